"""`uvit sample` and `uvit fid` on 2 gloo processes: the same bytes and the same numbers as one process, and a rerun
after one rank is killed mid-way that ends the same (tiny random-weight digits model, random FID Inception)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from metrics_fixtures import photo_crops, write_random_inception
from uvit_cli.build import build_model
from uvit_cli.checkpoint import save_weights
from uvit_cli.cli import main
from uvit_cli.metrics.sample_store import parts_dir
from uvit_cli.recipe import dump_recipe, load_recipe
from uvit_cli.run import RUN_EMA, write_recipe

pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _in_process(*args) -> None:
    """`uvit ARGS` in this process (one process, no torchrun)."""
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        assert not e.code, f"uvit {' '.join(map(str, args))} exited with {e.code}"


def _torchrun(*args):
    """`uvit ARGS` under an external torchrun with 2 processes, as a user on a cluster launches it."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "uvit_cli", *map(str, args)], capture_output=True, text=True, env=_env())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A digits run directory with random EMA weights (scaled output layer, so samples depend on the network)."""
    run = tmp_path_factory.mktemp("runs") / "00000-digits"
    run.mkdir()
    recipe = load_recipe("digits_uvit_tiny", ["model.num_layers=3", "model.embed_dim=32", "model.num_heads=2"])
    write_recipe(run, recipe)
    torch.manual_seed(0)
    model = build_model(recipe)
    with torch.no_grad():
        model.decoder_pred.weight.mul_(20)
    save_weights(run / RUN_EMA, model.state_dict(), dump_recipe(recipe), kind="ema")
    return run


def test_sample_on_two_processes_writes_the_bytes_one_process_writes(run_dir, tmp_path):
    common = [run_dir, "--class", "balanced", "--seeds", "0-99", "--device", "cpu", "--set", "sample.steps=4"]
    one, two = tmp_path / "one", tmp_path / "two"
    _in_process("sample", *common, "--npz", one / "s.npz", "--out-dir", one / "png", "--out", one / "grid.png")
    res = subprocess.run([sys.executable, "-m", "uvit_cli", "sample", *map(str, common), "--npz", two / "s.npz",
                          "--out-dir", two / "png", "--out", two / "grid.png", "--nproc-per-node", "2"],
                         capture_output=True, text=True, env=_env())
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 processes" in res.stdout
    assert (one / "s.npz").read_bytes() == (two / "s.npz").read_bytes()
    assert (one / "grid.png").read_bytes() == (two / "grid.png").read_bytes()
    pngs = sorted(p.name for p in (one / "png").iterdir())
    assert len(pngs) == 100 and pngs == sorted(p.name for p in (two / "png").iterdir())   # no work files left
    assert all((one / "png" / p).read_bytes() == (two / "png" / p).read_bytes() for p in pngs)
    with np.load(one / "s.npz") as z:
        assert z["arr_0"].shape == (100, 8, 8, 1) and (z["arr_1"] == np.arange(100) % 10).all()


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [int(child), *_children(int(child))]
    return out


def _rank(pid: int):
    for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the rank's process through /proc")
def test_fid_on_two_processes_after_a_killed_rank_gives_the_numbers_of_one(run_dir, tmp_path):
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    common = ["fid", run_dir, "--num-samples", 400, "--device", "cpu"]
    _in_process(*common, "--samples-out", one, "--json", tmp_path / "one.json")

    # Two processes (launched by --nproc-per-node); rank 1 is killed as soon as the first chunk is on disk.
    proc = subprocess.Popen([sys.executable, "-m", "uvit_cli", *map(str, common), "--samples-out", str(two),
                             "--json", str(tmp_path / "two.json"), "--nproc-per-node", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    deadline = time.time() + 300
    while time.time() < deadline and not list(parts_dir(two).glob("chunk_*.npz")) and proc.poll() is None:
        time.sleep(0.02)
    victims = [p for p in _children(proc.pid) if _rank(p) == 1]
    assert victims, "rank 1 was not found"
    os.kill(victims[0], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and not two.exists(), out      # stopped mid-way, nothing looks finished
    kept = len(list(parts_dir(two).glob("chunk_*.npz")))
    assert 0 < kept < 25, kept                                  # 400 samples = 25 chunks of 16
    assert "rerun the same command to continue" in out

    # The same command, now under an external torchrun: it continues from the kept chunks.
    res = _torchrun(*common, "--samples-out", two, "--json", tmp_path / "two.json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming sampling" in res.stdout + res.stderr
    assert one.read_bytes() == two.read_bytes()
    a, b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in ("one", "two"))
    assert set(a["metrics"]) == {"fd_digits", "acc_digits"}
    assert a["metrics"] == b["metrics"]                         # the same bits, not only 1e-6 relative
    assert b["protocol"]["feature_processes"] == 2 and not parts_dir(two).exists()


def test_inception_metrics_on_two_processes_equal_one_process(tmp_path, monkeypatch):
    """IS, KID, precision and recall of an .npz: each rank computes the Inception features of its parts, rank 0
    accumulates them in index order with one process's batches. (FID/sFID use the same pool/spatial features and
    the same replay; their 2048-d sqrtm takes tens of seconds on 2 cores, so the digits test covers the Fréchet
    path.)"""
    write_random_inception(tmp_path / "th")
    np.savez(tmp_path / "x.npz", photo_crops(12, 16, 3))
    np.savez(tmp_path / "ref.npz", photo_crops(10, 16, 4))
    args = ["fid", tmp_path / "x.npz", "--ref", tmp_path / "ref.npz", "--metrics", "is,kid,precision,recall",
            "--batch-size", 4, "--device", "cpu"]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as each torchrun rank: the CPU convolutions' last bits depend on the thread count
    try:
        _in_process(*args, "--json", tmp_path / "one.json")
    finally:
        torch.set_num_threads(threads)
    res = _torchrun(*args, "--json", tmp_path / "two.json")
    assert res.returncode == 0, res.stdout + res.stderr
    a, b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in ("one", "two"))
    assert set(a["metrics"]) == {"is", "kid", "precision", "recall"}
    assert a["metrics"] == b["metrics"]
    assert b["protocol"]["feature_processes"] == 2 and b["protocol"]["kid_subset_size"] == 10
    assert not (tmp_path / "x.npz.features").exists()          # the feature parts are removed after scoring


def test_more_processes_than_samples_is_a_clear_error(run_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", str(run_dir), "--seeds", "0-2", "--nproc-per-node", "4"])
    out = capsys.readouterr()
    assert e.value.code == 2 and "more than the 3 seeds" in out.err and "Traceback" not in out.err
    with pytest.raises(SystemExit) as e:
        main(["fid", str(run_dir), "--num-samples", "3", "--nproc-per-node", "4"])
    assert e.value.code == 2 and "more than the 3 samples" in capsys.readouterr().err
