"""generate(), the noise predictor and guidance, and the image writers, on tiny random-weight models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sampling_fixtures import (TINY, StubDecoder, StubTextEncoder, class_recipe, latent_text_recipe, tiny_model,
                               uncond_recipe)
from uvit_cli.build import build_schedule, nfe_per_sample
from uvit_cli.data.imagenet_classes import imagenet_class_id, imagenet_class_names
from uvit_cli.errors import UvitError
from uvit_cli.generate import default_forward_batch, generate, quantize
from uvit_cli.noise_predictor import NoisePredictor, cfg_combine
from uvit_cli.outputs import save_grid, save_npz, save_pngs
from uvit_cli.recipe import RecipeError, recipe_from_dict, replace


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


def test_unquantized_output_is_what_quantize_rounds():
    r = class_recipe()
    m = tiny_model(r)
    cond = torch.tensor([1, 2, 3])
    x = generate(m, r, [0, 1, 2], cond, quantized=False)
    assert x.dtype == torch.float32 and x.shape == (3, 1, 8, 8)
    assert torch.equal(quantize(x), generate(m, r, [0, 1, 2], cond))


def test_sde_sampler_noise_is_per_seed_too():
    r = uncond_recipe()
    m = tiny_model(r)
    a = generate(m, r, [0, 1, 2, 3, 4], batch_size=2)
    b = generate(m, r, [3, 4], batch_size=5)
    assert torch.equal(a[3:], b)


def test_guidance_w1_is_the_conditional_model_and_batched_equals_separate():
    r = class_recipe()
    m = tiny_model(r)
    s = build_schedule(r)
    x, cond = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    with torch.no_grad():
        plain = NoisePredictor(m, s, cond)(x, 0.5)
        direct = m(x, torch.full((3,), 999 * 0.5), cond)
        assert torch.allclose(plain, direct, atol=1e-5)
        batched = NoisePredictor(m, s, cond, cfg_scale=2.5, null_cond=10)(x, 0.5)
        uncond = m(x, torch.full((3,), 499.5), torch.full((3,), 10))
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
    generate(m, r, list(range(6)), torch.arange(6), forward_batch=4, stats=stats)   # the recipe guides: w = 2
    assert set(calls) == {8}  # each forward holds 4 samples' cond + uncond halves (the last one padded)
    assert stats["nfe"] == 6 and stats["forwards"] == len(calls) == 6 * 2


def test_generate_reports_progress_in_nfe():
    r = class_recipe()
    seen = []
    generate(tiny_model(r), r, list(range(10)), torch.arange(10) % 10, batch_size=4, forward_batch=4,
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
    assert set(dec.calls) == {default_forward_batch("cpu")}  # the decoder also sees fixed-size micro-batches
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
        generate(tiny_model(u), u, [0], torch.tensor([1]))
    # guidance without a null condition is a recipe error: the recipe is the one place it is checked
    with pytest.raises(RecipeError, match="null condition"):
        replace(u, sample={"cfg_scale": 2.0})
    nonull = recipe_from_dict({"model": {**TINY, "img_size": 8, "in_chans": 1, "num_classes": 10},
                               "data": {"name": "digits"}})
    with pytest.raises(RecipeError, match="null condition"):
        replace(nonull, sample={"cfg_scale": 1.5})


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
    r = load_recipe("digits_uvit_tiny", [f"sample.sampler={sampler}", f"sample.steps={steps}", "sample.cfg_scale=2"])
    classes = torch.arange(10)
    images = generate(oracle, r, list(range(10)), classes)
    train_u8 = quantize(x).float().flatten(1)                                   # (1797, 64)
    d = (images.float().flatten(1)[:, None] - train_u8[None]).abs().mean(-1)    # mean abs uint8 difference
    nearest = d.argmin(1)
    assert torch.equal(y[nearest], classes)
    assert d.min(1).values.max() < 3.0, d.min(1).values  # within a few uint8 levels of a training image


# ---------------------------------------------------------------------------------------------------------------------
# Guidance interval: guided inside [t_lo, t_hi], the conditional model outside, counted honestly
# ---------------------------------------------------------------------------------------------------------------------

def test_guidance_interval_guides_inside_and_is_the_conditional_model_outside():
    r = class_recipe()
    m = tiny_model(r)
    s = build_schedule(r)
    x, cond = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    interval = (0.3, 0.6)
    guided = NoisePredictor(m, s, cond, cfg_scale=2.5, null_cond=10, guidance_interval=interval)
    plain = NoisePredictor(m, s, cond)
    full = NoisePredictor(m, s, cond, cfg_scale=2.5, null_cond=10)
    for t in (0.2, 0.3, 0.45, 0.6, 0.9):
        inside = interval[0] <= t <= interval[1]
        assert torch.equal(guided(x, t), (full if inside else plain)(x, t)), t
    assert guided.nfe == 5 and guided.guided_nfe == 3  # 0.3, 0.45 and 0.6: the ends are inside


def test_guidance_interval_counts_nfe_and_forward_cost_on_the_card():
    from uvit_cli.build import guided_nfe_per_sample
    from uvit_cli.metrics.model_eval import sampling_card
    from uvit_cli.sampling import evaluation_times

    r = class_recipe(guidance_interval=[0.2, 0.7], steps=10)
    m = tiny_model(r)
    rows = []
    m.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    stats = {}
    generate(m, r, list(range(4)), torch.arange(4), forward_batch=4, stats=stats)
    times = evaluation_times("dpm_solver", build_schedule(r), steps=10)
    want = sum(0.2 <= t <= 0.7 for t in times)
    assert 0 < want < 10 and stats["nfe"] == 10 and stats["guided_nfe"] == want == guided_nfe_per_sample(r)
    # one forward of 2x the batch per guided evaluation, one of the batch per unguided one
    assert sorted(set(rows)) == [4, 8] and rows.count(8) == want and rows.count(4) == 10 - want
    card = sampling_card(r, num_samples=4, seed=0)
    assert card["nfe"] == 10 and card["nfe_guided"] == want and card["forward_cost"] == sum(rows) // 4
    assert "guidance_interval" in card
    full = sampling_card(class_recipe(steps=10), num_samples=4, seed=0)   # guided everywhere: cost 2 per NFE
    assert full["nfe_guided"] == 10 and full["forward_cost"] == 20 and "guidance_interval" not in full
    assert "nfe_guided" not in sampling_card(replace(r, sample={"cfg_scale": 1.0}), num_samples=4, seed=0)


def test_sampling_identity_ignores_the_new_fields_at_their_defaults():
    """Kept evaluation samples of runs made before the flow fields existed keep their identity."""
    from uvit_cli.metrics.model_eval import sampling_identity

    r = class_recipe()
    assert sampling_identity(r) == sampling_identity(replace(r, sample={"guidance_interval": [0.0, 1.0]}))
    assert sampling_identity(r) != sampling_identity(replace(r, sample={"guidance_interval": [0.1, 1.0]}))
    assert sampling_identity(r) != sampling_identity(replace(r, diffusion={"prediction": "v"}))


class FlowDigitsOracle(DigitsOracle):
    """The exact velocity E[eps - x0 | x_t, y] of the flow path x_t = (1 - t) x0 + t eps on the training digits."""

    def forward(self, x, t_net, y):
        t = (t_net.double() / 999)[:, None]
        a, s = 1 - t, t
        xf = x.flatten(1).double()
        d2 = (xf ** 2).sum(1, keepdim=True) - 2 * a * (xf @ self.images.T) + a ** 2 * self.sq[None]
        allowed = (self.labels[None] == y[:, None]) | (y[:, None] == self.null_class_id)
        w = torch.softmax((-d2 / (2 * s ** 2)).masked_fill(~allowed, -torch.inf), dim=1)
        x0 = w @ self.images
        return ((xf - x0) / s).view_as(x).to(x.dtype)   # velocity = eps - x0 = (x_t - x0) / t


@pytest.mark.parametrize("sampler,steps", [("dpm_solver_pp", 25), ("heun", 25), ("euler_maruyama", 250)])
def test_flow_generate_with_the_exact_velocity_draws_training_digits_of_the_class(sampler, steps):
    """End to end on the flow formulation (net time 999 t, velocity target, guidance, sampler): with the exact
    velocity of the training set every sample is (almost) a training digit of the requested class."""
    from uvit_cli.data.digits import digits_tensors
    from uvit_cli.recipe import load_recipe

    x, y = digits_tensors()
    r = load_recipe("digits_flow_uvit_tiny", [f"sample.sampler={sampler}", f"sample.steps={steps}"])
    classes = torch.arange(10)
    images = generate(FlowDigitsOracle(x, y), r, list(range(10)), classes)
    train_u8 = quantize(x).float().flatten(1)
    d = (images.float().flatten(1)[:, None] - train_u8[None]).abs().mean(-1)
    assert torch.equal(y[d.argmin(1)], classes)
    assert d.min(1).values.max() < 3.0, d.min(1).values
