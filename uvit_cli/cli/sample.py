"""`uvit sample`: draw samples from a run or checkpoint (classes, prompts, guidance, DPM-Solver)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

from ..data.imagenet_classes import imagenet_class_id, imagenet_class_names
from ..errors import UvitError
from ..recipe import samplers_by_formulation
from .app import app, console, setup_logging
from .options import (IO, PERF, DeviceOption, PrecisionChoice, SamplerChoice, SetOption, VerboseOption,
                      WeightsChoice, WeightsOption, parse_seeds, precision_option, sampling_overrides, value)
from .progress import progress_bar

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
    out = list(prompts or [])
    if prompts_file is not None:
        if not prompts_file.exists():
            raise UvitError(f"--prompts-file {prompts_file} does not exist")
        out += [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


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
    forward_batch: Optional[int] = typer.Option(None, "--forward-batch", min=1, help="samples per network forward "
                                                "(default 4 on CPU, 32 on GPU); images depend on it in the last bits",
                                                rich_help_panel=PERF),
    device: str = DeviceOption,
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
    """
    import torch

    from .. import build, generate, outputs, runtime  # deferred: loads torch (cli/app.py)

    setup_logging(verbose)
    precision = value(precision)
    if seeds_text and n is not None:
        raise UvitError("pass either --seeds or --n/--seed, not both")
    seeds = parse_seeds(seeds_text) if seeds_text else list(range(seed, seed + (n or 16)))
    prompt_list = read_prompts(prompts, prompts_file)
    dev = runtime.resolve_device(device)
    runtime.setup_runtime(dev)

    sets = [*(overrides or []), *sampling_overrides(sampler, steps, cfg_scale)]
    model, recipe, path = build.load_model(target, recipe_path, sets, value(weights))
    kind, w = recipe.conditioning, recipe.sample.cfg_scale
    if kind != "text" and prompt_list:
        fix = "class-conditional: pass --class ids or names" if kind == "class" else "unconditional: drop --prompt"
        raise UvitError(f"--prompt given, but this model is {fix}")
    if kind != "class" and classes:
        fix = "text-conditional: pass --prompt" if kind == "text" else "unconditional: drop --class"
        raise UvitError(f"--class given, but this model is {fix}")

    cond, labels, captions, null_context = None, None, None, None
    cycle = 0                                     # a cycled list of K classes or prompts: one grid column each
    if kind == "class":
        if not classes:
            log.info("no --class given: drawing a random class for each seed")
        ids = class_ids_for(classes or ["random"], seeds, recipe.model.num_classes)
        cond, labels = torch.tensor(ids, dtype=torch.long), ids
        captions = [_class_label(k, recipe.model.num_classes) for k in ids]
        tokens = _class_tokens(classes or [])
        if tokens and tokens[0] not in ("random", "balanced"):
            cycle = len(tokens)
    elif kind == "text":
        if not prompt_list:
            raise UvitError("this model is text-conditional: pass --prompt TEXT or --prompts-file FILE")
        encoder = build.build_text_encoder(recipe, dev, text_encoder, allow_download)
        per_seed = [prompt_list[i % len(prompt_list)] for i in range(len(seeds))]
        unique = list(dict.fromkeys(per_seed + ([""] if w != 1.0 else [])))
        feats = encoder.encode(unique).float().cpu()
        index = {p: i for i, p in enumerate(unique)}
        cond = feats[[index[p] for p in per_seed]]
        null_context = feats[index[""]] if w != 1.0 else None
        captions = per_seed
        cycle = len(prompt_list)
    else:
        captions = [f"seed {s}" for s in seeds]
    decoder = build.build_decoder(recipe, dev, vae, allow_download)

    stats: dict = {}
    s = recipe.sample
    console.print(f"sampling {len(seeds)} images from {path} · {s.sampler} {s.steps} steps "
                  f"({build.nfe_per_sample(recipe)} NFE/image) · guidance w={w:g} · {dev} {precision}", highlight=False)
    with progress_bar("NFE") as bar:
        task = bar.add_task("sample", total=None)
        images = generate.generate(model, recipe, seeds, cond, batch_size=batch_size, device=dev, precision=precision,
                          decoder=decoder, null_context=null_context, forward_batch=forward_batch, stats=stats,
                          progress=lambda done, total: bar.update(task, completed=done, total=total))

    written = []
    if out is not None or (out_dir is None and npz is None):
        grid_path = out or Path("grid.png")
        if len(images) > GRID_MAX:
            log.warning("the grid shows the first %d of %d samples; use --out-dir or --npz for all", GRID_MAX,
                        len(images))
        cols = cycle if 2 <= cycle <= 16 and len(images) > cycle else None
        outputs.save_grid(images[:GRID_MAX], grid_path, captions[:GRID_MAX], ncols=cols)
        written.append(f"grid {grid_path}")
    if out_dir is not None:
        outputs.save_pngs(images, out_dir, seeds)
        written.append(f"{len(seeds)} PNGs in {out_dir}")
    if npz is not None:
        outputs.save_npz(npz, images, labels)
        written.append(f"{npz} (arr_0 {tuple(images.shape)}" + (", arr_1 labels)" if labels is not None else ")"))
    console.print(f"wrote {'; '.join(written)} · {stats['seconds']:.1f}s, {stats['images_per_s']:.2f} images/s",
                  highlight=False)
