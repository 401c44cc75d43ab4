"""The training loop: one readable function, with small top-level helpers that tests can import.

Official behaviour kept: AdamW on all parameters, linear warm-up then constant (LambdaLR, so the very first step
runs at lr 0 as officially), EMA 0.9999 updated after every step, noise-prediction MSE. Added: exact resume,
world-size-invariant randomness (see data/stream.py), mixed precision, accumulation, clipping, atomic checkpoints.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import resource
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from . import distributed as dist
from .build import build_decoder, build_model, build_optimizer, build_schedule, build_source, build_stream
from .checkpoint import load_latest_state, save_state, save_weights, state_path
from .data.stream import StreamBatches
from .errors import Interrupted, UvitError
from .generate import generate
from .metrics.model_eval import monitor_record
from .outputs import save_grid
from .recipe import Recipe, dump_recipe
from .run import (AMENDMENTS, METRICS, RUN_EMA, RUN_RAW, RUN_RECIPE, RUN_TEXT_ENCODER, SAMPLES, amend_recipe,
                  read_metrics)
from .runtime import autocast, check_precision, graceful_stop, ignore_stop_signals
from .text import BUILTIN_PREFIX, builtin_tower_dir
from .tracking import Trackers, check_trackers

log = logging.getLogger(__name__)


def ema_rate(rate: float, step: int, warmup: bool) -> float:
    """The EMA rate at a step: constant (official), or warmed up as min(rate, (1 + step) / (10 + step))."""
    return min(rate, (1 + step) / (10 + step)) if warmup else rate


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, rate: float) -> None:
    """ema <- rate * ema + (1 - rate) * model, for every parameter (buffers are copied)."""
    e = [p for p in ema.parameters()]
    m = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - rate)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def optimizer_step(model: torch.nn.Module, opt, lr_schedule, scaler, grad_clip: float) -> tuple[torch.Tensor, float]:
    """One update from the accumulated gradients: unscale (fp16), clip, AdamW, LR schedule; returns (grad norm,
    the lr this step used). ``train()`` and ``uvit bench`` both run it."""
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    lr = lr_schedule.get_last_lr()[0]
    lr_schedule.step()
    return grad_norm, lr


def null_condition(model, source, device):
    """What replaces a dropped condition: the null class id or the empty-prompt context (None: unconditional)."""
    if model.num_classes > 0:
        return model.null_class_id
    if model.text_dim > 0:
        ctx = getattr(source, "null_context", None)
        if ctx is None:
            raise UvitError("this text model trains with guidance but the latent cache stores no empty-prompt "
                            "context; re-run `uvit encode-latents` (it writes one) or set train.p_uncond: 0")
        return ctx.to(device).float()
    return None


def apply_drop(y, drop, null):
    """Label dropout for classifier-free guidance, in one place."""
    if null is None or y is None or not bool(drop.any()):
        return y
    if y.dtype == torch.long:
        return torch.where(drop, torch.full_like(y, null), y)
    return torch.where(drop[:, None, None], null.to(y.dtype).expand_as(y), y)


def keep_builtin_text_encoder(recipe: Recipe, run_dir: Path) -> None:
    """A built-in text tower is a function of its seed; the run keeps a copy anyway, so that sampling it later
    (another machine, another torch) uses the identical tower (build.build_text_encoder reads the copy)."""
    spec = recipe.data.text_encoder
    if recipe.conditioning != "text" or not spec.startswith(BUILTIN_PREFIX) or (run_dir / RUN_TEXT_ENCODER).is_dir():
        return
    src = builtin_tower_dir(spec[len(BUILTIN_PREFIX):])
    tmp = run_dir / f".{RUN_TEXT_ENCODER}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, run_dir / RUN_TEXT_ENCODER)   # the folder appears whole or not at all


def check_data_fits_model(recipe: Recipe, source) -> None:
    """A model that does not fit the data (channels, size, classes) fails before any training starts."""
    m = recipe.model
    x, y = source.get(0)
    want = (m.in_chans, m.img_size, m.img_size)
    if recipe.data.name == "latents":
        want = (2 * m.in_chans, m.img_size, m.img_size)  # moments: mean and logvar
    if tuple(x.shape) != want:
        raise UvitError(f"the data gives {tuple(x.shape)} samples but the model expects {want}; set model.in_chans "
                        f"/ model.img_size to match the data")
    n = getattr(source, "num_classes", 0)
    if m.num_classes > 0 and n and n != m.num_classes:
        raise UvitError(f"the data has {n} classes but model.num_classes is {m.num_classes}")
    if m.num_classes > 0 and not n:
        raise UvitError("the model is class-conditional but the data has no labels; set model.num_classes: 0")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def train(recipe: Recipe, run_dir: Path, *, device: str = "auto", resume: bool = True, progress=None) -> Path:
    """Train ``recipe`` into ``run_dir`` (resuming from its last checkpoint when ``resume``); returns run_dir.

    ``progress(step, total, info)`` is called after every step (info holds the last logged metrics)."""
    t = recipe.train
    check_trackers(t.log_to)  # a missing optional package fails before any work, on every rank
    dev = dist.init(device)
    check_precision(dev, t.precision)
    world, rank, main = dist.world_size(), dist.rank(), dist.is_main()
    if t.batch_size % (world * t.grad_accum):
        raise UvitError(f"train.batch_size {t.batch_size} does not split over {world} ranks x {t.grad_accum} "
                        "accumulation steps; pick a batch size divisible by their product")

    # Data: a seeded stream over the source, so a step's batch is a function of the step alone.
    source = build_source(recipe, run_dir)
    check_data_fits_model(recipe, source)
    stream = build_stream(recipe, source)

    # Model (the same initial weights whatever the world size), EMA, optimizer, LR schedule, loss scaler, diffusion.
    torch.manual_seed(t.seed)
    model = build_model(recipe).to(dev)
    torch.manual_seed(t.seed * world + rank)  # per-rank seeds (DiT convention); the data stream is seeded apart
    random.seed(t.seed * world + rank)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt, lr_schedule, scaler = build_optimizer(recipe, model, dev)
    diffusion = build_schedule(recipe)
    null = null_condition(model, source, dev)

    # Resume from the newest good checkpoint.
    start = 0
    if resume and (found := load_latest_state(run_dir)) is not None:
        state, path = found
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start = int(state["step"])
        rngs = state.get("rng", [])
        if len(rngs) == world:
            _set_rng_state(rngs[rank])
        if main:
            log.info("resumed from %s (step %d)", path, start)
    elif main and (run_dir / METRICS).is_file():
        done = max((m.get("step", 0) for m in read_metrics(run_dir)), default=0)
        log.warning("%s has no checkpoint to resume from (the last run stopped at step %d, before its first save "
                    "every %d steps): training starts again from step 0", run_dir, done, t.save_every)
    if start > t.steps:   # every rank knows: all stop together
        raise UvitError(f"{run_dir} is already at step {start}: train.steps={t.steps} would train nothing and "
                        f"cannot undo steps; pass train.steps > {start} to continue it, or sample the run as it is")

    # Run directory: the resolved recipe before step 0 (a resume records what it changed); metrics.jsonl and the
    # train.log_to trackers on rank 0.
    trackers = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for key in amend_recipe(run_dir, recipe, start):
            log.warning("resumed with a changed setting: %s from step %d (recorded in %s)", key, start, AMENDMENTS)
        keep_builtin_text_encoder(recipe, run_dir)
        trackers = Trackers(run_dir, recipe, resume_step=start)
    dist.barrier()
    try:
        micro = t.batch_size // world // t.grad_accum
        batches = StreamBatches(t.batch_size, world, rank, t.grad_accum, start, t.steps)
        loader = DataLoader(stream, batch_sampler=batches,
                            num_workers=recipe.data.num_workers if recipe.data.name != "digits" else 0,
                            pin_memory=dev.type == "cuda", persistent_workers=False,
                            worker_init_fn=ignore_stop_signals)   # Ctrl-C stops the main process cleanly
        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None) if world > 1 else model
        if t.compile:
            net = torch.compile(net)
        if main and t.lr_decay != "none" and t.warmup_steps >= t.steps:   # a shortened recipe (--set train.steps)
            log.warning("train.warmup_steps (%d) is not below train.steps (%d): the LR only warms up, the %s decay "
                        "never starts", t.warmup_steps, t.steps, t.lr_decay)
        log.info("training %s for %d steps from step %d: global batch %d = %d ranks x %d accum x %d", recipe.name,
                 t.steps, start, t.batch_size, world, t.grad_accum, micro)

        def checkpoint(step: int) -> None:
            rngs = [_rng_state()]
            if world > 1:
                rngs = [None] * world
                torch.distributed.all_gather_object(rngs, _rng_state())
            if main:
                save_state(run_dir, step, {"step": step, "model": model.state_dict(), "ema": ema.state_dict(),
                                           "optimizer": opt.state_dict(), "scheduler": lr_schedule.state_dict(),
                                           "scaler": scaler.state_dict(), "rng": rngs, "world_size": world,
                                           "recipe": dump_recipe(recipe)}, t.keep_last)
                yaml = dump_recipe(recipe)
                save_weights(run_dir / RUN_EMA, ema.state_dict(), yaml, step=step, weights="ema")
                save_weights(run_dir / RUN_RAW, model.state_dict(), yaml, step=step, weights="raw")
            dist.barrier()

        it, grid_cache, monitor_ok = iter(loader), {}, True
        model.train()
        window_loss = torch.zeros((), device=dev)
        nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
        window_steps, window_start, window_data, info = 0, time.perf_counter(), 0.0, {}
        with graceful_stop() as stop:
            for step in range(start, t.steps):
                # Accumulate gradients.
                for a in range(t.grad_accum):
                    fetch = time.perf_counter()
                    batch = next(it)
                    window_data += time.perf_counter() - fetch
                    x0, noise = (batch[k].to(dev, non_blocking=True) for k in ("x0", "noise"))
                    u = batch["u"]  # the time draws stay on the CPU: the schedule's float64 math runs there
                    y = batch["y"].to(dev, non_blocking=True) if model.num_classes or model.text_dim else None
                    y = apply_drop(y, batch["drop"].to(dev), null)
                    sync = a == t.grad_accum - 1 or world == 1
                    with (nullcontext() if sync else net.no_sync()), autocast(dev, t.precision):
                        loss = diffusion.loss(net, x0, y, u, noise).mean()
                    scaler.scale(loss / t.grad_accum).backward()
                    window_loss += loss.detach() / t.grad_accum
                    nonfinite |= ~torch.isfinite(loss.detach())

                # Update weights.
                grad_norm, lr = optimizer_step(model, opt, lr_schedule, scaler, t.grad_clip)

                # Update EMA.
                update_ema(ema, model, ema_rate(t.ema_rate, step, t.ema_warmup))
                window_steps += 1
                done = step + 1

                # Log (and stop on a non-finite loss, keeping the last good checkpoint).
                if done % t.log_every == 0 or done == t.steps:
                    if t.precision != "fp16" and bool(dist.all_reduce_mean(nonfinite.float()) > 0):
                        raise UvitError(f"the loss became NaN or inf before step {done}; stopping without saving. The "
                                        f"last good checkpoint is kept in {run_dir}/checkpoints. Lower train.lr, set "
                                        "train.grad_clip, or train in bf16")
                    elapsed = time.perf_counter() - window_start
                    info = {"step": done, "loss": float(dist.all_reduce_mean(window_loss) / window_steps), "lr": lr,
                            "grad_norm": float(grad_norm), "img_per_s": window_steps * t.batch_size / elapsed,
                            # the share of the window spent waiting for batches: the data stream's cost (on a CPU) or
                            # a loader that cannot keep up (on a GPU, where the step itself runs asynchronously)
                            "data_frac": window_data / elapsed,
                            "peak_mem_gb": _peak_memory_gb(dev), "time": time.time()}
                    if t.precision == "fp16":
                        info["loss_scale"] = scaler.get_scale()
                    if main:
                        trackers.log(info)
                    window_loss.zero_()
                    window_steps, window_start, window_data = 0, time.perf_counter(), 0.0

                # Save a checkpoint; draw a sample grid; run the monitor evaluation.
                if done % t.save_every == 0 or done == t.steps:
                    checkpoint(done)
                if main and t.sample_every and (done % t.sample_every == 0 or done == t.steps):
                    grid = _sample_grid(ema, recipe, run_dir, done, dev, source, grid_cache)
                    if grid is not None:
                        trackers.image(done, "samples/ema_grid", grid)
                if main and t.eval_every and done % t.eval_every == 0 and monitor_ok:
                    record = monitor_record(ema, recipe, dev)
                    monitor_ok = record is not None
                    if record:
                        trackers.log({"step": done, **record})
                if progress is not None:
                    progress(done, t.steps, info)

                # Stop cleanly on Ctrl-C / SIGTERM: every rank stops at the same step, with a checkpoint of it.
                if dist.any_rank(stop.requested, dev):
                    if done % t.save_every and done != t.steps:
                        checkpoint(done)
                    raise Interrupted(f"training stopped by {stop.signal_name or 'a signal on another rank'} at step "
                                      f"{done} of {t.steps}; kept the training state {state_path(run_dir, done)} and "
                                      f"the weights {run_dir / RUN_EMA}. Resume with: uvit train "
                                      f"{run_dir / RUN_RECIPE} --run-dir {run_dir}")


        if start >= t.steps and main:
            log.info("nothing to do: the run already reached %d steps", t.steps)
    finally:
        if trackers is not None:
            trackers.close()
    return run_dir


GRID_IMAGENET_CLASSES = (88, 207, 279, 360, 387, 417, 812, 980, 33, 130, 292, 928, 972, 985, 1, 250)


def training_grid(ema, recipe: Recipe, path: Path, device, source, cache: dict) -> Path:
    """A guided sample grid of the EMA model with fixed seeds and conditions, so grids compare across steps."""
    m, cond, labels = recipe.model, None, None
    if m.num_classes > 0:
        classes = list(range(m.num_classes)) if m.num_classes <= 10 else list(GRID_IMAGENET_CLASSES)
        per = 8 if m.num_classes <= 10 else 1
        ids = [c for _ in range(per) for c in classes]
        cond = torch.tensor(ids)
        labels = [str(c) for c in ids]
    elif m.text_dim > 0:
        picks = range(min(8, len(source)))
        cond = torch.stack([source.get(i, caption=0)[1] for i in picks])
        if hasattr(source, "captions"):   # the captioned digits keep their strings
            labels = [source.captions[i][0] for i in picks]
    n = len(cond) if cond is not None else 16
    if "decoder" not in cache:  # loaded once per run; a missing VAE is remembered, so it warns once per grid
        try:
            cache["decoder"] = build_decoder(recipe, device)
        except UvitError as e:
            cache["decoder"] = e
    if isinstance(cache["decoder"], UvitError):
        raise cache["decoder"]
    images = generate(ema, recipe, list(range(n)), cond, device=device, decoder=cache["decoder"],
                      null_context=getattr(source, "null_context", None))
    return save_grid(images, path, labels=labels, ncols=min(n, 10 if m.num_classes <= 10 else 8))


def _sample_grid(ema, recipe: Recipe, run_dir: Path, step: int, device, source, cache: dict) -> Path | None:
    """Draw the training grid (its path); never fatal (a missing VAE only skips it, with a warning: None)."""
    try:
        path = training_grid(ema, recipe, run_dir / SAMPLES / f"step-{step:08d}.png", device, source, cache)
        log.info("sample grid: %s", path)
        return path
    except UvitError as e:
        log.warning("no sample grid at step %d: %s", step, e)
        return None
