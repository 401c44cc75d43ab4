"""The FID Inception-v3: the TF "2015-12-05" graph as a torchvision Inception3 with TF's pooling quirks.

One forward pass gives the three feature sets the metrics use: pool_3 (2048, FID and precision/recall),
the sFID spatial features (Mixed_6d.branch1x1, first 7 channels, (h, w, c) order, 2023) and the 1008
unbiased logits (pool_3 times fc.weight, no bias; Inception Score). The network takes a preprocessed
(N, 3, 299, 299) batch; resizing and value maps live in features.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UvitError

log = logging.getLogger(__name__)

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
WEIGHTS_ENV = "UVIT_INCEPTION_WEIGHTS"
POOL_DIM = 2048
SPATIAL_CHANNELS = 7      # ADM keeps mixed_6/conv[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
NUM_LOGITS = 1008         # the TF graph's softmax width (1000 ImageNet classes + 8 unused)


@dataclass
class InceptionOutputs:
    """Per-image features from one pass: pool (N, 2048), spatial (N, 2023), logits (N, 1008), all float32."""

    pool: torch.Tensor
    spatial: torch.Tensor
    logits: torch.Tensor


def _tf_pool(x: torch.Tensor, kind: str) -> torch.Tensor:
    # TF's 3x3/stride-1 AvgPool ignores the zero padding (count_include_pad=False); Mixed_7c's graph uses a max pool.
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _blocks():
    """Subclasses of torchvision's Inception blocks whose pool branch pools as the TF graph does (built on first
    use: torchvision costs ~1.5 s to import and only the Inception metrics need it)."""
    from torchvision.models.inception import InceptionA, InceptionC, InceptionE

    class TFInceptionA(InceptionA):
        def _forward(self, x):
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return [self.branch1x1(x), b5, b3, self.branch_pool(_tf_pool(x, "avg"))]

    class TFInceptionC(InceptionC):
        def _forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            b7d = self.branch7x7dbl_1(x)
            for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
                b7d = layer(b7d)
            # branch1x1 comes first, so Mixed_6d's output[:, :7] is mixed_6/conv:0[..., :7] (the sFID tensor).
            return [self.branch1x1(x), b7, b7d, self.branch_pool(_tf_pool(x, "avg"))]

    class TFInceptionE(InceptionE):
        def __init__(self, in_channels: int, pool: str):
            super().__init__(in_channels)
            self.pool_kind = pool

        def _forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
            return [self.branch1x1(x), b3, b3d, self.branch_pool(_tf_pool(x, self.pool_kind))]

    return TFInceptionA, TFInceptionC, TFInceptionE


class FIDInception(nn.Module):
    """Inception-v3 with the FID graph's blocks; ``forward`` returns :class:`InceptionOutputs`.

    State-dict keys equal torchvision's ``Inception3(num_classes=1008, aux_logits=False)``, which is the layout
    of ``pt_inception-2015-12-05-6726825d.pth``.
    """

    def __init__(self):
        super().__init__()
        from torchvision.models.inception import Inception3  # deferred like _blocks()

        A, C, E = _blocks()
        net = Inception3(num_classes=NUM_LOGITS, aux_logits=False, init_weights=False, transform_input=False)
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
        net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = C(768, 128), C(768, 160), C(768, 160), C(768, 192)
        net.Mixed_7b, net.Mixed_7c = E(1280, "avg"), E(2048, "max")
        self.fused = False
        self.weights_path = ""
        # Keep torchvision's module names (the weight file's keys) by adopting its children directly.
        for name, module in net.named_children():
            if name not in ("AuxLogits", "dropout"):
                self.add_module(name, module)
        self.eval()

    def forward(self, x: torch.Tensor) -> InceptionOutputs:
        """x: (N, 3, 299, 299) float, already resized and value-mapped by the chosen pipeline."""
        if self.fused:
            x = x.contiguous(memory_format=torch.channels_last)
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d"):
            x = getattr(self, name)(x)
        # sFID: first 7 channels of mixed_6/conv (17x17), flattened in TF's NHWC order (h, w, c).
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        for name in ("Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        pool = torch.flatten(self.avgpool(x), 1)
        logits = pool @ self.fc.weight.t()  # the unbiased logits of improved-gan / ADM (no fc bias)
        return InceptionOutputs(pool=pool.float(), spatial=spatial.float(), logits=logits.float())

    def fuse(self) -> "FIDInception":
        """Fold each BatchNorm into its conv and use channels-last memory: about 3x faster on CPU, features equal
        to the unfused network within ~1e-6 relative (float rounding). Irreversible; returns self."""
        with torch.no_grad():
            for module in self.modules():
                bn = getattr(module, "bn", None)
                if hasattr(module, "conv") and isinstance(bn, nn.BatchNorm2d):
                    # BN(conv(x)) = conv'(x) with w' = w * g / sqrt(v + eps), b' = beta - m * g / sqrt(v + eps).
                    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                    conv = module.conv
                    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
                    conv.bias = nn.Parameter(bn.bias - bn.running_mean * scale)
                    module.bn = nn.Identity()
        self.fused = True
        return self.to(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------------

def default_weights_locations() -> list[Path]:
    """Where the weight file is looked for when no path is given: $UVIT_INCEPTION_WEIGHTS, then the torch hub cache."""
    out = []
    if os.environ.get(WEIGHTS_ENV):
        out.append(Path(os.environ[WEIGHTS_ENV]).expanduser())
    out.append(Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE)
    return out


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The FID Inception weight file: ``path``, else $UVIT_INCEPTION_WEIGHTS, else the torch hub cache.

    Nothing is downloaded: a missing file is a UvitError that names the file and where it comes from.
    """
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UvitError(f"--inception-weights {p} does not exist; download {WEIGHTS_URL} "
                            "and pass its path")
        return p
    candidates = default_weights_locations()
    for p in candidates:
        if p.is_file():
            return p
    tried = ", ".join(str(c) for c in candidates)
    raise UvitError(f"the FID Inception weights {WEIGHTS_FILE} were not found (looked in {tried}). Download them "
                    f"once from {WEIGHTS_URL} into {candidates[-1].parent}/, or pass --inception-weights PATH / set "
                    f"{WEIGHTS_ENV}. For the built-in digits use --mode digits (no Inception needed)")


def load_fid_inception(path: str | Path | None = None, device: str | torch.device = "cpu",
                       exact: bool = False) -> FIDInception:
    """The FID Inception in eval mode with the weights found by :func:`find_inception_weights` (weights_only load).

    By default BatchNorm is folded into the convs for speed (:meth:`FIDInception.fuse`); ``exact=True`` keeps the
    layer-by-layer arithmetic of pytorch-fid (bit-identical pool features on CPU).
    """
    p = find_inception_weights(path)
    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not a plain tensor state dict"
        raise UvitError(f"{p} could not be read as a tensor state dict ({type(e).__name__}); re-download "
                        f"{WEIGHTS_URL}") from None
    with torch.device("meta"):  # no random init of 24M parameters: the file provides every tensor
        model = FIDInception()
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]  # BN fills these in
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected or any(sd[k].shape != own[k].shape for k in own if k in sd):
        raise UvitError(f"{p} is not the FID Inception ({WEIGHTS_FILE}): {len(missing)} keys missing, "
                        f"{len(unexpected)} unexpected (e.g. {(missing or unexpected or ['shape mismatch'])[0]}). "
                        "torchvision's ImageNet Inception is a different network and must not be used for FID")
    model.load_state_dict(sd, strict=True, assign=True)
    model.weights_path = str(p)
    if not exact:
        model.fuse()
    return model.to(device).eval()


def random_state_dict(seed: int = 0) -> dict:
    """A random but well-scaled FID Inception state dict, for tests and benchmarks only (never for scores)."""
    gen = torch.Generator().manual_seed(seed)
    model = FIDInception()
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("conv.weight"):
            fan_in = v[0].numel()
            sd[k] = torch.randn(v.shape, generator=gen) * (2.0 / fan_in) ** 0.5  # He init keeps activations O(1)
        elif k.endswith("bn.running_mean") or k.endswith("bn.bias"):
            sd[k] = torch.randn(v.shape, generator=gen) * 0.1
        elif k.endswith("bn.running_var") or k.endswith("bn.weight"):
            sd[k] = 0.75 + 0.5 * torch.rand(v.shape, generator=gen)
        elif k == "fc.weight":
            sd[k] = torch.randn(v.shape, generator=gen) * 0.05
        elif v.is_floating_point():
            sd[k] = torch.randn(v.shape, generator=gen) * 0.01
        else:
            sd[k] = v.clone()
    return sd
