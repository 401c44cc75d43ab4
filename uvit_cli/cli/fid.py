"""`uvit fid` and `uvit fid-stats`: score samples (FID, sFID, IS, precision, recall) and build reference statistics."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..errors import UvitError
from ..files import prepare_output, sha256_file, write_json
from ..recipe import parse_sweep, sweep_override
from ..run import latest_run
from .app import app, console, setup_logging
from .options import (DeviceOption, NprocOption, PrecisionChoice, SetOption, VerboseOption, WeightsChoice,
                      WeightsOption, compile_option, forward_batch_option, precision_option, relaunch, value)
from .progress import Counter, Stages, progress_bar

MODE_HELP = ("feature pipeline: pytorch_fid (U-ViT's published numbers), clean (clean-fid), legacy_tensorflow "
             "(ADM / TF1 resize) or digits (built-in 8x8 digits; not comparable to Inception FID); default: the "
             "recipe's eval.mode, digits for 8x8 gray images, else pytorch_fid")
SAMPLING = "Sampling (runs and checkpoints)"


def _auto_mode(samples: Path) -> str:
    """digits for 8x8 single-channel images, else pytorch_fid."""
    from ..metrics import sources  # deferred: loads torch (cli/app.py)

    try:
        src = sources.open_source(samples, channels=1)
        if tuple(src.shape[:2]) == (8, 8):
            return "digits"
    except UvitError:
        pass
    return "pytorch_fid"


def _print(result, title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result.metrics.items():
        table.add_row(k, f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}")
    console.print(table)
    card = Table(title="protocol", show_header=False)
    for k, v in result.protocol.items():
        card.add_row(k, str(v))
    console.print(card)


@app.command("fid")
def fid_cmd(
    samples: Optional[Path] = typer.Argument(None, help="image folder, ADM-style .npz (uint8 NHWC arr_0), run "
                                             "directory or checkpoint; default: the latest run in ./runs"),
    ref: Optional[str] = typer.Option(None, "--ref", help="reference: image folder, ADM reference batch, fid_stats "
                                      ".npz or `uvit fid-stats` output; default: the recipe's eval.ref"),
    metrics: Optional[str] = typer.Option(None, "--metrics", help="comma list of fid,sfid,is,precision,recall,kid "
                                          "(or all); default: the recipe's eval.metrics, else fid"),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", min=1, help="score the first N images "
                                              "(runs: sample N; default eval.num_samples)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="images per Inception batch "
                                             "(default: eval.batch_size, 50)", rich_help_panel="Performance"),
    device: str = DeviceOption,
    mode: Optional[str] = typer.Option(None, "--mode", help=MODE_HELP),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="pt_inception-2015-12-05-"
                                                     "6726825d.pth (default: $UVIT_INCEPTION_WEIGHTS, torch hub cache)"),
    exact: bool = typer.Option(False, "--exact", help="unfused Inception, bit-identical to pytorch-fid "
                               "(slower on CPU; the default folds BatchNorm, features within ~1e-6)",
                               rich_help_panel="Performance"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write metrics + protocol card as JSON"),
    recipe_path: Optional[str] = typer.Option(None, "--recipe", "-r", help="recipe for an official .pth checkpoint",
                                              rich_help_panel=SAMPLING),
    overrides: Optional[List[str]] = SetOption,
    weights: WeightsChoice = WeightsOption,
    seed: int = typer.Option(0, "--seed", min=0, help="sample i uses seed + i", rich_help_panel=SAMPLING),
    samples_out: Optional[Path] = typer.Option(None, "--samples-out", help="resumable .npz for the samples "
                                               "(default: RUN/eval/samples_<recipe>_<N>_<protocol>.npz)",
                                               rich_help_panel=SAMPLING),
    precision: PrecisionChoice = precision_option("sampling precision (autocast)", SAMPLING),
    sample_batch_size: Optional[int] = typer.Option(None, "--sample-batch-size", min=1, help="samples per sampler "
                                                    "batch (default: sample.batch_size)", rich_help_panel=SAMPLING),
    forward_batch: Optional[int] = forward_batch_option(SAMPLING),
    compile_: bool = compile_option(SAMPLING),
    captions: Optional[Path] = typer.Option(None, "--captions", help="text models: the encoded val cache "
                                            "(`uvit encode-latents coco --split val`) whose captions are drawn "
                                            "with the MS-COCO protocol; default: eval.captions",
                                            rich_help_panel=SAMPLING),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="text models: prompts, one per line, "
                                                "used in order (sample i gets prompt i mod P)",
                                                rich_help_panel=SAMPLING),
    sweep: Optional[str] = typer.Option(None, "--sweep", metavar="sample.KEY=V1,V2,...", help="score a run at "
                                        "several values of one sampling setting, e.g. sample.cfg_scale=1,1.5,2,3, "
                                        "sample.steps=10,25,50 or sample.guidance_interval=[0,1],[0.2,0.8]: one kept "
                                        ".npz per value, a table, the JSON (--json) and a figure",
                                        rich_help_panel=SAMPLING),
    nproc_per_node: int = NprocOption,
    verbose: bool = VerboseOption,
) -> None:
    """Score samples: FID, sFID, IS, precision and recall (or the digits metric), with a protocol card.

    A run directory or checkpoint is first sampled with the recipe's evaluation protocol (EMA, guidance w,
    sampler, balanced classes, per-sample seeds) into a resumable .npz that is kept, then scored.

    Examples:
      uvit fid samples.npz --ref VIRTUAL_imagenet256_labeled.npz --metrics all --mode legacy_tensorflow
      uvit fid samples/ --ref fid_stats_cifar10_train_pytorch.npz --json fid.json
      uvit fid runs/00000-digits-U-ViT-Tiny2 --num-samples 1000
      uvit fid runs/00003-imagenet256_uvit_h2-U-ViT-H2 --nproc-per-node 8    (or: torchrun --nproc-per-node 8 -m uvit_cli fid RUN)
      uvit fid runs/00004-coco_uvit_s --captions data/coco256_latents_val     (text models: the MS-COCO protocol)
      uvit fid runs/00000-digits --sweep sample.cfg_scale=1,1.5,2,3 --json cfg.json   (and cfg.png: one curve per metric)

    Many processes draw the same samples and give the same numbers as one; an interrupted job continues when the
    same command is run again (with any number of processes).
    """
    if captions is not None and prompts_file is not None:
        raise UvitError("pass --captions (an encoded val cache) or --prompts-file, not both")
    swept = parse_sweep(sweep) if sweep is not None else None
    if swept is not None and samples_out is not None:
        raise UvitError("--samples-out names one file, and a sweep samples once per value; leave it out (each value "
                        "keeps its own RUN/eval/samples_*.npz)")
    if num_samples is not None and nproc_per_node > num_samples:
        raise UvitError(f"--nproc-per-node {nproc_per_node} is more than the {num_samples} samples; use at most "
                        f"{num_samples} processes")
    for path, option in ((json_out, "--json"), (samples_out, "--samples-out")):
        if path is not None:   # before any work: an unwritable output must not cost the scoring
            prepare_output(path, option)
    if nproc_per_node > 1:   # what every rank would refuse, said once by the launcher before any process starts
        _check_before_launch(samples, device, recipe_path, overrides, value(weights), swept)
    relaunch(nproc_per_node)
    from .. import distributed  # deferred: loads torch (cli/app.py)

    setup_logging(verbose)
    dev = distributed.init(device)
    try:
        _fid(samples, ref, metrics, num_samples, batch_size, dev, mode, inception_weights, exact, json_out,
             recipe_path, overrides, value(weights), seed, samples_out, value(precision), sample_batch_size,
             forward_batch, compile_, captions, prompts_file, swept)
    finally:
        distributed.cleanup()


def _check_before_launch(samples: Optional[Path], device: str, recipe_path, overrides, weights: str,
                         swept) -> None:
    """The device, the samples path and a model target's recipe (not its weights), at every swept value."""
    from .. import build, runtime  # deferred: loads torch (cli/app.py)

    runtime.resolve_device(device)
    if samples is not None and not samples.exists():
        raise UvitError(f"{samples} does not exist")
    if samples is not None and build.is_model_target(samples):
        _check_recipes(samples, recipe_path, overrides, weights, swept)


def _sweep_overrides(overrides, swept) -> list[list[str]]:
    """The --set list of each scoring: one, or one per swept value (the swept value last, so it wins)."""
    base = list(overrides or [])
    return [base] if swept is None else [[*base, sweep_override(swept[0], v)] for v in swept[1]]


def _check_recipes(target: Path, recipe_path, overrides, weights: str, swept) -> None:
    """Every value's recipe is valid before any sampling, so a bad value cannot cost the good ones' work."""
    from .. import build  # deferred: loads torch (cli/app.py)

    for sets in _sweep_overrides(overrides, swept):
        build.model_recipe(target, recipe_path, sets, weights)


def _fid(samples, ref, metrics, num_samples, batch_size, dev, mode, inception_weights, exact, json_out, recipe_path,
         overrides, weights, seed, samples_out, precision, sample_batch_size, forward_batch, compile_, captions,
         prompts_file, swept=None) -> None:
    """Every rank: sample its share (runs), compute its share of the features; rank 0 scores and prints. With a
    sweep, the same once per swept value, then one table, JSON and figure."""
    from .. import build, distributed, runtime  # deferred: loads torch (cli/app.py)

    runtime.setup_runtime(dev)
    main = distributed.is_main()
    if samples is None:
        samples = latest_run("runs")
        if samples is None:
            raise UvitError("no SAMPLES given and no run in ./runs; pass an image folder, an .npz, a run directory "
                            "or a checkpoint")
        if main:
            console.print(f"scoring the latest run: {samples}")
    is_model = build.is_model_target(samples)
    if not is_model and not samples.exists():
        raise UvitError(f"{samples} does not exist")
    if swept is not None and not is_model:
        raise UvitError(f"--sweep samples a run directory or checkpoint once per value; {samples} holds images "
                        "already (pass a run, or score each sample set on its own)")
    if is_model and swept is not None:   # one scoring's recipe is checked as its model loads
        _check_recipes(samples, recipe_path, overrides, weights, swept)
    results = []
    for sets in _sweep_overrides(overrides, swept):
        if swept is not None and main:
            console.rule(f"{sets[-1]}")
        scored, recipe, card = samples, None, {}
        if is_model:
            scored, recipe, card = _sample_run(samples, recipe_path, sets, weights, seed, samples_out, precision,
                                               sample_batch_size, num_samples, dev, forward_batch, compile_,
                                               captions, prompts_file)
        result = _score(scored, recipe, card, ref, metrics, num_samples, batch_size, dev, mode, inception_weights,
                        exact)
        if main:
            _print(result, f"{scored}")
            results.append(result.to_dict())
    if not main:
        return
    if swept is None:
        if json_out:
            write_json(json_out, results[0], indent=2)
            console.print(f"wrote {json_out}")
        return
    _report_sweep(swept, results, samples, json_out)


def _score(samples: Path, recipe, card: dict, ref, metrics, num_samples, batch_size, dev, mode, inception_weights,
           exact):
    """Features and metrics of one sample set (every rank its share of the features); the result on rank 0."""
    from .. import distributed  # deferred: loads torch (cli/app.py)
    from ..metrics.evaluate import evaluate  # deferred: loads torch (cli/app.py)

    ev = recipe.eval if recipe is not None else None
    mode = mode or (ev.mode if ev is not None else _auto_mode(samples))
    with progress_bar(disable=not distributed.is_main()) as bar:
        return evaluate(samples, ref or (ev.ref if ev is not None else None) or None,
                        metrics=metrics or (ev.metrics if ev is not None else None), mode=mode,
                        num_samples=num_samples, batch_size=batch_size or (ev.batch_size if ev else 50),
                        device=dev, inception_weights=inception_weights, exact=exact, protocol=card,
                        progress=Stages(bar), shards_dir=samples.with_name(samples.name + ".features")
                        if distributed.world_size() > 1 else None)


def _report_sweep(swept, results: list[dict], target: Path, json_out: Optional[Path]) -> None:
    """The sweep's table (the best value of each metric in bold), its JSON and its figure."""
    from ..metrics import sweep as sw  # deferred: loads matplotlib

    key, values = swept
    names = list(results[0]["metrics"])
    best = sw.best_values(key, values, results)
    table = Table(title=f"{target}: {key}")
    table.add_column(key)
    for name in names:
        table.add_column(f"{name} ({'lower' if name in sw.LOWER_IS_BETTER else 'higher'} is better)",
                         justify="right")
    table.add_column("NFE", justify="right")
    for v, r in zip(values, results):
        cells = []
        for name in names:
            x = r["metrics"][name]
            text = f"{x:.4f}" if abs(x) < 1e4 else f"{x:.4g}"
            cells.append(f"[bold]{text}[/]" if best.get(name) == v else text)
        table.add_row(sw.value_label(v), *cells, str(r["protocol"].get("nfe", "")))
    console.print(table)
    figure = (json_out.with_suffix(".png") if json_out else
              (target if target.is_dir() else target.parent) / "eval" / f"sweep_{key.split('.', 1)[1]}.png")
    sw.plot_sweep(key, values, results, figure, title=f"{target.name}: {results[0]['protocol'].get('count', '')} "
                                                      "samples per value")
    if json_out:
        write_json(json_out, sw.sweep_document(key, values, results), indent=2)
        console.print(f"wrote {json_out}")
    console.print(f"wrote {figure}")


def _sample_run(target: Path, recipe_path, overrides, weights, seed, samples_out, precision, batch_size,
                num_samples, device, forward_batch, compile_, captions, prompts_file):
    """Sample a run / checkpoint with the recipe's protocol into a kept, resumable .npz (every rank its share of
    the chunks); returns (npz, recipe, card)."""
    import torch

    from .. import build, distributed, generate  # deferred: loads torch (cli/app.py)
    from ..metrics import model_eval  # deferred: loads torch (cli/app.py)

    main = distributed.is_main()
    model, recipe, path = build.load_model(target, recipe_path, overrides, weights=weights)
    n = num_samples or recipe.eval.num_samples
    if distributed.world_size() > n:
        raise UvitError(f"{distributed.world_size()} processes for {n} samples; launch at most {n}")
    text = None
    if recipe.conditioning == "text":
        text = model_eval.open_captions(recipe, n, seed, captions=captions, prompts_file=prompts_file,
                                        device=device, run_dir=target)
    elif captions is not None or prompts_file is not None:
        raise UvitError(f"--captions / --prompts-file are for text models; this model is {recipe.conditioning}-"
                        "conditional")
    conditions = model_eval.eval_conditions(recipe, n, seed, captions=text)
    fb = int(forward_batch or generate.default_forward_batch(device))
    sha = distributed.broadcast_object(sha256_file(path) if main else None)   # one hash, read once
    card = model_eval.sampling_card(recipe, num_samples=n, seed=seed, weights=weights, checkpoint=str(path),
                                    checkpoint_sha256=sha, precision=precision, conditions=conditions,
                                    forward_batch=fb, device_type=torch.device(device).type, compiled=compile_)
    meta = {**card, "sampling_recipe_sha256": model_eval.sampling_identity(recipe)}
    meta.pop("checkpoint", None)  # the hash identifies the weights; the path may move
    for key in ("nfe_guided", "forward_cost"):  # derived from the sampling recipe, which the identity covers
        meta.pop(key, None)
    out = samples_out or model_eval.samples_path(target, recipe, n, meta)
    if main:
        console.print(f"sampling {n} images into {out} (resumable; kept after scoring)"
                      + (f" · {distributed.world_size()} processes" if distributed.world_size() > 1 else ""))
    net = model.to(device)
    if compile_:
        net = torch.compile(net)
    with progress_bar(disable=not main) as bar:
        model_eval.sample_for_eval(net, recipe, out, n, meta=meta, seed=seed, device=device, precision=precision,
                                   batch_size=batch_size or recipe.sample.batch_size, conditions=conditions,
                                   forward_batch=fb, all_ranks=True, progress=Counter(bar, "sampling"))
    card["samples_file"] = str(out)
    return out, recipe, card


@app.command("fid-stats")
def fid_stats_cmd(
    source: Path = typer.Argument(..., help="image folder or .npz (uint8 NHWC arr_0) to summarise"),
    out: Path = typer.Option(..., "--out", "-o", help="output .npz (mu, sigma, mu_s, sigma_s, uvit_meta)"),
    mode: Optional[str] = typer.Option(None, "--mode", help=MODE_HELP),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", "-n", min=2, help="use the first N images"),
    features: bool = typer.Option(False, "--features/--no-features", help="also store per-image pool features "
                                  "(needed for precision/recall against these statistics)"),
    batch_size: int = typer.Option(50, "--batch-size", min=1, help="images per Inception batch",
                                   rich_help_panel="Performance"),
    device: str = DeviceOption,
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="pt_inception-2015-12-05-"
                                                     "6726825d.pth (default: $UVIT_INCEPTION_WEIGHTS, torch hub cache)"),
    exact: bool = typer.Option(False, "--exact", help="unfused Inception (bit-identical to pytorch-fid)",
                               rich_help_panel="Performance"),
    verbose: bool = VerboseOption,
) -> None:
    """Build reference statistics for your own images (FID and sFID; optionally features for precision/recall).

    Examples:
      uvit fid-stats data/celeba64_train/ --out assets/fid_stats/my_celeba64.npz
      uvit fid-stats VIRTUAL_imagenet64_labeled.npz --out in64_pfid.npz --features
    """
    from .. import runtime  # deferred: loads torch (cli/app.py)
    from ..metrics.evaluate import build_reference_stats  # deferred: loads torch (cli/app.py)

    setup_logging(verbose)
    if out.suffix != ".npz":
        raise UvitError(f"--out {out}: statistics are written as .npz")
    prepare_output(out, "--out")
    if not source.exists():
        raise UvitError(f"{source} does not exist")
    mode = mode or _auto_mode(source)
    with progress_bar() as bar:
        task = bar.add_task("features", total=None)
        card = build_reference_stats(source, out, mode=mode, num_samples=num_samples, batch_size=batch_size,
                                     device=runtime.resolve_device(device), inception_weights=inception_weights,
                                     exact=exact, keep_features=features,
                                     progress=lambda done, total: bar.update(task, completed=done, total=total))
    table = Table(title=f"wrote {out}", show_header=False)
    for k, v in card.items():
        table.add_row(k, str(v))
    console.print(table)
