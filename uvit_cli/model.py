"""U-ViT: a ViT backbone for diffusion models (Bao et al., CVPR 2023, arXiv 2209.12152).

Everything is a token (time, condition, image patches) and shallow blocks are joined to deep ones by long
skips. With the default switches this is the official network (baofff/U-ViT ``libs/uvit.py`` and
``libs/uvit_t2i.py``): the same state-dict names, so released checkpoints load with ``strict=True``, and the
same forward pass. The other switch values are the paper's ablations (Figure 2).
"""

from __future__ import annotations

import math

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .registry import official_depth, size_kwargs, size_names

SKIP_MODES = ("concat_linear", "add", "linear_skip", "linear_sum", "none")
CHECKPOINT_POLICIES = ("all", "every_other", "attention", "mlp")   # what backward recomputes (grad_checkpoint)

#################################################################################
#                                   Helpers                                     #
#################################################################################


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) times: cos half, then sin half (official order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_2d_embedding(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (grid x grid, dim): sin-cos of the row and of the column, concatenated."""
    def one_axis(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    ii, jj = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([one_axis(ii, dim // 2), one_axis(jj, dim // 2)], dim=1).float()


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    return einops.rearrange(x, "B C (h p1) (w p2) -> B (h w) (p1 p2 C)", p1=p, p2=p)


def unpatchify(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Tokens (B, h*w, p*p*C) back to images; token order (h w), channel order (p1 p2 C) as officially."""
    p = int(math.isqrt(x.shape[2] // channels))
    h = int(math.isqrt(x.shape[1]))
    return einops.rearrange(x, "B (h w) (p1 p2 C) -> B C (h p1) (w p2)", h=h, p1=p, p2=p)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: scale and shift a normalised input by projections of the time embedding (1 + scale keeps init stable)."""
    return x * (1 + scale[:, None]) + shift[:, None]


#################################################################################
#                                Core layers                                    #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention (scale 1/sqrt(head_dim))."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = einops.rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, D/H)
        return self.proj(einops.rearrange(x, "B H L D -> B L (H D)"))


class Mlp(nn.Module):
    """Linear D -> rD, GELU, Linear rD -> D."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _recompute(fn, *args):
    """fn(*args), its activations recomputed in backward instead of kept (when a graph is being recorded)."""
    if torch.is_grad_enabled() and any(a.requires_grad for a in args if isinstance(a, torch.Tensor)):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class Block(nn.Module):
    """Pre-LN transformer block; out-blocks first fuse the long skip h_s into the main branch h_m.

    ``recompute`` ("attention" or "mlp") recomputes that sub-layer in backward (selective activation checkpointing);
    the UViT sets it from its checkpoint policy while training."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: str | None = None,
                 adaln: bool = False):
        super().__init__()
        self.recompute: str | None = None
        self.skip = skip
        if skip == "concat_linear":   # Linear(concat(h_m, h_s)): the paper's choice
            self.skip_linear = nn.Linear(2 * dim, dim)
        elif skip in ("linear_skip", "linear_sum"):  # h_m + Linear(h_s) / Linear(h_m + h_s)
            self.skip_linear = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaln = nn.Linear(dim, 4 * dim) if adaln else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None, c: torch.Tensor | None = None):
        if self.skip == "concat_linear":
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        elif self.skip == "add":
            x = x + skip
        elif self.skip == "linear_skip":
            x = x + self.skip_linear(skip)
        elif self.skip == "linear_sum":
            x = self.skip_linear(x + skip)
        if self.adaln is None:
            x = x + self._sublayer("attention", self._attn, x)
            return x + self._sublayer("mlp", self._mlp, x)
        shift1, scale1, shift2, scale2 = self.adaln(c).chunk(4, dim=-1)
        x = x + self._sublayer("attention", self._attn, x, shift1, scale1)
        return x + self._sublayer("mlp", self._mlp, x, shift2, scale2)

    def _sublayer(self, name: str, fn, *args):
        return _recompute(fn, *args) if self.recompute == name and self.training else fn(*args)

    def _attn(self, x, shift=None, scale=None):
        h = self.norm1(x)
        return self.attn(h if shift is None else modulate(h, shift, scale))

    def _mlp(self, x, shift=None, scale=None):
        h = self.norm2(x)
        return self.mlp(h if shift is None else modulate(h, shift, scale))


class PatchEmbed(nn.Module):
    """Image to patch tokens: a P x P stride-P conv (= a Linear per patch), or a 3x3-conv stack then a 1x1 conv."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, kind: str = "linear"):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
            return
        # Conv stem (ablation (d)): log2(P) stride-2 3x3 convs (one stride-1 conv when P = 1), GELU between.
        n = max(1, int(math.log2(patch_size)))
        hidden = max(embed_dim // 4, in_chans)
        layers, ch = [], in_chans
        for i in range(n):
            layers += [nn.Conv2d(ch, hidden, 3, stride=2 if patch_size > 1 else 1, padding=1), nn.GELU()]
            ch = hidden
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(hidden, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            x = self.convs(x)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, L, D)


#################################################################################
#                                    U-ViT                                      #
#################################################################################


class UViT(nn.Module):
    """The U-ViT noise predictor eps(x_t, t, y): time, condition and patches as tokens, long skips between halves."""

    def __init__(self, img_size: int = 32, patch_size: int = 2, in_chans: int = 3, embed_dim: int = 512,
                 num_layers: int = 13, num_heads: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 mlp_time_embed: bool = False, num_classes: int = 0, null_class: bool = False, text_dim: int = 0,
                 text_tokens: int = 77, skip: str = "concat_linear", time_cond: str = "token", conv: str = "after",
                 patch_embed: str = "linear", pos_embed: str = "learned", conv_init: str = "default",
                 grad_checkpoint: bool = False, checkpoint_policy: str = "all"):
        super().__init__()
        if num_layers % 2 == 0:
            raise ValueError(f"num_layers must be odd (in + mid + out blocks), got {num_layers}")
        if skip not in SKIP_MODES:
            raise ValueError(f"skip must be one of {SKIP_MODES}, got {skip!r}")
        if checkpoint_policy not in CHECKPOINT_POLICIES:
            raise ValueError(f"checkpoint_policy must be one of {CHECKPOINT_POLICIES}, got {checkpoint_policy!r}")
        self.img_size, self.patch_size, self.in_chans, self.embed_dim = img_size, patch_size, in_chans, embed_dim
        self.num_classes, self.null_class, self.text_dim = num_classes, null_class, text_dim
        self.time_cond, self.conv, self.pos_embed_kind = time_cond, conv, pos_embed
        self.grad_checkpoint, self.checkpoint_policy = grad_checkpoint, checkpoint_policy
        grid = img_size // patch_size
        num_patches = grid * grid

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_embed)
        self.time_embed = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(),
                                        nn.Linear(4 * embed_dim, embed_dim)) if mlp_time_embed else nn.Identity()
        self.extras = 1 if time_cond == "token" else 0
        if num_classes > 0:
            # One extra row for the null label when trained for guidance; the null id is num_classes.
            self.label_emb = nn.Embedding(num_classes + int(null_class), embed_dim)
            self.extras += 1
        elif text_dim > 0:
            self.context_embed = nn.Linear(text_dim, embed_dim)
            self.extras += text_tokens

        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))
        elif pos_embed == "sincos2d":  # fixed; the extra tokens get a zero embedding
            table = torch.cat([torch.zeros(self.extras, embed_dim), sincos_2d_embedding(grid, embed_dim)])
            self.register_buffer("pos_embed", table[None], persistent=False)
        else:
            self.pos_embed = None

        half = (num_layers - 1) // 2  # official depth = 2 * half; layers = half + 1 + half
        adaln = time_cond == "adaln"
        block = dict(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, adaln=adaln)
        self.in_blocks = nn.ModuleList([Block(**block) for _ in range(half)])
        self.mid_block = Block(**block)
        self.out_blocks = nn.ModuleList([Block(**block, skip=None if skip == "none" else skip) for _ in range(half)])
        if grad_checkpoint and checkpoint_policy in ("attention", "mlp"):
            for blk in self.blocks():
                blk.recompute = checkpoint_policy

        self.norm = nn.LayerNorm(embed_dim)
        self.token_conv = nn.Conv2d(embed_dim, embed_dim, 3, padding=1) if conv == "before" else None
        self.decoder_pred = nn.Linear(embed_dim, patch_size ** 2 * in_chans)
        if conv == "after":
            self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1)
        self.initialize_weights(conv_init)

    def initialize_weights(self, conv_init: str = "default"):
        # Linear weights: truncated normal, std 0.02; biases 0 (official _init_weights).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            # LayerNorm: weight 1, bias 0. Convs keep PyTorch's default init, as officially.
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Learned position table: truncated normal, std 0.02.
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # The extra conv as a no-op: PyTorch's default init of a 1- or 4-channel 3x3 conv is a random filter (weights
        # up to +-1/3 for one channel) that the decoder must first learn to undo; on the digits that stalls the loss
        # for the first ~200 steps.
        conv = getattr(self, "final_layer", None) or self.token_conv
        if conv_init == "identity" and conv is not None:
            nn.init.dirac_(conv.weight)
            nn.init.zeros_(conv.bias)
        elif conv_init not in ("default", "identity"):
            raise ValueError(f"conv_init must be 'default' or 'identity', got {conv_init!r}")

    @property
    def null_class_id(self) -> int | None:
        """The label that means "no class" (for guidance), or None when the model has no null row."""
        return self.num_classes if self.num_classes > 0 and self.null_class else None

    def blocks(self) -> list[Block]:
        """In-blocks, mid-block, out-blocks: the order the forward runs them."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def _run(self, i: int, blk: Block, x, skip, c):
        """Block i of the forward; whole blocks are recomputed in backward under the "all" policy, and the
        even-numbered ones under "every_other" (half the saving at half the extra compute)."""
        whole = self.checkpoint_policy == "all" or (self.checkpoint_policy == "every_other" and i % 2 == 0)
        if self.grad_checkpoint and whole and self.training:
            return _recompute(blk, x, skip, c)
        return blk(x, skip, c)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) noisy input; t: (B,) network time; y: (B,) class ids or (B, 77, text_dim) context."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        x = self.patch_embed(x)                                           # (B, L, D)
        B, L, D = x.shape
        temb = self.time_embed(timestep_embedding(t, D).to(x.dtype))      # (B, D)
        tokens = [temb[:, None]] if self.time_cond == "token" else []
        if self.num_classes > 0:
            if y is None:
                raise ValueError("this model is class-conditional: pass class ids y")
            tokens.insert(0, self.label_emb(y)[:, None])  # official quirk: the label token precedes the time token
        elif self.text_dim > 0:
            if y is None:
                raise ValueError("this model is text-conditional: pass the text context y")
            tokens.append(self.context_embed(y))                          # (B, 77, D)
        x = torch.cat([*tokens, x], dim=1)                                # (B, extras + L, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed

        c = temb if self.time_cond == "adaln" else None
        skips, half = [], len(self.in_blocks)
        for i, blk in enumerate(self.in_blocks):
            x = self._run(i, blk, x, None, c)
            skips.append(x)
        x = self._run(half, self.mid_block, x, None, c)
        for i, blk in enumerate(self.out_blocks, start=half + 1):
            x = self._run(i, blk, x, skips.pop(), c)

        x = self.norm(x)[:, self.extras:]                                 # (B, L, D)
        if self.token_conv is not None:  # ablation (c): the 3x3 conv on the token grid, before the decoder
            g = int(math.isqrt(L))
            x = einops.rearrange(x, "B (h w) D -> B D h w", h=g)
            x = einops.rearrange(self.token_conv(x), "B D h w -> B (h w) D")
        x = unpatchify(self.decoder_pred(x), self.in_chans)               # (B, C, H, W)
        if self.conv == "after":
            x = self.final_layer(x)
        return x


#################################################################################
#                                 Size registry                                 #
#################################################################################


def uvit_from_size(name: str, **kwargs) -> UViT:
    """Build a registry model, e.g. ``uvit_from_size("U-ViT-H/2", img_size=32, in_chans=4, conv="none")``."""
    return UViT(**{**size_kwargs(name), **kwargs})


UVIT_MODELS = {name: (lambda n: lambda **kw: uvit_from_size(n, **kw))(name) for name in size_names()}


def official_kwargs(model: UViT) -> dict:
    """The official constructor arguments that build the same network (paper layers -> official depth)."""
    depth = official_depth(len(model.in_blocks) * 2 + 1)
    out = dict(img_size=model.img_size, patch_size=model.patch_size, in_chans=model.in_chans,
               embed_dim=model.embed_dim, depth=depth, num_heads=model.mid_block.attn.num_heads,
               mlp_ratio=model.mid_block.mlp.fc1.out_features / model.embed_dim,
               qkv_bias=model.mid_block.attn.qkv.bias is not None,
               mlp_time_embed=not isinstance(model.time_embed, nn.Identity), conv=model.conv == "after")
    if model.num_classes > 0:
        out["num_classes"] = model.num_classes + int(model.null_class)
    elif model.text_dim > 0:
        out.update(clip_dim=model.text_dim, num_clip_token=model.extras - 1)
    else:
        out["num_classes"] = -1
    return out


def kwargs_from_official(depth: int, num_classes: int = -1, conv: bool = True, skip: bool = True,
                         clip_dim: int | None = None, num_clip_token: int = 77, use_checkpoint: bool = False,
                         qk_scale=None, **kw) -> dict:
    """Our constructor arguments for the official ``UViT(**config.nnet)`` arguments (name/num_classes quirks mapped).

    Official ``num_classes=1001`` for ImageNet latents means 1000 classes plus the null row used for guidance;
    ``num_classes=1000`` (ImageNet 64) has no null row. We cannot tell which from the number alone, so 1001 and any
    odd "classes + 1" layout must be stated by the caller through a recipe; here 1001 maps to 1000 + null.
    """
    if qk_scale is not None:
        raise ValueError("qk_scale other than 1/sqrt(head_dim) is not supported")
    out = dict(num_layers=depth + 1, conv="after" if conv else "none", skip="concat_linear" if skip else "none",
               grad_checkpoint=use_checkpoint, **kw)
    if clip_dim is not None:
        out.update(text_dim=clip_dim, text_tokens=num_clip_token)
    elif num_classes > 0:
        null = num_classes == 1001
        out.update(num_classes=num_classes - int(null), null_class=null)
    return out
