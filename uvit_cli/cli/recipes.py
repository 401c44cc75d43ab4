"""`uvit recipes`, `uvit info` and `uvit convert`: look at recipes and checkpoints, import official weights."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..errors import UvitError
from ..files import prepare_output
from ..recipe import dump_recipe, load_recipe, shipped_recipes
from ..registry import DEFAULT_TEXT_ENCODER
from .app import app, console, setup_logging
from .options import SetOption


@app.command("recipes")
def recipes_cmd() -> None:
    """List the shipped recipes with their model, data and parameter count.

    Example: uvit recipes
    """
    from .. import build  # deferred: loads torch (cli/app.py)

    table = Table(title="shipped recipes (recipes/)")
    for col in ("recipe", "model", "data", "condition", "formulation", "params"):
        table.add_column(col, no_wrap=True)
    table.add_column("description", overflow="fold")
    for path in shipped_recipes():
        r = load_recipe(path)
        table.add_row(path.stem, r.model.size or "custom", r.data.name, r.conditioning, r.diffusion.formulation,
                      f"{build.parameter_count(r):,}", r.description)
    console.print(table)


@app.command("info")
def info_cmd(
    target: str = typer.Argument(..., metavar="RECIPE_OR_CHECKPOINT", help="a recipe YAML, a shipped recipe name, "
                                 "a run directory or a .safetensors checkpoint"),
    overrides: Optional[List[str]] = SetOption,
    show_recipe: bool = typer.Option(True, "--recipe/--no-recipe", help="print the resolved recipe"),
) -> None:
    """Print the resolved configuration, parameter count, token count and forward GFLOPs.

    Example: uvit info recipes/imagenet256_uvit_h2.yaml
    """
    import torch

    from .. import build, flops  # deferred: loads torch (cli/app.py)

    setup_logging()
    recipe, ckpt = build.load_recipe_for(target, overrides)
    with torch.device("meta"):
        model = build.build_model(recipe)
    params = sum(p.numel() for p in model.parameters())
    tokens = (recipe.model.img_size // recipe.model.patch_size) ** 2
    gflops = flops.forward_flops(model)
    if show_recipe:
        console.rule(f"resolved recipe: {recipe.name}")
        console.print(dump_recipe(recipe), highlight=False, markup=False)
    table = Table(show_header=False, title=f"{recipe.model.size or 'custom'} · {recipe.name}")
    table.add_row("parameters", f"{params:,}")
    table.add_row("tokens", f"{tokens} patches + {model.extras} extra ({tokens + model.extras} in all)")
    table.add_row("layers", f"{recipe.model.num_layers} (official depth={recipe.model.num_layers - 1})")
    table.add_row("forward GFLOPs / image", f"{gflops / 2e9:.2f} multiply-adds (paper convention); "
                                             f"{gflops / 1e9:.2f} FLOPs")
    table.add_row("conditioning", recipe.conditioning + (" + null (guidance)" if recipe.has_null_condition else ""))
    tr = recipe.train
    table.add_row("objective", f"{recipe.diffusion.formulation}, predicts {recipe.prediction_target}; training times "
                               f"{tr.time_sampling}; loss weighting {tr.loss_weighting}")
    table.add_row("guidance w", f"{recipe.sample.cfg_scale} (official scale {recipe.sample.cfg_scale - 1:g})"
                  + ("" if tuple(recipe.sample.guidance_interval) == (0.0, 1.0)
                     else f", only for t in {list(recipe.sample.guidance_interval)}"))
    if recipe.conditioning == "text":
        enc = recipe.data.text_encoder or DEFAULT_TEXT_ENCODER
        table.add_row("text encoder", enc + (" (NOT CLIP: a small CLIP-architecture tower with seeded random weights, "
                                              "so the job runs where CLIP cannot be fetched; the run keeps a copy)"
                                              if enc.startswith("builtin:") else ""))
    if ckpt is not None:
        table.add_row("checkpoint", str(ckpt))
    console.print(table)


@app.command("convert")
def convert_cmd(
    official: Path = typer.Argument(..., metavar="CHECKPOINT", help="official U-ViT .pth state dict (nnet_ema.pth or a released file)"),
    recipe_path: str = typer.Option(..., "--recipe", "-r", help="recipe that describes the checkpoint's model"),
    out: Path = typer.Option(..., "--out", "-o", help="output .safetensors file"),
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Convert an official .pth checkpoint into a safetensors checkpoint with the recipe in its metadata.

    The .pth is read with torch.load(weights_only=True) and must load into the recipe's model strictly.

    Example: uvit convert imagenet256_uvit_huge.pth --recipe imagenet256_uvit_h2 --out uvit_h2.safetensors
    """
    from .. import build, checkpoint  # deferred: loads torch (cli/app.py)

    setup_logging()
    if out.suffix != ".safetensors":
        raise UvitError(f"--out {out}: the output must end in .safetensors")
    prepare_output(out, "--out")
    recipe = load_recipe(recipe_path, overrides)
    sd = checkpoint.read_official_pth(official)
    model = build.build_model(recipe)
    checkpoint.load_into(model, sd, source=str(official))
    checkpoint.save_weights(out, model.state_dict(), dump_recipe(recipe), source=str(official), kind="ema")
    console.print(f"wrote {out} ({sum(v.numel() for v in sd.values()):,} parameters, strict load OK)")
