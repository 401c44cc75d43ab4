"""`uvit bench`: training and sampling throughput, MFU against a measured matmul peak, memory, scaling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ..errors import UvitError
from ..files import prepare_output, write_json
from ..choices import Precision, choices
from .app import app, console, setup_logging
from .options import DeviceOption, SetOption, parse_list

SUITES = ("peak", "train", "profile", "checkpoint", "scaling", "sample", "encode", "features")   # one module each in uvit_cli/bench/


def _choices(text: str, allowed: tuple, what: str) -> list[str]:
    out = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in out if s not in allowed]
    if bad:
        raise UvitError(f"{what}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return out


def _flags(text: str, what: str) -> list[bool]:
    return {"off": [False], "on": [True], "both": [False, True]}[_choices(text, ("off", "on", "both"), what)[0]]


@app.command("bench")
def bench_cmd(
    recipe_path: str = typer.Argument("cifar10_uvit_s2", metavar="RECIPE", help="recipe whose model is measured "
                                      "(a run directory or .safetensors: its recipe, and its weights for the "
                                      "sample suite's image agreement)"),
    overrides: Optional[List[str]] = SetOption,
    suite: str = typer.Option("peak,train", "--suite", help=f"comma list of {', '.join(SUITES)}"),
    device: str = DeviceOption,
    batch: int = typer.Option(0, "--batch", min=0, help="training batch (0: 128 on GPU, 8 on CPU)"),
    precisions: str = typer.Option("fp32,bf16", "--precision", help="comma list of fp32, bf16, fp16"),
    compile_: str = typer.Option("off", "--compile", help="torch.compile: off, on or both"),
    grad_ckpt: str = typer.Option("off", "--grad-ckpt", help="gradient checkpointing: off, on or both"),
    naive: bool = typer.Option(False, "--naive/--no-naive", help="also time the straightforward model (attention "
                               "written out as softmax(QK^T)V) in fp32, the CPU baseline"),
    batches: str = typer.Option("", "--batches", help="scaling suite: batch sizes, e.g. 1,4,16"),
    patch_sizes: str = typer.Option("", "--patch-sizes", help="scaling suite: patch sizes, e.g. 1,2,4,8"),
    vae_batch: int = typer.Option(0, "--vae-batch", min=0, help="sample suite: VAE decode batch (0: 8 on GPU, "
                                  "1 on CPU)"),
    forward_batches: str = typer.Option("", "--forward-batches", help="sample suite: network forward batches to "
                                        "time the recipe's protocol at (default: the device's default, 2x, 4x, 8x)"),
    guided: bool = typer.Option(True, "--guided/--no-guided", help="sample suite: also time batched bf16 guidance "
                                "against two fp32 forwards (CIFAR10 U-ViT-S/2) and, for a pixel recipe, the SD-VAE "
                                "decode"),
    iters: int = typer.Option(0, "--iters", min=0, help="timed steps per run (0: 10 on GPU, 3 on CPU)"),
    repeats: int = typer.Option(3, "--repeats", min=1, help="runs per measurement; the median is reported"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write every number to this JSON file"),
) -> None:
    """Measure throughput, MFU and memory on this device; print a table and optionally write JSON.

    Examples:
      uvit bench cifar10_uvit_s2 --device cpu --batch 8 --precision fp32,bf16 --naive
      uvit bench imagenet256_uvit_h2 --device cuda --batch 128 --precision bf16 --compile both --grad-ckpt both
      uvit bench digits_uvit_tiny --suite scaling --batches 8,32,128 --patch-sizes 1,2,4
      uvit bench imagenet256_uvit_h2 --suite sample --device cuda   (the recipe's protocol, guided DPM-Solver, SD-VAE)
      uvit bench runs/digits --suite sample --device cpu --forward-batches 4,8,16,32 --no-guided
      uvit bench cifar10_uvit_s2 --suite checkpoint --batch 4 --precision fp32   (per checkpoint policy: memory, FLOPs, time)
    """
    import torch

    from .. import build, runtime  # deferred: loads torch (cli/app.py)
    from ..bench import encode, features, memory, profile, sample, timer, train  # deferred: loads torch (cli/app.py)

    setup_logging()
    if json_out is not None:
        prepare_output(json_out, "--json")
    suites = _choices(suite, SUITES, "--suite")
    precs = _choices(precisions, choices(Precision), "--precision")
    bs = parse_list(batches, "--batches")
    ps = parse_list(patch_sizes, "--patch-sizes")
    recipe, weights_path = build.load_recipe_for(recipe_path, overrides)
    dev = runtime.resolve_device(device)
    runtime.setup_runtime(dev)
    gpu = dev.type == "cuda"
    batch = batch or (128 if gpu else 8)
    iters = iters or (10 if gpu else 3)
    result = {"recipe": recipe.name, "model": recipe.model.size, "device": str(dev), "machine": timer.machine()}

    peaks = {}
    if "peak" in suites or "train" in suites:
        for p in sorted({"fp32" if p == "fp32" else "bf16" for p in precs} | {"fp32"}):
            dtype = torch.float32 if p == "fp32" else torch.bfloat16
            peaks[p] = timer.matmul_peak(dev, dtype, repeats=repeats)
        result["matmul_peak_tflops"] = peaks
        table = Table(title=f"matmul peak on {dev} (measured)")
        table.add_column("dtype")
        table.add_column("TFLOP/s", justify="right")
        for p, v in peaks.items():
            table.add_row(p, f"{v:.2f}")
        console.print(table)

    if "train" in suites:
        rows = []
        for prec in precs:
            peak = peaks["fp32" if prec == "fp32" else "bf16"]
            for comp in _flags(compile_, "--compile"):
                for ck in _flags(grad_ckpt, "--grad-ckpt"):
                    rows.append(train.bench_train(recipe, batch=batch, precision=prec, compile=comp, grad_checkpoint=ck,
                                            device=str(dev), iters=iters, repeats=repeats, peak_tflops=peak))
        if naive:
            rows.append(train.bench_train(recipe, batch=batch, precision="fp32", naive_attention=True, device=str(dev),
                                    iters=iters, repeats=repeats, peak_tflops=peaks["fp32"]))
        result["train"] = rows
        base = next((r for r in rows if r["precision"] == "fp32" and not r["compile"] and not r["grad_checkpoint"]
                     and not r["naive_attention"]), None)
        table = Table(title=f"training step, {recipe.model.size} {recipe.model.img_size}px x{recipe.model.in_chans}, "
                            f"batch {batch}, {dev} (median of {repeats})")
        for col in ("precision", "compile", "grad ckpt", "attention", "steps/s", "img/s", "TFLOP/s", "MFU",
                    "vs fp32", "peak GiB"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(r["precision"], "on" if r["compile"] else "off", "on" if r["grad_checkpoint"] else "off",
                          "naive" if r["naive_attention"] else "sdpa", f"{r['steps_per_s']:.3f}",
                          f"{r['img_per_s']:.1f}", f"{r['tflops']:.2f}", f"{100 * r['mfu']:.1f}%",
                          f"{r['img_per_s'] / base['img_per_s']:.2f}x" if base else "-",
                          f"{r['peak_mem_gb']:.1f}" if "peak_mem_gb" in r else "-")
        console.print(table)

    if "profile" in suites:
        result["profile"] = []
        for prec in precs:
            for comp in _flags(compile_, "--compile"):
                r = profile.profile_train(recipe, batch=batch, precision=prec, compile=comp, device=str(dev),
                                          steps=iters)
                result["profile"].append(r)
                _print_profile(r, recipe, dev)

    if "checkpoint" in suites:
        result["checkpoint"] = _bench_checkpoint(recipe, memory, train, batch=batch, device=str(dev),
                                                 precision=precs[-1], iters=iters, repeats=repeats)

    if "scaling" in suites:
        rows = train.bench_scaling(recipe, batches=bs or [1, 4, batch], patch_sizes=ps, precision=precs[-1], device=str(dev),
                                   iters=iters, repeats=repeats)
        result["scaling"] = rows
        table = Table(title=f"scaling ({precs[-1]}, {dev})")
        for col in ("axis", "batch", "patch", "tokens", "img/s", "TFLOP/s", "peak GiB"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(r["axis"], str(r["batch"]), str(r.get("patch_size", recipe.model.patch_size)),
                          str(r["tokens"]), f"{r['img_per_s']:.1f}", f"{r['tflops']:.2f}",
                          f"{r['peak_mem_gb']:.1f}" if "peak_mem_gb" in r else "-")
        console.print(table)

    if "sample" in suites:
        model = build.load_model(recipe_path, None, overrides)[0] if weights_path is not None else None
        r = sample.bench_sampling(recipe, model=model, forward_batches=parse_list(forward_batches, "--forward-batches"),
                                  precisions=[p for p in precs if p != "fp16" or gpu],
                                  compile_flags=_flags(compile_, "--compile"), device=str(dev), repeats=repeats)
        result["sample_protocol"] = r
        _print_protocol(r, recipe, repeats)
        if guided:
            r = sample.bench_guided_sampling(recipe if recipe.has_null_condition and recipe.model.num_classes
                                             else None, device=str(dev), repeats=repeats)
            result["sample"] = r
            console.print_json(json.dumps(r, default=str))
    if "sample" in suites and (recipe.is_latent or guided):
        # The VAE decode after sampling: the recipe's latent grid, or 32x32 (256 px) for a pixel-space recipe.
        latent = recipe.model.img_size if recipe.model.in_chans == 4 else 32
        decode_precs = [p for p in precs if p != "fp16" or gpu]
        rows = sample.bench_vae_decode("sd", latent_size=latent, batch=vae_batch or (8 if gpu else 1),
                                precisions=decode_precs, device=str(dev), repeats=repeats)
        result["vae_decode"] = rows
        table = Table(title=f"SD-VAE decode, {latent}x{latent} latents, {dev} (median of {repeats})")
        for col in ("precision", "batch", "image px", "s/batch", "img/s"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(r["precision"], str(r["batch"]), str(r["image_size"]), f"{r['sec_per_batch']:.3f}",
                          f"{r['img_per_s']:.2f}")
        console.print(table)

    if "encode" in suites:
        # The SD VAE at 256 px is slow on a CPU: there a small batch measures the same ratio.
        sd_kw = {} if gpu else {"batch_size": 2, "num_batches": 2}
        result["encode"] = [encode.bench_encode("tiny", device=str(dev)), encode.bench_encode("sd", device=str(dev), **sd_kw)]
        console.print_json(json.dumps(result["encode"], default=str))

    if "features" in suites:
        result["features"] = features.bench_features(device=str(dev), repeats=repeats)
        console.print_json(json.dumps(result["features"], default=str))

    if json_out:
        write_json(json_out, result)
        console.print(f"wrote {json_out}")


def _bench_checkpoint(recipe, memory, train, *, batch: int, device: str, precision: str, iters: int,
                      repeats: int) -> list[dict]:
    """Every activation-checkpointing policy against none, in the last --precision: what the forward keeps, the
    step's peak tensor memory and FLOPs (counted) and its time on this device (the median of ``repeats``)."""
    from ..recipe import replace

    rows = memory.bench_checkpointing(recipe, batch=batch, device=device, precision=precision)
    for r in rows:
        policy = r["policy"]
        timed = train.bench_train(replace(recipe, model={"checkpoint_policy": "all" if policy == "none" else policy}),
                                  batch=batch, precision=precision, grad_checkpoint=policy != "none", device=device,
                                  iters=iters, repeats=repeats)
        r.update(sec_per_step=timed["sec_per_step"], runs=timed.get("runs"), peak_mem_gb=timed.get("peak_mem_gb"))
    ref = rows[0]
    table = Table(title=f"activation checkpointing, {recipe.model.size} {recipe.model.img_size}px, batch {batch}, "
                        f"{precision}, {device}: memory and FLOPs counted, time the median of {repeats}")
    for col in ("policy", "kept by forward MiB", "vs none", "step peak MiB", "vs none", "step GFLOPs", "vs none",
                "s/step", "vs none"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["policy"], f"{r['forward_bytes'] / 2 ** 20:.1f}", f"{r['forward_vs_none']:.3f}",
                      f"{r['peak_bytes'] / 2 ** 20:.1f}", f"{r['memory_vs_none']:.3f}",
                      f"{r['flops'] / 1e9:.2f}", f"{r['flops_vs_none']:.3f}", f"{r['sec_per_step']:.3f}",
                      f"{r['sec_per_step'] / ref['sec_per_step']:.3f}")
    console.print(table)
    return rows


def _print_profile(r: dict, recipe, dev) -> None:
    head = (f"{recipe.model.size} training step, batch {r['batch']}, {r['precision']}"
            f"{', compiled' if r['compile'] else ''}, {dev}: {r['time']} per step, {r['steps']} profiled steps")
    table = Table(title=f"where the time goes: {head}")
    for col in ("phase", "ms/step", "share"):
        table.add_column(col, justify="right")
    for p in r["phases"]:
        table.add_row(p["phase"], f"{p['ms_per_step']:.2f}", f"{100 * p['share']:.1f}%")
    console.print(table)
    table = Table(title=f"top operators by self time: {head}")
    for col in ("operator", "self ms/step", "share", "calls/step"):
        table.add_column(col, justify="right")
    for o in r["ops"]:
        table.add_row(o["op"], f"{o['self_ms_per_step']:.2f}", f"{100 * o['share']:.1f}%", f"{o['calls_per_step']:g}")
    console.print(table)


def _print_protocol(r: dict, recipe, repeats: int) -> None:
    s = recipe.sample
    first = r["rows"][0]
    table = Table(title=f"sampling protocol of {recipe.name}: {s.sampler} {s.steps} steps ({first['nfe']} NFE/image), "
                        f"w={s.cfg_scale:g}, {first['samples']} images per call, {r['device']}, {r['weights']} weights "
                        f"(median of {repeats})")
    for col in ("precision", "compile", "forward batch", "img/s", "s/image"):
        table.add_column(col, justify="right")
    for row in r["rows"]:
        mark = " (default)" if row["default_forward_batch"] else ""
        table.add_row(row["precision"], "on" if row["compile"] else "off", f"{row['forward_batch']}{mark}",
                      f"{row['img_per_s']:.2f}", f"{row['sec_per_image']:.4f}")
    console.print(table)
    if r["agreement"]:
        table = Table(title="images against fp32 eager (default forward batch)")
        for col in ("precision", "compile", "rel. L2 error", "uint8 max diff", "uint8 mean diff"):
            table.add_column(col, justify="right")
        for a in r["agreement"]:
            table.add_row(a["precision"], "on" if a["compile"] else "off", f"{a['sample_rel_err']:.2e}",
                          str(a["uint8_max_diff"]), f"{a['uint8_mean_diff']:.3f}")
        console.print(table)
    p = r["projection"]
    for name in ("default", "best"):
        q = p[name]
        walls = ", ".join(f"{d} device{'s' if int(d) > 1 else ''} {_duration(w)}" for d, w in q["wall_s"].items())
        console.print(f"{p['num_samples']} samples ({name}: {q['precision']}, forward batch {q['forward_batch']}, "
                      f"{q['img_per_s']:.2f} img/s per device): {walls}", highlight=False)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"
