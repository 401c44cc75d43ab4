"""torchrun / DDP helpers: one process looks like world size 1, so single- and multi-process share one path.

The device comes from LOCAL_RANK (not the global rank, which breaks multi-node: DiT #79); data is sharded and
seeded by the global rank; NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys

import torch
import torch.distributed as dist

from .errors import UvitError
from .runtime import resolve_device

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: str | torch.device = "auto", timeout_minutes: float = 30.0) -> torch.device:
    """Start the process group when launched by torchrun and return this process's device (CUDA devices take
    LOCAL_RANK). ``timeout_minutes`` bounds every collective: a dead rank is an error, not a hang."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if is_distributed() and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=dev if dev.type == "cuda" else None)
        log.info("process group: %s, rank %d of %d, device %s", backend, rank(), world_size(), dev)
    return dev


def barrier(what: str = "") -> None:
    """Wait for every rank. With ``what`` (the job, e.g. "sampling"), a rank that died or hung past the
    process-group timeout is a UvitError saying so, not a traceback from the backend."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if not what:
        dist.barrier()
        return
    try:
        dist.barrier()
    except (RuntimeError, dist.DistBackendError) as e:
        raise UvitError(f"{what}: another process did not arrive within the process-group timeout or failed "
                        f"({str(e).splitlines()[0][:200]}); see its log, then rerun the same command: finished work "
                        "is kept") from None


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (for logging the loss; gradients are averaged by DDP)."""
    if world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world_size()
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when the flag is set on any rank (so all ranks stop at the same step)."""
    if world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj):
    """Rank 0's value of a picklable object on every rank (used for small control values only)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share(items: list) -> tuple[list, list]:
    """(rank 0's ``items`` on every rank, this rank's share ``items[rank::world]``): work items listed once,
    handed out round-robin so a resume with another world size is as balanced as a fresh start."""
    items = list(broadcast_object(items))
    return items, items[rank()::world_size()]


def first_error(fn):
    """Run ``fn`` on rank 0 and hand its value, or its UvitError, to every rank (a clear error on all ranks
    instead of one failing while the others wait)."""
    out = None
    if is_main():
        try:
            out = ("ok", fn())
        except UvitError as e:
            out = ("error", str(e))
    status, value = broadcast_object(out)
    if status == "error":
        raise UvitError(value)
    return value


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(nproc: int, args: list[str], nnodes: int = 1, node_rank: int = 0,
                     master_addr: str | None = None, master_port: int = 29500) -> list[str]:
    """The torchrun argv (through cli/torchrun.py) that re-runs ``uvit ARGS`` with ``nproc`` processes on each of ``nnodes`` nodes: one node is
    ``--standalone``; several use a static rendezvous at ``master_addr:master_port`` with this node's rank."""
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise UvitError(f"--node-rank {node_rank} is not a node of --nnodes {nnodes}; node ranks are 0..{nnodes - 1}")
    if nnodes > 1 and not master_addr:
        raise UvitError(f"--nnodes {nnodes} needs --master-addr HOST: the address of node 0, which every node can "
                        "reach (under SLURM: the first host of $SLURM_JOB_NODELIST)")
    cmd = [sys.executable, "-m", "uvit_cli.cli.torchrun"]   # torchrun's arguments, without its failure traceback
    cmd += ["--nproc-per-node", str(nproc), "--nnodes", str(nnodes)]
    if nnodes == 1:
        cmd += ["--standalone"]
    else:
        cmd += ["--node-rank", str(node_rank), "--master-addr", str(master_addr), "--master-port", str(master_port)]
    return [*cmd, "-m", "uvit_cli", *args]


def launch_torchrun(nproc: int, args: list[str], nnodes: int = 1, node_rank: int = 0,
                    master_addr: str | None = None, master_port: int = 29500) -> int:
    """Re-run this command under torchrun (see :func:`torchrun_command`); returns torchrun's exit status."""
    cmd = torchrun_command(nproc, args, nnodes, node_rank, master_addr, master_port)
    log.info("launching: %s", " ".join(cmd))
    return subprocess.call(cmd)
