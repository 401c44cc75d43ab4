"""Ctrl-C during the chunked jobs: `uvit sample --npz`, `uvit fid RUN` (its sampling) and `uvit encode-latents`
keep their last complete chunk or shard, say what was kept and the command that resumes, and exit 130; the same
command then finishes with the bytes of an uninterrupted run. (`uvit train`'s Ctrl-C is in test_train.py.)"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from uvit_cli.data import latents as L
from uvit_cli.metrics.sample_store import parts_dir

TINY = ["model.num_layers=3", "model.embed_dim=32", "model.num_heads=2", "train.batch_size=32",
        "train.sample_every=0", "train.log_every=1", "train.warmup_steps=1", "data.num_workers=0", "train.steps=2"]


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _uvit(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uvit_cli", *map(str, args)], capture_output=True, text=True,
                          env=_env(), timeout=600)


def _interrupt_after_first(args: list, finished) -> tuple[int, str]:
    """Run `uvit ARGS`, send SIGINT as soon as ``finished()`` (the first complete unit is on disk), and return
    (exit status, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "uvit_cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 300
    while time.time() < deadline and not finished() and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the job ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _flat(text: str) -> str:
    return " ".join(text.split())


def _assert_stopped(code: int, err: str, args: list) -> None:
    flat = _flat(err)
    assert code == 130, err
    assert "Traceback" not in err, err
    assert "interrupted:" in flat and "stopped by SIGINT" in flat, err
    assert f"Resume with the same command: uvit {shlex.join(map(str, args))}" in flat, err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from uvit_cli.recipe import load_recipe
    from uvit_cli.train import train

    run = tmp_path_factory.mktemp("stop") / "run"
    train(load_recipe("digits_uvit_tiny", TINY), run, device="cpu")
    return run


def _chunks(npz: Path) -> list:
    return list(parts_dir(npz).glob("chunk_*.npz"))


def test_sample_npz_keeps_its_chunks_on_ctrl_c_and_resumes_to_the_same_bytes(run, tmp_path):
    common = ["sample", run, "--n", 128, "--steps", 100, "--device", "cpu"]   # 8 chunks of 16
    straight, stopped = tmp_path / "straight.npz", tmp_path / "stopped.npz"
    assert _uvit(*common, "--npz", straight).returncode == 0

    args = [*common, "--npz", stopped]
    code, err = _interrupt_after_first(args, lambda: _chunks(stopped))
    _assert_stopped(code, err, args)
    kept = len(_chunks(stopped))
    assert 0 < kept < 8 and not stopped.exists(), kept         # the finished chunks; no file that looks done
    assert f"kept {kept * 16} of 128" in _flat(err), err

    res = _uvit(*args)
    assert res.returncode == 0, res.stderr
    assert "resuming sampling" in _flat(res.stderr), res.stderr
    assert stopped.read_bytes() == straight.read_bytes() and not parts_dir(stopped).exists()


def test_fid_run_keeps_its_samples_on_ctrl_c_and_resumes_to_the_same_numbers(run, tmp_path):
    common = ["fid", run, "--num-samples", 128, "--set", "sample.steps=100", "--device", "cpu"]
    straight, stopped = tmp_path / "straight.npz", tmp_path / "stopped.npz"
    res = _uvit(*common, "--samples-out", straight, "--json", tmp_path / "straight.json")
    assert res.returncode == 0, res.stderr

    args = [*common, "--samples-out", stopped, "--json", tmp_path / "stopped.json"]
    code, err = _interrupt_after_first(args, lambda: _chunks(stopped))
    _assert_stopped(code, err, args)
    assert 0 < len(_chunks(stopped)) < 8 and not stopped.exists()
    assert not (tmp_path / "stopped.json").exists()

    res = _uvit(*args)
    assert res.returncode == 0, res.stderr
    assert stopped.read_bytes() == straight.read_bytes()
    a, b = (json.loads((tmp_path / f"{x}.json").read_text())["metrics"] for x in ("straight", "stopped"))
    assert a == b and set(a) == {"fd_digits", "acc_digits"}


def test_encode_keeps_its_shards_on_ctrl_c_and_resumes_to_the_same_bytes(tmp_path):
    from encode_fixtures import photo_folder, save_tiny_vae

    vae = save_tiny_vae(tmp_path / "vae")
    images = photo_folder(tmp_path / "images", 32, 256, 256)
    common = ["encode-latents", "folder", "--source", images, "--res", 256, "--vae", vae, "--shard-size", 2,
              "--batch-size", 2, "--num-workers", 0, "--device", "cpu"]           # 16 shards
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert _uvit(*common, "--out", straight).returncode == 0

    args = [*common, "--out", stopped]
    code, err = _interrupt_after_first(args, lambda: len(L.completed_shards(stopped, 16)) > 0)
    _assert_stopped(code, err, args)
    kept = len(L.completed_shards(stopped, 16))
    assert 0 < kept < 16 and not (stopped / L.MANIFEST).exists(), kept
    assert f"kept {kept} of 16 shards" in _flat(err), err

    res = _uvit(*args)
    assert res.returncode == 0, res.stderr
    assert "resuming" in _flat(res.stderr), res.stderr
    for s in range(16):
        name = f"{L.SHARD_DIR}/{L.shard_name(s)}.safetensors"
        assert (stopped / name).read_bytes() == (straight / name).read_bytes(), name
    m1, m2 = (json.loads((d / L.MANIFEST).read_text()) for d in (straight, stopped))
    assert m1["shards"] == m2["shards"] and m1["count"] == m2["count"] == 32


def test_ablate_stops_on_ctrl_c_with_the_suite_resume_command_which_finishes_it(tmp_path):
    """Ctrl-C during `uvit ablate` names the suite and the run it stopped in, keeps that run's checkpoint, and
    prints the ablate command that continues (with --resume), not the inner `uvit train` (which would skip the
    suite's evaluation and report); that command then finishes the suite."""
    import yaml

    tiny = {"model.num_layers": 3, "model.embed_dim": 32, "model.num_heads": 2, "model.num_classes": 0,
            "model.null_class": False, "train.p_uncond": 0.0, "train.batch_size": 16, "train.warmup_steps": 2,
            "train.log_every": 1, "train.sample_every": 0, "train.save_every": 2, "sample.steps": 2,
            "sample.cfg_scale": 1.0, "eval.monitor_samples": 16, "data.num_workers": 0}
    suite = {"name": "tiny", "base": "digits_uvit_tiny", "overrides": tiny, "steps": 400, "eval_every": 400,
             "metric": "fd_digits", "lower_is_better": True,
             "variants": {"base": {}, "skip_none": {"model.skip": "none"}},
             "factors": {"long_skip": {"title": "long skip", "finding": "concat is best",
                                       "variants": {"base": "concat", "skip_none": "none"},
                                       "claims": ["base > skip_none"]}}}
    path, out = tmp_path / "suite.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    args = ["ablate", path, "--out", out, "--device", "cpu"]
    code, err = _interrupt_after_first(args, lambda: any((out / "runs" / "base" / "checkpoints").glob("*.pt")))
    flat = _flat(err)
    assert code == 130 and "Traceback" not in err, err
    assert "stopped by SIGINT" in flat and "of base (1/2 in suite tiny)" in flat, err
    assert "uvit train" not in flat, err
    again = f"Resume with: uvit {shlex.join(map(str, args + ['--resume']))}"
    assert again in flat, err
    assert not (out / "runs" / "skip_none").exists()
    res = _uvit(*args, "--resume")
    assert res.returncode == 0, res.stderr
    assert (out / "results.md").is_file() and (out / "runs" / "skip_none" / "ema.safetensors").is_file()
