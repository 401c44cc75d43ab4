"""The VAE wrapper: official .pth conversion (checked against the official code's outputs), moments, sampling,
decode, loading from local files and the hub cache, and clear errors for missing weights."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from encode_fixtures import TINY_VAE, save_tiny_vae, tiny_vae
from safetensors.torch import load_file

from uvit_cli.autoencoder import Autoencoder, ldm_config, ldm_to_diffusers, load_autoencoder
from uvit_cli.errors import UvitError

DATA = Path(__file__).parent / "data"


def _official():
    """Tiny official-layout weights + input/outputs computed by U-ViT's libs/autoencoder.py (see tests/data)."""
    d = load_file(str(DATA / "official_vae_tiny.safetensors"))
    return {k[4:]: v.float() for k, v in d.items() if k.startswith("ldm.")}, d


def test_official_pth_loads_and_matches_official_encoder_and_decoder(tmp_path):
    sd, d = _official()
    pth = tmp_path / "autoencoder_kl.pth"
    torch.save(sd, pth)                    # the official release is a plain state dict .pth
    ae = load_autoencoder(str(pth), scale_factor=0.23010)
    assert ae.sha256 == hashlib.sha256(pth.read_bytes()).hexdigest() and ae.name == str(pth)
    assert ae.downsample == 2 and ae.latent_channels == 4
    moments = ae.encode_moments(d["input"])
    assert moments.shape == (2, 8, 8, 8)
    torch.testing.assert_close(moments, d["moments"], atol=1e-4, rtol=1e-4)
    # decode divides by the scale factor itself, then runs post_quant_conv + decoder like the official decode
    torch.testing.assert_close(ae.decode(d["z_unscaled"] * 0.23010), d["decoded"].clamp(-1, 1), atol=1e-4, rtol=1e-4)


def test_conversion_agrees_with_diffusers_own_ldm_converter():
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    sd, _ = _official()
    config = ldm_config(sd)
    assert config["block_out_channels"] == (32, 32) and config["layers_per_block"] == 1
    ours = ldm_to_diffusers(sd)
    theirs = single_file.convert_ldm_vae_checkpoint(sd, config)
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k].reshape(theirs[k].shape), theirs[k]), k


def test_ldm_keys_that_do_not_fit_are_a_named_error(tmp_path):
    sd, _ = _official()
    sd.pop("decoder.conv_out.weight")
    torch.save(sd, tmp_path / "vae.pth")
    with pytest.raises(UvitError, match="missing"):
        load_autoencoder(str(tmp_path / "vae.pth"), 0.18215)


def test_sample_latents_draws_mean_plus_std_noise_times_scale():
    ae = Autoencoder(tiny_vae(), scale_factor=0.5)
    mean = torch.full((4000, 4, 2, 2), 3.0)
    logvar = torch.full((4000, 4, 2, 2), 2 * torch.log(torch.tensor(0.5)).item())   # std 0.5
    moments = torch.cat([mean, logvar], 1)
    z = ae.sample_latents(moments, generator=torch.Generator().manual_seed(1))
    assert z.shape == (4000, 4, 2, 2)
    assert abs(z.mean().item() - 1.5) < 0.01 and abs(z.std().item() - 0.25) < 0.01
    z2 = ae.sample_latents(moments.half(), generator=torch.Generator().manual_seed(1))   # fp16 cache input
    assert z2.dtype == torch.float32
    torch.testing.assert_close(z, z2, atol=1e-3, rtol=1e-3)   # same noise; only the fp16 rounding of logvar
    # logvar is clamped to [-30, 20] like the official sampler: no inf for absurd values
    huge = torch.cat([mean[:1], torch.full_like(mean[:1], 500.0)], 1)
    assert torch.isfinite(ae.sample_latents(huge)).all()


def test_decode_uses_its_own_scale_factor_and_clamps():
    vae = tiny_vae()
    a, b = Autoencoder(vae, 0.18215), Autoencoder(vae, 0.23010)
    z = torch.randn(2, 4, 2, 2)
    torch.testing.assert_close(a.decode(z * 0.18215), b.decode(z * 0.23010))
    assert a.decode(z * 0.18215).shape == (2, 3, 16, 16)
    assert a.decode(z * 100).abs().max() <= 1.0


def test_diffusers_directory_and_pipeline_subfolder_load(tmp_path):
    d = save_tiny_vae(tmp_path / "vae_dir")
    ae = load_autoencoder(str(d), 0.18215)
    weights = d / "diffusion_pytorch_model.safetensors"
    assert ae.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(ae.encode_moments(x), Autoencoder(tiny_vae(), 1.0).encode_moments(x))
    pipe = tmp_path / "pipeline"
    save_tiny_vae(pipe / "vae")
    assert load_autoencoder(str(pipe), 0.23010).sha256 == ae.sha256   # an SD pipeline folder: uses vae/


def _fake_hub_cache(cache: Path, repo: str, files: dict, subfolder: str = "") -> None:
    """Lay files out as huggingface_hub's cache does (models--org--name/snapshots/<rev>/..., refs/main)."""
    base = cache / f"models--{repo.replace('/', '--')}"
    rev = "0" * 40
    snap = base / "snapshots" / rev / subfolder
    snap.mkdir(parents=True)
    for name, src in files.items():
        (snap / name).write_bytes(Path(src).read_bytes())
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)


def test_hub_id_loads_from_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    src = save_tiny_vae(tmp_path / "src")
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "someorg/some-sd", {"config.json": src / "config.json", "diffusion_pytorch_model."
                    "safetensors": src / "diffusion_pytorch_model.safetensors"}, subfolder="vae")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("UVIT_ALLOW_DOWNLOAD", raising=False)
    ae = load_autoencoder("someorg/some-sd:vae", 0.23010)
    assert ae.name == "someorg/some-sd:vae" and ae.scale_factor == 0.23010
    assert ae.sha256 == hashlib.sha256((src / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    with pytest.raises(UvitError) as e:            # the same repo without the subfolder is not cached
        load_autoencoder("someorg/some-sd", 0.23010)
    msg = str(e.value)
    assert "'someorg/some-sd'" in msg and "--vae" in msg and "--allow-download" in msg and "UVIT_ALLOW_DOWNLOAD" in msg


def test_missing_weights_are_clear_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("UVIT_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(UvitError, match="stabilityai/sd-vae-ft-ema.*not in the local Hugging Face cache"):
        load_autoencoder("stabilityai/sd-vae-ft-ema", 0.18215)
    with pytest.raises(UvitError, match="autoencoder_kl.pth"):
        load_autoencoder(str(tmp_path / "assets" / "autoencoder_kl_ema.pth"), 0.18215)
    (tmp_path / "not_a_vae").mkdir()
    with pytest.raises(UvitError, match="config.json"):
        load_autoencoder(str(tmp_path / "not_a_vae"), 0.18215)
    with pytest.raises(UvitError, match="no VAE"):
        load_autoencoder("", 0.18215)


def test_in_memory_constructor_matches_config():
    ae = Autoencoder.from_config(TINY_VAE, 0.18215, name="tiny")
    assert ae.downsample == 8 and ae.latent_channels == 4 and ae.name == "tiny"
    assert ae.encode_moments(torch.zeros(1, 3, 32, 32)).shape == (1, 8, 4, 4)
    assert json.dumps(ae.vae.config["block_out_channels"]) == "[8, 8, 8, 8]"
