"""`uvit encode-latents` at the command line: a whole run with --verify, text folders, clear errors before work,
and a resume after a real SIGKILL that ends byte-identical to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from encode_fixtures import coco_tree, imagenet_tree, photo_image, save_tiny_clip, save_tiny_vae
from typer.testing import CliRunner

from uvit_cli.cli import app
from uvit_cli.errors import UvitError

runner = CliRunner()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"vae": save_tiny_vae(root / "vae"), "clip": save_tiny_clip(root / "clip"),
            "inet": imagenet_tree(root / "inet"), "coco": coco_tree(root / "coco")}


def _run(*args):
    return runner.invoke(app, ["encode-latents", *map(str, args)], terminal_width=200)


def test_imagenet_run_with_verify_reports_skips(tmp_path, assets):
    out = tmp_path / "lat"
    res = _run("imagenet", "--res", 32, "--source", assets["inet"], "--vae", assets["vae"], "--out", out,
               "--shard-size", 8, "--batch-size", 4, "--num-workers", 1, "--verify")
    assert res.exit_code == 0, res.output
    assert "verified 3 shards, 18 images" in res.output and "skipped" in res.output and "CMYK: 1" in res.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["flips"] is True and m["crop"] == "adm_center" and m["vae"] == str(assets["vae"])
    assert m["scale_factor"] == 0.18215 and m["resolution"] == 32
    again = _run("imagenet", "--res", 32, "--source", assets["inet"], "--vae", assets["vae"], "--out", out,
                 "--shard-size", 8, "--batch-size", 4, "--num-workers", 0)   # complete: nothing to redo
    assert again.exit_code == 0 and "18 of 20" in again.output


def test_coco_and_caption_folder_runs(tmp_path, assets):
    res = _run("coco", "--res", 32, "--source", assets["coco"], "--vae", assets["vae"], "--text-encoder",
               assets["clip"], "--out", tmp_path / "coco", "--num-workers", 0, "--shard-size", 2)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "coco" / "manifest.json").read_text())
    assert m["crop"] == "center_lanczos" and m["flips"] is False and m["scale_factor"] == 0.2301
    assert m["num_captions"] == 26 and (tmp_path / "coco" / "null_context.safetensors").is_file()

    rng = np.random.default_rng(0)
    folder = tmp_path / "mine"
    folder.mkdir()
    lines = []
    for k in range(3):
        photo_image(rng, 30, 40).save(folder / f"{k}.png")
        lines.append(json.dumps({"file_name": f"{k}.png", "text": f"picture number {k}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    res = _run("folder", "--res", 16, "--source", folder, "--vae", assets["vae"], "--text-encoder", assets["clip"],
               "--out", tmp_path / "f", "--num-workers", 0, "--limit", 2)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "f" / "manifest.json").read_text())
    assert m["conditioning"] == "text" and m["count"] == 2 and m["latent_size"] == 2 and m["limit"] == 2


@pytest.mark.parametrize("args, message", [
    (["coco", "--source", "{coco}", "--split", "val"], "captions_val2014.json is missing"),
    (["folder", "--source", "{empty}"], "holds no images"),
    (["imagenet", "--source", "{inet}", "--res", "100"], "not a multiple of 8"),
    (["imagenet"], "--source is required"),
    (["imagenet", "--source", "{inet}", "--vae", "uvit-test/no-such-vae"], "not in the local Hugging Face cache"),
])
def test_clear_errors_before_work(tmp_path, assets, monkeypatch, args, message):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    (tmp_path / "empty").mkdir()
    args = [a.format(coco=assets["coco"], empty=tmp_path / "empty", inet=assets["inet"]) for a in args]
    res = _run(*args, "--out", tmp_path / "out")
    assert isinstance(res.exception, UvitError), res.output
    assert message in str(res.exception)
    assert not (tmp_path / "out").exists()


# Runs the real CLI in a child process, with image loading slowed down so that the kill lands mid-run.
SLOW_CLI = """
import sys, time
import uvit_cli.data.sources as images
load = images.FileSource.load
def slow_load(self, i):
    time.sleep(float(sys.argv[1]))
    return load(self, i)
images.FileSource.load = slow_load
from uvit_cli.cli import main
main(sys.argv[2:])
"""


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_sigkill_then_rerun_is_identical_to_an_uninterrupted_run(tmp_path, assets):
    def argv(out, delay):
        return [sys.executable, "-c", SLOW_CLI, str(delay), "encode-latents", "imagenet", "--res", "32",
                "--source", str(assets["inet"]), "--vae", str(assets["vae"]), "--out", str(out),
                "--shard-size", "2", "--batch-size", "2", "--num-workers", "0"]

    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    out = tmp_path / "killed"
    marks = out / "shards"
    for kill_after in (2, 6):                  # two kills at different points, then a clean finish
        proc = subprocess.Popen(argv(out, 0.05), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if marks.is_dir() and len(list(marks.glob("*.json"))) >= kill_after:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / "manifest.json").exists()
        assert len(list(marks.glob("*.json"))) < 10
    done = subprocess.run(argv(out, 0), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    ref = subprocess.run(argv(tmp_path / "straight", 0), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    assert not list(out.rglob("*.tmp"))
    assert _files(out) == _files(tmp_path / "straight")
