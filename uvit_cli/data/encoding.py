"""The encode job: image source -> crop -> VAE moments (+ CLIP caption features) -> latent shards, resumably.

Work is cut into fixed shards of source items (shard s = items [s*S, (s+1)*S)), encoded in batches that never
cross a shard, so a shard's bytes do not depend on when or by which rank it was made: a killed run resumes at the
first incomplete shard and ends identical to an uninterrupted one. Ranks take shards s with s % world == rank;
the manifest is built from the shards' completion marks once all exist.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import Interrupted, UvitError
from ..files import read_json, sha256_file, write_json, write_safetensors
from ..runtime import autocast, graceful_stop, ignore_stop_signals
from . import latents as L
from .sources import CroppedImages, collate

log = logging.getLogger(__name__)

# Keys of encode_config.json that may differ on a resume (they do not change what is stored).
RESUMABLE_KEYS = ("batch_size",)


def run_config(source, vae, text, *, resolution: int, crop: str, flips: bool, shard_size: int, batch_size: int,
               split: str, limit: int | None) -> dict:
    """The settings that define a cache (stored in encode_config.json and the manifest)."""
    n = len(source) if limit is None else min(limit, len(source))
    return {
        "dataset": source.kind, "source": source.location, "split": split, "source_items": len(source),
        "limit": limit, "items": n, "resolution": resolution, "crop": crop, "flips": flips,
        "vae": vae.name, "vae_sha256": vae.sha256, "scale_factor": vae.scale_factor,
        "downsample": vae.downsample, "latent_channels": vae.latent_channels,
        "latent_size": resolution // vae.downsample,
        "conditioning": source.conditioning, "class_names": source.class_names,
        "text_encoder": text.name if text is not None else None,
        "text_encoder_sha256": text.sha256 if text is not None else None,
        "context_shape": [text.context_length, text.width] if text is not None else None,
        "shard_size": shard_size, "num_shards": math.ceil(n / shard_size), "batch_size": batch_size,
    }


def _settle_config(out: Path, config: dict) -> dict:
    """Write encode_config.json, or check that a previous run used the same settings."""
    path = out / L.CONFIG
    if path.is_file():
        old = read_json(path)
        diff = [k for k in sorted(set(old) | set(config)) if k not in RESUMABLE_KEYS and old.get(k) != config.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} there, {config.get(k)!r} now" for k in diff[:4])
            raise UvitError(f"{out} holds a cache made with other settings ({shown}"
                            f"{'; ...' if len(diff) > 4 else ''}); rerun with the same options to resume, "
                            "or pass a new --out")
        if old.get("batch_size") != config["batch_size"]:
            log.warning("batch size %s differs from the first run's %s: remaining shards may differ in the last "
                        "bits from an uninterrupted run", config["batch_size"], old.get("batch_size"))
        return old
    write_json(path, config)
    return config


def _wait_for(path: Path, timeout_s: float = 3600.0) -> None:
    """Wait until rank 0 has written ``path`` (ranks start at slightly different times)."""
    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise UvitError(f"{path} did not appear within {timeout_s:.0f} s: did rank 0 fail? See its log")
        time.sleep(0.2)


def _write_null_context(out: Path, text) -> None:
    path = out / L.NULL_CONTEXT
    if not path.is_file():
        ctx = text.encode([""])[0].to(torch.float16).cpu().contiguous()
        write_safetensors(path, {"context": ctx}, {"format": L.FORMAT, "prompt": ""})


def finalize(out: str | Path) -> dict | None:
    """Write manifest.json once every shard is complete; returns it, or None while shards are missing."""
    out = Path(out)
    config = read_json(out / L.CONFIG)
    marks = L.completed_shards(out, config["num_shards"])
    if len(marks) < config["num_shards"]:
        return None
    null = None
    if config["conditioning"] == "text":
        p = out / L.NULL_CONTEXT
        null = {"file": L.NULL_CONTEXT, "sha256": sha256_file(p), "prompt": ""}
    manifest = L.build_manifest(out, config, marks, null)
    if manifest["count"] == 0:   # no manifest: an empty cache must never look complete
        _discard(out)             # nor be resumed: its shards only say "skipped", so a rerun must re-read the images
        shown = "; ".join(f"{s['key']}: {s['reason']}" for s in manifest["skipped"][:3])
        raise UvitError(f"no image of {config['source']} could be encoded ({manifest['num_skipped']} skipped: "
                        f"{shown}{' ...' if manifest['num_skipped'] > 3 else ''}); fix or replace the images, then "
                        "rerun the same command")
    write_json(out / L.MANIFEST, manifest)
    return manifest


def _discard(out: Path) -> None:
    """Remove what the encode job wrote in ``out`` (config, shards, null context), and ``out`` itself if that
    leaves it empty."""
    shutil.rmtree(out / L.SHARD_DIR, ignore_errors=True)
    for name in (L.CONFIG, L.NULL_CONTEXT):
        (out / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        out.rmdir()


class _Shard:
    """Accumulates one shard's encoded items until all its source items are seen."""

    def __init__(self, s: int, first: int, stop: int):
        self.s, self.first, self.stop = s, first, stop
        self.seen = 0
        self.moments, self.flipped, self.labels, self.index, self.contexts, self.ncap = [], [], [], [], [], []
        self.skipped, self.converted = [], {}

    def tensors(self, flips: bool, context_shape: list | None, shape: tuple) -> dict:
        def cat(xs, empty):
            return torch.cat(xs) if xs else empty

        t = {"moments": cat(self.moments, torch.zeros((0, *shape), dtype=torch.float16)),
             "labels": torch.tensor(self.labels, dtype=torch.int64),
             "source_index": torch.tensor(self.index, dtype=torch.int64)}
        if flips:
            t["moments_flip"] = cat(self.flipped, torch.zeros((0, *shape), dtype=torch.float16))
        if context_shape:
            t["contexts"] = cat(self.contexts, torch.zeros((0, *context_shape), dtype=torch.float16))
            t["caption_offsets"] = torch.tensor([0] + self.ncap, dtype=torch.int64).cumsum(0)
        return t

    def stats(self, latent_channels: int) -> dict:
        if not self.moments:
            return {"n": 0, "sum": 0.0, "sumsq": 0.0, "sumvar": 0.0}
        m = torch.cat(self.moments + self.flipped).double()
        mean, logvar = m[:, :latent_channels], m[:, latent_channels:]
        return {"n": mean.numel(), "sum": mean.sum().item(), "sumsq": (mean * mean).sum().item(),
                "sumvar": logvar.clamp(-30, 20).exp().sum().item()}


def encode_latents(source, out: str | Path, vae, text=None, *, resolution: int, crop: str, flips: bool,
                   batch_size: int = 64, shard_size: int = 1024, num_workers: int = 2, precision: str = "fp32",
                   split: str = "train", limit: int | None = None, rank: int = 0, world_size: int = 1,
                   progress=None) -> dict | None:
    """Encode this rank's pending shards of ``source`` into ``out``. Returns the manifest when the cache is
    complete (single process), else None (multi-rank: rank 0 calls :func:`finalize` after a barrier).
    ``progress(done_items, total_items)`` is called after every batch."""
    out = Path(out)
    if resolution % vae.downsample or resolution < vae.downsample:
        raise UvitError(f"--res {resolution} is not a multiple of the VAE's downsampling factor {vae.downsample}")
    if source.conditioning == "text" and text is None:
        raise UvitError("this data set has captions: a text encoder is needed (--text-encoder ViT-L-14/openai)")
    if source.conditioning != "text":
        text = None
    config = run_config(source, vae, text, resolution=resolution, crop=crop, flips=flips, shard_size=shard_size,
                        batch_size=batch_size, split=split, limit=limit)
    if config["items"] == 0:
        raise UvitError(f"{source.location} has no items to encode")
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:                        # rank 0 prepares the directory; the others wait for its config
        for p in out.glob(".*.tmp"):     # temporaries of a killed run (config, null context, manifest)
            p.unlink(missing_ok=True)
        config = _settle_config(out, config)
        if text is not None:
            _write_null_context(out, text)
    else:
        _wait_for(out / L.CONFIG)
        config = _settle_config(out, config)
    n, S = config["items"], shard_size
    done = L.completed_shards(out, config["num_shards"])
    mine = [s for s in range(config["num_shards"]) if s % world_size == rank and s not in done]
    L.remove_stale_temporaries(out, mine)
    if done:
        log.info("resuming: %d of %d shards already complete", len(done), config["num_shards"])
    batches = [list(range(b, min(b + batch_size, min((s + 1) * S, n))))
               for s in mine for b in range(s * S, min((s + 1) * S, n), batch_size)]
    total = sum(len(b) for b in batches)
    if total:
        _run(source, out, vae, text, config, mine, batches, total,
             CroppedImages(source, crop, resolution), num_workers, precision, progress)
    return finalize(out) if world_size == 1 else None


def _run(source, out, vae, text, config, mine, batches, total, dataset, num_workers, precision, progress):
    """The loop: DataLoader workers decode and crop; this thread encodes; a writer thread saves shards."""
    device = vae.optimize_for_encoding().device
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate,
        pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers else None,
        worker_init_fn=ignore_stop_signals)
    C, h = config["latent_channels"], config["latent_size"]
    shape, flips, S = (2 * C, h, h), config["flips"], config["shard_size"]
    queue = iter(mine)
    shard = None
    done_items = 0
    pending = []
    with ThreadPoolExecutor(max_workers=1) as writer, graceful_stop() as stop:
        def flush(sh):
            mark = {"index": sh.s, "first": sh.first, "stop": sh.stop, "count": len(sh.labels),
                    "captions": sum(sh.ncap), "skipped": sh.skipped, "converted": sh.converted,
                    "stats": sh.stats(C)}
            pending.append(writer.submit(L.write_shard, out, sh.s, sh.tensors(flips, config["context_shape"], shape), mark))
            while len(pending) > 2:
                pending.pop(0).result()

        for batch in loader:
            if shard is None:
                s = next(queue)
                shard = _Shard(s, s * S, min((s + 1) * S, config["items"]))
            keep = []
            for j, (i, ok, note) in enumerate(zip(batch["index"], batch["ok"], batch["note"])):
                rec = source.record(i)
                if not ok:
                    shard.skipped.append({"index": i, "key": rec.key, "reason": note.split(":", 1)[1]})
                    continue
                if text is not None and not rec.captions:
                    shard.skipped.append({"index": i, "key": rec.key, "reason": "no caption"})
                    keep.append(None)       # one entry per decoded image, so rows line up with batch["images"]
                    continue
                if note.startswith("converted:"):
                    mode = note.split(":", 1)[1]
                    shard.converted[mode] = shard.converted.get(mode, 0) + 1
                keep.append((i, rec))
            if batch["images"] is not None and any(k is not None for k in keep):
                rows = torch.tensor([j for j, k in enumerate(keep) if k is not None])
                x = batch["images"][rows].to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
                recs = [k[1] for k in keep if k is not None]
                if flips:
                    x = torch.cat([x, x.flip(-1)])
                with torch.no_grad(), autocast(device, precision):
                    m = vae.encode_moments(x).float().to(torch.float16).cpu()
                shard.moments.append(m[:len(recs)])
                if flips:
                    shard.flipped.append(m[len(recs):])
                shard.labels += [r.label for r in recs]
                shard.index += [k[0] for k in keep if k is not None]
                if text is not None:
                    prompts = [c for r in recs for c in r.captions]
                    with torch.no_grad(), autocast(device, precision):
                        feats = [text.encode(prompts[a:a + 256]) for a in range(0, len(prompts), 256)]
                    shard.contexts.append(torch.cat(feats).float().to(torch.float16).cpu())
                    shard.ncap += [len(r.captions) for r in recs]
            shard.seen += len(batch["index"])
            done_items += len(batch["index"])
            if shard.seen == shard.stop - shard.first:
                flush(shard)
                shard = None
                if stop.requested and done_items < total:   # Ctrl-C / SIGTERM: keep the finished shards, stop
                    for f in pending:
                        f.result()
                    kept = len(L.completed_shards(out, config["num_shards"]))
                    raise Interrupted(f"encoding stopped by {stop.signal_name}: kept {kept} of "
                                      f"{config['num_shards']} shards in {out}", same_command=True)
            if progress:
                progress(done_items, total)
        for f in pending:
            f.result()
