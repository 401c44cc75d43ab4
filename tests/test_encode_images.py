"""Image sources and preprocessing: the official crops (vs outputs of U-ViT's datasets.py), bad images, and the
ImageNet / COCO / folder / Hugging Face sources."""

import json
from pathlib import Path

import numpy as np
import pytest
from encode_fixtures import coco_tree, imagenet_tree, photo_image
from photos import photo_paths
from PIL import Image, ImageOps

from uvit_cli.data.crops import adm_center_crop, center_crop_lanczos
from uvit_cli.data.sources import (BadImage, CroppedImages, collate, open_coco, open_folder, open_image,
                                   open_imagenet)
from uvit_cli.errors import UvitError

DATA = Path(__file__).parent / "data"


def test_crops_equal_the_official_functions():
    """tests/data/official_crops.npz: outputs of U-ViT datasets.py center_crop_arr (ImageNet, ADM) and
    center_crop (MS-COCO) on small images (shrinking with BOX halving, upscaling, odd sizes)."""
    ref = np.load(DATA / "official_crops.npz")
    n = sum(k.startswith("input_") for k in ref.files)
    assert n == 5
    for k in range(n):
        img = Image.fromarray(ref[f"input_{k}"])
        for size in (16, 24):
            np.testing.assert_array_equal(adm_center_crop(img, size), ref[f"adm_{k}_{size}"], err_msg=f"adm {k}")
            np.testing.assert_array_equal(center_crop_lanczos(img, size), ref[f"coco_{k}_{size}"],
                                          err_msg=f"coco {k}")


def _official_center_crop_arr(img, size: int) -> np.ndarray:
    """The official center_crop_arr (U-ViT datasets.py, from guided-diffusion) as its code states it, written out:
    k BOX halvings (each floor-halves both sides) while the short side is at least 2 x size, then one BICUBIC resize
    that rounds each side times size / short side, then the centred size x size window of the array."""
    w, h = img.size
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        img = img.resize((w, h), resample=Image.BOX)
    w, h = round(w * size / min(w, h)), round(h * size / min(w, h))
    arr = np.array(img.resize((w, h), resample=Image.BICUBIC))
    top, left = (h - size) // 2, (w - size) // 2
    return arr[top:top + size, left:left + size]


def test_the_adm_crop_of_real_photos_is_the_official_one():
    """On the real photos (640x427, 512x600: two or three halvings at 64, none at 256) the ADM crop equals the
    official steps exactly, and stays close to an independent route: the centred square, one LANCZOS resize."""
    for name, path in photo_paths().items():
        img = Image.open(path).convert("RGB")
        for size in (32, 64, 256):
            got = adm_center_crop(img, size)
            assert got.shape == (size, size, 3) and got.dtype == np.uint8
            np.testing.assert_array_equal(got, _official_center_crop_arr(img, size), err_msg=f"{name} {size}")
            s = min(img.size)
            left, top = (img.width - s) // 2, (img.height - s) // 2
            direct = np.asarray(img.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS))
            corr = np.corrcoef(got.ravel().astype(float), direct.ravel().astype(float))[0, 1]
            assert corr > 0.9, (name, size, corr)   # the same content in the same place (a shift of s/8: < 0.86)
            np.testing.assert_array_equal(center_crop_lanczos(img, size), direct)  # the COCO crop is that route


def _exif_photo(path, orientation: int, crop=None, fmt="JPEG"):
    """Save a real photo as a camera would: pixels stored turned, an EXIF orientation tag that turns them back.
    Returns the upright image."""
    upright = Image.open(photo_paths()["grace_hopper"]).convert("RGB")
    if crop:
        upright = upright.crop(crop)
    undo = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright.transpose(undo).save(path, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    return upright


def test_folder_sources_turn_exif_photos_upright_like_datasets_and_official_sources_keep_the_stored_pixels(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "mine" / "people"
    folder.mkdir(parents=True)
    upright = _exif_photo(folder / "hopper.jpg", 6)
    odd = _exif_photo(folder / "odd.png", 8, crop=(11, 40, 344, 557), fmt="PNG")     # 333 x 517, lossless
    src = open_folder(str(tmp_path / "mine"))
    got = {src.record(i).key: src.load(i)[0] for i in range(len(src))}
    assert got["people/hopper.jpg"].size == upright.size == (512, 600)
    want = ImageOps.exif_transpose(Image.open(folder / "hopper.jpg")).convert("RGB")
    np.testing.assert_array_equal(np.asarray(got["people/hopper.jpg"]), np.asarray(want))
    assert np.abs(np.asarray(got["people/hopper.jpg"], int) - np.asarray(upright, int)).mean() < 3  # JPEG loss only
    np.testing.assert_array_equal(np.asarray(got["people/odd.png"]), np.asarray(odd))
    item = CroppedImages(src, "adm_center", 32)[[src.record(i).key for i in range(2)].index("people/odd.png")]
    np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), adm_center_crop(odd, 32))

    # the same files through Hugging Face datasets decode to the same upright pixels
    ds = datasets.Dataset.from_dict({"image": [str(folder / "hopper.jpg"), str(folder / "odd.png")]},
                                    features=datasets.Features({"image": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "hf"))
    hf = open_folder(f"hf:{tmp_path / 'hf'}", condition="none")
    np.testing.assert_array_equal(np.asarray(hf.load(0)[0]), np.asarray(got["people/hopper.jpg"]))
    np.testing.assert_array_equal(np.asarray(hf.load(1)[0]), np.asarray(odd))

    # ImageNet and COCO decode as the official pipelines do: the stored pixels, tag ignored
    inet = tmp_path / "inet" / "train" / "n01440764"
    inet.mkdir(parents=True)
    (inet / "hopper.JPEG").write_bytes((folder / "hopper.jpg").read_bytes())
    assert open_imagenet(str(tmp_path / "inet")).load(0)[0].size == (600, 512)
    root = coco_tree(tmp_path / "coco", n=1)
    name = next((root / "train2014").iterdir())
    name.write_bytes((folder / "hopper.jpg").read_bytes())
    coco = open_coco(str(root), "train")
    stored = coco.load(0)[0]
    assert stored.size == (600, 512)
    np.testing.assert_array_equal(np.asarray(stored), np.asarray(Image.open(folder / "hopper.jpg").convert("RGB")))


def test_bad_images_are_converted_or_reported(tmp_path):
    rng = np.random.default_rng(0)
    photo_image(rng, 20, 30, "CMYK").save(tmp_path / "cmyk.jpg")
    photo_image(rng, 20, 30, "L").save(tmp_path / "gray.jpg")
    photo_image(rng, 20, 30, "P").save(tmp_path / "palette.png")
    Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16)).save(tmp_path / "gray16.png")
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :15, 3] = 255                      # left half opaque red, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    for name, mode in (("cmyk.jpg", "CMYK"), ("gray.jpg", "L"), ("palette.png", "P"), ("gray16.png", "I;16"),
                       ("alpha.png", "RGBA")):
        img, converted = open_image(tmp_path / name)
        assert img.mode == "RGB" and converted == mode, name
    arr = np.asarray(open_image(tmp_path / "alpha.png")[0])
    assert (arr[:, :15] == [200, 0, 0]).all() and (arr[:, 15:] == 255).all()   # alpha composited on white
    photo_image(rng, 64, 64).save(tmp_path / "full.jpg", quality=95)
    (tmp_path / "trunc.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:500])
    with pytest.raises(BadImage, match="truncated"):
        open_image(tmp_path / "trunc.jpg")
    (tmp_path / "junk.jpg").write_bytes(b"garbage")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name in ("junk.jpg", "empty.jpg"):
        with pytest.raises(BadImage):
            open_image(tmp_path / name)


def test_imagenet_tree_labels_are_sorted_wnids(tmp_path):
    root = imagenet_tree(tmp_path / "inet")
    src = open_imagenet(str(root), "train")
    assert src.conditioning == "class" and src.class_names == ["n01440764", "n01443537", "n01484850"]
    assert len(src) == 15 + 5
    recs = [src.record(i) for i in range(len(src))]
    for r in recs:
        assert src.class_names[r.label] == r.key.split("/")[0]
    assert [r.label for r in recs] == sorted(r.label for r in recs)
    # the split folder itself works too, and the errors name the expected layout
    assert len(open_imagenet(str(root / "train"), "train")) == 20
    with pytest.raises(UvitError, match="does not exist"):
        open_imagenet(str(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    with pytest.raises(UvitError, match="no class folders"):
        open_imagenet(str(tmp_path / "flat"))
    (tmp_path / "emptycls" / "train" / "n0").mkdir(parents=True)
    with pytest.raises(UvitError, match="holds no images"):
        open_imagenet(str(tmp_path / "emptycls"))


def test_cropped_images_mark_bad_files_and_collate_keeps_order(tmp_path):
    src = open_imagenet(str(imagenet_tree(tmp_path / "inet")), "train")
    ds = CroppedImages(src, "adm_center", 16)
    items = [ds[i] for i in range(len(ds))]
    notes = {src.record(it["index"]).key.split("/")[-1]: it["note"] for it in items}
    assert notes["x_cmyk.JPEG"] == "converted:CMYK" and notes["x_gray.JPEG"] == "converted:L"
    assert notes["x_alpha.png"] == "converted:RGBA"
    assert notes["x_trunc.JPEG"] == "skipped:truncated" and notes["x_corrupt.JPEG"].startswith("skipped:")
    good = [it for it in items if it["image"] is not None]
    assert len(good) == 18 and all(it["image"].shape == (3, 16, 16) for it in good)
    batch = collate(items[:8])
    assert batch["index"] == list(range(8)) and batch["images"].shape[0] == sum(batch["ok"])


def test_coco_local_orders_by_image_id_and_keeps_caption_file_order(tmp_path):
    root = coco_tree(tmp_path / "coco")
    src = open_coco(str(root), "train")
    assert src.conditioning == "text" and src.class_names is None
    ann = json.loads((root / "annotations" / "captions_train2014.json").read_text())
    ids = sorted(im["id"] for im in ann["images"])
    assert [int(src.record(i).key[-16:-4]) for i in range(len(src))] == ids
    first = next(im for im in ann["images"] if im["height"] == 40)   # the image with 6 captions
    r = src.record(ids.index(first["id"]))
    assert len(r.captions) == 6
    assert list(r.captions) == [a["caption"].strip() for a in ann["annotations"] if a["image_id"] == first["id"]]
    with pytest.raises(UvitError, match="captions_val2014.json is missing"):
        open_coco(str(root), "val")
    (root / "train2014" / "gone").mkdir()
    (root / "train2014" / r.key).unlink()
    assert CroppedImages(src, "center_lanczos", 16)[ids.index(first["id"])]["note"] == "skipped:missing file"


def test_folder_labels_captions_and_unconditional(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (tmp_path / "cls" / c).mkdir(parents=True)
        for k in range(2):
            photo_image(rng, 20, 20).save(tmp_path / "cls" / c / f"{k}.png")
    src = open_folder(str(tmp_path / "cls"))
    assert src.conditioning == "class" and src.class_names == ["cats", "dogs"]
    assert [src.record(i).label for i in range(4)] == [0, 0, 1, 1]
    assert open_folder(str(tmp_path / "cls"), condition="none").conditioning == "none"

    (tmp_path / "cap").mkdir()
    for k in range(3):
        photo_image(rng, 20, 20).save(tmp_path / "cap" / f"{k}.jpg")
    (tmp_path / "cap" / "0.txt").write_text("first caption\n\nsecond caption\n")
    (tmp_path / "cap" / "captions.jsonl").write_text(json.dumps({"file_name": "1.jpg", "text": "from jsonl"}) + "\n")
    src = open_folder(str(tmp_path / "cap"))
    assert src.conditioning == "text"
    assert [src.record(i).captions for i in range(3)] == [("first caption", "second caption"), ("from jsonl",), ()]

    (tmp_path / "flat").mkdir()
    photo_image(rng, 20, 20).save(tmp_path / "flat" / "a.png")
    assert open_folder(str(tmp_path / "flat")).conditioning == "none"
    with pytest.raises(UvitError, match="no captions found"):
        open_folder(str(tmp_path / "flat"), condition="text")
    (tmp_path / "void").mkdir()
    with pytest.raises(UvitError, match="holds no images"):
        open_folder(str(tmp_path / "void"))


def test_hugging_face_sources(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    imgs = [photo_image(rng, 20 + k, 24) for k in range(4)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    ds = datasets.Dataset.from_dict({"image": imgs, "label": [2, 0, 1, 2]}, features=features)
    ds.save_to_disk(str(tmp_path / "inet"))
    src = open_imagenet(f"hf:{tmp_path / 'inet'}", "train")
    assert src.class_names == ["a", "b", "c"] and [src.record(i).label for i in range(4)] == [2, 0, 1, 2]
    img, _ = src.load(1)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(imgs[1]))

    caps = datasets.Dataset.from_dict({"image": imgs[:2],
                                       "sentences": [[{"raw": "one"}, {"raw": "two"}], [{"raw": "three"}]]})
    (tmp_path / "coco").mkdir()
    caps.to_parquet(str(tmp_path / "coco" / "train-00000.parquet"))
    src = open_coco(f"hf:{tmp_path / 'coco'}", "train")
    assert src.conditioning == "text" and src.record(0).captions == ("one", "two") and src.record(1).captions == ("three",)
    with pytest.raises(UvitError, match="no split"):
        open_coco(f"hf:{tmp_path / 'coco'}", "val")
