"""The built-in captioned digits: phrasings, the seeded text tower, the caption cache, and a text run end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uvit_cli.data.captions import (HELD_OUT_PHRASINGS, TRAIN_PHRASINGS, WORDS, CaptionedDigits, build_caption_cache,
                                    digit_captions, stroke_weights)
from uvit_cli.data.digits import load_digits_uint8
from uvit_cli.errors import UvitError
from uvit_cli.files import read_json, sha256_file
from uvit_cli.metrics.captions import cache_conditions, draw_captions
from uvit_cli.recipe import load_recipe
from uvit_cli.text import builtin_tower_dir, load_text_encoder


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder("builtin:digits-clip")


def test_every_caption_names_its_digit_and_the_splits_do_not_share_a_phrasing():
    for split in ("train", "val"):
        images, labels, captions = digit_captions(split)
        assert len(captions) == len(images) == 1797
        for c, caps in zip(labels, captions):
            words = [set(s.replace(",", " ").split()) for s in caps]
            assert caps and all(WORDS[c] in w or str(c) in w for w in words)
    train = {s for caps in digit_captions("train")[2] for s in caps}
    val = {s for caps in digit_captions("val")[2] for s in caps}
    assert not train & val and "a handwritten seven" in train
    vocab = {w for s in train for w in s.replace(",", " ").split()}
    assert all(w in vocab for s in val for w in s.replace(",", " ").split())   # held-out phrasings, seen words
    with pytest.raises(UvitError, match="splits"):
        digit_captions("test")


def test_stroke_weight_is_the_ink_tertile_within_each_class():
    images, labels = load_digits_uint8()
    weights = stroke_weights(images, labels)
    ink = images.reshape(len(images), -1).sum(1)
    for c in range(10):
        idx = labels == c
        thick = ink[idx][[w == "thick " for w, i in zip(weights, idx) if i]]
        thin = ink[idx][[w == "thin " for w, i in zip(weights, idx) if i]]
        assert thick.min() > thin.max() and 0.25 < len(thick) / idx.sum() < 0.4


def test_the_builtin_tower_is_made_from_its_seed(tmp_path, monkeypatch, encoder):
    assert (encoder.context_length, encoder.width) == (16, 64)
    first = sha256_file(builtin_tower_dir("digits-clip") / "open_clip_model.safetensors")
    monkeypatch.setenv("UVIT_CACHE", str(tmp_path))            # a fresh cache makes it again, bit for bit
    assert sha256_file(builtin_tower_dir("digits-clip") / "open_clip_model.safetensors") == first == encoder.sha256
    tokens = encoder.tokenize(["a handwritten seven"])
    eot = encoder.tokenizer.eot_token_id
    assert tokens.shape == (1, 16) and tokens[0, 0] == encoder.tokenizer.sot_token_id
    assert (tokens[0, 4:] == eot).all() and (tokens[0, 1:4] != eot).all()    # 3 words, then end-of-text padding
    with pytest.raises(UvitError, match="built-in"):
        builtin_tower_dir("nope")
    # the word, not the random layers, dominates its position: the digit is what tells two captions apart
    c = encoder.encode(["a handwritten seven", "a handwritten three", "the digit 7", "the digit 3"])
    same_word = torch.nn.functional.cosine_similarity(c[0, 2], c[1, 2], dim=-1)     # "handwritten" in both
    digit = torch.nn.functional.cosine_similarity(c[0, 3], c[1, 3], dim=-1)         # "seven" against "three"
    numeral = torch.nn.functional.cosine_similarity(c[2, 3], c[3, 3], dim=-1)       # "7" against "3"
    assert same_word > 0.99 and digit < 0.5 and numeral < 0.5, (same_word, digit, numeral)


def test_the_caption_cache_holds_each_caption_s_features(encoder, tmp_path):
    root = build_caption_cache(encoder, tmp_path / "cache")
    train, val = CaptionedDigits(root, "train"), CaptionedDigits(root, "val")
    assert len(train) == len(val) == 1797 and train.num_captions == len(TRAIN_PHRASINGS)
    assert val.num_captions == len(HELD_OUT_PHRASINGS)
    x, ctx = train.get(10, caption=2)
    want = encoder.encode([train.captions[10][2]])[0]
    assert x.shape == (1, 8, 8) and ctx.shape == (16, 64)
    torch.testing.assert_close(ctx, want, atol=2e-3, rtol=1e-3)           # stored fp16
    torch.testing.assert_close(train.null_context.float(), encoder.encode([""])[0], atol=2e-3, rtol=1e-3)
    assert int(train.labels[10]) == load_digits_uint8()[1][10]
    with pytest.raises(IndexError):
        train.context(0, 99)


def test_a_text_run_trains_keeps_its_tower_and_samples_prompts(tmp_path, uvit):
    run = tmp_path / "run"
    sets = ["model.num_layers=3", "model.embed_dim=32", "model.num_heads=2", "train.steps=4", "train.batch_size=16",
            "train.save_every=4", "train.sample_every=4", "train.log_every=2", "sample.steps=3"]
    res = uvit("train", "digits_t2i_uvit_tiny", *sum((["--set", s] for s in sets), []), "--run-dir", run)
    assert res.returncode == 0, res.output
    assert (run / "text_encoder" / "open_clip_model.safetensors").is_file()
    res = uvit("info", run)
    assert res.returncode == 0 and "NOT CLIP" in res.output and "builtin:digits-clip" in res.output, res.output
    assert list((run / "samples").glob("*.png"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten seven\n\nthe digit 3\n")
    res = uvit("sample", run, "--prompts-file", prompts, "--n", "4", "--npz", tmp_path / "s.npz",
               "--out", tmp_path / "g.png")
    assert res.returncode == 0, res.output
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (4, 8, 8, 1)
    # the run's copy is what sampling reads: remove the cached tower and sample again, same images
    import shutil

    shutil.rmtree(builtin_tower_dir("digits-clip"))
    res = uvit("sample", run, "--prompts-file", prompts, "--n", "4", "--npz", tmp_path / "t.npz",
               "--out", tmp_path / "g.png")
    assert res.returncode == 0, res.output
    with np.load(tmp_path / "s.npz") as a, np.load(tmp_path / "t.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    assert load_recipe(run / "recipe.yaml").data.text_encoder == "builtin:digits-clip"
    # `uvit fid RUN` draws held-out captions and checks that each sample is the digit its caption asks for
    res = uvit("fid", run, "-n", "20", "--json", tmp_path / "fid.json")
    assert res.returncode == 0, res.output
    result = read_json(tmp_path / "fid.json")
    assert {"fd_digits", "acc_digits"} <= set(result["metrics"]), result
    assert "held-out" in result["protocol"]["caption_source"], result["protocol"]


def test_a_text_run_made_with_an_older_tower_is_resumed_sampled_and_scored_with_its_copy(tmp_path, uvit,
                                                                                        monkeypatch):
    """A run keeps the built-in tower it trained with: after the project's tower changes (here a 12-token tower
    becomes today's), resuming, sampling and `uvit fid RUN` all read the run's copy; the code's own tower no
    longer fits the model and is refused with a message naming the mismatch."""
    from uvit_cli import text

    seed, std, cfg = text.BUILTIN_TOWERS["digits-clip"]
    old = {**cfg, "text_cfg": {**cfg["text_cfg"], "context_length": 12}}
    monkeypatch.setitem(text.BUILTIN_TOWERS, "digits-clip", (seed, std, old))
    run = tmp_path / "run"
    sets = ["model.num_layers=3", "model.embed_dim=32", "model.num_heads=2", "model.text_tokens=12",
            "train.steps=2", "train.batch_size=8", "train.save_every=2", "train.sample_every=0", "sample.steps=2"]
    sets = sum((["--set", s] for s in sets), [])
    assert uvit("train", "digits_t2i_uvit_tiny", *sets, "--run-dir", run).returncode == 0
    monkeypatch.setitem(text.BUILTIN_TOWERS, "digits-clip", (seed, std, cfg))     # the tower changes
    assert load_text_encoder("builtin:digits-clip").context_length == 16

    res = uvit("train", run / "recipe.yaml", "--set", "train.steps=4", "--run-dir", run)       # resume
    assert res.returncode == 0, res.output
    assert (run / "checkpoints" / "step-00000004.pt").is_file()
    res = uvit("sample", run, "--prompt", "a handwritten seven", "--n", "2", "--out", tmp_path / "g.png")
    assert res.returncode == 0, res.output
    res = uvit("fid", run, "-n", "8", "--json", tmp_path / "fid.json")
    assert res.returncode == 0, res.output
    assert "acc_digits" in read_json(tmp_path / "fid.json")["metrics"]
    # naming today's tower explicitly is refused: it gives 16 tokens, the model reads 12
    res = uvit("sample", run, "--prompt", "a seven", "--text-encoder", "builtin:digits-clip", "--out",
               tmp_path / "h.png")
    assert res.returncode != 0 and "16 x 64" in res.output and "12 x 64" in res.output, res.output


def test_the_fid_protocol_draws_held_out_captions_with_the_class_they_name(encoder, tmp_path):
    digits = CaptionedDigits(build_caption_cache(encoder, tmp_path / "cache"), "val")
    cond = cache_conditions(digits, 30, seed=5)
    items, ks = draw_captions(digits, 30, seed=5)
    assert np.array_equal(cond.labels, digits.labels.numpy()[items])
    for j in (0, 17):
        caption = digits.captions[items[j]][ks[j]]
        assert WORDS[cond.labels[j]] in caption or str(cond.labels[j]) in caption
        assert caption not in {p.format(w=WORDS[cond.labels[j]], d=cond.labels[j], weight=w)
                               for p in TRAIN_PHRASINGS for w in ("", "thick ", "thin ")}
        torch.testing.assert_close(cond.contexts(j, j + 1)[0], encoder.encode([caption])[0], atol=2e-3, rtol=1e-3)
    # and a class-free caption set gives no labels (the MS-COCO cache)
    digits.labels = None
    assert cache_conditions(digits, 4, seed=5).labels is None
