"""The permanent bad-input sweep: every subcommand, through the real `uvit` entry point, with bad recipes, paths,
weights, data, numbers and resumed runs with changed settings.

Each case asserts a non-zero exit, no traceback, a message that names the offending option, key or path, and that
nothing was half-written: the case's folder holds exactly what it held before the command (the command runs
there, so default outputs such as grid.png, runs/ or data/ would show), and the shared run and samples are
byte-for-byte unchanged. A case that fails here is fixed where every command passes (recipe loading, files,
build, the launcher), not per command.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch

TINY = ["model.num_layers=3", "model.embed_dim=32", "model.num_heads=2", "train.batch_size=32",
        "train.sample_every=0", "train.log_every=1", "train.warmup_steps=1", "data.num_workers=0"]
SETS = [a for s in TINY for a in ("--set", s)]


# ---------------------------------------------------------------------------------------------------------------------
# Shared assets: one tiny trained run and its samples, made once per module and never changed by a case
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Assets:
    root: Path
    run: Path          # a 2-step digits run (checkpoint at step 2)
    npz: Path          # 4 samples of the run drawn by `uvit sample --npz`
    cache: Path        # a finished latent cache (tiny VAE) of 3 folder images
    vae: Path          # the tiny VAE folder

    def digest(self) -> dict[str, str]:
        """SHA-256 of every file under the shared assets (the check that no case touched them)."""
        out = {}
        for top in (self.run, self.npz, self.cache):
            for p in sorted([top] if top.is_file() else top.rglob("*")):
                if p.is_file():
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out


def _main(*args) -> int:
    from uvit_cli.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    from encode_fixtures import photo_folder, save_tiny_vae

    from uvit_cli.recipe import load_recipe
    from uvit_cli.train import train

    root = tmp_path_factory.mktemp("sweep")
    run = root / "run"
    train(load_recipe("digits_uvit_tiny", TINY + ["train.steps=2"]), run, device="cpu")
    npz = root / "samples.npz"
    assert _main("sample", run, "--n", 4, "--steps", 2, "--npz", npz, "--device", "cpu") == 0
    vae = save_tiny_vae(root / "vae")
    images = photo_folder(root / "images", 3, 20, 24)
    cache = root / "cache"
    assert _main("encode-latents", "folder", "--source", images, "--res", 16, "--vae", vae, "--out", cache,
                 "--num-workers", 0, "--device", "cpu") == 0
    return Assets(root, run, npz, cache, vae)


# ---------------------------------------------------------------------------------------------------------------------
# Set-ups: what a case needs in its own folder
# ---------------------------------------------------------------------------------------------------------------------

def _write(rel: str, data: bytes | str) -> Callable[[Path, Assets], None]:
    def setup(tmp: Path, a: Assets) -> None:
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


def _mkdir(rel: str) -> Callable[[Path, Assets], None]:
    return lambda tmp, a: (tmp / rel).mkdir(parents=True)


def _both(*setups) -> Callable[[Path, Assets], None]:
    def setup(tmp: Path, a: Assets) -> None:
        for s in setups:
            s(tmp, a)
    return setup


def _truncated_weights(tmp: Path, a: Assets) -> None:
    (tmp / "cut.safetensors").write_bytes((a.run / "ema.safetensors").read_bytes()[:3000])


def _pickle_pth(tmp: Path, a: Assets) -> None:
    """A .pth holding a pickled object that is not a tensor state dict (weights_only must refuse it)."""
    torch.save({"model": Path("x"), "note": object.__name__}, tmp / "evil.pth")


def _wrong_shapes_pth(tmp: Path, a: Assets) -> None:
    torch.save({"pos_embed": torch.zeros(1, 3, 7), "head.weight": torch.zeros(2, 2)}, tmp / "other.pth")


def _copy_run(tmp: Path, a: Assets) -> None:
    shutil.copytree(a.run, tmp / "run")


def _images(rel: str, n: int = 2, size: int = 8, mode: str = "L") -> Callable[[Path, Assets], None]:
    def setup(tmp: Path, a: Assets) -> None:
        from PIL import Image

        d = tmp / rel
        d.mkdir(parents=True)
        rng = np.random.default_rng(0)
        shape = (size, size) if mode == "L" else (size, size, 3)
        for k in range(n):
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(d / f"{k}.png")
    return setup


def _npz(rel: str, shape=(4, 8, 8, 1)) -> Callable[[Path, Assets], None]:
    def setup(tmp: Path, a: Assets) -> None:
        np.savez(tmp / rel, arr_0=np.zeros(shape, dtype=np.uint8))
    return setup


# ---------------------------------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    args: list                    # {tmp}, {run}, {npz}, {cache}, {vae} are filled in
    names: list[str]              # what the message must name (option, key or path), after the fill-in
    setup: Optional[Callable[[Path, Assets], None]] = None
    subprocess: bool = False      # through `python -m uvit_cli` (the launcher, signals)
    skip_if: Optional[Callable[[], str]] = None
    extra_check: Optional[Callable[[Path, Assets], None]] = field(default=None, repr=False)


def _gpu() -> str:
    return "this machine has a CUDA GPU" if torch.cuda.is_available() else ""


def _run_unchanged_recipe(tmp: Path, a: Assets) -> None:
    """A refused resume leaves the run record as it was: the trained recipe, no amendment."""
    assert (tmp / "run" / "recipe.yaml").read_bytes() == (a.run / "recipe.yaml").read_bytes()
    assert not (tmp / "run" / "amendments.jsonl").exists()


CPU = ["--device", "cpu"]
BAD_YAML = "model: {embed_dim: 32\n  num_layers: [3\n"

CASES = [
    # --- the root command
    Case("root-unknown-command", ["trian", "digits_uvit_tiny"], ["trian"]),
    Case("root-unknown-option", ["--verbose-all"], ["--verbose-all"]),

    # --- train: recipes
    Case("train-recipe-missing", ["train", "{tmp}/nope.yaml", *CPU], ["{tmp}/nope.yaml"]),
    Case("train-recipe-unknown-name", ["train", "digits_uvit_tinyy", *CPU], ["digits_uvit_tinyy", "digits_uvit_tiny"]),
    Case("train-recipe-is-a-folder", ["train", "{tmp}/r.yaml", *CPU], ["{tmp}/r.yaml"], _mkdir("r.yaml")),
    Case("train-recipe-binary", ["train", "{tmp}/r.yaml", *CPU], ["{tmp}/r.yaml"],
         _write("r.yaml", bytes(range(256)) * 4)),
    Case("train-recipe-yaml-list", ["train", "{tmp}/r.yaml", *CPU], ["{tmp}/r.yaml"], _write("r.yaml", "- 1\n- 2\n")),
    Case("train-recipe-bad-yaml", ["train", "{tmp}/r.yaml", *CPU], ["{tmp}/r.yaml", "line"], _write("r.yaml", BAD_YAML)),
    Case("train-recipe-empty", ["train", "{tmp}/r.yaml", *CPU], ["{tmp}/r.yaml"], _write("r.yaml", "")),
    Case("train-recipe-unknown-section", ["train", "{tmp}/r.yaml", *CPU], ["modle", "model"],
         _write("r.yaml", "modle: {embed_dim: 32}\n")),
    Case("train-recipe-unknown-key", ["train", "{tmp}/r.yaml", *CPU], ["embed_dimm", "embed_dim"],
         _write("r.yaml", "model: {embed_dimm: 32}\n")),
    Case("train-recipe-section-not-a-mapping", ["train", "{tmp}/r.yaml", *CPU], ["train"],
         _write("r.yaml", "train: 5\n")),
    Case("train-recipe-not-utf8", ["train", "{tmp}/r.yaml", *CPU], ["{tmp}/r.yaml"],
         _write("r.yaml", "name: caf\xe9\n".encode("latin-1"))),

    # --- train: --set and numbers
    Case("train-set-unknown-key", ["train", "digits_uvit_tiny", "--set", "train.stepz=5", *CPU], ["train.stepz", "steps"]),
    Case("train-set-no-equals", ["train", "digits_uvit_tiny", "--set", "train.steps", *CPU], ["--set", "train.steps"]),
    Case("train-set-no-section", ["train", "digits_uvit_tiny", "--set", "steps=5", *CPU], ["steps"]),
    Case("train-set-not-a-number", ["train", "digits_uvit_tiny", "--set", "train.steps=abc", *CPU], ["train.steps", "abc"]),
    Case("train-set-float-for-int", ["train", "digits_uvit_tiny", "--set", "train.steps=1.5", *CPU], ["train.steps"]),
    Case("train-set-bad-choice", ["train", "digits_uvit_tiny", "--set", "model.skip=bogus", *CPU], ["model.skip", "bogus"]),
    Case("train-log-every-0", ["train", "digits_uvit_tiny", "--set", "train.log_every=0", *CPU], ["train.log_every"]),
    Case("train-save-every-0", ["train", "digits_uvit_tiny", "--set", "train.save_every=0", *CPU], ["train.save_every"]),
    Case("train-batch-negative", ["train", "digits_uvit_tiny", "--set", "train.batch_size=-1", *CPU],
         ["train.batch_size"]),
    Case("train-lr-negative", ["train", "digits_uvit_tiny", "--set", "train.lr=-1e-4", *CPU], ["train.lr"]),
    Case("train-steps-0", ["train", "digits_uvit_tiny", "--set", "train.steps=0", *CPU], ["train.steps"]),
    Case("train-heads-do-not-divide", ["train", "digits_uvit_tiny", "--set", "model.num_heads=5", *CPU],
         ["model.num_heads"]),
    Case("train-patch-does-not-divide", ["train", "digits_uvit_tiny", "--set", "model.patch_size=3", *CPU],
         ["model.patch_size"]),
    Case("train-folder-data-missing", ["train", "digits_uvit_tiny", "--set", "data.name=folder", "--set",
                                       "data.source={tmp}/nowhere", *SETS, *CPU], ["{tmp}/nowhere"]),
    Case("train-latent-cache-missing", ["train", "digits_uvit_tiny", "--set", "data.name=latents", "--set",
                                        "data.latents={tmp}/nolatents", "--set", "model.in_chans=4", *SETS, *CPU],
         ["{tmp}/nolatents"]),
    Case("train-latent-cache-unfinished", ["train", "digits_uvit_tiny", "--set", "data.name=latents", "--set",
                                           "data.latents={tmp}/lat", "--set", "model.in_chans=4", *SETS, *CPU],
         ["{tmp}/lat"], _write("lat/encode_config.json", "{}")),

    # --- train: devices and outputs
    Case("train-device-gpu", ["train", "digits_uvit_tiny", *SETS, "--device", "gpu", "--run-dir", "{tmp}/r"],
         ["--device", "gpu"]),
    Case("train-device-cuda-absent", ["train", "digits_uvit_tiny", *SETS, "--device", "cuda", "--run-dir", "{tmp}/r"],
         ["--device", "cuda"], skip_if=_gpu),
    Case("train-run-dir-under-a-file", ["train", "digits_uvit_tiny", *SETS, "--run-dir", "{tmp}/f/run", *CPU],
         ["--run-dir", "{tmp}/f"], _write("f", "x")),
    Case("train-run-dir-is-a-file", ["train", "digits_uvit_tiny", *SETS, "--run-dir", "{tmp}/f", *CPU],
         ["--run-dir", "{tmp}/f"], _write("f", "x")),
    Case("train-runs-root-is-a-file", ["train", "digits_uvit_tiny", *SETS, "--runs", "{tmp}/f", *CPU],
         ["{tmp}/f"], _write("f", "x")),

    # --- train: resumed runs with changed settings
    Case("train-resume-changed-architecture", ["train", "{tmp}/run/recipe.yaml", "--run-dir", "{tmp}/run",
                                               "--set", "model.embed_dim=64", *CPU],
         ["model.embed_dim"], _copy_run, extra_check=_run_unchanged_recipe),
    Case("train-resume-steps-below-reached", ["train", "{tmp}/run/recipe.yaml", "--run-dir", "{tmp}/run",
                                              "--set", "train.steps=1", *CPU],
         ["train.steps"], _copy_run, extra_check=_run_unchanged_recipe),
    Case("train-checkpoints-without-resume", ["train", "{tmp}/run/recipe.yaml", "--run-dir", "{tmp}/run",
                                              "--no-resume", *CPU], ["{tmp}/run", "--resume"], _copy_run,
         extra_check=_run_unchanged_recipe),
    Case("train-resume-other-data", ["train", "{tmp}/run/recipe.yaml", "--run-dir", "{tmp}/run", "--set",
                                     "data.name=cifar10", *CPU], ["data"], _copy_run, extra_check=_run_unchanged_recipe),

    # --- train: the launcher (one clear error from it, exit 2, no copies)
    Case("train-launcher-missing-data", ["train", "digits_uvit_tiny", "--set", "data.name=folder", "--set",
                                         "data.source={tmp}/nowhere", *SETS, *CPU, "--nproc-per-node", "2",
                                         "--run-dir", "{tmp}/r"], ["{tmp}/nowhere"], subprocess=True),
    Case("train-launcher-bad-key", ["train", "digits_uvit_tiny", "--set", "train.stepz=3", *CPU,
                                    "--nproc-per-node", "2"], ["train.stepz"], subprocess=True),
    Case("sample-launcher-error-in-the-ranks", ["sample", "{run}", "--n", "4", "--prompt", "a cat", *CPU,
                                                "--nproc-per-node", "2"], ["--prompt"], subprocess=True),
    Case("fid-launcher-samples-missing", ["fid", "{tmp}/nope.npz", *CPU, "--nproc-per-node", "2"], ["{tmp}/nope.npz"],
         subprocess=True),

    # --- sample
    Case("sample-target-missing", ["sample", "{tmp}/runs/nope", *CPU], ["{tmp}/runs/nope"]),
    Case("sample-target-not-a-run", ["sample", "{tmp}/d", *CPU], ["{tmp}/d"], _mkdir("d")),
    Case("sample-truncated-weights", ["sample", "{tmp}/cut.safetensors", *CPU], ["{tmp}/cut.safetensors"],
         _truncated_weights),
    Case("sample-pth-without-recipe", ["sample", "{tmp}/w.pth", *CPU], ["--recipe"], _write("w.pth", b"\0" * 64)),
    Case("sample-pickle-refused", ["sample", "{tmp}/evil.pth", "--recipe", "digits_uvit_tiny", *CPU],
         ["{tmp}/evil.pth", "weights_only"], _pickle_pth),
    Case("sample-pth-wrong-model", ["sample", "{tmp}/other.pth", "--recipe", "digits_uvit_tiny", *CPU],
         ["{tmp}/other.pth"], _wrong_shapes_pth),
    Case("sample-out-is-a-folder", ["sample", "{run}", "--out", "{tmp}/d", *CPU], ["--out", "{tmp}/d"], _mkdir("d")),
    Case("sample-npz-under-a-file", ["sample", "{run}", "--npz", "{tmp}/f/s.npz", *CPU], ["--npz", "{tmp}/f"],
         _write("f", "x")),
    Case("sample-out-dir-is-a-file", ["sample", "{run}", "--out-dir", "{tmp}/f", *CPU], ["--out-dir", "{tmp}/f"],
         _write("f", "x")),
    Case("sample-seeds-backwards", ["sample", "{run}", "--seeds", "5-1", *CPU], ["--seeds", "5-1"]),
    Case("sample-seeds-and-n", ["sample", "{run}", "--seeds", "0-3", "--n", "3", *CPU], ["--seeds", "--n"]),
    Case("sample-n-zero", ["sample", "{run}", "--n", "0", *CPU], ["--n"]),
    Case("sample-steps-zero", ["sample", "{run}", "--steps", "0", *CPU], ["--steps"]),
    Case("sample-class-out-of-range", ["sample", "{run}", "--class", "12", *CPU], ["12", "0..9"]),
    Case("sample-class-name-on-digits", ["sample", "{run}", "--class", "goldfish", *CPU], ["goldfish"]),
    Case("sample-prompt-on-class-model", ["sample", "{run}", "--prompt", "a cat", *CPU], ["--prompt"]),
    Case("sample-sampler-unknown", ["sample", "{run}", "--sampler", "ddpm9", *CPU], ["--sampler", "ddpm9"]),
    Case("sample-order-out-of-range", ["sample", "{run}", "--set", "sample.order=5", *CPU], ["sample.order"]),
    Case("sample-set-unknown-key", ["sample", "{run}", "--set", "sample.stepz=3", *CPU], ["sample.stepz", "steps"]),
    Case("sample-cfg-negative", ["sample", "{run}", "--cfg-scale", "-1", *CPU], ["--cfg-scale"]),
    Case("sample-precision-unknown", ["sample", "{run}", "--precision", "fp8", *CPU], ["--precision", "fp8"]),
    Case("sample-device-gpu", ["sample", "{run}", "--device", "gpu"], ["--device", "gpu"]),
    Case("sample-prompts-file-missing", ["sample", "{run}", "--prompts-file", "{tmp}/p.txt", *CPU], ["{tmp}/p.txt"]),
    Case("sample-more-processes-than-seeds", ["sample", "{run}", "--n", "2", "--nproc-per-node", "3", *CPU],
         ["--nproc-per-node"]),

    # --- fid
    Case("fid-samples-missing", ["fid", "{tmp}/nope.npz", *CPU], ["{tmp}/nope.npz"]),
    Case("fid-samples-not-an-npz", ["fid", "{tmp}/s.npz", *CPU], ["{tmp}/s.npz"], _write("s.npz", "not a zip")),
    Case("fid-samples-empty-folder", ["fid", "{tmp}/d", "--mode", "digits", *CPU], ["{tmp}/d"], _mkdir("d")),
    Case("fid-npz-without-arr0", ["fid", "{tmp}/s.npz", *CPU], ["{tmp}/s.npz", "arr_0"],
         lambda tmp, a: np.savez(tmp / "s.npz", images=np.zeros((2, 8, 8, 1), np.uint8))),
    Case("fid-ref-missing", ["fid", "{tmp}/rgb.npz", "--ref", "{tmp}/ref.npz", "--mode", "clean", *CPU],
         ["{tmp}/ref.npz"], _npz("rgb.npz", (4, 16, 16, 3))),
    Case("fid-metric-unknown", ["fid", "{npz}", "--metrics", "fid,bogus", *CPU], ["bogus"]),
    Case("fid-mode-unknown", ["fid", "{npz}", "--mode", "bogus", *CPU], ["bogus"]),
    Case("fid-json-is-a-folder", ["fid", "{npz}", "--json", "{tmp}/d", *CPU], ["--json", "{tmp}/d"], _mkdir("d")),
    Case("fid-samples-out-under-a-file", ["fid", "{run}", "--samples-out", "{tmp}/f/s.npz", *CPU],
         ["--samples-out", "{tmp}/f"], _write("f", "x")),
    Case("fid-captions-and-prompts", ["fid", "{run}", "--captions", "{tmp}/c", "--prompts-file", "{tmp}/p.txt", *CPU],
         ["--captions", "--prompts-file"]),
    Case("fid-captions-on-class-model", ["fid", "{run}", "--captions", "{cache}", "-n", "4", *CPU], ["--captions"]),
    Case("fid-more-processes-than-samples", ["fid", "{run}", "-n", "2", "--nproc-per-node", "3", *CPU],
         ["--nproc-per-node"]),
    Case("fid-kept-samples-of-another-protocol", ["fid", "{run}", "-n", "4", "--samples-out", "{tmp}/s.npz", "--set",
                                                 "sample.steps=3", *CPU], ["{tmp}/s.npz"],
         lambda tmp, a: shutil.copy(a.npz, tmp / "s.npz")),
    Case("fid-no-run-in-cwd", ["fid", *CPU], ["runs"]),

    # --- fid-stats
    Case("fid-stats-out-not-npz", ["fid-stats", "{npz}", "--out", "{tmp}/s.txt", *CPU], ["--out", "{tmp}/s.txt"]),
    Case("fid-stats-out-is-a-folder", ["fid-stats", "{npz}", "--out", "{tmp}/d.npz", *CPU], ["--out", "{tmp}/d.npz"],
         _mkdir("d.npz")),
    Case("fid-stats-source-missing", ["fid-stats", "{tmp}/nope", "--out", "{tmp}/s.npz", *CPU], ["{tmp}/nope"]),
    Case("fid-stats-one-image", ["fid-stats", "{npz}", "--out", "{tmp}/s.npz", "-n", "1", *CPU], ["--num-samples"]),
    Case("fid-stats-folder-without-images", ["fid-stats", "{tmp}/d", "--out", "{tmp}/s.npz", "--mode", "digits",
                                             *CPU], ["{tmp}/d"], _both(_mkdir("d"), _write("d/readme.txt", "x"))),

    # --- encode-latents
    Case("encode-no-source", ["encode-latents", "folder", *CPU], ["--source"]),
    Case("encode-source-missing", ["encode-latents", "folder", "--source", "{tmp}/nope", "--vae", "{vae}", *CPU],
         ["{tmp}/nope"]),
    Case("encode-res-not-multiple-of-8", ["encode-latents", "folder", "--source", "{tmp}/i", "--res", "20", *CPU],
         ["--res", "20"], _images("i")),
    Case("encode-dataset-unknown", ["encode-latents", "pictures", "--source", "{tmp}/i", *CPU], ["pictures"]),
    Case("encode-hub-data-offline", ["encode-latents", "imagenet", "--source", "hf:uvit-test/no-such-set",
                                     "--vae", "{vae}", *CPU], ["hf:uvit-test/no-such-set", "--allow-download"]),
    Case("encode-vae-missing", ["encode-latents", "folder", "--source", "{tmp}/i", "--res", "16", "--vae",
                                "{tmp}/novae", "--out", "{tmp}/lat", *CPU], ["{tmp}/novae"], _images("i")),
    Case("encode-out-is-a-file", ["encode-latents", "folder", "--source", "{tmp}/i", "--res", "16", "--vae", "{vae}",
                                  "--out", "{tmp}/f", *CPU], ["--out", "{tmp}/f"], _both(_images("i"), _write("f", "x"))),
    Case("encode-all-images-unreadable", ["encode-latents", "folder", "--source", "{tmp}/i", "--res", "16", "--vae",
                                          "{vae}", "--out", "{tmp}/lat", "--num-workers", "0", *CPU], ["{tmp}/i"],
         _both(_write("i/a.png", "not a png"), _write("i/b.jpg", b"\xff\xd8 broken"))),
    Case("encode-resume-changed-settings", ["encode-latents", "folder", "--source", "{tmp}/i", "--res", "16",
                                            "--vae", "{vae}", "--out", "{cache}", "--num-workers", "0", *CPU],
         ["{cache}", "--out"], _images("i", 3, 12, "RGB")),
    Case("encode-scale-negative", ["encode-latents", "folder", "--source", "{tmp}/i", "--scale-factor", "-1", *CPU],
         ["--scale-factor"], _images("i")),

    # --- ablate
    Case("ablate-suite-missing", ["ablate", "{tmp}/nope.yaml", *CPU], ["{tmp}/nope.yaml"]),
    Case("ablate-suite-yaml-list", ["ablate", "{tmp}/s.yaml", *CPU], ["{tmp}/s.yaml"], _write("s.yaml", "- a\n")),
    Case("ablate-only-unknown", ["ablate", "digits_fig2", "--only", "bogus", "--out", "{tmp}/a", *CPU], ["bogus"]),
    Case("ablate-set-unknown-key", ["ablate", "digits_fig2", "--set", "model.bogus=1", "--out", "{tmp}/a", *CPU],
         ["model.bogus"]),
    Case("ablate-steps-zero", ["ablate", "digits_fig2", "--steps", "0", "--out", "{tmp}/a", *CPU], ["--steps"]),
    Case("ablate-out-is-a-file", ["ablate", "digits_fig2", "--only", "skip_none", "--steps", "1", "--out", "{tmp}/f",
                                  *CPU], ["--out", "{tmp}/f"], _write("f", "x")),

    # --- bench
    Case("bench-batches-not-numbers", ["bench", "digits_uvit_tiny", "--suite", "scaling", "--batches", "8,x", *CPU],
         ["--batches", "x"]),
    Case("bench-suite-unknown", ["bench", "digits_uvit_tiny", "--suite", "bogus", *CPU], ["bogus"]),
    Case("bench-precision-unknown", ["bench", "digits_uvit_tiny", "--precision", "fp64", *CPU], ["fp64"]),
    Case("bench-json-is-a-folder", ["bench", "digits_uvit_tiny", "--json", "{tmp}/d", *CPU], ["--json", "{tmp}/d"],
         _mkdir("d")),
    Case("bench-recipe-missing", ["bench", "{tmp}/nope.yaml", *CPU], ["{tmp}/nope.yaml"]),
    Case("bench-compile-bad-flag", ["bench", "digits_uvit_tiny", "--compile", "maybe", *CPU], ["maybe"]),

    # --- export
    Case("export-target-missing", ["export", "{tmp}/nope", "--out", "{tmp}/e"], ["{tmp}/nope"]),
    Case("export-format-unknown", ["export", "{run}", "--format", "onnx", "--out", "{tmp}/e"], ["--format", "onnx"]),
    Case("export-push-needs-diffusers", ["export", "{run}", "--format", "safetensors", "--out", "{tmp}/e.safetensors",
                                         "--push-to-hub", "me/x"], ["--push-to-hub"]),
    Case("export-out-not-empty", ["export", "{run}", "--out", "{tmp}/e"], ["{tmp}/e", "--overwrite"],
         _write("e/keep.txt", "mine")),
    Case("export-out-is-a-file", ["export", "{run}", "--out", "{tmp}/e"], ["{tmp}/e"], _write("e", "x")),
    Case("export-truncated-weights", ["export", "{tmp}/cut.safetensors", "--out", "{tmp}/e"],
         ["{tmp}/cut.safetensors"], _truncated_weights),

    # --- info, convert, recipes
    Case("info-truncated-weights", ["info", "{tmp}/cut.safetensors"], ["{tmp}/cut.safetensors"], _truncated_weights),
    Case("info-target-missing", ["info", "{tmp}/nope.yaml"], ["{tmp}/nope.yaml"]),
    Case("info-set-bad-value", ["info", "digits_uvit_tiny", "--set", "model.num_layers=many"], ["model.num_layers"]),
    Case("info-safetensors-without-recipe", ["info", "{tmp}/w.safetensors"], ["{tmp}/w.safetensors", "--recipe"],
         lambda tmp, a: __import__("uvit_cli.files", fromlist=["x"]).write_safetensors(
             tmp / "w.safetensors", {"w": torch.zeros(2)})),
    Case("convert-out-not-safetensors", ["convert", "{tmp}/other.pth", "--recipe", "digits_uvit_tiny", "--out",
                                         "{tmp}/o.pt"], ["--out", "{tmp}/o.pt"], _wrong_shapes_pth),
    Case("convert-checkpoint-missing", ["convert", "{tmp}/nope.pth", "--recipe", "digits_uvit_tiny", "--out",
                                        "{tmp}/o.safetensors"], ["{tmp}/nope.pth"]),
    Case("convert-pickle-refused", ["convert", "{tmp}/evil.pth", "--recipe", "digits_uvit_tiny", "--out",
                                    "{tmp}/o.safetensors"], ["{tmp}/evil.pth", "weights_only"], _pickle_pth),
    Case("convert-wrong-model", ["convert", "{tmp}/other.pth", "--recipe", "digits_uvit_tiny", "--out",
                                 "{tmp}/o.safetensors"], ["{tmp}/other.pth"], _wrong_shapes_pth),
    Case("convert-out-under-a-file", ["convert", "{tmp}/other.pth", "--recipe", "digits_uvit_tiny", "--out",
                                      "{tmp}/f/o.safetensors"], ["--out", "{tmp}/f"],
         _both(_wrong_shapes_pth, _write("f", "x"))),
    Case("recipes-extra-argument", ["recipes", "extra"], ["extra"]),
]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


def _flat(text: str) -> str:
    """Output with rich's panel borders and line wrapping undone, so a name split over lines still reads whole."""
    for ch in "│╭╮╰╯─":
        text = text.replace(ch, " ")
    return " ".join(text.split())


def _subprocess_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, assets: Assets, tmp_path, monkeypatch, uvit):
    if case.skip_if is not None and (why := case.skip_if()):
        pytest.skip(why)
    work = tmp_path / "work"
    work.mkdir()
    if case.setup is not None:
        case.setup(work, assets)
    fill = {"tmp": str(work), "run": str(assets.run), "npz": str(assets.npz), "cache": str(assets.cache),
            "vae": str(assets.vae)}
    args = [str(a).format(**fill) for a in case.args]
    before, shared = _tree(work), assets.digest()
    monkeypatch.chdir(work)                       # default outputs (grid.png, runs/, data/) would land here
    if case.subprocess:
        res = subprocess.run([sys.executable, "-m", "uvit_cli", *args], capture_output=True, text=True,
                             env=_subprocess_env(), timeout=300)
        code, output = res.returncode, res.stdout + res.stderr
    else:
        res = uvit(*args)
        code, output = res.returncode, res.output

    assert code != 0, f"exit 0 for bad input:\n{output}"
    assert "Traceback" not in output, output
    flat = _flat(output)
    for name in case.names:
        assert name.format(**fill) in flat, f"the message does not name {name.format(**fill)!r}:\n{output}"
    assert _tree(work) == before, f"the failed command left files: {sorted(set(_tree(work)) - set(before))}"
    assert assets.digest() == shared, "the shared run or samples changed"
    if case.subprocess:                           # one message, from the launcher: no copy per rank
        assert flat.count("error:") == 1, output
    if case.extra_check is not None:
        case.extra_check(work, assets)


def test_the_sweep_covers_every_command():
    """Every `uvit` subcommand has at least one case (a new command must join the sweep)."""
    from uvit_cli.cli import app

    commands = {c.name for c in app.registered_commands}
    covered = {c.args[0] for c in CASES}
    assert commands - covered == set(), f"commands without a bad-input case: {sorted(commands - covered)}"
    assert len(CASES) >= 60
