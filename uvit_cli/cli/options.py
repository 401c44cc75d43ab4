"""Options and argument parsing shared by the commands: one definition of --device, --precision, --set, -v, and
the enums of every choice, derived from the recipe's types (uvit_cli/choices.py)."""

from __future__ import annotations

import enum
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer

from ..errors import Interrupted, UvitError
from ..files import write_json
from ..choices import Precision, Sampler, Weights, choices

PERF, IO = "Performance", "I/O"


def choice_enum(name: str, kind) -> type[enum.Enum]:
    """A str Enum of a recipe Literal's values (typer shows them as the option's choices)."""
    return enum.Enum(name, {v: v for v in choices(kind)}, type=str)


PrecisionChoice = choice_enum("PrecisionChoice", Precision)
SamplerChoice = choice_enum("SamplerChoice", Sampler)
WeightsChoice = choice_enum("WeightsChoice", Weights)

SetOption = typer.Option(None, "--set", metavar="SECTION.KEY=VALUE",
                         help="override a recipe field, e.g. --set train.lr=1e-4 (repeatable)")
DeviceOption = typer.Option("auto", "--device", help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N "
                            "or mps; under torchrun CUDA devices come from LOCAL_RANK", rich_help_panel=PERF)
VerboseOption = typer.Option(False, "--verbose", "-v", help="debug logging")
NprocOption = typer.Option(1, "--nproc-per-node", min=1, help="launch this many processes with torchrun (NCCL on "
                           "GPUs, gloo on CPU)", rich_help_panel=PERF)
NnodesOption = typer.Option(1, "--nnodes", min=1, help="nodes in the job (torchrun --nnodes); with more than one, "
                            "run the same command on every node with its --node-rank", rich_help_panel=PERF)
NodeRankOption = typer.Option(0, "--node-rank", min=0, help="this node's rank, 0..nnodes-1 (SLURM: $SLURM_NODEID)",
                              rich_help_panel=PERF)
MasterAddrOption = typer.Option(None, "--master-addr", help="address of node 0, reachable from every node (SLURM: the "
                                "first host of $SLURM_JOB_NODELIST)", rich_help_panel=PERF)
MasterPortOption = typer.Option(29500, "--master-port", help="a free TCP port on node 0 for the rendezvous",
                                rich_help_panel=PERF)
LAUNCH_OPTIONS = ("--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port")  # not passed on
WeightsOption = typer.Option(WeightsChoice.ema, "--weights", help="which weights of a run directory: ema (the "
                             "paper protocol) or raw")


def forward_batch_option(panel: str = PERF):
    return typer.Option(None, "--forward-batch", min=1, help="samples per network forward (default: "
                        "generate.DEFAULT_FORWARD_BATCH of the device type); images depend on it in the last bits",
                        rich_help_panel=panel)


def compile_option(panel: str = PERF):
    return typer.Option(False, "--compile/--no-compile", help="torch.compile the network for sampling (images "
                        "differ from eager ones in the last bits; BENCHMARKS.md)", rich_help_panel=panel)


def precision_option(help: str, panel: str = PERF):
    return typer.Option(PrecisionChoice.fp32, "--precision", help=help, rich_help_panel=panel)


def value(x):
    """An enum option's string value (or the value itself)."""
    return x.value if isinstance(x, enum.Enum) else x


def sampling_overrides(sampler: Optional[str] = None, steps: Optional[int] = None,
                       cfg_scale: Optional[float] = None) -> list[str]:
    """--sampler / --steps / --cfg-scale as recipe overrides: the recipe is the one place they are checked."""
    out = []
    if sampler is not None:
        out.append(f"sample.sampler={value(sampler)}")
    if steps is not None:
        out.append(f"sample.steps={steps}")
    if cfg_scale is not None:
        out.append(f"sample.cfg_scale={cfg_scale}")
    return out


def parse_seeds(text: Optional[str]) -> list[int]:
    """"0-63" or "1,5,7-9" -> a list of ints."""
    if not text:
        return []
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise UvitError(f"--seeds {text!r}: expected ranges like 0-63 or lists like 1,5,7-9") from None
    return out


def parse_list(text: str, option: str, kind=int) -> list:
    """"8,32,128" -> [8, 32, 128]; a bad item is a UvitError naming the option."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        try:
            out.append(kind(item))
        except ValueError:
            raise UvitError(f"{option} {text!r}: {item!r} is not {'an integer' if kind is int else 'a number'}; "
                            f"pass a comma list such as {option} 8,32") from None
    return out


def strip_option(args: list[str], name: str, takes_value: bool = True) -> list[str]:
    """argv without ``name`` (and its value): the launcher re-runs the command under torchrun without it."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == name:
            skip = takes_value
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return out


def command_args() -> list[str]:
    """The arguments of the running `uvit` command (what main() was given), for re-running it under torchrun."""
    import click

    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return list(obj["argv"]) if isinstance(obj, dict) and "argv" in obj else sys.argv[1:]


def in_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ


def relaunch(nproc: int, extra: list[str] | None = None, *, nnodes: int = 1, node_rank: int = 0,
             master_addr: str | None = None, master_port: int = 29500) -> None:
    """With ``--nproc-per-node N`` > 1 (or several nodes) outside torchrun: re-run this command under torchrun (and
    ``extra`` arguments) and exit with its status; a failed rank is named with the way to resume."""
    if (nproc <= 1 and nnodes <= 1) or in_torchrun():
        return
    from .. import distributed  # deferred: loads torch (cli/app.py)

    args = command_args()
    for name in LAUNCH_OPTIONS:
        args = strip_option(args, name)
    old = os.environ.get(RANK_ERRORS_ENV)
    with tempfile.TemporaryDirectory(prefix="uvit-rank-errors-") as errors:
        os.environ[RANK_ERRORS_ENV] = errors      # the ranks inherit it (cli/__init__.py: main)
        try:
            code = distributed.launch_torchrun(nproc, args + list(extra or []), nnodes, node_rank, master_addr,
                                               master_port)
        finally:
            if old is None:
                os.environ.pop(RANK_ERRORS_ENV, None)
            else:
                os.environ[RANK_ERRORS_ENV] = old
        reports = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in Path(errors).glob("rank-*.json")}
        exits = json.loads((Path(errors) / EXITS).read_text()) if (Path(errors) / EXITS).is_file() else {}
    if not code:
        raise typer.Exit(0)
    errors_ = [r for r in sorted(reports) if not reports[r]["interrupted"]]
    if errors_:                        # a clear error: rank 0's (else the lowest rank's), once
        raise UvitError(reports[errors_[0]]["message"])
    died = sorted(int(r) for r, c in exits.items() if int(r) not in reports and c != Interrupted.exit_code)
    if not died and reports:           # stopped by a signal: what rank 0 kept, and how to continue
        first = reports[min(reports)]
        raise Interrupted(first["message"], same_command=first["same_command"])
    how = ", ".join(f"rank {r}: {_ending(exits[str(r)])}" for r in died) or f"torchrun exit status {code}"
    raise UvitError(f"a process of the {nproc}-process job failed ({how}; its output is above); finished work is "
                    "kept: rerun the same command to continue")


def _ending(exitcode: int) -> str:
    """How a process ended, from its exit code (negative: the signal that killed it)."""
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit status {exitcode}"


RANK_ERRORS_ENV = "UVIT_RANK_ERRORS"   # the folder where the ranks of a --nproc-per-node job record their errors
EXITS = "exits.json"                   # ... and where cli/torchrun.py records how each failed rank ended


def record_rank_error(folder: str, error: UvitError) -> None:
    """A rank's UvitError, written for the launcher (its rank in the name), so the user reads it once."""
    rank = int(os.environ.get("RANK", "0"))
    write_json(Path(folder) / f"rank-{rank}.json", {"message": str(error),
                                                    "interrupted": isinstance(error, Interrupted),
                                                    "same_command": getattr(error, "same_command", False)})


def existing_path(path: Optional[Path], option: str) -> Optional[Path]:
    if path is not None and not path.exists():
        raise UvitError(f"{option} {path} does not exist")
    return path
