"""The latent cache end to end (library level): what the shards hold, the reader the trainer uses, ranks,
resume settings, --verify and the recipe check."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from encode_fixtures import TINY_VAE, coco_tree, imagenet_tree, tiny_text_tower
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

from uvit_cli.autoencoder import Autoencoder
from uvit_cli.data.encoding import encode_latents, finalize
from uvit_cli.data.crops import adm_center_crop, center_crop_lanczos
from uvit_cli.data.sources import open_coco, open_image, open_imagenet
from uvit_cli.data.latents import check_latents_against_recipe, open_latents, verify_latents
from uvit_cli.errors import UvitError
from uvit_cli.recipe import load_recipe, replace
from uvit_cli.text import TextEncoder


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return Autoencoder.from_config(TINY_VAE, 0.18215, name="tiny-vae", sha256="ab" * 32)


@pytest.fixture(scope="module")
def text():
    return TextEncoder(tiny_text_tower(), SimpleTokenizer(context_length=77), name="tiny-clip", sha256="cd" * 32)


@pytest.fixture(scope="module")
def inet(tmp_path_factory):
    return open_imagenet(str(imagenet_tree(tmp_path_factory.mktemp("inet"))), "train")


def _encode(src, out, vae, text=None, **kw):
    args = dict(resolution=32, crop="adm_center", flips=True, batch_size=4, shard_size=6, num_workers=0)
    args.update(kw)
    return encode_latents(src, out, vae, text, **args)


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_imagenet_cache_holds_moments_flips_labels_and_lists_bad_images(tmp_path, vae, inet):
    m = _encode(inet, tmp_path / "c", vae)
    assert m["count"] == 18 and m["num_items"] == 36 and m["num_skipped"] == 2 and m["items"] == 20
    assert sorted(s["reason"] for s in m["skipped"])[0].startswith(("corrupt", "not a readable"))
    assert {s["key"].split("/")[-1] for s in m["skipped"]} == {"x_trunc.JPEG", "x_corrupt.JPEG"}
    assert m["converted"] == {"CMYK": 1, "L": 1, "RGBA": 1}
    for key, value in {"vae": "tiny-vae", "vae_sha256": "ab" * 32, "scale_factor": 0.18215, "resolution": 32,
                       "crop": "adm_center", "flips": True, "dtype": "float16", "stored": "moments",
                       "latent_channels": 4, "latent_size": 4, "dataset": "imagenet", "source_items": 20,
                       "text_encoder": None, "class_names": inet.class_names}.items():
        assert m[key] == value, key
    assert len(m["shards"]) == 4 and all(len(s["sha256"]) == 64 for s in m["shards"])
    assert 0 < m["latent_stats"]["std"] < 10

    ds = open_latents(tmp_path / "c")
    assert len(ds) == 36 and ds.num_classes == 3 and ds.null_context is None and ds.num_captions == 0
    good = [i for i in range(len(inet)) if inet.record(i).key.split("/")[-1] not in ("x_trunc.JPEG", "x_corrupt.JPEG")]
    for item in (0, 5, 17):                    # image j = good[item]; items 2j / 2j + 1 are image / flip
        img = torch.tensor(adm_center_crop(open_image(inet.paths[good[item]])[0], 32)).permute(2, 0, 1)
        x = img[None].float() / 127.5 - 1
        want = vae.encode_moments(torch.cat([x, x.flip(-1)])).half()
        moments, label = ds[2 * item]
        assert moments.dtype == torch.float16 and moments.shape == (8, 4, 4) and label.dtype == torch.int64
        torch.testing.assert_close(moments, want[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(ds[2 * item + 1][0], want[1], atol=2e-3, rtol=2e-3)
        assert int(label) == inet.record(good[item]).label == int(ds.labels[2 * item + 1])
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=1)
    batch = next(iter(loader))
    assert batch[0].shape == (8, 8, 4, 4) and batch[1].dtype == torch.int64


def test_coco_cache_holds_every_caption_and_the_empty_prompt(tmp_path, vae, text):
    src = open_coco(str(coco_tree(tmp_path / "coco")), "train")
    m = _encode(src, tmp_path / "c", vae, text, crop="center_lanczos", flips=False, shard_size=2)
    assert m["conditioning"] == "text" and m["text_encoder"] == "tiny-clip" and m["context_shape"] == [77, 32]
    assert m["count"] == 5 and m["num_captions"] == 26 and m["null_context"]["prompt"] == ""
    ds = open_latents(tmp_path / "c")
    assert len(ds) == 5 and ds.caption_counts.tolist() == [len(src.record(i).captions) for i in range(5)]
    assert ds.num_captions == 5                # every image has 5; one has a 6th
    torch.testing.assert_close(ds.null_context, text.encode([""])[0].half())
    i = int(np.argmax(ds.caption_counts))      # the image with 6 captions
    for k in (0, 5):
        moments, ctx = ds[(i, k)]
        assert ctx.dtype == torch.float16 and ctx.shape == (77, 32)
        torch.testing.assert_close(ctx, text.encode([src.record(i).captions[k]])[0].half(), atol=2e-3, rtol=2e-3)
    img = torch.tensor(center_crop_lanczos(open_image(src.paths[i])[0], 32)).permute(2, 0, 1)[None]
    torch.testing.assert_close(moments, vae.encode_moments(img.float() / 127.5 - 1)[0].half(), atol=2e-3, rtol=2e-3)
    with pytest.raises(IndexError):
        ds[(i, 6)]


def test_ranks_split_shards_and_merge_to_the_single_process_result(tmp_path, vae, inet):
    _encode(inet, tmp_path / "one", vae)
    for rank in (0, 1):                        # rank 0 first: it writes the config the other ranks wait for
        assert _encode(inet, tmp_path / "two", vae, rank=rank, world_size=2) is None
        if rank == 0:
            assert finalize(tmp_path / "two") is None       # rank 1's shards are still missing
    finalize(tmp_path / "two")
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_rerun_resumes_and_refuses_other_settings(tmp_path, vae, inet, caplog):
    out = tmp_path / "c"
    _encode(inet, out, vae)
    full = _files(out)
    (out / "manifest.json").unlink()
    for s in (1, 3):                           # lose two shards: only they are redone
        (out / "shards" / f"shard-0000{s}.json").unlink()
    (out / "shards" / ".shard-00001.safetensors.abc.tmp").write_bytes(b"partial")
    calls = []
    _encode(inet, out, vae, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (8, 8)                 # shards 1 and 3 of 20 items: 6 + 2
    assert _files(out) == full
    with caplog.at_level(logging.WARNING):
        _encode(inet, out, vae, batch_size=3)
    assert "batch size" in caplog.text
    with pytest.raises(UvitError, match="other settings.*flips"):
        _encode(inet, out, vae, flips=False)
    with pytest.raises(UvitError, match="other settings.*resolution"):
        _encode(inet, out, vae, resolution=64)


def test_verify_catches_damage(tmp_path, vae, inet):
    out = tmp_path / "c"
    _encode(inet, out, vae)
    assert verify_latents(out) == {"shards": 4, "count": 18, "captions": 0}
    shard = out / "shards" / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UvitError, match="shard-00002.safetensors: checksum mismatch"):
        verify_latents(out)
    shard.unlink()
    with pytest.raises(UvitError, match="missing"):
        verify_latents(out)
    shutil.rmtree(out / "shards")
    (out / "manifest.json").unlink()
    with pytest.raises(UvitError, match="has not finished"):
        open_latents(out)


def test_errors_before_work(tmp_path, vae, inet):
    with pytest.raises(UvitError, match="multiple of"):
        _encode(inet, tmp_path / "c", vae, resolution=36)
    src = open_coco(str(coco_tree(tmp_path / "coco")), "train")
    with pytest.raises(UvitError, match="text encoder"):
        _encode(src, tmp_path / "c", vae, None)
    assert not (tmp_path / "c").exists()


def _recipe(**data):
    r = load_recipe("imagenet256_uvit_h2")
    return replace(r, model={"img_size": 4, "num_classes": 3}, data={"vae": "tiny-vae", **data})


def test_recipe_check_refuses_mismatches_and_logs_the_scaled_std(tmp_path, vae, inet, caplog):
    _encode(inet, tmp_path / "c", vae)
    ds = open_latents(tmp_path / "c")
    with caplog.at_level(logging.INFO, logger="uvit_cli.data.latents"):
        check_latents_against_recipe(ds, _recipe())
    std = ds.manifest["latent_stats"]["std"]
    assert f"{std * 0.18215:.3f}" in caplog.text
    check_latents_against_recipe(ds.manifest, _recipe())            # a manifest dict works too
    check_latents_against_recipe(tmp_path / "c", _recipe())         # and a path
    bad = {"scale factor": _recipe(scale_factor=0.2301), "VAE": _recipe(vae="stabilityai/sd-vae-ft-ema"),
           "model.img_size": replace(_recipe(), model={"img_size": 32}),
           "model.num_classes": replace(_recipe(), model={"num_classes": 1000})}
    for what, recipe in bad.items():
        with pytest.raises(UvitError, match=what):
            check_latents_against_recipe(ds, recipe)


def test_recipe_check_for_text_models(tmp_path, vae, text):
    src = open_coco(str(coco_tree(tmp_path / "coco")), "train")
    _encode(src, tmp_path / "c", vae, text, crop="center_lanczos", flips=False)
    r = load_recipe("coco_uvit_s")
    ok = replace(r, model={"img_size": 4, "text_dim": 32}, data={"vae": "tiny-vae", "scale_factor": 0.18215,
                                                                  "text_encoder": "tiny-clip"})
    check_latents_against_recipe(tmp_path / "c", ok)
    with pytest.raises(UvitError, match="data.text_encoder"):
        check_latents_against_recipe(tmp_path / "c", replace(ok, data={"text_encoder": "ViT-L-14/openai"}))
    with pytest.raises(UvitError, match="text features"):
        check_latents_against_recipe(tmp_path / "c", replace(ok, model={"text_dim": 768}))
    json.dumps(open_latents(tmp_path / "c").manifest)   # plain JSON all the way
    assert Image is not None


def test_reader_keeps_a_bounded_number_of_shards_open(tmp_path, vae, inet):
    _encode(inet, tmp_path / "c", vae, shard_size=2)
    ds = open_latents(tmp_path / "c")
    ref = [ds[i][0].clone() for i in range(len(ds))]
    fresh = open_latents(tmp_path / "c")
    fresh.MAX_OPEN = 2
    for i in list(range(len(ds)))[::-1] + list(range(len(ds))):
        assert torch.equal(fresh[i][0], ref[i])
        assert len(fresh._handles) <= 2


def test_bench_encode_reports_both_throughputs(tmp_path, vae):
    from uvit_cli.bench.encode import bench_encode

    r = bench_encode(vae, resolution=32, batch_size=2, num_batches=2, num_workers=0, image_size=(40, 30),
                     rounds=2, workdir=tmp_path)
    assert r["images"] == 6 and r["vae"] == "tiny-vae" and r["flips"] is True
    assert len(r["encoder_runs"]) == 3 and len(r["pipeline_runs"]) == 2
    assert r["encoder_images_per_s"] > 0 and r["pipeline_images_per_s"] > 0 and r["loader_images_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["pipeline_images_per_s"] / r["encoder_images_per_s"], abs=2e-3)  # rounded
    assert not any(tmp_path.iterdir())         # the synthetic images and cache are removed
