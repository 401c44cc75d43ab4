"""generate(), guidance, image writers and `uvit sample`, on tiny random-weight models and stand-in VAE / CLIP."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from uvit_cli.build import build_model
from uvit_cli.checkpoint import save_weights
from uvit_cli.cli import main
from uvit_cli.data.imagenet_classes import imagenet_class_id, imagenet_class_names
from uvit_cli.errors import UvitError
from uvit_cli.generate import generate, nfe_per_sample, quantize
from uvit_cli.guidance import ModelNoiseFn, cfg_combine
from uvit_cli.images import save_grid, save_npz, save_pngs
from uvit_cli.recipe import dump_recipe, recipe_from_dict

TINY = dict(size="", embed_dim=32, num_layers=3, num_heads=2, patch_size=2)


def class_recipe(**sample):
    return recipe_from_dict({"name": "tiny_digits", "model": {**TINY, "img_size": 8, "in_chans": 1,
                                                              "num_classes": 10, "null_class": True},
                             "data": {"name": "digits"},
                             "sample": {"sampler": "dpm_solver", "steps": 6, "cfg_scale": 2.0, "batch_size": 8,
                                        **sample}})


def uncond_recipe():
    return recipe_from_dict({"name": "tiny_uncond", "model": {**TINY, "img_size": 8, "in_chans": 3},
                             "data": {"name": "cifar10"}, "sample": {"sampler": "euler_maruyama", "steps": 5}})


def latent_text_recipe():
    return recipe_from_dict({"name": "tiny_t2i", "model": {**TINY, "img_size": 4, "in_chans": 4, "text_dim": 16,
                                                           "text_tokens": 77},
                             "data": {"name": "latents", "vae": "stub-vae", "text_encoder": "stub-clip",
                                      "scale_factor": 0.5},
                             "diffusion": {"formulation": "discrete"},
                             "sample": {"sampler": "dpm_solver_pp", "steps": 5, "cfg_scale": 3.0}})


def tiny_model(recipe, seed=0):
    torch.manual_seed(seed)
    m = build_model(recipe).eval()
    # Random init leaves the output layer near zero; scale it so samples actually depend on the network.
    with torch.no_grad():
        m.decoder_pred.weight.mul_(20)
    return m


class StubDecoder:
    """Stands in for the VAE: scaled latents (B, 4, h, w) -> images (B, 3, 2h, 2w) in [-1, 1]."""

    def __init__(self, scale_factor=0.5):
        self.scale_factor = scale_factor
        self.calls = []

    def decode(self, z):
        self.calls.append(z.shape[0])
        x = torch.tanh(z[:, :3] / self.scale_factor)
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")


class StubTextEncoder:
    """Stands in for CLIP: a prompt -> a deterministic (77, 16) context; "" gets its own context."""

    def __init__(self):
        self.seen = []

    def encode(self, prompts):
        self.seen.append(list(prompts))
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(map(ord, p)) + 7 * len(p))
            out.append(torch.randn(77, 16, generator=g))
        return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------------------
# generate(): seeds, batch-size independence, guidance, decoding
# ---------------------------------------------------------------------------------------------------------------------

def test_same_seed_same_image_whatever_the_batch_size():
    r = class_recipe()
    m = tiny_model(r)
    seeds, cond = [5, 6, 7, 8, 9, 10, 11], torch.tensor([0, 1, 2, 3, 4, 5, 6])
    a = generate(m, r, seeds, cond, batch_size=1)
    b = generate(m, r, seeds, cond, batch_size=3)
    c = generate(m, r, seeds, cond, batch_size=16)
    alone = generate(m, r, [8], cond[3:4])
    assert a.shape == (7, 8, 8, 1) and a.dtype == torch.uint8
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a[3:4], alone)
    assert not torch.equal(a[0], a[1])  # different seeds, different images


def test_sde_sampler_noise_is_per_seed_too():
    r = uncond_recipe()
    m = tiny_model(r)
    a = generate(m, r, [0, 1, 2, 3, 4], batch_size=2)
    b = generate(m, r, [3, 4], batch_size=5)
    assert torch.equal(a[3:], b)


def test_guidance_w1_is_the_conditional_model_and_batched_equals_separate():
    r = class_recipe()
    m = tiny_model(r)
    from uvit_cli.build import build_schedule

    s = build_schedule(r)
    x, cond = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    plain = ModelNoiseFn(m, s, cond)(x, 0.5)
    direct = m(x, torch.full((3,), 999 * 0.5), cond)
    assert torch.allclose(plain, direct, atol=1e-5)
    batched = ModelNoiseFn(m, s, cond, cfg_scale=2.5, null_cond=10)(x, 0.5)
    separate = ModelNoiseFn(m, s, cond, cfg_scale=2.5, null_cond=10, batched_guidance=False)(x, 0.5)
    uncond = m(x, torch.full((3,), 499.5), torch.full((3,), 10))
    assert torch.allclose(batched, separate, atol=1e-5)
    assert torch.allclose(batched, uncond + 2.5 * (direct - uncond), atol=1e-4)


def test_official_scale_is_w_minus_one():
    ec, eu, s = torch.randn(4), torch.randn(4), 0.4
    official = ec + s * (ec - eu)  # U-ViT's cfg_nnet
    assert torch.allclose(cfg_combine(ec, eu, 1 + s), official, atol=1e-6)


def test_guided_forward_is_one_batched_call():
    r = class_recipe()
    m = tiny_model(r)
    calls = []
    m.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    stats = {}
    generate(m, r, list(range(6)), torch.arange(6), cfg_scale=2.0, forward_batch=4, stats=stats)
    assert set(calls) == {8}  # each forward holds 4 samples' cond + uncond halves (the last one padded)
    assert stats["nfe"] == 6 and stats["forwards"] == len(calls) == 6 * 2


def test_generate_reports_progress_in_nfe():
    r = class_recipe()
    seen = []
    generate(tiny_model(r), r, list(range(10)), torch.arange(10) % 10, batch_size=4,
             progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (nfe_per_sample(r) * 3, nfe_per_sample(r) * 3) and len(seen) == 18  # 3 batches x 6 NFE


def test_latent_text_model_decodes_and_guides_with_the_empty_prompt_context():
    r = latent_text_recipe()
    m = tiny_model(r)
    enc, dec = StubTextEncoder(), StubDecoder()
    ctx, null = enc.encode(["a cat", "a dog", "a cat"]), enc.encode([""])[0]
    a = generate(m, r, [1, 2, 3], ctx, decoder=dec, null_context=null, batch_size=1)
    b = generate(m, r, [1, 2, 3], ctx, decoder=dec, null_context=null, batch_size=3)
    assert a.shape == (3, 8, 8, 3) and torch.equal(a, b)
    assert set(dec.calls) == {4}  # the decoder also sees fixed-size micro-batches
    other = generate(m, r, [1, 2, 3], ctx, decoder=dec, null_context=enc.encode(["x"])[0])
    assert not torch.equal(a, other)  # the null context matters when guiding
    with pytest.raises(UvitError, match="empty-prompt"):
        generate(m, r, [1], ctx[:1], decoder=dec)
    with pytest.raises(UvitError, match="decoder"):
        generate(m, r, [1], ctx[:1], null_context=null)


def test_generate_rejects_bad_conditions():
    r = class_recipe()
    m = tiny_model(r)
    with pytest.raises(UvitError, match="out of range"):
        generate(m, r, [0], torch.tensor([11]))
    with pytest.raises(UvitError, match="class-conditional"):
        generate(m, r, [0])
    u = uncond_recipe()
    with pytest.raises(UvitError, match="unconditional"):
        generate(tiny_model(u), u, [0], cfg_scale=2.0)
    nonull = recipe_from_dict({"model": {**TINY, "img_size": 8, "in_chans": 1, "num_classes": 10},
                               "data": {"name": "digits"}})
    with pytest.raises(UvitError, match="null class"):
        generate(tiny_model(nonull), nonull, [0], torch.tensor([1]), cfg_scale=1.5)


def test_bf16_images_close_to_fp32():
    r = class_recipe()
    m = tiny_model(r)
    a = generate(m, r, [0, 1, 2], torch.tensor([1, 2, 3])).float()
    b = generate(m, r, [0, 1, 2], torch.tensor([1, 2, 3]), precision="bf16").float()
    assert (a - b).abs().mean() < 4  # uint8 levels; bf16 keeps about 3 significant digits


def test_quantize_rounds_half_up_and_clamps():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, -1 + 1 / 255]).view(1, 1, 1, 6)
    assert quantize(x).flatten().tolist() == [0, 0, 128, 255, 255, 1]


# ---------------------------------------------------------------------------------------------------------------------
# Writers and class names
# ---------------------------------------------------------------------------------------------------------------------

def test_writers_are_atomic_and_faithful(tmp_path):
    imgs = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    save_npz(tmp_path / "s.npz", imgs, [4, 5, 6])
    with np.load(tmp_path / "s.npz") as f:
        assert np.array_equal(f["arr_0"], imgs.numpy()) and f["arr_1"].tolist() == [4, 5, 6]
    paths = save_pngs(imgs, tmp_path / "pngs", [7, 42, 1000])
    assert [p.name for p in paths] == ["000007.png", "000042.png", "001000.png"]
    assert np.array_equal(np.asarray(Image.open(paths[1])), imgs[1].numpy())
    save_grid(imgs, tmp_path / "g.png", ["a", "b", "a very long label that does not fit"])
    g = Image.open(tmp_path / "g.png")
    assert g.size[0] >= 2 * 64 and g.size[1] > 2 * 64  # small tiles enlarged, room for captions
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_imagenet_names_and_suggestions():
    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[207] == "golden retriever"
    assert imagenet_class_id("Golden_Retriever") == 207
    with pytest.raises(UvitError, match="golden retriever"):
        imagenet_class_id("golden retreiver")


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
])
def test_cli_class_model_bad_input_is_one_clear_error(tmp_path, capsys, args, message):
    ck = _ckpt(tmp_path, class_recipe())
    code, out = _run(["sample", str(ck), "--out", str(tmp_path / "g.png"), *args], capsys)
    assert code == 2 and message in out and "Traceback" not in out


def test_cli_guidance_without_a_null_condition_is_an_error(tmp_path, capsys):
    ck = _ckpt(tmp_path, uncond_recipe())
    code, out = _run(["sample", str(ck), "--cfg-scale", "1.5"], capsys)
    assert code == 2 and "guidance needs a model trained with a null condition" in out
    code, out = _run(["sample", str(ck), "--class", "1"], capsys)
    assert code == 2 and "--class given, but this model is unconditional" in out


def test_cli_text_model_encodes_prompts_and_decodes_latents(tmp_path, capsys, monkeypatch):
    import uvit_cli.cli.sample as cli_sample

    ck = _ckpt(tmp_path, latent_text_recipe())
    enc, dec = StubTextEncoder(), StubDecoder()
    loaded = {}
    monkeypatch.setattr(cli_sample, "_load_text_encoder", lambda spec, device, allow: loaded.setdefault("clip", spec) and enc)
    monkeypatch.setattr(cli_sample, "_load_decoder",
                        lambda spec, sf, device, allow: loaded.setdefault("vae", (spec, sf)) and dec)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red bus\n\na green tree\n")
    code, out = _run(["sample", str(ck), "--prompt", "a cat", "--prompts-file", str(prompts), "--seeds", "0-3",
                      "--npz", str(tmp_path / "t.npz")], capsys)
    assert code == 0, out
    assert loaded == {"clip": "stub-clip", "vae": ("stub-vae", 0.5)}
    assert enc.seen == [["a cat", "a red bus", "a green tree", ""]]  # unique prompts + the empty prompt, one call
    with np.load(tmp_path / "t.npz") as f:
        assert f["arr_0"].shape == (4, 8, 8, 3) and "arr_1" not in f
    code, out = _run(["sample", str(ck), "--class", "3"], capsys)
    assert code == 2 and "--class given, but this model is text-conditional" in out
    code, out = _run(["sample", str(ck)], capsys)
    assert code == 2 and "pass --prompt" in out


def test_cli_long_prompt_is_truncated_with_a_warning(tmp_path, capsys, monkeypatch, caplog):
    """With the real TextEncoder (a tiny random CLIP text tower and the real tokenizer)."""
    from open_clip.tokenizer import SimpleTokenizer

    import uvit_cli.cli.sample as cli_sample
    from uvit_cli.text import TextEncoder, build_text_tower

    tower = build_text_tower({"embed_dim": 16, "text_cfg": {"width": 16, "heads": 2, "layers": 1}})
    enc = TextEncoder(tower, SimpleTokenizer(context_length=77), name="tiny")
    ck = _ckpt(tmp_path, latent_text_recipe())
    monkeypatch.setattr(cli_sample, "_load_text_encoder", lambda spec, device, allow: enc)
    monkeypatch.setattr(cli_sample, "_load_decoder", lambda spec, sf, device, allow: StubDecoder())
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


def test_bench_guided_sampling_runs_both_paths_at_equal_nfe():
    from uvit_cli.bench_sampling import bench_guided_sampling

    r = bench_guided_sampling(class_recipe(), batch=2, steps=3, repeats=1)
    assert r["nfe"] == 3 and r["baseline_s"] > 0 and r["fast_s"] > 0 and "batched_fp32_s" in r
    assert r["speedup"] == pytest.approx(r["baseline_s"] / r["fast_s"])
    assert r["eps_rel_err"] < 0.05 and r["sample_rel_err"] < 0.05  # bf16: a few x 2^-8


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


class DigitsOracle(torch.nn.Module):
    """The exact E[eps | x_t, y] of the VP-SDE when the data are the 1797 training digits (a mixture of points):
    posterior weights softmax(-|x - alpha x_i|^2 / 2 sigma^2) over the images of class y (all of them for the null
    class). Called like a U-ViT, with the network time 999 t."""

    def __init__(self, images, labels):
        super().__init__()
        self.register_buffer("images", images.flatten(1).double())
        self.register_buffer("labels", labels)
        self.register_buffer("sq", self.images.pow(2).sum(1))
        self.null_class_id = 10

    def forward(self, x, t_net, y):
        t = t_net.double() / 999
        log_a = -0.25 * t ** 2 * 19.9 - 0.05 * t
        a, s = log_a.exp()[:, None], (-torch.expm1(2 * log_a)).sqrt()[:, None]
        xf = x.flatten(1).double()
        d2 = (xf ** 2).sum(1, keepdim=True) - 2 * a * (xf @ self.images.T) + a ** 2 * self.sq[None]  # (B, N)
        allowed = (self.labels[None] == y[:, None]) | (y[:, None] == self.null_class_id)
        w = torch.softmax((-d2 / (2 * s ** 2)).masked_fill(~allowed, -torch.inf), dim=1)
        x0 = w @ self.images
        return ((xf - a * x0) / s).view_as(x).to(x.dtype)


@pytest.mark.parametrize("sampler,steps", [("dpm_solver", 25), ("dpm_solver_pp_2m", 50), ("euler_maruyama", 200)])
def test_generate_with_the_exact_denoiser_draws_training_digits_of_the_class(sampler, steps):
    """End to end (time convention, guidance, sampler, quantisation): with the exact denoiser of the training set,
    every sample is (almost) a training digit, of the requested class, also when guided."""
    from uvit_cli.data.digits import digits_tensors
    from uvit_cli.recipe import load_recipe

    x, y = digits_tensors()
    oracle = DigitsOracle(x, y)
    r = load_recipe("digits_uvit_tiny")
    classes = torch.arange(10)
    images = generate(oracle, r, list(range(10)), classes, cfg_scale=2.0, sampler=sampler, steps=steps)
    train_u8 = quantize(x).float().flatten(1)                                   # (1797, 64)
    d = (images.float().flatten(1)[:, None] - train_u8[None]).abs().mean(-1)    # mean abs uint8 difference
    nearest = d.argmin(1)
    assert torch.equal(y[nearest], classes)
    assert d.min(1).values.max() < 3.0, d.min(1).values  # within a few uint8 levels of a training image
