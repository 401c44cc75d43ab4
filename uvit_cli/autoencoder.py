"""The Stable Diffusion KL autoencoder (diffusers ``AutoencoderKL``): encoder moments, latent samples, one decode path.

Latent models never see images: `uvit encode-latents` stores the encoder moments (mean and log-variance, as the
official U-ViT cache does), training draws z = (mean + std * noise) * scale_factor from them, and `uvit sample`
decodes z / scale_factor. ImageNet uses the EMA-finetuned SD VAE with scale 0.18215; MS-COCO the original SD v1 VAE
with scale 0.23010 (paper section 3).

diffusers is imported inside the functions that build an AutoencoderKL: it costs about 4.5 s to import, and
pixel-space runs (the digits, CIFAR10) never need it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from .errors import UvitError
from .files import read_state_dict, sha256_file
from .hub import downloads_allowed, hub_file, missing_message
from .registry import VAES

log = logging.getLogger(__name__)

# diffusers AutoencoderKL arguments of the Stable Diffusion v1 VAE (f=8, 4 latent channels); the official
# U-ViT `autoencoder_kl.pth` has this architecture (ch=128, ch_mult=(1,2,4,4), 2 res blocks, no attention
# except the mid block).
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    block_out_channels=(128, 256, 512, 512), sample_size=256,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)

DEFAULT_VAE = {kind: hub_id for kind, (hub_id, _) in VAES.items()}
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
LOCAL_HINT = ("pass a local path with --vae (a diffusers VAE directory, or the official U-ViT "
              "assets/stable-diffusion/autoencoder_kl.pth / autoencoder_kl_ema.pth)")


class Autoencoder(torch.nn.Module):
    """A frozen AutoencoderKL plus its latent scale factor; images are (B, 3, H, W) in [-1, 1]."""

    def __init__(self, vae, scale_factor: float, name: str = "", sha256: str = "", weights_file: str = ""):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scale_factor = float(scale_factor)
        self.name = name                      # the spec it was loaded from (recorded in latent manifests)
        self.sha256 = sha256                  # SHA-256 of the weights file ("" for in-memory models)
        self.weights_file = weights_file
        self.channels_last = False

    def optimize_for_encoding(self) -> "Autoencoder":
        """On CPU, run the convolutions in channels-last layout (measured ~1.5x faster for small VAEs; outputs
        agree to ~1e-6). GPUs keep the default layout (GroupNorm prefers it). Idempotent."""
        if self.device.type == "cpu" and not self.channels_last:
            self.vae.to(memory_format=torch.channels_last)
            self.channels_last = True
        return self

    @classmethod
    def from_config(cls, config: dict, scale_factor: float, **kw) -> "Autoencoder":
        """A randomly initialised AutoencoderKL with the given diffusers config (tests, benchmarks)."""
        from diffusers import AutoencoderKL

        return cls(AutoencoderKL(**config), scale_factor, **kw)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 2C, H/f, W/f): mean and log-variance concatenated on channels (the official cache's layout)."""
        x = images.to(device=self.device, dtype=self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.vae.encoder(x)
        return self.vae.quant_conv(h) if self.vae.quant_conv is not None else h

    def sample_latents(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = (mean + std * noise) * scale_factor, what the network is trained on; logvar clamped to [-30, 20]."""
        mean, logvar = moments.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise) * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents (divides by the scale factor itself)."""
        z = (z / self.scale_factor).to(device=self.device, dtype=self.dtype)
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        return self.vae.decoder(z).float().clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# The official (LDM-layout) state dict -> diffusers
# ---------------------------------------------------------------------------------------------------------------------

def ldm_config(sd: dict) -> dict:
    """The AutoencoderKL config implied by the shapes of an LDM-layout state dict (the official .pth)."""
    levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    widths = tuple(int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels))
    latent = int(sd["post_quant_conv.weight"].shape[0]) if "post_quant_conv.weight" in sd else \
        int(sd["encoder.conv_out.weight"].shape[0]) // 2
    return dict(SD_VAE_CONFIG, block_out_channels=widths, layers_per_block=blocks, latent_channels=latent,
                down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels)


def _rename_block(rest: str) -> str:
    return rest.replace("nin_shortcut", "conv_shortcut")


def _rename_mid(rest: str) -> str:
    """mid.block_1/2 -> mid_block.resnets.0/1; mid.attn_1.{norm,q,k,v,proj_out} -> attentions.0.{...}."""
    rest = re.sub(r"^block_(\d)\.", lambda m: f"resnets.{int(m.group(1)) - 1}.", rest)
    for old, new in (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                     ("proj_out.", "to_out.0.")):
        rest = re.sub(rf"^attn_1\.{re.escape(old)}", f"attentions.0.{new}", rest)
    return _rename_block(rest)


def ldm_to_diffusers(sd: dict) -> dict:
    """Rename an LDM/official-U-ViT VAE state dict to diffusers AutoencoderKL keys.

    Decoder levels are numbered bottom-up in LDM (``up.0`` is the last level) and top-down in diffusers;
    the 1x1-conv attention projections become linear layers.
    """
    levels = len(ldm_config(sd)["block_out_channels"])
    out = {}
    for key, value in sd.items():
        new = key
        if m := re.match(r"(encoder|decoder)\.mid\.(.*)", key):
            new = f"{m.group(1)}.mid_block.{_rename_mid(m.group(2))}"
            if ".attentions.0.to_" in new and value.ndim == 4:
                value = value[:, :, 0, 0]
        elif m := re.match(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.*)", key):
            new = f"encoder.down_blocks.{m.group(1)}.resnets.{m.group(2)}.{_rename_block(m.group(3))}"
        elif m := re.match(r"encoder\.down\.(\d+)\.downsample\.conv\.(.*)", key):
            new = f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
        elif m := re.match(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.*)", key):
            new = f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.resnets.{m.group(2)}.{_rename_block(m.group(3))}"
        elif m := re.match(r"decoder\.up\.(\d+)\.upsample\.conv\.(.*)", key):
            new = f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
        elif m := re.match(r"(encoder|decoder)\.norm_out\.(.*)", key):
            new = f"{m.group(1)}.conv_norm_out.{m.group(2)}"
        out[new] = value
    return out


def vae_from_ldm_state_dict(sd: dict):
    """An AutoencoderKL holding the weights of an LDM-layout state dict (strict: every key must match)."""
    from diffusers import AutoencoderKL

    prefix = "first_stage_model."  # a whole LDM checkpoint: keep only its autoencoder
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    try:
        config = ldm_config(sd)
    except (KeyError, ValueError) as e:
        raise UvitError(f"the state dict does not look like a KL autoencoder (missing {e}); expected the official "
                        "U-ViT autoencoder_kl.pth or a diffusers VAE directory") from None
    vae = AutoencoderKL(**config)
    converted = ldm_to_diffusers(sd)
    own = vae.state_dict()
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    if missing or unexpected:
        raise UvitError(f"VAE weights do not match the AutoencoderKL layout: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}; expected the official U-ViT autoencoder_kl.pth (LDM keys)")
    vae.load_state_dict(converted, strict=True)
    return vae


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------

def _diffusers_dir(path: Path) -> Path | None:
    """The directory holding config.json: the path itself or its ``vae/`` subfolder (a whole SD pipeline)."""
    for d in (path, path / "vae"):
        if (d / "config.json").is_file():
            return d
    return None


def _weights_in(d: Path) -> Path | None:
    return next((d / n for n in WEIGHT_NAMES if (d / n).is_file()), None)


def split_spec(spec: str) -> tuple[str, str | None]:
    """"org/name:subfolder" -> ("org/name", "subfolder"); a hub id has exactly one slash."""
    repo, _, sub = spec.partition(":")
    return repo, (sub or None)


def _resolve_hub(spec: str, allow: bool) -> Path:
    repo, sub = split_spec(spec)
    if repo.count("/") != 1:
        raise UvitError(f"--vae {spec!r} is neither an existing path nor a hub id like stabilityai/sd-vae-ft-ema "
                        "(or CompVis/stable-diffusion-v1-4:vae for a subfolder); check the path")
    try:
        config = hub_file(repo, "config.json", subfolder=sub, allow_download=allow, what="VAE", local_hint=LOCAL_HINT)
    except FileNotFoundError:
        raise UvitError(missing_message(spec, "VAE", LOCAL_HINT)) from None
    for name in WEIGHT_NAMES:
        try:
            hub_file(repo, name, subfolder=sub, allow_download=allow, what="VAE", local_hint=LOCAL_HINT)
            return config.parent
        except FileNotFoundError:
            continue
    raise UvitError(missing_message(spec, "VAE weights of", LOCAL_HINT))


def load_autoencoder(spec: str, scale_factor: float, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, allow_download: bool | None = None) -> Autoencoder:
    """Load a VAE from a hub id (``org/name`` or ``org/name:subfolder``), a local diffusers directory, or a
    state-dict file (the official U-ViT ``autoencoder_kl*.pth``, LDM keys; or .safetensors in either layout).

    Hub ids come from the local cache unless downloads are allowed (``allow_download`` or UVIT_ALLOW_DOWNLOAD=1).
    """
    from diffusers import AutoencoderKL

    if not spec:
        raise UvitError("no VAE given; set data.vae in the recipe or pass --vae (e.g. stabilityai/sd-vae-ft-ema)")
    path = Path(spec).expanduser()
    if path.is_file():
        sd = read_state_dict(path, hint="expected the official U-ViT autoencoder_kl.pth or a VAE .safetensors")
        if any(k.startswith("encoder.down_blocks.") for k in sd):   # already diffusers keys
            vae = AutoencoderKL(**SD_VAE_CONFIG)
            vae.load_state_dict(sd, strict=True)
        else:
            vae = vae_from_ldm_state_dict(sd)
        weights = path
    else:
        if path.is_dir():
            d = _diffusers_dir(path)
            if d is None:
                raise UvitError(f"--vae {spec}: the directory has no config.json (nor vae/config.json); pass a "
                                "diffusers VAE directory or the official autoencoder_kl.pth file")
        elif spec.startswith((".", "/", "~")) or path.suffix in (".pth", ".pt", ".ckpt", ".safetensors", ".bin"):
            raise UvitError(f"VAE file {spec} does not exist; the official U-ViT release ships it as "
                            "assets/stable-diffusion/autoencoder_kl.pth (ImageNet: autoencoder_kl_ema.pth); "
                            "or pass a hub id such as stabilityai/sd-vae-ft-ema")
        else:
            d = _resolve_hub(spec, downloads_allowed(allow_download))
        weights = _weights_in(d)
        if weights is None:
            raise UvitError(f"{d} holds no {' or '.join(WEIGHT_NAMES)}; {LOCAL_HINT}")
        vae = AutoencoderKL.from_pretrained(str(d), local_files_only=True, low_cpu_mem_usage=False,
                                            torch_dtype=dtype)
    sha = sha256_file(weights)
    log.info("VAE %s (%s, sha256 %s), scale factor %g", spec, weights.name, sha[:12], scale_factor)
    vae = vae.to(device)
    if next(vae.parameters()).dtype != dtype:
        vae = vae.to(dtype)
    return Autoencoder(vae, scale_factor, name=spec, sha256=sha, weights_file=str(weights))
