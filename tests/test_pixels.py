"""Training sources: the built-in digits, and real photos in a class folder or a saved Hugging Face data set,
through the recipe (build_source) with the official crops."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from photos import photo_paths, photos
from uvit_cli.build import build_source
from uvit_cli.data.crops import adm_center_crop
from uvit_cli.data.pixels import DigitsSource
from uvit_cli.errors import UvitError
from uvit_cli.recipe import load_recipe


def _folder_recipe(source, **model):
    return load_recipe("cifar10_uvit_s2", ["data.name=folder", f"data.source={source}",
                                            *(f"model.{k}={v}" for k, v in model.items())])


@pytest.fixture
def photo_tree(tmp_path):
    """class folders of real JPEGs (and one PNG): people/grace_hopper, places/china + places/flower.png."""
    for cls, names in {"people": ["grace_hopper"], "places": ["china", "flower"]}.items():
        (tmp_path / "photos" / cls).mkdir(parents=True)
        for n in names:
            src = photo_paths()[n]
            if n == "flower":
                Image.open(src).save(tmp_path / "photos" / cls / "flower.png")
            else:
                shutil.copy(src, tmp_path / "photos" / cls / src.name)
    return tmp_path / "photos"


def test_digits_source_is_the_scikit_learn_digits():
    s = DigitsSource()
    x, y = s.get(0)
    assert len(s) == 1797 and s.num_classes == 10 and x.shape == (1, 8, 8) and y == 0
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert torch.equal(s.get(5, flip=True)[0], s.get(5)[0].flip(-1))


def test_a_folder_of_real_photos_trains_through_the_official_crop(photo_tree):
    src = build_source(_folder_recipe(photo_tree, num_classes=2, img_size=32))
    assert len(src) == 3 and src.num_classes == 2
    labels = [src.get(i)[1] for i in range(3)]
    assert labels == [0, 1, 1]                        # people, then places (sorted folder names)
    x, _ = src.get(0)
    want = adm_center_crop(Image.open(photo_paths()["grace_hopper"]).convert("RGB"), 32)
    assert x.shape == (3, 32, 32)
    assert np.array_equal(((x.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy(), want)
    assert torch.equal(src.get(0, flip=True)[0], x.flip(-1))


def test_an_unconditional_model_ignores_the_folders(photo_tree):
    src = build_source(_folder_recipe(photo_tree, img_size=16))
    assert src.num_classes == 0 and src.get(1)[1] is None


def test_a_saved_hugging_face_data_set_is_a_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    imgs = photos()
    ds = datasets.Dataset.from_dict({"img": [Image.fromarray(a) for a in imgs.values()], "label": [0, 1, 1]},
                                    features=datasets.Features({"img": datasets.Image(),
                                                                "label": datasets.ClassLabel(names=["a", "b"])}))
    ds.save_to_disk(str(tmp_path / "hf"))
    src = build_source(_folder_recipe(tmp_path / "hf", num_classes=2, img_size=16))
    assert len(src) == 3 and src.num_classes == 2 and [src.get(i)[1] for i in range(3)] == [0, 1, 1]
    assert src.get(2)[0].shape == (3, 16, 16)


def test_training_sources_name_the_problem(photo_tree, tmp_path):
    with pytest.raises(UvitError, match="data.source .* does not exist"):
        build_source(_folder_recipe(tmp_path / "nope"))
    r = load_recipe("cifar10_uvit_s2", ["data.name=folder", f"data.source={photo_tree}", "data.crop=none"])
    with pytest.raises(UvitError, match="does not match the model's 32x32"):
        build_source(r).get(0)
    (photo_tree / "places" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    src = build_source(_folder_recipe(photo_tree, img_size=16))
    with pytest.raises(UvitError, match="broken.jpg .* unusable"):
        src.get([str(p) for p in src.source.paths].index(str(photo_tree / "places" / "broken.jpg")))
