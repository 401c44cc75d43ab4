"""Recipes: every shipped recipe loads, overrides apply, and mistakes give errors that name the key and the fix."""

import dataclasses

import pytest

from uvit_cli.recipe import (RecipeError, apply_overrides, dump_recipe, load_recipe, recipe_from_dict, recipes_dir,
                             replace, shipped_recipes)

OFFICIAL = ["cifar10_uvit_s2", "celeba64_uvit_s4", "imagenet64_uvit_m4", "imagenet64_uvit_l4", "imagenet256_uvit_l2",
            "imagenet256_uvit_h2", "imagenet512_uvit_l4", "imagenet512_uvit_h4", "coco_uvit_s", "coco_uvit_s_deep"]


NEW = ["digits_flow_uvit_tiny", "imagenet256_uvit_h2_flow", "cifar10_uvit_s2_flow"]  # not paper configurations


def test_all_official_recipes_ship_and_load():
    names = {p.stem for p in shipped_recipes()}
    assert set(OFFICIAL) | {"digits_uvit_tiny"} | set(NEW) <= names
    for p in shipped_recipes():
        r = load_recipe(p)
        assert r.train.weight_decay == 0.03 or p.stem == "digits_uvit_tiny"
        if p.stem in OFFICIAL:  # the paper's runs keep the paper's objective
            assert (r.prediction_target, r.train.time_sampling, r.train.loss_weighting) == ("eps", "uniform", "none")
            assert r.sample.guidance_interval == (0.0, 1.0) and r.diffusion.formulation != "flow"
        assert dump_recipe(r)


def test_official_values():
    h2 = load_recipe("imagenet256_uvit_h2")
    assert (h2.model.num_layers, h2.model.embed_dim, h2.model.conv) == (29, 1152, "none")
    assert h2.diffusion.formulation == "discrete" and h2.sample.sampler == "dpm_solver_pp"
    assert h2.sample.cfg_scale == pytest.approx(1.4) and h2.train.p_uncond == 0.1
    l2 = load_recipe("imagenet256_uvit_l2")
    assert l2.train.p_uncond == 0.15 and l2.diffusion.formulation == "vp" and l2.sample.sampler == "dpm_solver"
    coco = load_recipe("coco_uvit_s_deep")
    assert coco.model.num_layers == 17 and coco.data.scale_factor == pytest.approx(0.23010)
    assert coco.train.betas == (0.9, 0.9) and coco.sample.cfg_scale == 2.0 and coco.conditioning == "text"
    c10 = load_recipe("cifar10_uvit_s2")
    assert c10.train.betas == (0.99, 0.999) and c10.train.warmup_steps == 2500 and c10.data.random_flip
    assert c10.sample.sampler == "euler_maruyama" and c10.sample.steps == 1000
    in64 = load_recipe("imagenet64_uvit_m4")
    assert in64.train.lr == pytest.approx(3e-4) and not in64.model.null_class


def test_resolved_recipe_round_trips():
    import yaml

    r = load_recipe("imagenet256_uvit_h2")
    again = recipe_from_dict(yaml.safe_load(dump_recipe(r)))
    assert again == r


def test_overrides():
    r = load_recipe("digits_uvit_tiny", ["train.lr=1e-4", "model.num_layers=9", "sample.cfg_scale=3", "name=x"])
    assert r.train.lr == pytest.approx(1e-4) and r.model.num_layers == 9 and r.sample.cfg_scale == 3.0
    assert r.name == "x"
    assert replace(r, train={"steps": 7}).train.steps == 7
    with pytest.raises(RecipeError, match="expected section.key=value"):
        apply_overrides({}, ["train.lr"])


def test_size_fills_fields_and_explicit_fields_win():
    r = recipe_from_dict({"model": {"size": "U-ViT-M/4", "img_size": 64, "num_layers": 9}})
    assert (r.model.embed_dim, r.model.num_heads, r.model.patch_size, r.model.num_layers) == (768, 12, 4, 9)


@pytest.mark.parametrize("raw, pattern", [
    ({"model": {"embed_dm": 64}}, r"model\.embed_dm is not a known key; did you mean 'embed_dim'"),
    ({"trian": {}}, r"trian is not a known section; did you mean 'train'"),
    ({"train": {"lr": "fast"}}, r"train\.lr must be a number"),
    ({"train": {"steps": 1.5}}, r"train\.steps must be an integer"),
    ({"model": {"qkv_bias": "yes"}}, r"model\.qkv_bias must be true or false"),
    ({"model": {"img_size": 30, "patch_size": 4}}, r"not divisible by patch size"),
    ({"model": {"embed_dim": 100, "num_heads": 8}}, r"8 heads do not divide width 100"),
    ({"train": {"lr": -1}}, r"learning rate must be positive"),
    ({"sample": {"cfg_scale": 2.0}}, r"guidance w=2.0 needs a model trained with a null condition"),
    ({"model": {"num_classes": 10}, "sample": {"cfg_scale": 1.5}}, r"null condition"),
    ({"model": {"num_layers": 12}}, r"odd count.*num_layers=13"),
    ({"model": {"conv": "sideways"}}, r"model\.conv = 'sideways' is not a valid choice"),
    ({"model": {"size": "U-ViT-X/2"}}, r"unknown model size"),
    ({"train": {"p_uncond": 0.1}}, r"label dropout needs a null condition"),
    ({"data": {"name": "digits"}, "model": {"img_size": 32}}, r"8x8"),
    ({"train": {"batch_size": 10, "grad_accum": 3}}, r"do not divide the batch"),
    ({"diffusion": {"formulation": "flow", "prediction": "v"}},
     r"diffusion\.prediction: v is not a target of the flow formulation; use velocity, eps, x0"),
    ({"diffusion": {"prediction": "velocity"}}, r"velocity is not a target of the vp formulation; use eps, v, x0"),
    ({"diffusion": {"formulation": "flow"}, "sample": {"sampler": "pf_ode_euler"}},
     r"sample\.sampler: pf_ode_euler does not apply to the flow formulation; use one of .*euler, heun, ddim"),
    ({"sample": {"guidance_interval": [0.8, 0.2]}}, r"sample\.guidance_interval: must be \[t_lo, t_hi\]"),
    ({"sample": {"guidance_interval": [0.2]}}, r"sample\.guidance_interval must have 2 items"),
    ({"train": {"time_sampling": "logit"}}, r"did you mean 'logit_normal'"),
    ({"train": {"logit_std": 0}}, r"train\.logit_std: must be positive"),
    ({"train": {"loss_weighting": "min-snr"}}, r"did you mean 'min_snr'"),
    ({"train": {"lr_decay": "cos"}}, r"did you mean 'cosine'"),
    ({"train": {"lr_final": 2.0}}, r"train\.lr_final: is a fraction of train\.lr and must be in \[0, 1\]"),
])
def test_mistakes_name_the_key_and_the_fix(raw, pattern):
    with pytest.raises(RecipeError, match=pattern):
        recipe_from_dict(raw, source="r.yaml")


def test_yaml_exponent_strings_are_numbers(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lr: 1e-4\n")  # YAML 1.1 reads this as a string
    assert load_recipe(p).train.lr == pytest.approx(1e-4)


def test_missing_recipe_suggests_close_names():
    with pytest.raises(RecipeError, match="did you mean"):
        load_recipe("digits_uvit_tine")


def test_recipe_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, uvit_cli.recipe; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_flow_recipes_are_the_paper_backbones_with_the_flow_objective():
    for name, official in (("imagenet256_uvit_h2_flow", "imagenet256_uvit_h2"), ("cifar10_uvit_s2_flow",
                                                                                 "cifar10_uvit_s2"),
                           ("digits_flow_uvit_tiny", "digits_uvit_tiny")):
        r, o = load_recipe(name), load_recipe(official)
        assert r.diffusion.formulation == "flow" and r.prediction_target == "velocity"
        # the same backbone and data; the digits job may start its extra conv as a no-op (an init, not the network)
        # and cuts its 8x8 digits into 4x4 patches (the same blocks on 4 tokens instead of 16)
        same = dataclasses.replace(r.model, conv_init=o.model.conv_init, patch_size=o.model.patch_size,
                                   size=o.model.size)
        assert same == o.model and r.data == o.data
        assert r.model.patch_size == (4 if name.startswith("digits") else o.model.patch_size)
        text = (recipes_dir() / f"{name}.yaml").read_text()
        assert "not a paper result" in text.splitlines()[0] + text.splitlines()[1]
    assert load_recipe("imagenet256_uvit_h2_flow").train.time_sampling == "logit_normal"


def test_guidance_interval_and_new_fields_round_trip():
    import yaml

    r = load_recipe("digits_flow_uvit_tiny", ["sample.guidance_interval=[0.2, 0.8]", "train.loss_weighting=min_snr"])
    assert r.sample.guidance_interval == (0.2, 0.8)
    assert recipe_from_dict(yaml.safe_load(dump_recipe(r))) == r
