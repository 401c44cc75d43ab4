"""uvit export: a diffusers folder that round-trips (UViTModel.from_pretrained gives the uvit model's outputs), the
scheduler that matches the recipe's schedule and sampler, the VAE reference, the model card with the run's FID card,
the official release files in both formats, and --push-to-hub through a stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from uvit_cli.build import build_schedule, load_model, parameter_count
from uvit_cli.recipe import load_recipe

DATA = Path(__file__).parent / "data"
TINY = ["model.num_layers=3", "model.embed_dim=32", "model.num_heads=2", "train.batch_size=16", "train.steps=2",
        "train.save_every=2", "train.sample_every=0", "data.num_workers=0", "sample.steps=3"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from uvit_cli.train import train

    run = tmp_path_factory.mktemp("run")
    train(load_recipe("digits_uvit_tiny", TINY), run, device="cpu")
    return run


def _same_outputs(model, exported, recipe, condition: dict, y, ks=(0, 17, 499, 998, 999)):
    """The exported model at diffusers index k equals the uvit model at network time net_time((k + 1) / N), or at
    net_time(k / N) for flow matching, whose diffusers timestep is N t."""
    n = exported.num_train_timesteps
    schedule = build_schedule(recipe)
    offset = 0 if schedule.kind == "flow" else 1
    torch.manual_seed(0)
    m = recipe.model
    x = torch.randn(3, m.in_chans, m.img_size, m.img_size)
    with torch.no_grad():
        for k in ks:
            t_net = torch.full((3,), float(schedule.net_time((k + offset) / n)))
            want = model(x, t_net, y)
            got = exported(x, torch.tensor(k), **condition).sample
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        ks = torch.tensor([3, 400, 999])                                # one timestep per sample
        got = exported(x, ks, **condition).sample
        want = model(x, schedule.net_time((ks.double() + offset) / n).float(), y)
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_a_run_exports_to_a_diffusers_folder_that_round_trips(digits_run, tmp_path, uvit):
    from diffusers import DPMSolverSinglestepScheduler

    from uvit_cli.diffusers_model import UViTModel

    # a real FID card in the run directory (the digits metric on 20 samples)
    res = uvit("fid", digits_run, "--num-samples", "20", "--json", digits_run / "fid.json", "--device", "cpu")
    assert res.returncode == 0, res.output
    out = tmp_path / "export"
    res = uvit("export", digits_run, "--out", out)
    assert res.returncode == 0, res.output
    model, recipe, _ = load_model(digits_run)
    exported = UViTModel.from_pretrained(out / "transformer").eval()
    y = torch.tensor([0, 3, 9])
    _same_outputs(model, exported, recipe, {"class_labels": y}, y)
    again, _, _ = load_model(out / "transformer" / "diffusion_pytorch_model.safetensors", str(out / "recipe.yaml"))
    for k, v in model.state_dict().items():                           # our keys: `uvit sample` reads the file too
        torch.testing.assert_close(again.state_dict()[k], v, atol=0, rtol=0)

    # the scheduler: the recipe's sampler (DPM-Solver, order 3, fast) on our VP schedule, exactly
    scheduler = DPMSolverSinglestepScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.algorithm_type == "dpmsolver" and scheduler.config.solver_order == 3
    assert scheduler.config.lower_order_final and scheduler.config.final_sigmas_type == "sigma_min"
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), build_schedule(recipe).marginal_alpha(t) ** 2,
                               rtol=1e-5, atol=1e-7)

    info = json.loads((out / "uvit.json").read_text())
    assert info["vae"] is None and info["sampling"]["null_class_id"] == 10 and info["training_steps"] == 2
    assert load_recipe(out / "recipe.yaml") == recipe
    card = (out / "README.md").read_text()
    fid = json.loads((digits_run / "fid.json").read_text())
    assert card.startswith("---\nlibrary_name: diffusers") and "class-conditional" in card
    assert f"{parameter_count(recipe):,}" in card and "| training steps | 2 " in card
    assert f"fd_digits = {fid['metrics']['fd_digits']:.4g}" in card
    assert fid["protocol"]["sha256"] in card and "NOT comparable" in card   # the whole protocol card is quoted
    assert "DPMSolverSinglestepScheduler" in card and "logSNR" in card

    # the usage snippet on the card runs as written (with the folder for the repo)
    code = card.split("```python\n")[1].split("```")[0].replace('"THIS_REPO"', repr(str(out)))
    scope: dict = {}
    exec(code, scope)
    assert scope["images"].shape == (4, 1, 8, 8) and torch.isfinite(scope["images"]).all()

    # an existing folder is kept unless --overwrite
    res = uvit("export", digits_run, "--out", out)
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert uvit("export", digits_run, "--out", out, "--overwrite").returncode == 0
    assert not list(tmp_path.glob(".export.*"))                       # no partial folder left behind


def _official(tmp_path):
    from safetensors import safe_open

    with safe_open(str(DATA / "official_uvit_class_null_noconv_mlptime.safetensors"), framework="pt") as f:
        sd = {k[3:]: f.get_tensor(k) for k in f.keys() if k.startswith("sd.")}
        x, t, y, want = (f.get_tensor(k) for k in ("in.x", "in.t", "in.y", "out"))
    pth = tmp_path / "imagenet256_uvit_tiny.pth"
    torch.save(sd, pth)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"img_size": 8, "patch_size": 2, "in_chans": 4, "embed_dim": 64, "num_layers": 3, "num_heads": 2,
                  "num_classes": 10, "null_class": True, "conv": "none", "mlp_time_embed": True, "qkv_bias": True},
        "data": {"name": "latents", "latents": "unused", "vae": "stabilityai/sd-vae-ft-ema", "scale_factor": 0.18215},
        "diffusion": {"formulation": "discrete"},
        "sample": {"sampler": "dpm_solver_pp", "steps": 50, "order": 3, "fast": True, "cfg_scale": 1.4}}))
    return pth, recipe, (x, t, y, want)


def test_an_official_release_file_converts_to_both_formats(tmp_path, uvit):
    from diffusers import DPMSolverSinglestepScheduler

    from uvit_cli.diffusers_model import UViTModel
    from uvit_cli.model import UViT

    pth, recipe, (x, t, y, want) = _official(tmp_path)
    res = uvit("export", pth, "--recipe", recipe, "--out", tmp_path / "hub")
    assert res.returncode == 0, res.output
    res = uvit("export", pth, "--recipe", recipe, "--format", "safetensors", "--out", tmp_path / "w.safetensors")
    assert res.returncode == 0, res.output
    model, r, _ = load_model(tmp_path / "w.safetensors")
    exported = UViTModel.from_pretrained(tmp_path / "hub" / "transformer").eval()
    with torch.no_grad():                                             # the official vectors survive both
        torch.testing.assert_close(model(x, t, y), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(UViT.forward(exported, x, t, y), want, atol=1e-5, rtol=0)
    _same_outputs(model, exported, r, {"class_labels": y[:3]}, y[:3])
    # discrete formulation: network time = index + 1 (the official n), diffusers' scaled_linear betas
    assert float(exported.network_time(0, 1)) == 1.0 and float(exported.network_time(999, 1)) == 1000.0
    scheduler = DPMSolverSinglestepScheduler.from_pretrained(tmp_path / "hub" / "scheduler")
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.algorithm_type == "dpmsolver++"
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), build_schedule(r).alphas_cumprod,
                               rtol=1e-5, atol=0)
    info = json.loads((tmp_path / "hub" / "uvit.json").read_text())
    assert info["vae"] == {"repo_id": "stabilityai/sd-vae-ft-ema", "subfolder": None, "scale_factor": 0.18215,
                           "decode": "vae.decode(latents / scale_factor)"}
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "official release imagenet256_uvit_tiny.pth" in card and "| training steps | unknown" in card
    assert 'AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-ema")' in card and "x / 0.18215" in card


def _gaussian_sample(recipe, ours_sampler):
    """Our sampler and the exported diffusers scheduler on data x0 ~ N(0, 1/4 I), whose noise prediction is exact:
    eps(x_t) = sigma_t x_t / (alpha_t^2 / 4 + sigma_t^2). Returns (ours, diffusers') final samples."""
    from uvit_cli.export import build_scheduler
    from uvit_cli.sampling import get_sampler

    schedule = build_schedule(recipe)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)

    def eps(x, t):
        a, s = float(schedule.marginal_alpha(t)), float(schedule.marginal_sigma(t))
        return s * x / (a * a / 4 + s * s)

    ours = get_sampler(ours_sampler)(eps, x.clone(), schedule, steps=50, order=3, fast=True)
    scheduler, _ = build_scheduler(recipe)
    scheduler.set_timesteps(50)
    ac = scheduler.alphas_cumprod.double()
    z = x.clone().float()
    for t in scheduler.timesteps:
        a, s = float(ac[int(t)].sqrt()), float((1 - ac[int(t)]).sqrt())
        z = scheduler.step((s * z.double() / (a * a / 4 + s * s)).float(), t, z).prev_sample
    return ours, z.double()


def test_the_exported_schedulers_reproduce_the_official_samplers_where_the_card_says():
    base = ["sample.steps=50", "sample.order=3", "sample.fast=true"]
    discrete = load_recipe("digits_uvit_tiny", [*base, "diffusion.formulation=discrete", "sample.sampler=dpm_solver_pp"])
    ours, theirs = _gaussian_sample(discrete, "dpm_solver_pp")
    assert float((theirs - ours).norm() / ours.norm()) < 1e-3         # the official discrete protocol: reproduced
    vp = load_recipe("digits_uvit_tiny", [*base, "sample.sampler=dpm_solver"])
    ours, theirs = _gaussian_sample(vp, "dpm_solver")
    rel = float((theirs - ours).norm() / ours.norm())
    assert 1e-3 < rel < 0.1                                           # VP: the time grid differs (card says ~4%)


def test_every_sampler_has_a_scheduler_and_every_format_a_writer():
    from uvit_cli.export import EXPORTERS, SCHEDULERS, build_scheduler
    from uvit_cli.recipe import SAMPLERS_FOR, ExportFormat, Formulation, Sampler, choices

    assert tuple(SCHEDULERS) == choices(Sampler) and tuple(EXPORTERS) == choices(ExportFormat)
    for sampler in choices(Sampler):
        for formulation in choices(Formulation):
            if sampler not in SAMPLERS_FOR[formulation]:
                continue
            r = load_recipe("digits_uvit_tiny", [f"sample.sampler={sampler}", f"diffusion.formulation={formulation}"])
            scheduler, note = build_scheduler(r)
            scheduler.set_timesteps(10)
            assert len(scheduler.timesteps) >= 10 and note


def test_a_text_model_exports_with_encoder_hidden_states(tmp_path):
    from uvit_cli.build import build_model
    from uvit_cli.diffusers_model import UViTModel
    from uvit_cli.export import export_diffusers

    r = load_recipe("digits_t2i_uvit_tiny", ["model.text_dim=16",
                                         "model.text_tokens=5", "model.num_layers=3", "model.embed_dim=32",
                                         "model.num_heads=2", "sample.cfg_scale=1"])
    torch.manual_seed(1)
    model = build_model(r).eval()
    export_diffusers(model, r, tmp_path / "t2i", source="test")
    exported = UViTModel.from_pretrained(tmp_path / "t2i" / "transformer").eval()
    ctx = torch.randn(3, 5, 16)
    _same_outputs(model, exported, r, {"encoder_hidden_states": ctx}, ctx)
    assert "encoder_hidden_states" in (tmp_path / "t2i" / "README.md").read_text()


def test_push_to_hub_dry_run_and_through_a_stand_in(digits_run, tmp_path, monkeypatch, uvit):
    import uvit_cli.hub as hub

    res = uvit("export", digits_run, "--out", tmp_path / "a", "--push-to-hub", "me/uvit-digits", "--dry-run")
    assert res.returncode == 0, res.output
    assert "would upload 6 files to me/uvit-digits" in res.stdout and "transformer/config.json" in res.stdout

    calls = []

    class StandIn:  # what HfApi does for us: create the repo, upload the folder
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, folder_path, repo_id, **kw):
            calls.append(("upload_folder", repo_id, sorted(str(p.relative_to(folder_path))
                                                           for p in Path(folder_path).rglob("*") if p.is_file())))

    monkeypatch.setattr(hub, "HfApi", StandIn)
    res = uvit("export", digits_run, "--out", tmp_path / "b", "--push-to-hub", "me/uvit-digits", "--private")
    assert res.returncode == 0, res.output
    assert calls[0] == ("create_repo", "me/uvit-digits", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[1][0] == "upload_folder" and "transformer/diffusion_pytorch_model.safetensors" in calls[1][2]
    assert "README.md" in calls[1][2] and "scheduler/scheduler_config.json" in calls[1][2]
    for bad in ("no-slash", "a/b/c"):
        res = uvit("export", digits_run, "--out", tmp_path / bad.replace("/", "_"), "--push-to-hub", bad)
        assert res.returncode == 2 and "OWNER/NAME" in res.stderr
    res = uvit("export", digits_run, "--format", "safetensors", "--out", tmp_path / "w.safetensors",
               "--push-to-hub", "me/x")
    assert res.returncode == 2 and "--format diffusers" in res.stderr


def test_a_flow_model_sees_its_own_time_through_the_flow_matching_scheduler():
    from uvit_cli.diffusers_model import UViTModel
    from uvit_cli.export import build_scheduler

    r = load_recipe("digits_flow_uvit_tiny", ["model.num_layers=3", "model.embed_dim=32", "model.num_heads=2"])
    scheduler, note = build_scheduler(r)
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and "flow matching" in note
    scheduler.set_timesteps(4)
    from uvit_cli.build import build_model

    model = UViTModel.from_uvit(build_model(r), r)
    t = scheduler.timesteps[1] / 1000                     # FlowMatch timesteps are 1000 sigma, sigma = t
    assert torch.allclose(model.network_time(scheduler.timesteps[1], 1), (999 * t).float().reshape(1), atol=1e-3)
