"""`uvit sample` through the real CLI entry point (in-process), on tiny random-weight models; text models use a tiny
random VAE and CLIP text tower saved to local directories, loaded as a user's would be."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from encode_fixtures import TINY_CLIP, save_tiny_clip, save_tiny_vae
from sampling_fixtures import TINY, class_recipe, tiny_model, uncond_recipe
from uvit_cli.checkpoint import save_weights
from uvit_cli.cli import main
from uvit_cli.recipe import dump_recipe, recipe_from_dict


# ---------------------------------------------------------------------------------------------------------------------
# `uvit sample`
# ---------------------------------------------------------------------------------------------------------------------

def _ckpt(tmp_path, recipe, name="m.safetensors"):
    path = tmp_path / name
    save_weights(path, tiny_model(recipe).state_dict(), dump_recipe(recipe))
    return path


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


def test_cli_class_model_writes_grid_pngs_and_npz(tmp_path, capsys, monkeypatch):
    ck = _ckpt(tmp_path, class_recipe())
    monkeypatch.chdir(tmp_path)
    code, out = _run(["sample", str(ck), "--class", "3,4", "--seeds", "0-3", "--out-dir", "pngs", "--npz",
                      "s.npz", "--out", "grid.png", "--batch-size", "3"], capsys)
    assert code == 0, out
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (4, 8, 8, 1) and f["arr_1"].tolist() == [3, 4, 3, 4]
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == [f"00000{i}.png" for i in range(4)]
    assert (tmp_path / "grid.png").exists() and "6 NFE/image" in out
    # the same seed gives the same image with another batch size, seed range and output
    code, out = _run(["sample", str(ck), "--class", "4", "--seeds", "1", "--npz", "one.npz", "--batch-size", "1"],
                     capsys)
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "s.npz") as all_:
        assert np.array_equal(one["arr_0"][0], all_["arr_0"][1])


def test_cli_default_output_is_a_grid(tmp_path, capsys, monkeypatch):
    ck = _ckpt(tmp_path, class_recipe())
    monkeypatch.chdir(tmp_path)
    code, out = _run(["sample", str(ck), "--n", "4", "--seed", "10", "--class", "balanced", "--cfg-scale", "1"],
                     capsys)
    assert code == 0, out
    assert (tmp_path / "grid.png").exists()


def test_cli_grid_gives_each_cycled_class_a_column(tmp_path, capsys, monkeypatch):
    ck = _ckpt(tmp_path, class_recipe())
    monkeypatch.chdir(tmp_path)
    assert _run(["sample", str(ck), "--class", "0,1", "--seeds", "0-5", "--out", "cycled.png"], capsys)[0] == 0
    assert _run(["sample", str(ck), "--class", "balanced", "--seeds", "0-5", "--out", "square.png"], capsys)[0] == 0
    (w2, h2), (w3, h3) = Image.open(tmp_path / "cycled.png").size, Image.open(tmp_path / "square.png").size
    assert w2 < h2 and w3 > h3       # 2 columns x 3 rows (one per class) vs the near-square 3 x 2


@pytest.mark.parametrize("args,message", [
    (["--class", "10"], "class id 10 is out of range: this model has classes 0..9"),
    (["--class", "golden retriever"], "class names are ImageNet's"),
    (["--prompt", "a cat"], "--prompt given, but this model is class-conditional"),
    (["--seeds", "0-3", "--n", "2"], "either --seeds or --n"),
    (["--class", "random,3"], "cannot be mixed"),
    (["--out", "s.npz"], "--out writes the labelled grid as a PNG; use --npz s.npz"),
    (["--out", "g.jpg"], "use --out g.png"),
    (["--out", "pngs"], "use --out-dir pngs"),
])
def test_cli_class_model_bad_input_is_one_clear_error(tmp_path, capsys, monkeypatch, args, message):
    ck = _ckpt(tmp_path, class_recipe())
    monkeypatch.chdir(tmp_path)
    code, out = _run(["sample", str(ck), "--out", "g.png", *args], capsys)
    assert code == 2 and message in out and "Traceback" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]   # nothing written


def test_cli_guidance_without_a_null_condition_is_an_error(tmp_path, capsys):
    ck = _ckpt(tmp_path, uncond_recipe())
    code, out = _run(["sample", str(ck), "--cfg-scale", "1.5"], capsys)
    assert code == 2 and "needs a model trained with a null condition" in out and "--cfg-scale" in out
    code, out = _run(["sample", str(ck), "--class", "1"], capsys)
    assert code == 2 and "--class given, but this model is unconditional" in out


def _text_checkpoint(tmp_path):
    """A tiny latent text-to-image model whose recipe points at a tiny VAE and CLIP tower saved on disk."""
    vae, clip = save_tiny_vae(tmp_path / "vae"), save_tiny_clip(tmp_path / "clip")
    r = recipe_from_dict({"name": "tiny_t2i", "model": {**TINY, "img_size": 4, "in_chans": 4,
                                                        "text_dim": TINY_CLIP["text_cfg"]["width"], "text_tokens": 77},
                          "data": {"name": "latents", "vae": str(vae), "text_encoder": str(clip), "scale_factor": 0.5},
                          "diffusion": {"formulation": "discrete"},
                          "sample": {"sampler": "dpm_solver_pp", "steps": 5, "cfg_scale": 3.0}})
    return _ckpt(tmp_path, r)


def test_cli_text_model_encodes_prompts_and_decodes_latents(tmp_path, capsys):
    ck = _text_checkpoint(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red bus\n\na green tree\n")
    code, out = _run(["sample", str(ck), "--prompt", "a cat", "--prompts-file", str(prompts), "--seeds", "0-3",
                      "--npz", str(tmp_path / "t.npz")], capsys)
    assert code == 0, out
    with np.load(tmp_path / "t.npz") as f:
        images = f["arr_0"]
        assert images.shape == (4, 32, 32, 3) and "arr_1" not in f      # 4x4 latents, decoded 8x up
    # prompts cycle over the seeds (a cat, a red bus, a green tree, a cat): seed 3 alone with "a cat" is the same image
    code, out = _run(["sample", str(ck), "--prompt", "a cat", "--seeds", "3", "--npz", str(tmp_path / "one.npz")],
                     capsys)
    assert code == 0, out
    with np.load(tmp_path / "one.npz") as f:
        assert np.array_equal(f["arr_0"][0], images[3])
    code, out = _run(["sample", str(ck), "--class", "3"], capsys)
    assert code == 2 and "--class given, but this model is text-conditional" in out
    code, out = _run(["sample", str(ck)], capsys)
    assert code == 2 and "pass --prompt" in out


def test_cli_long_prompt_is_truncated_with_a_warning(tmp_path, capsys, caplog):
    ck = _text_checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING):
        code, out = _run(["sample", str(ck), "--prompt", "a photo of a cat " * 30, "--n", "1",
                          "--out", str(tmp_path / "g.png")], capsys)
    assert code == 0, out
    assert "truncated" in caplog.text + out


def test_cli_missing_vae_names_the_model_and_the_local_path_option(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("UVIT_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    r = recipe_from_dict({"name": "tiny_latent", "model": {**TINY, "img_size": 4, "in_chans": 4, "num_classes": 5},
                          "data": {"name": "latents", "vae": "stabilityai/sd-vae-ft-ema"}})
    code, out = _run(["sample", str(_ckpt(tmp_path, r)), "--n", "1", "--out", str(tmp_path / "g.png")], capsys)
    assert code == 2 and "Traceback" not in out
    assert "stabilityai/sd-vae-ft-ema" in out and "--vae" in out


def test_cli_imagenet_class_names(tmp_path, capsys):
    r = recipe_from_dict({"name": "tiny_in", "model": {**TINY, "img_size": 8, "in_chans": 3, "num_classes": 1000,
                                                       "null_class": True},
                          "data": {"name": "imagenet64"}, "sample": {"steps": 3, "cfg_scale": 1.5}})
    ck = _ckpt(tmp_path, r)
    code, out = _run(["sample", str(ck), "--class", "golden retriever", "--class", "88", "--n", "3", "--npz",
                      str(tmp_path / "in.npz"), "--out", str(tmp_path / "g.png")], capsys)
    assert code == 0, out
    with np.load(tmp_path / "in.npz") as f:
        assert f["arr_1"].tolist() == [207, 88, 207]
    code, out = _run(["sample", str(ck), "--class", "golden retreiver"], capsys)
    assert code == 2 and "did you mean 'golden retriever' (207)" in out


def test_cli_text_model_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, capsys):
    ck = _text_checkpoint(tmp_path)
    blank, binary = tmp_path / "blank.txt", tmp_path / "bin.txt"
    blank.write_text("\n   \n\n")
    binary.write_bytes(b"\xff\xfe\x00bad")
    other_clip = tmp_path / "wide_clip"
    other = dict(TINY_CLIP, text_cfg=dict(TINY_CLIP["text_cfg"], width=48, heads=2))
    other_clip.mkdir()
    from uvit_cli.files import write_json, write_safetensors
    from uvit_cli.text import build_text_tower

    write_json(other_clip / "open_clip_config.json", {"model_cfg": other})
    write_safetensors(other_clip / "open_clip_model.safetensors", build_text_tower(other).state_dict())
    out = tmp_path / "out.npz"
    for args, message in [(["--prompts-file", blank], "holds no prompts"),
                          (["--prompts-file", tmp_path / "missing.txt"], "does not exist"),
                          (["--prompts-file", binary], "not UTF-8"),
                          (["--prompt", "a cat", "--text-encoder", other_clip], "48 features but the model expects"),
                          (["--class", "2"], "--class given, but this model is text-conditional")]:
        code, text = _run(["sample", str(ck), *map(str, args), "--npz", str(out)], capsys)
        assert code == 2 and message in text and "Traceback" not in text, (args, text)
        assert not out.exists() and not list(tmp_path.glob(".out.npz*"))


def test_cli_sampler_that_does_not_apply_to_the_formulation_is_refused_with_the_ones_that_do(tmp_path, capsys,
                                                                                            monkeypatch):
    from uvit_cli.recipe import replace

    flow = replace(class_recipe(), diffusion={"formulation": "flow"})
    ck = _ckpt(tmp_path, flow)
    monkeypatch.chdir(tmp_path)
    code, out = _run(["sample", str(ck), "--class", "1", "--n", "2", "--sampler", "pf_ode_euler"], capsys)
    assert code == 2 and "pf_ode_euler does not apply to the flow formulation" in out and "heun" in out
    assert "Traceback" not in out
    code, out = _run(["sample", str(ck), "--class", "1", "--n", "2", "--sampler", "heun", "--steps", "3"], capsys)
    assert code == 0 and "6 NFE/image" in out, out   # Heun: 2 evaluations per step
    code, out = _run(["sample", "--help"], capsys)
    assert "flow: all but pf_ode_euler" in " ".join(out.replace("│", " ").split())
