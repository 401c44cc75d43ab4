"""The MS-COCO caption protocol for text-to-image scoring: a seeded, recorded draw (one caption per drawn val image),
prompts files in order, and `uvit fid` end to end on a tiny text-to-image run with a tiny COCO-format val cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from encode_fixtures import TINY_CLIP, coco_tree, save_tiny_clip, save_tiny_vae
from metrics_fixtures import photo_crops, write_random_inception
from sampling_fixtures import TINY, StubTextEncoder, tiny_model
from uvit_cli.checkpoint import save_weights
from uvit_cli.cli import main
from uvit_cli.data.latents import open_latents
from uvit_cli.errors import UvitError
from uvit_cli.metrics.captions import cache_conditions, draw_captions, prompt_conditions
from uvit_cli.metrics.model_eval import class_labels, eval_conditions
from uvit_cli.recipe import dump_recipe, recipe_from_dict


class Captions:
    """The caption-set interface on its own: items with 5 to 7 captions, context(i, k) encodes (i, k)."""

    def __init__(self, counts, flips=False):
        self.caption_counts, self.flips = np.asarray(counts), flips
        self.null_context = torch.zeros(77, 4)

    def __len__(self):
        return len(self.caption_counts)

    def context(self, i, k):
        return torch.full((77, 4), 10.0 * i + k)


def test_the_draw_uses_distinct_images_and_every_caption_of_each():
    counts = np.array([5, 6, 7, 5] * 25)
    items, ks = draw_captions(Captions(counts), 80, seed=3)
    assert len(set(items.tolist())) == 80                       # fewer samples than images: no image twice
    assert (ks >= 0).all() and (ks < counts[items]).all()
    assert (ks[counts[items] == 7] == 6).any()                  # a 7th caption is drawn too, as officially
    again, ks2 = draw_captions(Captions(counts), 80, seed=3)
    assert (again == items).all() and (ks2 == ks).all()         # seeded
    other, _ = draw_captions(Captions(counts), 80, seed=4)
    assert (other != items).any()
    more, _ = draw_captions(Captions(counts), 250, seed=3)      # more samples than images: every image, then again
    assert np.bincount(more[:200], minlength=100).tolist() == [2] * 100 and (more[:80] == items).all()
    flipped, _ = draw_captions(Captions(np.repeat(counts[:10], 2), flips=True), 10, seed=0)
    assert sorted(flipped.tolist()) == list(range(0, 20, 2))    # mirrored items are not drawn twice


def test_cache_conditions_give_each_sample_its_drawn_context_and_a_recorded_draw():
    caps = Captions([5] * 8)
    cond = cache_conditions(caps, 6, seed=1, source="val", source_sha256="abc")
    items, ks = draw_captions(caps, 6, seed=1)
    ctx = cond.contexts(2, 5)
    assert ctx.shape == (3, 77, 4) and ctx.dtype == torch.float32
    assert ctx[:, 0, 0].tolist() == [10.0 * i + k for i, k in zip(items[2:5], ks[2:5])]
    card = cond.card
    assert card["caption_seed"] == 1 and card["caption_images"] == 8 and card["caption_source_sha256"] == "abc"
    assert "MS-COCO protocol" in card["captions"] and len(card["caption_draw_sha256"]) == 64
    assert cache_conditions(caps, 6, seed=2).card["caption_draw_sha256"] != card["caption_draw_sha256"]
    assert torch.equal(cond.null_context, caps.null_context)


def test_prompt_conditions_use_the_prompts_in_order():
    enc = StubTextEncoder()
    cond = prompt_conditions(["a", "b", "c"], enc, 7, source="p.txt")
    assert torch.equal(cond.contexts(3, 5), enc.encode(["a", "b"]))   # samples 3, 4 get prompts 0, 1
    assert cond.card["prompts"] == 3 and "i mod 3" in cond.card["captions"]
    assert torch.equal(cond.null_context, enc.encode([""])[0])
    with pytest.raises(UvitError, match="holds no prompts"):
        prompt_conditions([], enc, 3, source="empty.txt")


def test_class_models_keep_their_protocol_and_text_models_ask_for_captions():
    r = recipe_from_dict({"name": "c", "model": {**TINY, "img_size": 8, "in_chans": 1, "num_classes": 10},
                          "data": {"name": "digits"}})
    assert (eval_conditions(r, 12).labels == class_labels(r, 12)).all() and eval_conditions(r, 12).card == {}
    t = recipe_from_dict({"name": "t", "model": {**TINY, "img_size": 4, "in_chans": 4, "text_dim": 16},
                          "data": {"name": "latents"}, "diffusion": {"formulation": "discrete"}})
    with pytest.raises(UvitError, match="encode-latents coco --split val"):
        eval_conditions(t, 4)


def _main(*args):
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        assert not e.code, f"exit {e.code}"


@pytest.mark.slow
def test_uvit_fid_scores_a_text_model_with_captions_from_the_val_cache(tmp_path, monkeypatch, capsys):
    vae, clip = save_tiny_vae(tmp_path / "vae"), save_tiny_clip(tmp_path / "clip")
    coco_tree(tmp_path / "coco", split="val", n=5)
    cache = tmp_path / "coco32_latents_val"
    _main("encode-latents", "coco", "--split", "val", "--res", 32, "--source", tmp_path / "coco", "--vae", vae,
          "--text-encoder", clip, "--scale-factor", 0.5, "--out", cache, "--num-workers", 0, "--device", "cpu")
    ds = open_latents(cache)
    six = int(np.argmax(ds.caption_counts))                      # the image with 6 captions
    assert ds.caption_counts[six] == 6 and torch.equal(ds.context(six, 5), ds[(six, 5)][1])
    write_random_inception(tmp_path / "th")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    np.savez(tmp_path / "ref.npz", photo_crops(8, 32, 1))
    r = recipe_from_dict({"name": "tiny_t2i", "model": {**TINY, "img_size": 4, "in_chans": 4,
                                                        "text_dim": TINY_CLIP["text_cfg"]["width"]},
                          "data": {"name": "latents", "vae": str(vae), "text_encoder": str(clip), "scale_factor": 0.5},
                          "diffusion": {"formulation": "discrete"},
                          "sample": {"sampler": "dpm_solver_pp", "steps": 3, "cfg_scale": 3.0},
                          "eval": {"ref": str(tmp_path / "ref.npz"), "metrics": ["is", "kid"], "num_samples": 8,
                                   "batch_size": 4, "captions": str(cache)}})
    ckpt = tmp_path / "t2i.safetensors"
    save_weights(ckpt, tiny_model(r).state_dict(), dump_recipe(r))

    _main("fid", ckpt, "--device", "cpu", "--json", tmp_path / "r.json")      # captions from eval.captions
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res["metrics"]) == {"is", "kid"}
    card = res["protocol"]
    items, ks = draw_captions(ds, 8, seed=0)
    assert card["caption_source"] == str(cache) and card["caption_images"] == 5 and card["caption_seed"] == 0
    assert card["caption_draw_sha256"] == cache_conditions(ds, 8, 0).card["caption_draw_sha256"]
    assert card["guidance_w"] == 3.0 and card["kid_subset_size"] == 8 and card["count"] == 8
    with np.load(card["samples_file"]) as z:
        assert z["arr_0"].shape == (8, 32, 32, 3)

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red bus\na green tree\n")
    _main("fid", ckpt, "--device", "cpu", "--prompts-file", prompts, "--json", tmp_path / "p.json")
    card = json.loads((tmp_path / "p.json").read_text())["protocol"]
    assert card["prompts"] == 2 and card["samples_file"] != res["protocol"]["samples_file"]   # another protocol
    with pytest.raises(SystemExit):
        main(["fid", str(ckpt), "--device", "cpu", "--captions", str(tmp_path / "nowhere")])
    assert "does not exist" in capsys.readouterr().err
