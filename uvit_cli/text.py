"""The CLIP ViT-L/14 text encoder (open_clip, OpenAI weights) as Stable Diffusion uses it: 77 x 768 token features.

The output is the last hidden state after the final LayerNorm for the 77 token positions, exactly as transformers'
``CLIPTextModel`` gives it to Stable Diffusion (and U-ViT's MS-COCO cache). SD's tokenizer pads with the end-of-text
token while open_clip pads with 0; under the causal mask the features at padded positions depend on that id, so we
pad with end-of-text. Prompts longer than 77 tokens are truncated (start + 75 tokens + end), with a warning.

open_clip is imported inside the functions that build a tower: it costs about 2.5 s to import, and only text
models need it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .errors import UvitError
from .files import cache_dir, read_state_dict, sha256_file, write_json, write_safetensors
from .hub import downloads_allowed, hub_file, missing_message
from .registry import DEFAULT_TEXT_ENCODER

log = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
LOCAL_HINT = ("pass a local path with --text-encoder: an open_clip folder (open_clip_config.json + "
              "open_clip_model.safetensors, as in the hub repo timm/vit_large_patch14_clip_224.openai) or the "
              "ViT-L-14 weights file itself")
TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
BUILTIN_PREFIX = "builtin:"

# Text towers this project makes itself, for jobs that must run where no CLIP weights can be fetched (the built-in
# captioned digits): CLIP's tokenizer and architecture, small, with weights drawn from a fixed seed (random, not
# trained). name -> (seed, token embedding std, open_clip model config). A run keeps a copy of the tower it trained
# with. The token embeddings are drawn at std 1 instead of CLIP's 0.02: at CLIP's scale the random layers' output
# swamps the word, so "a handwritten seven" and "a handwritten three" came out 0.97 cosine-similar at the digit's
# position (a text run then drew the asked digit 17% of the time); at std 1 the word dominates its position (0.19),
# as a trained tower keeps words apart.
BUILTIN_TOWERS = {
    "digits-clip": (0, 1.0, {"embed_dim": 64, "quick_gelu": True,
                             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2,
                                          "layers": 2}}),
}


class TextEncoder(torch.nn.Module):
    """Prompts -> (B, context_length, width) float features; wraps an open_clip text tower and its tokenizer."""

    def __init__(self, text_tower, tokenizer, name: str = "", sha256: str = "", weights_file: str = ""):
        super().__init__()
        self.text = text_tower.eval().requires_grad_(False)
        self.tokenizer = tokenizer            # open_clip SimpleTokenizer: .encode(str) -> ids, sot/eot ids
        self.name = name                      # the spec it was loaded from (recorded in latent manifests)
        self.sha256 = sha256
        self.weights_file = weights_file      # where the weights were read ("" for in-memory towers)
        self.context_length = int(text_tower.context_length)
        self.width = int(text_tower.width)

    @property
    def device(self) -> torch.device:
        return self.text.token_embedding.weight.device

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, 77) ids: start, the prompt's tokens, end, then end-of-text padding (SD's CLIPTokenizer layout)."""
        n = self.context_length
        sot, eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        out = torch.full((len(prompts), n), eot, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer.encode(prompt)
            if len(ids) > n - 2:
                log.warning("prompt %d has %d tokens; truncated to the first %d (CLIP reads %d tokens): %.60r...",
                            i, len(ids), n - 2, n, prompt)
                ids = ids[: n - 2]
            out[i, 0] = sot
            out[i, 1:1 + len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    @torch.no_grad()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Last hidden state after ln_final for given token ids (no pooling, no projection)."""
        t = self.text
        tokens = tokens.to(self.device)
        x = t.token_embedding(tokens) + t.positional_embedding[: tokens.shape[1]]
        x = t.transformer(x, attn_mask=t.attn_mask)
        return t.ln_final(x).float()

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Float (B, 77, 768) features for a list of prompts ("" is the unconditional context)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.encode_tokens(self.tokenize(list(prompts)))


    def encode_fixed(self, prompts: list[str], micro_batch: int = 16) -> torch.Tensor:
        """:meth:`encode` in micro-batches of exactly ``micro_batch`` prompts (the last one padded), so a prompt's
        features do not depend on which prompts are encoded with it (kernels are chosen by shape): sampling can
        encode each chunk's prompts alone and match one pass over all of them."""
        tokens = self.tokenize(list(prompts))
        out = []
        for i in range(0, len(tokens), micro_batch):
            part = tokens[i:i + micro_batch]
            k = len(part)
            padded = torch.cat([part, part[-1:].expand(micro_batch - k, -1)]) if k < micro_batch else part
            out.append(self.encode_tokens(padded)[:k])
        return torch.cat(out)


def build_text_tower(model_cfg: dict):
    """An open_clip TextTransformer from an open_clip model config (``embed_dim``, ``text_cfg``, ``quick_gelu``)."""
    from open_clip.model import QuickGELU
    from open_clip.transformer import LayerNorm, TextTransformer

    tc = dict(model_cfg.get("text_cfg", {}))
    unsupported = [k for k in ("hf_model_name", "embed_cls", "no_causal_mask") if tc.get(k)]
    if unsupported or tc.get("pool_type", "argmax") != "argmax":
        raise UvitError(f"text encoder config uses {unsupported or tc.get('pool_type')}: only CLIP-style causal text "
                        "towers (like ViT-L-14) give Stable Diffusion's features")
    act = QuickGELU if model_cfg.get("quick_gelu") else torch.nn.GELU
    return TextTransformer(context_length=tc.get("context_length", 77), vocab_size=tc.get("vocab_size", 49408),
                           width=tc.get("width", 512), heads=tc.get("heads", 8), layers=tc.get("layers", 12),
                           mlp_ratio=tc.get("mlp_ratio", 4.0), output_dim=model_cfg.get("embed_dim", 512),
                           act_layer=act, norm_layer=LayerNorm)


def _read_weights(path: Path) -> dict:
    """The text-tower tensors of an open_clip / OpenAI CLIP state dict (the image tower is dropped)."""
    sd = read_state_dict(path, hint="use the open_clip_model.safetensors of timm/vit_large_patch14_clip_224.openai "
                                    "(OpenAI's TorchScript ViT-L-14.pt is not a state dict)")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k.startswith(TEXT_KEYS)}


def builtin_tower_dir(name: str) -> Path:
    """The open_clip folder of a built-in tower, made once from its seed under the cache (written atomically)."""
    if name not in BUILTIN_TOWERS:
        raise UvitError(f"unknown built-in text encoder {BUILTIN_PREFIX}{name}; built-in: "
                        f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_TOWERS)}")
    seed, token_std, cfg = BUILTIN_TOWERS[name]
    ctx = cfg["text_cfg"]["context_length"]   # the folder names every setting that changes the weights
    d = cache_dir() / "text_encoders" / f"{name}-seed{seed}-tok{token_std:g}-ctx{ctx}"
    if not (d / CONFIG_NAME).is_file():
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        tower = build_text_tower(cfg)
        torch.random.set_rng_state(generator_state)
        with torch.no_grad():
            tower.token_embedding.weight.normal_(0.0, token_std, generator=torch.Generator().manual_seed(seed))
        write_safetensors(d / WEIGHT_NAMES[0], tower.state_dict(), {"what": f"uvit built-in text tower {name}",
                                                                     "seed": str(seed)})
        write_json(d / CONFIG_NAME, {"model_cfg": cfg, "uvit_builtin": name, "seed": seed,
                                     "token_embedding_std": token_std})  # written last
        log.info("made the built-in text tower %s (seed %d) in %s", name, seed, d)
    return d


def _resolve(spec: str, allow: bool) -> tuple[dict, Path]:
    """(open_clip model config, weights file) for a spec: MODEL/TAG, hf-hub:org/repo, a folder or a file."""
    import open_clip

    if spec.startswith(BUILTIN_PREFIX):
        spec = str(builtin_tower_dir(spec[len(BUILTIN_PREFIX):]))
    p = Path(spec.removeprefix("local-dir:")).expanduser()
    if p.is_dir():
        cfg_path = p / CONFIG_NAME
        weights = next((p / n for n in WEIGHT_NAMES if (p / n).is_file()), None)
        if not cfg_path.is_file() or weights is None:
            raise UvitError(f"--text-encoder {spec}: the folder needs {CONFIG_NAME} and one of {', '.join(WEIGHT_NAMES)}")
        return json.loads(cfg_path.read_text())["model_cfg"], weights
    if p.is_file():
        return dict(open_clip.get_model_config("ViT-L-14"), quick_gelu=True), p   # OpenAI's ViT-L/14 weights
    if spec.startswith(("/", ".", "~", "local-dir:")):
        raise UvitError(f"text encoder path {spec} does not exist; {LOCAL_HINT}")
    if spec.startswith("hf-hub:"):
        repo = spec[len("hf-hub:"):]
        try:
            cfg = json.loads(hub_file(repo, CONFIG_NAME, allow_download=allow, what="text encoder",
                                      local_hint=LOCAL_HINT).read_text())["model_cfg"]
        except FileNotFoundError:
            raise UvitError(missing_message(spec, "text encoder", LOCAL_HINT)) from None
    else:
        model, _, tag = spec.partition("/")
        cfg = open_clip.get_model_config(model)
        pcfg = open_clip.get_pretrained_cfg(model, tag) if tag else {}
        if cfg is None or not pcfg or not pcfg.get("hf_hub"):
            raise UvitError(f"--text-encoder {spec!r}: expected an open_clip MODEL/TAG with hub weights such as "
                            f"{DEFAULT_TEXT_ENCODER}, hf-hub:org/repo, or a local path")
        cfg = dict(cfg, quick_gelu=bool(pcfg.get("quick_gelu", False)))
        repo = pcfg["hf_hub"].rstrip("/")
    for name in WEIGHT_NAMES:
        try:
            return cfg, hub_file(repo, name, allow_download=allow, what="text encoder", local_hint=LOCAL_HINT)
        except FileNotFoundError:
            continue
    raise UvitError(missing_message(f"{spec} ({repo})", "text encoder", LOCAL_HINT))


def load_text_encoder(spec: str = DEFAULT_TEXT_ENCODER, device: str | torch.device = "cpu",
                      allow_download: bool | None = None) -> TextEncoder:
    """Load a CLIP text encoder: ``ViT-L-14/openai`` (hub cache), ``hf-hub:org/repo``, an open_clip folder
    (open_clip_config.json + weights), a ViT-L-14 weights file, or ``builtin:NAME`` (a seeded tower of
    ``BUILTIN_TOWERS``). Nothing downloads unless allowed."""
    from open_clip.tokenizer import SimpleTokenizer

    if not spec:
        raise UvitError(f"no text encoder given; set data.text_encoder or pass --text-encoder {DEFAULT_TEXT_ENCODER}")
    cfg, weights = _resolve(spec, downloads_allowed(allow_download))
    tower = build_text_tower(cfg)
    sd = _read_weights(weights)
    own = tower.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise UvitError(f"{weights} does not fit the text tower of {spec}: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}, shape mismatch {shapes[:3]}")
    tower.load_state_dict(sd, strict=True)
    sha = sha256_file(weights)
    log.info("text encoder %s (%s, sha256 %s)", spec, weights.name, sha[:12])
    tokenizer = SimpleTokenizer(context_length=tower.context_length)
    return TextEncoder(tower.to(device), tokenizer, name=spec, sha256=sha, weights_file=str(weights))
