"""Image sources (folders, streamed .npz) and the resumable sample store: formats, validation, resume."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from metrics_fixtures import photo_crops, write_pngs
from uvit_cli.errors import UvitError
from uvit_cli.metrics.evaluate import evaluate
from uvit_cli.metrics import parts as P
from uvit_cli.metrics import sample_store as S
from uvit_cli.metrics.sample_store import default_chunk, parts_dir, read_samples_meta, sample_to_npz
from uvit_cli.metrics.sources import FolderSource, NpzSource, open_source


def _all(src, bs=3):
    return np.concatenate(list(src.batches(bs)))


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streams_arr_0_and_labels(tmp_path, compressed):
    imgs = photo_crops(10, 12, 0)
    path = tmp_path / "s.npz"
    (np.savez_compressed if compressed else np.savez)(path, imgs, np.arange(10) % 3)
    src = NpzSource(path)
    assert len(src) == 10 and src.shape == (12, 12, 3)
    np.testing.assert_array_equal(_all(src), imgs)
    np.testing.assert_array_equal(np.concatenate(list(src.batches(4, limit=6))), imgs[:6])
    # a rank reads its own range: straight from the file offset (stored) or by reading through (compressed)
    np.testing.assert_array_equal(np.concatenate(list(src.batches(2, limit=9, start=3))), imgs[3:9])
    np.testing.assert_array_equal(np.concatenate(list(src.batches(4, start=8))), imgs[8:])
    np.testing.assert_array_equal(src.labels, np.arange(10) % 3)
    assert src.sha256() == NpzSource(path).sha256() and len(src.sha256()) == 64


def test_folder_reads_sorted_rgb_and_gray(tmp_path):
    imgs = photo_crops(5, 10, 1)
    write_pngs(tmp_path / "f", imgs)
    np.testing.assert_array_equal(_all(FolderSource(tmp_path / "f")), imgs)
    Image.fromarray(imgs[0, ..., 0]).save(tmp_path / "f" / "99999.png")  # a gray PNG becomes RGB, as in pytorch-fid
    last = _all(FolderSource(tmp_path / "f"))[-1]
    assert last.shape == (10, 10, 3) and (last[..., 0] == last[..., 2]).all()
    (tmp_path / "nested" / "class_a").mkdir(parents=True)  # images only in sub-folders are found too
    write_pngs(tmp_path / "nested" / "class_a", imgs[:2])
    assert len(FolderSource(tmp_path / "nested")) == 2


@pytest.mark.parametrize("case,match", [
    ("nan", "NaN or inf"),
    ("float", "must be uint8"),
    ("nchw", "channels-first"),
    ("rgba", "4 channels"),
    ("int16", "expected uint8"),
    ("empty", "holds no images"),
    ("nokey", "no 'arr_0'"),
    ("garbage", "not a readable .npz"),
])
def test_bad_npz_inputs_are_clear_errors(tmp_path, case, match):
    path = tmp_path / "bad.npz"
    x = photo_crops(4, 8, 2)
    if case == "nan":
        f = x.astype(np.float32)
        f[2, 3, 3, 1] = np.nan
        np.savez(path, f)
    elif case == "float":
        np.savez(path, x.astype(np.float32) / 255)
    elif case == "nchw":
        np.savez(path, x.transpose(0, 3, 1, 2).copy())
    elif case == "rgba":
        np.savez(path, np.concatenate([x, x[..., :1]], -1))
    elif case == "int16":
        np.savez(path, x.astype(np.int16))
    elif case == "empty":
        np.savez(path, x[:0])
    elif case == "nokey":
        np.savez(path, images=x)
    else:
        path.write_bytes(b"not a zip file")
    with pytest.raises(UvitError, match=match):
        NpzSource(path)


def test_bad_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UvitError, match="holds no images"):
        FolderSource(tmp_path / "empty")
    write_pngs(tmp_path / "mixed", photo_crops(2, 8, 0))
    Image.fromarray(photo_crops(1, 9, 0)[0]).save(tmp_path / "mixed" / "z.png")
    with pytest.raises(UvitError, match="share one resolution"):
        _all(FolderSource(tmp_path / "mixed"))
    write_pngs(tmp_path / "broken", photo_crops(2, 8, 0))
    (tmp_path / "broken" / "00001.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(UvitError, match="cannot read image .*00001.png"):
        _all(FolderSource(tmp_path / "broken"))
    with pytest.raises(UvitError, match="does not exist"):
        open_source(tmp_path / "missing.npz")


def test_sample_counts_are_checked_before_scoring(tmp_path):
    np.savez(tmp_path / "s.npz", photo_crops(3, 8, 0))
    with pytest.raises(UvitError, match="holds 3 images but 10"):
        evaluate(tmp_path / "s.npz", tmp_path / "s.npz", num_samples=10)
    with pytest.raises(UvitError, match="precision needs at least 4"):
        evaluate(tmp_path / "s.npz", tmp_path / "s.npz", metrics="precision")
    with pytest.raises(UvitError, match="no reference"):
        evaluate(tmp_path / "s.npz", None, metrics="fid")


# ---------------------------------------------------------------- the resumable sample store

class Boom(Exception):
    pass


def _maker(calls, fail_at=None):
    def make(start, stop):
        if fail_at is not None and start >= fail_at:
            raise Boom()
        calls.append((start, stop))
        idx = np.arange(start, stop)
        return (idx[:, None, None, None] + np.zeros((1, 4, 4, 3))).astype(np.uint8), idx % 7
    return make


def test_sample_store_resumes_and_appears_only_when_complete(tmp_path):
    out = tmp_path / "eval" / "samples.npz"
    meta = {"checkpoint_sha256": "abc", "guidance_w": 1.5}
    calls = []
    with pytest.raises(Boom):
        sample_to_npz(out, 25, _maker(calls, fail_at=20), meta=meta, chunk=10)
    assert not out.exists() and calls == [(0, 10), (10, 20)]
    calls.clear()
    sample_to_npz(out, 25, _maker(calls), meta=meta, chunk=10)
    assert calls == [(20, 25)]  # only the missing chunk was made
    assert out.exists() and not parts_dir(out).exists()
    with np.load(out) as z:
        np.testing.assert_array_equal(z["arr_0"][:, 0, 0, 0], np.arange(25))
        np.testing.assert_array_equal(z["arr_1"], np.arange(25) % 7)
    assert read_samples_meta(out) == {**meta, "count": 25}
    src = NpzSource(out)  # the streamed reader handles the zip64 member
    np.testing.assert_array_equal(_all(src, 8)[:, 1, 1, 2], np.arange(25))
    calls.clear()
    assert sample_to_npz(out, 25, _maker(calls), meta=meta, chunk=10) == (out, []) and calls == []  # reused
    with pytest.raises(UvitError, match="another protocol.*guidance_w"):
        sample_to_npz(out, 25, _maker(calls), meta={**meta, "guidance_w": 2.0}, chunk=10)


def test_sample_store_refuses_to_mix_partial_protocols(tmp_path):
    out = tmp_path / "s.npz"
    with pytest.raises(Boom):
        sample_to_npz(out, 30, _maker([], fail_at=10), meta={"seed": 0}, chunk=10)
    with pytest.raises(UvitError, match="partial samples of another protocol"):
        sample_to_npz(out, 30, _maker([]), meta={"seed": 1}, chunk=10)
    calls = []
    sample_to_npz(out, 12, _maker(calls), meta={"seed": 0}, chunk=10)  # another N reuses the finished chunk
    assert calls == [(10, 12)]


def test_sample_store_bytes_do_not_depend_on_interruptions_or_time(tmp_path):
    meta = {"seed": 0}
    sample_to_npz(tmp_path / "a.npz", 25, _maker([]), meta=meta, chunk=10)
    with pytest.raises(Boom):
        sample_to_npz(tmp_path / "b.npz", 25, _maker([], fail_at=10), meta=meta, chunk=10)
    (parts_dir(tmp_path / "b.npz") / ".chunk_000000010_10.npz.x.tmp").write_bytes(b"half")  # a killed writer's
    sample_to_npz(tmp_path / "b.npz", 25, _maker([]), meta=meta, chunk=10)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()   # fixed zip timestamps


def test_sample_store_replace_overwrites_a_finished_file_of_another_protocol(tmp_path):
    out = tmp_path / "s.npz"
    sample_to_npz(out, 12, _maker([]), meta={"seed": 0}, chunk=10)
    calls = []
    assert sample_to_npz(out, 12, _maker(calls), meta={"seed": 1}, chunk=10, replace=True) == (out, [0, 10])
    assert read_samples_meta(out)["seed"] == 1 and calls == [(0, 10), (10, 12)]


class _Rank1Of2:
    """The distributed helpers as rank 1 of a 2-process job sees them (no process group needed)."""

    @staticmethod
    def share(items):
        return list(items), list(items)[1::2]

    @staticmethod
    def first_error(fn):
        return fn()

    @staticmethod
    def is_main():
        return False

    @staticmethod
    def barrier(what=""):
        pass


def test_a_store_half_drawn_by_rank_1_of_2_is_finished_by_one_process(tmp_path, monkeypatch):
    """Resume whatever the world size was: rank 1 of 2 drew chunks 10, 30 before the job stopped; one process
    draws the rest, and the file equals an uninterrupted one."""
    sample_to_npz(tmp_path / "ref.npz", 45, _maker([]), meta={"seed": 0}, chunk=10)
    with monkeypatch.context() as m:
        m.setattr(S, "distributed", _Rank1Of2)
        m.setattr(P, "distributed", _Rank1Of2)
        calls = []
        sample_to_npz(tmp_path / "s.npz", 45, _maker(calls), meta={"seed": 0}, chunk=10, all_ranks=True)
    assert calls == [(10, 20), (30, 40)] and not (tmp_path / "s.npz").exists()
    calls = []
    _, made = sample_to_npz(tmp_path / "s.npz", 45, _maker(calls), meta={"seed": 0}, chunk=10)
    assert made == [0, 20, 40] and calls == [(0, 10), (20, 30), (40, 45)]
    assert (tmp_path / "s.npz").read_bytes() == (tmp_path / "ref.npz").read_bytes()


def test_default_chunk_depends_only_on_n():
    assert [default_chunk(n) for n in (1, 100, 2048, 30_000, 50_000, 10**6)] == [16, 16, 16, 240, 400, 1024]
    assert all(default_chunk(n) % 16 == 0 for n in range(1, 5000, 37))


def test_parts_reuse_a_longer_part_and_count_what_is_done(tmp_path):
    long = P.Parts(tmp_path, 30, 10)
    long.write(20, {"x": np.arange(10)})
    short = P.Parts(tmp_path, 25, 10)                 # another n: the part at 20 holds the 5 rows it needs
    assert short.missing() == [0, 10] and short.done() == 5
    np.testing.assert_array_equal(short.read(20)["x"], np.arange(5))
    with pytest.raises(UvitError, match="missing"):
        short.read(0)
