"""`uvit sample`: draw samples from a run or checkpoint (classes, prompts, guidance, DPM-Solver)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

from ..data.imagenet_classes import imagenet_class_id, imagenet_class_names
from ..errors import UvitError
from ..files import prepare_output, sha256_file
from ..choices import samplers_by_formulation
from .app import app, console, setup_logging
from .options import (IO, PERF, DeviceOption, NprocOption, PrecisionChoice, SamplerChoice, SetOption, VerboseOption,
                      WeightsChoice, WeightsOption, compile_option, forward_batch_option, parse_seeds,
                      precision_option, relaunch, sampling_overrides, value)
from .progress import Counter, progress_bar

log = logging.getLogger("uvit_cli.sample")

GRID_MAX = 256  # a grid shows at most this many samples; --out-dir / --npz take any number


# ---------------------------------------------------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------------------------------------------------

def _class_tokens(values: List[str]) -> list[str]:
    return [tok.strip() for v in values for tok in v.split(",") if tok.strip()]


def class_ids_for(values: List[str], seeds: list[int], num_classes: int) -> list[int]:
    """One class id per seed from --class values: ids, ImageNet names (cycled over the seeds), "random" (a class
    drawn from each seed, so it does not depend on the other seeds) or "balanced" (sample i gets class i mod K)."""
    tokens = _class_tokens(values)
    if not tokens:
        raise UvitError("--class is empty; pass class ids, names, 'random' or 'balanced'")
    if tokens in (["random"], ["balanced"]):
        if tokens[0] == "balanced":
            return [i % num_classes for i in range(len(seeds))]
        return [int(np.random.default_rng([s, 0xC1A55]).integers(num_classes)) for s in seeds]
    ids = []
    for tok in tokens:
        if tok in ("random", "balanced"):
            raise UvitError(f"--class {tok} cannot be mixed with other classes")
        if tok.lstrip("-").isdigit():
            k = int(tok)
            if not 0 <= k < num_classes:
                raise UvitError(f"class id {k} is out of range: this model has classes 0..{num_classes - 1}")
        elif num_classes == 1000:
            k = imagenet_class_id(tok)
        else:
            raise UvitError(f"--class {tok!r}: class names are ImageNet's; this model has {num_classes} classes, "
                            f"pass ids 0..{num_classes - 1}")
        ids.append(k)
    return [ids[i % len(ids)] for i in range(len(seeds))]


def read_prompts(prompts: Optional[List[str]], prompts_file: Optional[Path]) -> list[str]:
    """--prompt values, then the non-empty lines of --prompts-file."""
    from ..metrics.captions import read_prompts_file  # deferred: loads torch (cli/app.py)

    return list(prompts or []) + (read_prompts_file(prompts_file) if prompts_file is not None else [])


def _sha(values) -> str:
    return hashlib.sha256(json.dumps(list(values)).encode()).hexdigest()


def work_store(out: Optional[Path], out_dir: Optional[Path], npz: Optional[Path]) -> Path:
    """Where the chunks are kept while sampling: the --npz file, else a hidden file beside the grid / in the PNG
    folder (removed once the outputs are written)."""
    if npz is not None:
        return npz
    if out_dir is not None:
        return out_dir / ".uvit-samples.npz"
    grid = out or Path("grid.png")
    return grid.with_name(f".{grid.name}.samples.npz")


def _class_label(k: int, num_classes: int) -> str:
    if num_classes == 1000:
        return f"{k} {imagenet_class_names()[k]}"
    return f"class {k}"


# ---------------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------------

@app.command("sample")
def sample_cmd(
    target: str = typer.Argument(..., metavar="RUN_OR_CHECKPOINT", help="a run directory, a .safetensors "
                                 "checkpoint, or an official .pth (with --recipe)"),
    recipe_path: Optional[str] = typer.Option(None, "--recipe", "-r", help="recipe that describes the checkpoint's "
                                              "model (required for official .pth files)"),
    overrides: Optional[List[str]] = SetOption,
    weights: WeightsChoice = WeightsOption,
    classes: Optional[List[str]] = typer.Option(None, "--class", "-c", metavar="ID|NAME|random|balanced",
                                                help="class ids or ImageNet names (repeatable or comma-separated, "
                                                "cycled over the seeds), 'random' or 'balanced'",
                                                rich_help_panel="Conditions"),
    prompts: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="text prompt (repeatable, cycled over "
                                                "the seeds); \"\" is the unconditional prompt",
                                                rich_help_panel="Conditions"),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="a text file with one prompt per line",
                                                rich_help_panel="Conditions"),
    seeds_text: Optional[str] = typer.Option(None, "--seeds", metavar="0-63", help="seeds, one image each "
                                             "(ranges and lists: 0-63 or 1,5,7-9)", rich_help_panel="Seeds"),
    n: Optional[int] = typer.Option(None, "--n", min=1, help="number of images, seeds --seed.. (default 16)",
                                    rich_help_panel="Seeds"),
    seed: int = typer.Option(0, "--seed", min=0, help="first seed with --n", rich_help_panel="Seeds"),
    sampler: Optional[SamplerChoice] = typer.Option(None, "--sampler", help="sampler (default: the recipe's); "
                                                    f"by formulation: {samplers_by_formulation()}",
                                                    rich_help_panel="Sampler"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="sampler steps (default: the recipe's)",
                                        rich_help_panel="Sampler"),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale", min=0.0, help="guidance w, 1 = off (the "
                                              "official scale s is w = 1 + s); default: the recipe's",
                                              rich_help_panel="Sampler"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="samples per sampler batch "
                                             "(default: the recipe's); images do not depend on it",
                                             rich_help_panel=PERF),
    forward_batch: Optional[int] = forward_batch_option(),
    compile_: bool = compile_option(),
    device: str = DeviceOption,
    nproc_per_node: int = NprocOption,
    precision: PrecisionChoice = precision_option("autocast precision of the network"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="labelled grid PNG (default grid.png when neither "
                                       "--out-dir nor --npz is given)", rich_help_panel=IO),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="one PNG per sample, named by seed",
                                           rich_help_panel=IO),
    npz: Optional[Path] = typer.Option(None, "--npz", help="ADM .npz (uint8 NHWC arr_0, labels arr_1)",
                                       rich_help_panel=IO),
    vae: Optional[str] = typer.Option(None, "--vae", help="VAE hub id or local path for latent models (default: "
                                      "the recipe's data.vae)", rich_help_panel=IO),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="CLIP text encoder id or local path "
                                               "for text models (default: the recipe's data.text_encoder)",
                                               rich_help_panel=IO),
    allow_download: Optional[bool] = typer.Option(None, "--allow-download", help="let a missing VAE or text "
                                                   "encoder download from the hub (default: UVIT_ALLOW_DOWNLOAD)",
                                                   rich_help_panel=IO),
    verbose: bool = VerboseOption,
) -> None:
    """Draw samples from a run directory or checkpoint: a labelled grid, a PNG per seed, or an ADM .npz.

    Examples:
      uvit sample runs/00001-digits --class 0,1,2,3 --seeds 0-15
      uvit sample uvit_h2.safetensors --class "golden retriever" --class 88 --n 8 --cfg-scale 1.4 --out dogs.png
      uvit sample imagenet256_uvit_huge.pth --recipe imagenet256_uvit_h2 --class balanced --seeds 0-49999 --npz s.npz
      uvit sample runs/00003-coco --prompt "a red bus on a bridge" --n 4 --precision bf16
      uvit sample uvit_h2.safetensors --class balanced --seeds 0-49999 --npz s.npz --nproc-per-node 8

    The same seeds give the same bytes with any number of processes; an interrupted --npz or --out-dir job
    continues when the same command is run again.
    """
    from .. import build, distributed, runtime  # deferred: loads torch (cli/app.py)

    setup_logging(verbose)
    grid_path = out or (Path("grid.png") if out_dir is None and npz is None else None)
    if out is not None and out.suffix.lower() != ".png":   # the grid is always PNG bytes: say so, do not misname them
        fix = f"--npz {out}" if out.suffix.lower() == ".npz" else f"--out-dir {out}" if not out.suffix else \
            f"--out {out.with_suffix('.png')}"
        raise UvitError(f"--out {out}: --out writes the labelled grid as a PNG; use {fix}")
    for path, option, is_dir in ((grid_path, "--out", False), (out_dir, "--out-dir", True), (npz, "--npz", False)):
        if path is not None:   # before any work: an unwritable output must not cost the sampling
            prepare_output(path, option, directory=is_dir)
    precision = value(precision)
    if seeds_text and n is not None:
        raise UvitError("pass either --seeds or --n/--seed, not both")
    seeds = parse_seeds(seeds_text) if seeds_text else list(range(seed, seed + (n or 16)))
    if nproc_per_node > len(seeds):
        raise UvitError(f"--nproc-per-node {nproc_per_node} is more than the {len(seeds)} seeds: every process "
                        f"needs samples to draw; use at most {len(seeds)} processes")
    prompt_list = read_prompts(prompts, prompts_file)
    if nproc_per_node > 1:   # what every rank would refuse, said once by the launcher before any process starts
        runtime.resolve_device(device)
        build.model_recipe(target, recipe_path, [*(overrides or []), *sampling_overrides(sampler, steps, cfg_scale)],
                           value(weights))
    relaunch(nproc_per_node)
    dev = distributed.init(device)
    try:
        if distributed.world_size() > len(seeds):
            raise UvitError(f"{distributed.world_size()} processes for {len(seeds)} seeds: every process needs "
                            f"samples to draw; launch at most {len(seeds)}")
        runtime.setup_runtime(dev)
        _sample(target=target, recipe_path=recipe_path, overrides=overrides,
                weights=value(weights), classes=classes, prompt_list=prompt_list, seeds=seeds, sampler=sampler,
                steps=steps, cfg_scale=cfg_scale, batch_size=batch_size, forward_batch=forward_batch, dev=dev,
                precision=precision, out=out, out_dir=out_dir, npz=npz, vae=vae, text_encoder=text_encoder,
                allow_download=allow_download, compile_=compile_)
    finally:
        distributed.cleanup()


def _sample(*, target, recipe_path, overrides, weights, classes, prompt_list, seeds, sampler, steps,
            cfg_scale, batch_size, forward_batch, dev, precision, out, out_dir, npz, vae, text_encoder,
            allow_download, compile_) -> None:
    """Every rank: draw its share of the chunks; rank 0: write the grid, the PNGs of reused chunks, the summary."""
    import torch

    from .. import build, distributed, generate, outputs  # deferred: loads torch (cli/app.py)
    from ..metrics.model_eval import sampling_identity  # deferred: loads torch (cli/app.py)
    from ..metrics.parts import Tracker  # deferred: loads torch (cli/app.py)
    from ..metrics.sample_store import default_chunk, sample_to_npz  # deferred: loads torch (cli/app.py)
    from ..metrics.sources import NpzSource  # deferred: loads torch (cli/app.py)

    main = distributed.is_main()
    sets = [*(overrides or []), *sampling_overrides(sampler, steps, cfg_scale)]
    model, recipe, path = build.load_model(target, recipe_path, sets, weights)
    kind, w = recipe.conditioning, recipe.sample.cfg_scale
    if kind != "text" and prompt_list:
        fix = "class-conditional: pass --class ids or names" if kind == "class" else "unconditional: drop --prompt"
        raise UvitError(f"--prompt given, but this model is {fix}")
    if kind != "class" and classes:
        fix = "text-conditional: pass --prompt" if kind == "text" else "unconditional: drop --class"
        raise UvitError(f"--class given, but this model is {fix}")

    labels, captions, null_context, encoder = None, None, None, None
    cycle = 0                                     # a cycled list of K classes or prompts: one grid column each
    if kind == "class":
        if not classes and main:
            log.info("no --class given: drawing a random class for each seed")
        labels = class_ids_for(classes or ["random"], seeds, recipe.model.num_classes)
        captions = [_class_label(k, recipe.model.num_classes) for k in labels]
        tokens = _class_tokens(classes or [])
        if tokens and tokens[0] not in ("random", "balanced"):
            cycle = len(tokens)
        conditions = _sha(labels)
    elif kind == "text":
        if not prompt_list:
            raise UvitError("this model is text-conditional: pass --prompt TEXT or --prompts-file FILE")
        encoder = build.build_text_encoder(recipe, dev, text_encoder, allow_download, run_dir=target)
        captions = [prompt_list[i % len(prompt_list)] for i in range(len(seeds))]
        null_context = encoder.encode_fixed([""])[0].cpu() if w != 1.0 else None
        cycle = len(prompt_list)
        conditions = _sha(captions)
    else:
        captions = [f"seed {s}" for s in seeds]
        conditions = None
    decoder = build.build_decoder(recipe, dev, vae, allow_download)
    fb = int(forward_batch or generate.default_forward_batch(dev))
    net = torch.compile(model.to(dev)) if compile_ else model

    def cond(start: int, stop: int):
        if labels is not None:
            return torch.tensor(labels[start:stop], dtype=torch.long)
        if encoder is not None:                   # each chunk's prompts, encoded in fixed micro-batches
            unique = list(dict.fromkeys(captions[start:stop]))
            feats = encoder.encode_fixed(unique).float().cpu()
            index = {p: i for i, p in enumerate(unique)}
            return feats[[index[p] for p in captions[start:stop]]]
        return None

    tracker = None

    def make(start: int, stop: int):
        images = generate.generate(net, recipe, seeds[start:stop], cond(start, stop), batch_size=batch_size,
                                   device=dev, precision=precision, decoder=decoder, null_context=null_context,
                                   forward_batch=fb,
                                   progress=lambda done, total: tracker.inflight(start, done / total))
        images = images.numpy()
        if out_dir is not None:                   # PNGs first: a finished chunk implies its PNGs
            outputs.save_pngs(images, out_dir, seeds[start:stop])
        return images, None if labels is None else labels[start:stop]

    meta = {"command": "uvit sample", "checkpoint_sha256": sha256_file(path) if main else "",
            "sampling_recipe_sha256": sampling_identity(recipe), "seeds_sha256": _sha(seeds),
            "conditions_sha256": conditions, "precision": precision, "forward_batch": fb, "device_type": dev.type,
            "compile": compile_, "vae": getattr(decoder, "name", None), "vae_sha256": getattr(decoder, "sha256", None),
            "text_encoder_sha256": getattr(encoder, "sha256", None)}
    store = work_store(out, out_dir, npz)
    s = recipe.sample
    world = distributed.world_size()
    if main:
        console.print(f"sampling {len(seeds)} images from {path} · {s.sampler} {s.steps} steps "
                      f"({build.nfe_per_sample(recipe)} NFE/image) · guidance w={w:g} · {dev} {precision}"
                      + (f" · {world} processes" if world > 1 else ""), highlight=False)
    chunk = default_chunk(len(seeds))
    if world > math.ceil(len(seeds) / chunk) and main:
        log.warning("%d processes but only %d chunks of %d samples: %d processes have nothing to draw", world,
                    math.ceil(len(seeds) / chunk), chunk, world - math.ceil(len(seeds) / chunk))
    t0 = time.perf_counter()
    with progress_bar(disable=not main) as bar:
        tracker = Tracker(Counter(bar, "sample"))
        store, made = sample_to_npz(store, len(seeds), make, meta=meta, chunk=chunk, tracker=tracker,
                                    all_ranks=True, replace=True)
    seconds = time.perf_counter() - t0
    if not main:
        return

    channels = 3 if recipe.is_latent else recipe.model.in_chans
    samples = NpzSource(store, channels=channels)
    written = []
    if out is not None or (out_dir is None and npz is None):
        grid_path = out or Path("grid.png")
        if len(seeds) > GRID_MAX:
            log.warning("the grid shows the first %d of %d samples; use --out-dir or --npz for all", GRID_MAX,
                        len(seeds))
        first = next(samples.batches(GRID_MAX))
        cols = cycle if 2 <= cycle <= 16 and len(seeds) > cycle else None
        outputs.save_grid(first, grid_path, captions[:GRID_MAX], ncols=cols)
        written.append(f"grid {grid_path}")
    if out_dir is not None:                       # chunks kept from an earlier run: their PNGs from the file
        for start in sorted(set(range(0, len(seeds), chunk)) - set(made)):
            stop = min(start + chunk, len(seeds))
            outputs.save_pngs(next(samples.batches(stop - start, stop, start)), out_dir, seeds[start:stop])
        written.append(f"{len(seeds)} PNGs in {out_dir}")
    if npz is not None:
        shape = (len(seeds), *samples.shape)
        written.append(f"{npz} (arr_0 {shape}" + (", arr_1 labels)" if labels is not None else ")"))
    else:
        store.unlink(missing_ok=True)
    drawn = sum(min(chunk, len(seeds) - c) for c in made)
    rate = f"{drawn / seconds:.2f} images/s" if drawn else "reused the finished samples"
    console.print(f"wrote {'; '.join(written)} · {seconds:.1f}s, {rate}", highlight=False)
