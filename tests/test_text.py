"""The CLIP text encoder: Stable Diffusion's tokens (end-of-text padding, truncation) and features (equal to
transformers' CLIPTextModel with the same weights, padded positions included), loading and errors."""

import gzip
import hashlib
import json
import logging

import pytest
import torch
from encode_fixtures import save_tiny_clip, tiny_text_tower
from open_clip.tokenizer import SimpleTokenizer, default_bpe

from uvit_cli.errors import UvitError
from uvit_cli.text import TextEncoder, load_text_encoder

SOT, EOT = 49406, 49407
PROMPTS = ["A photo of a Cat!", "", "a man riding a horse on the beach at sunset.",
           "Two   spaces,   punctuation: it's 3.5 o'clock; (really?) -- yes.", "word " * 100]


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(tiny_text_tower(), SimpleTokenizer(context_length=77), name="tiny")


def _hf_clip_text_model(tower):
    """A transformers CLIPTextModel holding the tiny open_clip tower's weights (what SD runs)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    w = tower.width
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=w, intermediate_size=4 * w, num_attention_heads=2,
                         num_hidden_layers=len(tower.transformer.resblocks), max_position_embeddings=77,
                         hidden_act="quick_gelu", bos_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT)
    model = CLIPTextModel(cfg).eval()
    sd = tower.state_dict()
    new = {"embeddings.token_embedding.weight": sd["token_embedding.weight"],
           "embeddings.position_embedding.weight": sd["positional_embedding"],
           "final_layer_norm.weight": sd["ln_final.weight"], "final_layer_norm.bias": sd["ln_final.bias"]}
    for i in range(cfg.num_hidden_layers):
        p, q = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for n, wt, b in zip("qkv", sd[p + "attn.in_proj_weight"].chunk(3), sd[p + "attn.in_proj_bias"].chunk(3)):
            new[q + f"self_attn.{n}_proj.weight"], new[q + f"self_attn.{n}_proj.bias"] = wt, b
        for a, c in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            for s in ("weight", "bias"):
                new[q + f"{c}.{s}"] = sd[p + f"{a}.{s}"]
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    model.load_state_dict({prefix + k: v for k, v in new.items()}, strict=True)
    return model


def test_tokens_are_padded_with_end_of_text_and_truncated_with_a_warning(encoder, caplog):
    with caplog.at_level(logging.WARNING, logger="uvit_cli.text"):
        tok = encoder.tokenize(PROMPTS)
    assert tok.shape == (5, 77) and (tok[:, 0] == SOT).all()
    assert tok[1, 1:].eq(EOT).all()                          # "" -> start, then end-of-text everywhere
    n = len(encoder.tokenizer.encode(PROMPTS[0]))
    assert tok[0, n + 1:].eq(EOT).all() and not tok[0, 1:n + 1].eq(EOT).any()
    assert tok[4, -1] == EOT and tok[4, 1:76].ne(EOT).all()   # start + 75 tokens + end
    assert sum("truncated" in r.message for r in caplog.records) == 1


def test_tokens_equal_transformers_clip_tokenizer(encoder, tmp_path):
    """SD's CLIPTokenizer (padding='max_length', truncation) built from the same BPE gives the same ids."""
    from transformers import CLIPTokenizer

    st = SimpleTokenizer()
    vocab = dict(st.encoder)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tk = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ref = tk(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")["input_ids"]
    assert torch.equal(encoder.tokenize(PROMPTS), ref)


def test_features_equal_transformers_clip_text_model_at_every_position(encoder):
    hf = _hf_clip_text_model(encoder.text)
    tok = encoder.tokenize(PROMPTS[:4])
    with torch.no_grad():
        ref = hf(input_ids=tok).last_hidden_state
    out = encoder.encode(PROMPTS[:4])
    assert out.shape == (4, 77, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # open_clip's default zero padding changes exactly the padded positions (causal mask: earlier ones agree)
    zero = tok.clone()
    first_eot = (tok == EOT).int().argmax(1)
    for i, e in enumerate(first_eot.tolist()):
        zero[i, e + 1:] = 0
    z = encoder.encode_tokens(zero)
    for i, e in enumerate(first_eot.tolist()):
        torch.testing.assert_close(z[i, :e + 1], ref[i, :e + 1], atol=1e-5, rtol=1e-5)
        assert (z[i, e + 1:] - ref[i, e + 1:]).abs().max() > 1e-2


def test_local_folder_loads_with_checksum(tmp_path, encoder):
    d = save_tiny_clip(tmp_path / "clip")
    te = load_text_encoder(str(d))
    assert te.sha256 == hashlib.sha256((d / "open_clip_model.safetensors").read_bytes()).hexdigest()
    assert te.name == str(d) and te.context_length == 77 and te.width == 32
    torch.testing.assert_close(te.encode(["a dog", ""]), encoder.encode(["a dog", ""]))
    assert load_text_encoder(f"local-dir:{d}").sha256 == te.sha256


def test_missing_weights_name_the_model_and_the_local_path_option(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("UVIT_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(UvitError) as e:
        load_text_encoder("ViT-L-14/openai")
    msg = str(e.value)
    assert "ViT-L-14/openai" in msg and "--text-encoder" in msg and "--allow-download" in msg
    with pytest.raises(UvitError, match="does not exist"):
        load_text_encoder(str(tmp_path / "nothere" / "clip.safetensors"))
    with pytest.raises(UvitError, match="MODEL/TAG"):
        load_text_encoder("ViT-L-14/no-such-tag")
    (tmp_path / "half").mkdir()
    with pytest.raises(UvitError, match="open_clip_config.json"):
        load_text_encoder(str(tmp_path / "half"))


def test_weights_that_do_not_fit_are_a_named_error(tmp_path):
    d = save_tiny_clip(tmp_path / "clip")
    cfg = json.loads((d / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"]["width"] = 64
    (d / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UvitError, match="does not fit"):
        load_text_encoder(str(d))


def test_fixed_micro_batches_make_a_prompts_features_independent_of_its_batch_mates(encoder):
    """Sampling encodes each chunk's prompts alone: with fixed micro-batches they equal one pass over all."""
    all_ = encoder.encode_fixed(PROMPTS[:4], micro_batch=3)
    assert all_.shape == (4, 77, encoder.width)
    for i, p in enumerate(PROMPTS[:4]):
        assert torch.equal(encoder.encode_fixed([p], micro_batch=3)[0], all_[i])
    torch.testing.assert_close(all_, encoder.encode(PROMPTS[:4]), atol=1e-5, rtol=1e-5)
