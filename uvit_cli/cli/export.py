"""`uvit export`: a run, one of our weight files or an official release file, as a diffusers folder (ready for the
Hub, optionally pushed) or as our safetensors file."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UvitError
from ..choices import ExportFormat
from ..run import is_run_dir
from .app import app, console, setup_logging
from .options import SetOption, WeightsChoice, WeightsOption, choice_enum, value

FormatChoice = choice_enum("FormatChoice", ExportFormat)


@app.command("export")
def export_cmd(
    target: str = typer.Argument(..., metavar="RUN_OR_WEIGHTS", help="a run directory, a .safetensors file, or an "
                                 "official .pth (with --recipe)"),
    fmt: FormatChoice = typer.Option(FormatChoice.diffusers, "--format", help="diffusers: a folder with UViTModel, "
                                     "the scheduler, the VAE reference and a model card; safetensors: our file"),
    out: Path = typer.Option(..., "--out", "-o", help="the folder (diffusers) or .safetensors file to write"),
    recipe_path: Optional[str] = typer.Option(None, "--recipe", "-r", help="recipe of an official .pth (or one "
                                              "that replaces the embedded recipe)"),
    overrides: Optional[List[str]] = SetOption,
    weights: WeightsChoice = WeightsOption,
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="REPO_ID", help="upload the diffusers "
                                              "folder to this Hub model repo (OWNER/NAME), creating it if needed"),
    private: bool = typer.Option(False, "--private", help="create the Hub repo as private"),
    dry_run: bool = typer.Option(False, "--dry-run", help="with --push-to-hub: write the folder and list what "
                                 "would be uploaded, without contacting the Hub"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
) -> None:
    """Export weights for the rest of the ecosystem.

    Examples:
      uvit export runs/00003-imagenet256_uvit_h2-U-ViT-H2 --out exports/uvit-h2
      uvit export imagenet256_uvit_huge.pth --recipe imagenet256_uvit_h2 --out uvit-h2-diffusers
      uvit export imagenet256_uvit_huge.pth --recipe imagenet256_uvit_h2 --format safetensors --out uvit_h2.safetensors
      uvit export runs/digits --out exports/digits --push-to-hub my-name/uvit-digits
    """
    from .. import build, checkpoint, export, hub  # deferred: loads torch and diffusers (cli/app.py)

    setup_logging()
    fmt = value(fmt)
    if push_to_hub and fmt != "diffusers":
        raise UvitError("--push-to-hub uploads a diffusers folder; use --format diffusers")
    model, recipe, path = build.load_model(target, recipe_path, overrides, weights=value(weights))
    meta = checkpoint.read_metadata(path) if path.suffix == ".safetensors" else {}
    step = int(meta["step"]) if str(meta.get("step", "")).isdigit() else None
    source = meta.get("source") or (str(path) if path.suffix == ".safetensors" else f"official release {path.name}")
    run_dir = Path(target) if is_run_dir(target) else None
    kw = dict(source=source, step=step, overwrite=overwrite)
    if fmt == "diffusers":
        kw["run_dir"] = run_dir
    written = export.EXPORTERS[fmt](model, recipe, out, **kw)
    console.print(f"wrote {written} ({fmt}, {build.parameter_count(recipe):,} parameters)")
    if push_to_hub:
        files = hub.push_folder(written, push_to_hub, private=private, dry_run=dry_run)
        verb = "would upload" if dry_run else "uploaded"
        console.print(f"{verb} {len(files)} files to {push_to_hub}: {', '.join(files)}")
