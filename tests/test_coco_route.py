"""The MS-COCO text-to-image route end to end through the CLI, nothing patched: a COCO-2014-format folder of real
photos, a tiny random VAE and CLIP text tower saved to local directories, encode-latents (train and val), train,
sample to PNG and .npz, and uvit fid RUN with the val captions (a random-init FID Inception stands in for the
weights, which cannot be fetched here)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image, ImageOps

from encode_fixtures import TINY_CLIP, save_tiny_clip, save_tiny_vae
from metrics_fixtures import photo_crops, write_random_inception
from photos import photos

CAPTIONS = {"china": ["a pagoda by a lake", "a temple with a red roof", "a building in a garden"],
            "flower": ["a pink flower", "a flower with yellow pollen", "a close-up of a blossom"],
            "grace_hopper": ["a woman in uniform", "a portrait of an officer", "a person smiling"]}


def coco_from_photos(root, split: str, variants: int):
    """``root/{split}2014/`` with crops and flips of the real photos and ``annotations/captions_{split}2014.json``."""
    (root / f"{split}2014").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, anns = [], []
    for k, (name, arr) in enumerate(photos().items()):
        img = Image.fromarray(arr)
        for v in range(variants):
            img_id = 1000 * k + v + (500 if split == "val" else 0)
            w, h = img.size
            crop = img.crop((v * w // 10, v * h // 12, w - v * w // 8, h))     # odd sizes
            crop = ImageOps.mirror(crop) if v % 2 else crop
            file_name = f"COCO_{split}2014_{img_id:012d}.jpg"
            crop.save(root / f"{split}2014" / file_name, quality=90)
            images.append({"id": img_id, "file_name": file_name, "width": crop.size[0], "height": crop.size[1]})
            anns += [{"id": 10 * img_id + j, "image_id": img_id, "caption": c} for j, c in enumerate(CAPTIONS[name])]
    (root / "annotations" / f"captions_{split}2014.json").write_text(json.dumps({"images": images,
                                                                               "annotations": anns}))
    return root


def test_a_user_s_commands_encode_train_sample_and_score(tmp_path, uvit, monkeypatch):
    coco = tmp_path / "coco"
    coco_from_photos(coco, "train", 3)
    coco_from_photos(coco, "val", 1)
    vae, clip = save_tiny_vae(tmp_path / "vae"), save_tiny_clip(tmp_path / "clip")
    for split in ("train", "val"):
        res = uvit("encode-latents", "coco", "--source", coco, "--split", split, "--res", "32", "--vae", vae,
                   "--text-encoder", clip, "--out", tmp_path / f"latents_{split}", "--num-workers", "0",
                   "--batch-size", "4", "--verify")
        assert res.returncode == 0, res.output
    manifest = json.loads((tmp_path / "latents_train" / "manifest.json").read_text())
    assert manifest["count"] == 9 and manifest["num_captions"] == 27 and manifest["vae"] == str(vae)

    recipe = tmp_path / "coco_tiny.yaml"
    recipe.write_text(f"""name: coco_tiny
model: {{img_size: 4, in_chans: 4, patch_size: 2, embed_dim: 32, num_layers: 3, num_heads: 2,
        text_dim: {TINY_CLIP['text_cfg']['width']}, text_tokens: 77}}
data: {{name: latents, latents: {tmp_path / 'latents_train'}, vae: {vae}, text_encoder: {clip},
       scale_factor: 0.23010, num_workers: 0}}
diffusion: {{formulation: discrete}}
train: {{steps: 4, batch_size: 4, p_uncond: 0.1, save_every: 4, sample_every: 4, log_every: 2, warmup_steps: 1}}
sample: {{sampler: dpm_solver_pp, steps: 3, cfg_scale: 2.0}}
""")
    run = tmp_path / "run"
    res = uvit("train", recipe, "--run-dir", run)
    assert res.returncode == 0, res.output
    assert (run / "ema.safetensors").is_file() and list((run / "samples").glob("*.png"))

    res = uvit("sample", run, "--prompt", "a pink flower", "--prompt", "a woman in uniform", "--n", "4",
               "--out-dir", tmp_path / "pngs", "--npz", tmp_path / "s.npz")
    assert res.returncode == 0, res.output
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (4, 32, 32, 3) and f["arr_0"].dtype == np.uint8
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == [f"00000{i}.png" for i in range(4)]

    # uvit fid RUN: the MS-COCO caption protocol over the encoded val split, against statistics of real photos
    write_random_inception(tmp_path / "th")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    np.savez(tmp_path / "ref.npz", photo_crops(8, 32, 1))
    res = uvit("fid", run, "--captions", tmp_path / "latents_val", "--ref", tmp_path / "ref.npz", "-n", "6",
               "--metrics", "fid,is", "--json", tmp_path / "fid.json")
    assert res.returncode == 0, res.output
    result = json.loads((tmp_path / "fid.json").read_text())
    assert set(result["metrics"]) == {"fid", "is"} and np.isfinite(result["metrics"]["fid"])
    card = result["protocol"]
    assert card["caption_source"] == str(tmp_path / "latents_val") and card["caption_images"] == 3
    assert card["guidance_w"] == 2.0 and card["count"] == 6
