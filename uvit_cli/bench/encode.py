"""The encode suite: is the encode pipeline (JPEG decode, crop, VAE encode, shard write) as fast as the VAE encoder alone?

The target is >= 90% of the encoder's own forward throughput on the same device and batch: data loading must
never starve the encoder. Both numbers count source images per second (with flips, each batch runs 2 x batch).
The loader's own rate (decode + crop, no encoder) is reported too: where it exceeds the encoder's, a pipeline
that falls short is sharing CPU cores with the encoder (a CPU-only machine), not waiting for data.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..autoencoder import SD_VAE_CONFIG, Autoencoder
from ..data.crops import adm_center_crop
from ..data.encoding import encode_latents
from ..data.sources import CroppedImages, collate, open_imagenet
from ..runtime import autocast
from .timer import measure, median

log = logging.getLogger(__name__)

# A small VAE with the SD layout (4 levels, f=8) for quick pipeline checks.
TINY_BENCH_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                      block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4)


def synthetic_jpeg_tree(root: Path, n: int, size=(500, 375), classes: int = 4, seed: int = 0) -> Path:
    """``root/train/<wnid>/*.JPEG``: smooth random images of ImageNet's typical size (natural-image file sizes)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / "train" / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        arr = np.clip(np.asarray(low, np.float32) + rng.normal(0, 6, (size[1], size[0], 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(d / f"img_{i:05d}.JPEG", quality=90)
    return root


def _encoder_throughput(vae, batch: torch.Tensor, flips: bool, repeats: int, precision: str) -> float:
    """Source images per second of the VAE encoder alone on a ready batch (median of ``repeats`` after a warm-up)."""
    x = torch.cat([batch, batch.flip(-1)]) if flips else batch

    def step():
        with torch.no_grad(), autocast(vae.device, precision):
            vae.encode_moments(x).float().to(torch.float16).cpu()

    return batch.shape[0] / median(measure(step, vae.device, warmup=1, repeats=repeats))


def _loader_throughput(source, resolution: int, batch_size: int, num_workers: int) -> float:
    """Source images per second of decoding + cropping alone (the pipeline's DataLoader, no encoder)."""
    batches = [list(range(b, min(b + batch_size, len(source)))) for b in range(0, len(source), batch_size)]
    loader = torch.utils.data.DataLoader(CroppedImages(source, "adm_center", resolution), batch_sampler=batches,
                                         num_workers=num_workers, collate_fn=collate)
    t = time.perf_counter()                       # worker start-up included: a conservative rate
    n = sum(len(b["index"]) for b in loader)
    return n / (time.perf_counter() - t)


def bench_encode(vae="tiny", *, resolution: int = 256, batch_size: int = 16, num_batches: int = 4,
                 num_workers: int | None = None, device: str = "cpu", precision: str = "fp32", flips: bool = True,
                 rounds: int = 1, image_size=(500, 375), workdir: str | Path | None = None, progress=None) -> dict:
    """Encoder-alone vs whole-pipeline throughput (source images/s) on synthetic ImageNet-sized JPEGs.

    ``vae``: "tiny", "sd" (the SD VAE architecture, random weights) or an Autoencoder. Each of ``rounds`` rounds
    times the encoder alone, then the pipeline; a last encoder timing closes the sequence, and medians are
    reported (alternating keeps a drift in machine load out of the ratio). The pipeline rate is taken after its
    first batch (worker start-up excluded) from the progress ticks of one real encode; its wall time including
    start-up is reported too.
    """
    name = vae if isinstance(vae, str) else vae.name
    if isinstance(vae, str):
        torch.manual_seed(0)
        config = {"tiny": TINY_BENCH_VAE, "sd": SD_VAE_CONFIG}[vae]
        vae = Autoencoder.from_config(config, 0.18215, name=f"{vae} (random weights)")
    vae.vae.to(device)
    vae.optimize_for_encoding()                   # the layout the pipeline uses, for both measurements
    num_workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
    n = batch_size * (num_batches + 1)            # one extra batch: the pipeline's warm-up
    encs, pipes, walls = [], [], []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        synthetic_jpeg_tree(tmp / "src", n, image_size)
        source = open_imagenet(str(tmp / "src"), "train")
        crops = [adm_center_crop(source.load(i)[0], resolution) for i in range(batch_size)]
        batch = torch.tensor(np.stack(crops)).permute(0, 3, 1, 2).contiguous().float().div(127.5).sub(1).to(device)
        for r in range(rounds):
            encs.append(_encoder_throughput(vae, batch, flips, num_batches, precision))
            stamps = []

            def tick(done, total):
                stamps.append((time.perf_counter(), done))
                if progress:
                    progress(r * total + done, rounds * total)

            t0 = time.perf_counter()
            encode_latents(source, tmp / f"out{r}", vae, None, resolution=resolution, crop="adm_center",
                           flips=flips, batch_size=batch_size, shard_size=n, num_workers=num_workers,
                           precision=precision, progress=tick)
            walls.append(time.perf_counter() - t0)
            (t1, d1), (t2, d2) = stamps[0], stamps[-1]
            pipes.append((d2 - d1) / (t2 - t1))
        encs.append(_encoder_throughput(vae, batch, flips, num_batches, precision))
        loader = _loader_throughput(source, resolution, batch_size, num_workers)
    enc, pipe = median(encs), median(pipes)
    result = {"vae": name, "device": str(torch.device(device)), "resolution": resolution, "batch_size": batch_size,
              "flips": flips, "num_workers": num_workers, "precision": precision, "torch_threads":
              torch.get_num_threads(), "images": n, "rounds": rounds, "encoder_images_per_s": round(enc, 3),
              "pipeline_images_per_s": round(pipe, 3), "ratio": round(pipe / enc, 3),
              "loader_images_per_s": round(loader, 3),
              "encoder_runs": [round(x, 3) for x in encs], "pipeline_runs": [round(x, 3) for x in pipes],
              "pipeline_wall_s": round(median(walls), 2)}
    log.info("encode benchmark: %s", result)
    return result
