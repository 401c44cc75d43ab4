"""Reference statistics: ADM reference batches, U-ViT fid_stats, our own stats files, the content-hash cache."""

from __future__ import annotations

import numpy as np
import pytest

from metrics_fixtures import photo_crops
from uvit_cli.errors import UvitError
from uvit_cli.metrics.features import Features
from uvit_cli.metrics.frechet import GaussianStats
from uvit_cli.metrics.reference import find_reference, load_reference, write_stats


def _never(*_):
    raise AssertionError("no features should be computed")


def _fake_extract(calls):
    def extract(src, keep):
        calls.append((src.name, keep))
        x = np.concatenate(list(src.batches(4))).reshape(len(src), -1)[:, :6].astype(np.float64)
        return Features(n=len(x), pool=GaussianStats.from_features(x), spatial=GaussianStats.from_features(x[:, :3]),
                        pool_features=x.astype(np.float32) if keep else None, shape=src.shape)
    return extract


def test_adm_reference_batch_uses_precomputed_stats_and_arr_0_for_pr(tmp_path):
    path = tmp_path / "VIRTUAL_test.npz"
    np.savez(path, arr_0=photo_crops(5, 8, 0), mu=np.ones(6), sigma=np.eye(6), mu_s=np.zeros(3), sigma_s=np.eye(3))
    ref = load_reference(path, need={"pool", "spatial"}, extract=_never, mode="legacy_tensorflow")
    assert ref.kind == "adm_ref_batch" and "ADM" in ref.mode
    np.testing.assert_array_equal(ref.pool.mu, np.ones(6))
    calls = []
    ref = load_reference(path, need={"pool", "pool_features"}, extract=_fake_extract(calls), mode="pytorch_fid")
    np.testing.assert_array_equal(ref.pool.mu, np.ones(6))  # the stored whole-dataset stats still win
    assert ref.pool_features.shape == (5, 6) and calls == [(str(path), True)] and ref.shape == (8, 8, 3)
    # Cached by content hash: a second load computes nothing.
    ref2 = load_reference(path, need={"pool_features"}, extract=_never, mode="pytorch_fid")
    np.testing.assert_array_equal(ref2.pool_features, ref.pool_features)


def test_uvit_fid_stats_without_sfid_is_a_clear_error(tmp_path):
    path = tmp_path / "fid_stats_cifar10_train_pytorch.npz"
    np.savez(path, mu=np.zeros(6), sigma=np.eye(6))
    ref = load_reference(path, need={"pool"}, extract=_never, mode="pytorch_fid")
    assert ref.kind == "fid_stats" and ref.pool.sigma.shape == (6, 6)
    with pytest.raises(UvitError, match="no sFID statistics"):
        load_reference(path, need={"pool", "spatial"}, extract=_never, mode="pytorch_fid")
    with pytest.raises(UvitError, match="precision/recall"):
        load_reference(path, need={"pool_features"}, extract=_never, mode="pytorch_fid")


def test_own_stats_record_their_mode(tmp_path):
    feats = Features(n=10, pool=GaussianStats(np.zeros(4), np.eye(4), 10))
    write_stats(tmp_path / "st.npz", feats, {"mode": "clean", "count": 10, "shape": [32, 32, 3]})
    ref = load_reference(tmp_path / "st.npz", need={"pool"}, extract=_never, mode="clean")
    assert ref.kind == "uvit_stats" and ref.count == 10 and ref.shape == (32, 32, 3)
    with pytest.raises(UvitError, match="built with --mode clean"):
        load_reference(tmp_path / "st.npz", need={"pool"}, extract=_never, mode="pytorch_fid")


def test_image_references_are_computed_once_per_content_and_mode(tmp_path):
    np.savez(tmp_path / "imgs.npz", photo_crops(6, 8, 1))
    calls = []
    a = load_reference(tmp_path / "imgs.npz", need={"pool"}, extract=_fake_extract(calls), mode="pytorch_fid")
    b = load_reference(tmp_path / "imgs.npz", need={"pool"}, extract=_fake_extract(calls), mode="pytorch_fid")
    assert len(calls) == 1 and a.kind == "images" and a.count == 6
    np.testing.assert_array_equal(a.pool.sigma, b.pool.sigma)
    load_reference(tmp_path / "imgs.npz", need={"pool"}, extract=_fake_extract(calls), mode="clean")
    assert len(calls) == 2  # another mode is another cache entry
    np.savez(tmp_path / "imgs.npz", photo_crops(6, 8, 2))  # new content under the same name
    load_reference(tmp_path / "imgs.npz", need={"pool"}, extract=_fake_extract(calls), mode="pytorch_fid")
    assert len(calls) == 3


def test_bare_names_are_searched_and_missing_ones_say_where_they_come_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "assets" / "fid_stats").mkdir(parents=True)
    np.savez(tmp_path / "assets" / "fid_stats" / "fid_stats_celeba64_train_50000_ddim.npz", mu=np.zeros(2),
             sigma=np.eye(2))
    assert find_reference("fid_stats_celeba64_train_50000_ddim.npz").parent.name == "fid_stats"
    monkeypatch.setenv("UVIT_FID_STATS", str(tmp_path / "elsewhere"))
    with pytest.raises(UvitError, match="elsewhere.*drive.google.com"):
        find_reference("fid_stats_mscoco256_val.npz")
    with pytest.raises(UvitError, match="uvit fid-stats"):
        find_reference("my_stats.npz")
