"""The CLI edge for the foundation: help, recipes, info, convert, and errors without tracebacks."""

import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from uvit_cli.build import load_model
from uvit_cli.checkpoint import read_metadata
from uvit_cli.cli import app
from uvit_cli.recipe import load_recipe

runner = CliRunner()
DATA = Path(__file__).parent / "data"


def test_help_lists_every_subcommand():
    out = runner.invoke(app, ["--help"]).output
    for cmd in ("encode-latents", "train", "sample", "fid", "ablate", "bench", "recipes", "info", "convert"):
        assert cmd in out


def test_recipes_lists_models_and_param_counts():
    res = runner.invoke(app, ["recipes"], terminal_width=250)
    assert res.exit_code == 0, res.output
    assert "imagenet256_uvit_h2" in res.output and "500,832,016" in res.output
    assert "U-ViT-S-Deep/2" in res.output and "58,345,636" in res.output


def test_info_reports_params_tokens_and_measured_flops():
    res = runner.invoke(app, ["info", "imagenet256_uvit_h2", "--no-recipe"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "500,832,016" in res.output and "256 patches + 2 extra" in res.output
    assert "133.20 multiply-adds" in res.output  # the paper's 133 GFLOPs for U-ViT-H/2 at 256
    res = runner.invoke(app, ["info", "digits_uvit_tiny", "--set", "model.num_layers=9"], terminal_width=200)
    assert "num_layers: 9" in res.output


def _uvit(*args):
    return subprocess.run([sys.executable, "-m", "uvit_cli", *args], capture_output=True, text=True)


def test_user_mistakes_exit_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  embed_dm: 3\n")
    res = _uvit("info", str(bad))
    assert res.returncode == 2
    assert "embed_dm is not a known key; did you mean 'embed_dim'" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    res = _uvit("info", "digits_uvit_tiny", "--set", "train.betas=[0.9, 2]")
    assert res.returncode == 2 and "betas" in res.stderr and "Traceback" not in res.stderr


def test_convert_official_pth_round_trip(tmp_path):
    """An official .pth state dict becomes our safetensors checkpoint with the recipe inside; outputs unchanged."""
    from safetensors import safe_open

    with safe_open(str(DATA / "official_uvit_class_null_noconv_mlptime.safetensors"), framework="pt") as f:
        sd = {k[3:]: f.get_tensor(k) for k in f.keys() if k.startswith("sd.")}
        x, t, y, want = (f.get_tensor(k) for k in ("in.x", "in.t", "in.y", "out"))
    pth = tmp_path / "nnet_ema.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, pth)  # a DDP-saved file: prefixes are stripped
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  img_size: 8\n  patch_size: 2\n  in_chans: 4\n  embed_dim: 64\n  num_layers: 3\n"
                      "  num_heads: 2\n  num_classes: 10\n  null_class: true\n  conv: none\n  mlp_time_embed: true\n"
                      "  qkv_bias: true\ndata:\n  name: folder\n")
    out = tmp_path / "w.safetensors"
    res = runner.invoke(app, ["convert", str(pth), "--recipe", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "num_classes: 10" in read_metadata(out)["recipe"]
    model, r, _ = load_model(out)
    assert r == load_recipe(recipe)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), want, atol=1e-5, rtol=0)
    # A recipe that does not describe the checkpoint is refused with the mismatching keys named.
    res = runner.invoke(app, ["convert", str(pth), "--recipe", str(recipe), "--out", str(out),
                              "--set", "model.conv=after"])
    assert res.exit_code != 0


def test_convert_refuses_pickled_objects(tmp_path, uvit):
    import argparse

    pth = tmp_path / "evil.pth"
    torch.save({"args": argparse.Namespace(lr=1)}, pth)  # an arbitrary object, as DiT checkpoints pickle
    res = uvit("convert", pth, "--recipe", "digits_uvit_tiny", "--out", tmp_path / "o.safetensors")
    assert res.returncode == 2 and "weights_only=True" in res.stderr and not (tmp_path / "o.safetensors").exists()
