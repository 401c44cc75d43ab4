"""The U-ViT network: official parity, exact official layouts and parameter counts, every ablation switch."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from uvit_cli.build import build_model
from uvit_cli.flops import example_inputs, forward_flops
from uvit_cli.model import UViT, kwargs_from_official, official_kwargs, uvit_from_size
from uvit_cli.recipe import load_recipe

DATA = Path(__file__).parent / "data"

# The exact parameter counts of the ten official configurations.
OFFICIAL_PARAMS = {
    "cifar10_uvit_s2": 44_255_328, "celeba64_uvit_s4": 44_292_228, "imagenet64_uvit_m4": 130_940_292,
    "imagenet64_uvit_l4": 286_827_652, "imagenet256_uvit_l2": 286_763_172, "imagenet256_uvit_h2": 500_832_016,
    "imagenet512_uvit_l4": 286_861_524, "imagenet512_uvit_h4": 500_942_656, "coco_uvit_s": 44_692_644,
    "coco_uvit_s_deep": 58_345_636,
}


def _read_vectors(path):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    sd = {k[3:]: v for k, v in tensors.items() if k.startswith("sd.")}
    return json.loads(meta["official_kwargs"]), sd, tensors


@pytest.mark.parametrize("path", sorted(DATA.glob("official_uvit_*.safetensors")), ids=lambda p: p.stem)
def test_forward_equals_official(path):
    """Weights saved by the official code load strictly and give the official output within 1e-5 (fp32, CPU)."""
    kw, sd, t = _read_vectors(path)
    model = UViT(**kwargs_from_official(**kw)).eval()
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        out = model(t["in.x"], t["in.t"], t.get("in.y"))
    assert out.shape == t["out"].shape
    torch.testing.assert_close(out, t["out"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS))
def test_official_layout_and_param_count(name):
    """Each official recipe builds the official state-dict layout exactly (names and shapes) and parameter count."""
    layouts = json.loads((DATA / "official_layouts.json").read_text())
    recipe = load_recipe(name)
    with torch.device("meta"):
        model = build_model(recipe)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == layouts[name]["state_dict"]
    n = sum(p.numel() for p in model.parameters())
    assert n == OFFICIAL_PARAMS[name] == layouts[name]["params"]
    # Our description of the model maps back to the official constructor arguments.
    off = official_kwargs(model)
    want = layouts[name]["official_kwargs"]
    for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
        assert off[key] == want[key]
    assert off.get("num_classes", -1) == want.get("num_classes", -1) or "clip_dim" in want


SWITCHES = [dict(skip=s) for s in ("concat_linear", "add", "linear_skip", "linear_sum", "none")] + [
    dict(time_cond="adaln"), dict(conv="before"), dict(conv="none"), dict(patch_embed="conv"),
    dict(patch_embed="conv", patch_size=1), dict(patch_embed="conv", patch_size=4),
    dict(pos_embed="sincos2d"), dict(pos_embed="none"), dict(qkv_bias=True), dict(mlp_time_embed=True),
    dict(num_layers=3), dict(num_layers=9, mlp_ratio=2.0), dict(patch_size=1), dict(patch_size=8),
]


@pytest.mark.parametrize("cond", ["none", "class", "text"])
@pytest.mark.parametrize("switch", SWITCHES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_every_switch_forward_and_backward(switch, cond):
    kw = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, num_layers=5, num_heads=4)
    kw.update(switch)
    if cond == "class":
        kw.update(num_classes=10, null_class=True)
    elif cond == "text":
        kw.update(text_dim=16, text_tokens=5)
    torch.manual_seed(0)
    model = UViT(**kw)
    x, t, y = example_inputs(model, batch=2)
    out = model(x, t, y)
    assert out.shape == x.shape
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # The switch really changes the network: its modules/keys are present or absent as described.
    keys = set(model.state_dict())
    if kw.get("skip", "concat_linear") == "none" or kw.get("skip") == "add":
        assert not any("skip_linear" in k for k in keys)
    else:
        assert any("skip_linear" in k for k in keys)
    assert ("final_layer.weight" in keys) == (kw.get("conv", "after") == "after")
    assert ("token_conv.weight" in keys) == (kw.get("conv") == "before")
    assert ("pos_embed" in keys) == (kw.get("pos_embed", "learned") == "learned")
    assert any(".adaln." in k for k in keys) == (kw.get("time_cond") == "adaln")


def test_time_and_condition_matter():
    torch.manual_seed(0)
    model = UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=32, num_layers=3, num_heads=4, num_classes=10,
                 null_class=True).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a = model(x, torch.tensor([10.0, 10.0]), torch.tensor([1, 1]))
        b = model(x, torch.tensor([900.0, 900.0]), torch.tensor([1, 1]))
        c = model(x, torch.tensor([10.0, 10.0]), torch.tensor([2, model.null_class_id]))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    assert model.null_class_id == 10 and model.label_emb.num_embeddings == 11
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, torch.tensor([1.0, 1.0]))


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    kw = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, num_layers=5, num_heads=4)
    a, b = UViT(**kw), UViT(**kw, grad_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x, t, _ = example_inputs(a, batch=2)
    for m in (a, b):
        m(x, t).square().mean().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("time_cond", ["token", "adaln"])
@pytest.mark.parametrize("policy", ["all", "every_other", "attention", "mlp"])
def test_every_checkpoint_policy_gives_the_gradients_of_none(policy, time_cond):
    torch.manual_seed(0)
    kw = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, num_layers=5, num_heads=4, num_classes=3,
              time_cond=time_cond)
    a, b = UViT(**kw), UViT(**kw, grad_checkpoint=True, checkpoint_policy=policy)
    b.load_state_dict(a.state_dict())
    x, t, y = example_inputs(a, batch=2)
    for m in (a, b):
        m(x, t, y).square().mean().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=n)
    with torch.no_grad():   # sampling: nothing to recompute, the same outputs
        torch.testing.assert_close(a.eval()(x, t, y), b.eval()(x, t, y))


def test_checkpoint_policies_trade_memory_for_recompute():
    """Counted, not timed: every policy holds less at its peak than none, and recomputes (more FLOPs); "all" saves
    the most and costs the most; the selective ones sit between."""
    from uvit_cli.bench.memory import bench_checkpointing
    from uvit_cli.recipe import load_recipe

    recipe = load_recipe("digits_uvit_tiny", ["model.embed_dim=64", "model.num_heads=2"])
    rows = {r["policy"]: r for r in bench_checkpointing(recipe, batch=8)}
    assert rows["none"]["memory_vs_none"] == 1.0 and rows["none"]["flops_vs_none"] == 1.0
    for policy in ("all", "every_other", "attention", "mlp"):
        assert rows[policy]["forward_vs_none"] < 0.8, policy
        assert rows[policy]["memory_vs_none"] < 0.9, policy
        assert rows[policy]["flops_vs_none"] > 1.02, policy
    assert rows["all"]["forward_vs_none"] < min(rows[p]["forward_vs_none"] for p in ("every_other", "attention", "mlp"))
    assert rows["all"]["memory_vs_none"] < min(rows[p]["memory_vs_none"] for p in ("every_other", "attention", "mlp"))
    assert rows["all"]["flops_vs_none"] > max(rows[p]["flops_vs_none"] for p in ("every_other", "attention", "mlp"))
    # the counter follows storages, not tensors: a view costs nothing, a freed tensor is given back
    from uvit_cli.bench.memory import LiveTensorBytes

    weight = torch.ones(4000)                   # exists before: its views inside cost nothing
    with LiveTensorBytes() as meter:
        a = torch.ones(1000)
        view, wt = a[:10], weight.view(40, 100).t()
        b = torch.ones(500)
        del b
        c = torch.ones(250)
        c.mul_(2)
    assert meter.peak == 4 * 1500 and meter.live == 4 * 1250
    del a, view, c, wt


def test_an_unknown_checkpoint_policy_is_refused():
    with pytest.raises(ValueError, match="checkpoint_policy must be one of"):
        UViT(img_size=8, patch_size=2, embed_dim=32, num_layers=3, num_heads=4, checkpoint_policy="some")


def test_size_registry_names_mean_paper_layers():
    m = uvit_from_size("U-ViT-S/2", img_size=8)
    assert len(m.in_blocks) + 1 + len(m.out_blocks) == 13
    assert official_kwargs(m)["depth"] == 12
    with torch.device("meta"):
        assert len(uvit_from_size("U-ViT-S-Deep/2", img_size=8).out_blocks) == 8
        h = uvit_from_size("U-ViT-H/2", img_size=32, in_chans=4, conv="none")
    assert h.embed_dim == 1152 and len(h.in_blocks) * 2 + 1 == 29
    with pytest.raises(KeyError, match="did you mean"):
        uvit_from_size("U-ViT-S/3")


def test_forward_flops_match_an_analytic_count():
    """The FLOP counter sees every matmul: compare with the hand count for a small model."""
    B, img, P, C, D, H, layers, r = 2, 16, 4, 3, 32, 4, 5, 4
    model = UViT(img_size=img, patch_size=P, in_chans=C, embed_dim=D, num_layers=layers, num_heads=H,
                 num_classes=10)
    L = (img // P) ** 2
    T = L + 2  # label + time tokens
    block = 2 * T * D * 3 * D + 2 * 2 * T * T * D + 2 * T * D * D + 2 * 2 * T * D * r * D
    skips = (layers - 1) // 2 * 2 * T * 2 * D * D
    expected = (2 * L * P * P * C * D          # patch embedding
                + layers * block + skips
                + 2 * L * D * P * P * C        # decoder on the patch tokens
                + 2 * img * img * C * C * 9)   # final 3x3 conv
    assert forward_flops(model, batch=B) == B * expected


@pytest.mark.parametrize("conv", ["after", "before"])
def test_identity_conv_init_starts_as_a_no_op_and_default_keeps_the_official_init(conv):
    """model.conv_init: identity makes the extra 3x3 conv pass its input through unchanged at step 0 (the network
    equals the one without the conv, weights shared); default leaves PyTorch's random init (official), which does
    not. The other parameters draw the same values either way."""
    kw = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, num_layers=3, num_heads=2, num_classes=10)
    torch.manual_seed(0)
    ident = UViT(**kw, conv=conv, conv_init="identity").eval()
    torch.manual_seed(0)
    default = UViT(**kw, conv=conv).eval()
    plain = UViT(**kw, conv="none").eval()
    conv_keys = {"final_layer.weight", "final_layer.bias", "token_conv.weight", "token_conv.bias"}
    plain.load_state_dict({k: v for k, v in ident.state_dict().items() if k not in conv_keys})
    for k, v in default.state_dict().items():
        if k not in conv_keys:
            torch.testing.assert_close(ident.state_dict()[k], v, rtol=0, atol=0, msg=k)
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.randint(0, 10, (4,))
    with torch.no_grad():
        torch.testing.assert_close(ident(x, t, y), plain(x, t, y), rtol=1e-5, atol=1e-6)
        assert (default(x, t, y) - plain(x, t, y)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="conv_init"):
        UViT(**kw, conv_init="dirac")
