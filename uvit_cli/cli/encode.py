"""`uvit encode-latents`: encode images to VAE latents and captions to CLIP features (sharded, resumable)."""

from __future__ import annotations

import enum
import os
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..data.crops import DEFAULT_CROP
from ..errors import UvitError
from ..files import prepare_output
from ..choices import Crop
from ..registry import DEFAULT_TEXT_ENCODER, VAES
from .app import app, console, setup_logging
from .options import PERF, DeviceOption, PrecisionChoice, VerboseOption, choice_enum, precision_option, value
from .progress import progress_bar

Dataset = enum.Enum("Dataset", {k: k for k in VAES}, type=str)   # the source kinds: imagenet, coco, folder
CropChoice = choice_enum("CropChoice", Crop)


class Split(str, Enum):
    train = "train"
    val = "val"


class Condition(str, Enum):
    auto = "auto"
    class_ = "class"
    text = "text"
    none = "none"


DATA, ENC, OUT = "Data", "Encoders", "Output"


@app.command("encode-latents")
def encode_cmd(
    dataset: Dataset = typer.Argument(..., help="imagenet (class labels), coco (5 captions per image) or folder"),
    res: int = typer.Option(256, "--res", min=8, help="image resolution (official: 256 or 512; latents are res/8)",
                            rich_help_panel=DATA),
    source: Optional[str] = typer.Option(None, "--source", help="hf:NAME (Hugging Face datasets) or a local path",
                                         rich_help_panel=DATA),
    split: Split = typer.Option(Split.train, "--split", help="data set split", rich_help_panel=DATA),
    crop: CropChoice = typer.Option(CropChoice.auto, "--crop", help="auto: ADM center crop for imagenet/folder, the official "
                              "center crop + lanczos for coco", rich_help_panel=DATA),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="also store the horizontal flip "
                                        "(default: on for imagenet, as the official cache)", rich_help_panel=DATA),
    condition: Condition = typer.Option(Condition.auto, "--condition", help="folder: class (sub-folders), text "
                                        "(captions) or none; auto detects", rich_help_panel=DATA),
    captions: Optional[Path] = typer.Option(None, "--captions", help="folder: a JSONL of {file_name, text}",
                                            rich_help_panel=DATA),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="encode only the first N images",
                                        rich_help_panel=DATA),
    vae: Optional[str] = typer.Option(None, "--vae", help="hub id (org/name or org/name:subfolder), diffusers "
                                      "directory, or the official autoencoder_kl.pth", rich_help_panel=ENC),
    scale_factor: Optional[float] = typer.Option(None, "--scale-factor", min=0.0, help="latent scale "
                                                 "(imagenet 0.18215, coco 0.23010)", rich_help_panel=ENC),
    text_encoder: str = typer.Option(DEFAULT_TEXT_ENCODER, "--text-encoder", help="CLIP text encoder for captions: "
                                     "open_clip MODEL/TAG, hf-hub:org/repo, or a local folder/file",
                                     rich_help_panel=ENC),
    allow_download: bool = typer.Option(False, "--allow-download", help="let missing hub weights and data sets "
                                        "download (also UVIT_ALLOW_DOWNLOAD=1)", rich_help_panel=ENC),
    out: Optional[Path] = typer.Option(None, "--out", help="output directory (default data/<dataset><res>_latents)",
                                       rich_help_panel=OUT),
    shard_size: int = typer.Option(1024, "--shard-size", min=1, help="images per shard (the resume unit)",
                                   rich_help_panel=OUT),
    verify: bool = typer.Option(False, "--verify", help="re-read every shard and check counts and checksums",
                                rich_help_panel=OUT),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="images per encoder batch", rich_help_panel=PERF),
    num_workers: int = typer.Option(min(8, os.cpu_count() or 1), "--num-workers", min=0,
                                    help="image decoding worker processes", rich_help_panel=PERF),
    device: str = DeviceOption,
    precision: PrecisionChoice = precision_option("encoder autocast precision (moments are stored fp16 either way)"),
    verbose: bool = VerboseOption,
) -> None:
    """Encode images to VAE latents (mean and logvar, fp16) and captions to CLIP features, in resumable shards.

    Rerun the same command after an interruption to continue; use torchrun for several GPUs.

    Example: uvit encode-latents imagenet --res 256 --source /data/imagenet --out data/imagenet256_latents

    Several GPUs: torchrun --nproc_per_node 8 -m uvit_cli encode-latents coco --source /data/coco --verify
    """
    from .. import autoencoder, distributed, runtime, text  # deferred: loads torch (cli/app.py)
    from ..data import encoding, latents, sources  # deferred: loads torch (cli/app.py)

    setup_logging(verbose)
    kind = value(dataset)
    if res % 8:
        raise UvitError(f"--res {res} is not a multiple of 8 (the VAE downsamples by 8); use 256 or 512")
    if scale_factor is not None and scale_factor <= 0:
        raise UvitError(f"--scale-factor {scale_factor} must be positive (imagenet 0.18215, coco 0.23010)")
    if not source:
        example = {"imagenet": "/data/imagenet (with train/<wnid>/*.JPEG) or hf:ILSVRC/imagenet-1k",
                   "coco": "/data/coco (with train2014/ and annotations/)", "folder": "/path/to/images"}[kind]
        raise UvitError(f"--source is required: e.g. --source {example}")
    folder_kw = {"condition": condition.value, "captions": str(captions) if captions else None} \
        if kind == "folder" else {}
    src = sources.open_source(kind, source, split.value, allow_download, **folder_kw)
    crop_name = DEFAULT_CROP[kind] if value(crop) == "auto" else value(crop)
    flips = (kind == "imagenet") if flip is None else flip
    if out is None:
        name = kind if kind != "folder" else (Path(source).name or "folder")
        out = Path("data") / f"{name}{res}_latents{'' if split is Split.train else '_' + split.value}"
    prepare_output(out, "--out", directory=True)
    # The process group only synchronises the finish (ranks encode disjoint shards), so its timeout is long.
    dev = distributed.init(device, timeout_minutes=48 * 60)
    rank, world = distributed.rank(), distributed.world_size()
    runtime.setup_runtime(dev, deterministic=True)   # fixed conv algorithms: a resumed shard matches bit for bit
    hub_id, default_scale = VAES[kind]
    vae_spec = vae or hub_id
    ae = autoencoder.load_autoencoder(vae_spec, scale_factor if scale_factor is not None else default_scale, dev,
                          allow_download=allow_download)
    te = text.load_text_encoder(text_encoder, dev, allow_download=allow_download) if src.conditioning == "text" else None
    if rank == 0:
        console.print(f"[bold]{kind}[/] {src.location}: {len(src):,} images, {src.conditioning} · {crop_name} "
                      f"{res}px{' + flips' if flips else ''} · VAE {vae_spec} · → {out}")
    try:
        with progress_bar(disable=rank != 0) as bar:
            task = bar.add_task("encoding", total=None)
            manifest = encoding.encode_latents(src, out, ae, te, resolution=res, crop=crop_name, flips=flips,
                                      batch_size=batch_size, shard_size=shard_size, num_workers=num_workers,
                                      precision=value(precision), split=split.value, limit=limit, rank=rank,
                                      world_size=world,
                                      progress=lambda done, total: bar.update(task, completed=done, total=total))
        if world > 1:
            distributed.barrier()
            if rank == 0:
                manifest = encoding.finalize(out)
            distributed.barrier()
    finally:
        distributed.cleanup()
    if rank != 0:
        return
    if manifest is None:
        raise UvitError(f"{out}: some shards are still missing; rerun the same command to finish them")
    if verify:
        with progress_bar("shard") as bar:
            task = bar.add_task("verifying", total=len(manifest["shards"]))
            result = latents.verify_latents(out, progress=lambda d, t: bar.update(task, completed=d))
        console.print(f"[green]verified[/] {result['shards']} shards, {result['count']:,} images"
                      + (f", {result['captions']:,} captions" if result["captions"] else ""))
    _summary(manifest, out)


def _summary(manifest: dict, out: Path) -> None:
    table = Table(show_header=False, title=f"latent cache {out}")
    table.add_row("images", f"{manifest['count']:,} of {manifest['items']:,}"
                  + (" (+ flips)" if manifest["flips"] else ""))
    table.add_row("latents", f"{manifest['latent_channels']}x{manifest['latent_size']}x{manifest['latent_size']} "
                  f"moments, fp16, {len(manifest['shards'])} shards")
    if manifest["num_captions"]:
        table.add_row("captions", f"{manifest['num_captions']:,} (+ empty-prompt context)")
    if manifest.get("class_names"):
        table.add_row("classes", str(len(manifest["class_names"])))
    stats = manifest["latent_stats"]
    if stats.get("values"):
        table.add_row("latent std x scale", f"{stats['std']:.3f} x {manifest['scale_factor']} = "
                      f"{stats['std'] * manifest['scale_factor']:.3f} (about 1 expected)")
    if manifest["num_skipped"]:
        shown = ", ".join(f"{s['key']} ({s['reason']})" for s in manifest["skipped"][:5])
        table.add_row("[yellow]skipped[/]", f"{manifest['num_skipped']}: {shown}"
                      + (" ..." if manifest["num_skipped"] > 5 else "") + " (all listed in manifest.json)")
    if manifest["converted"]:
        table.add_row("converted", ", ".join(f"{k}: {v}" for k, v in sorted(manifest["converted"].items())))
    console.print(table)
