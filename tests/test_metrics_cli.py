"""`uvit fid` / `uvit fid-stats` end to end, and the digits domain metric (CPU, no Inception weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metrics_fixtures import smooth_images, write_pngs, write_random_inception
from uvit_cli.data.digits import load_digits_uint8
from uvit_cli.metrics import digits as D
from uvit_cli.metrics.evaluate import evaluate

def _invoke_main(args):
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    from uvit_cli.cli import main

    out, err = StringIO(), StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code or 0
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def digits():
    imgs, labels = load_digits_uint8()
    return imgs, labels


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    # Trained once per session (seconds) into the cache directory conftest gives every test.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UVIT_CACHE", str(tmp_path_factory.getbasetemp() / "uvit-cache"))
        return D.load_classifier()


def test_digits_metric_separates_real_from_noise(digits, classifier):
    imgs, labels = digits
    perm = np.random.default_rng(0).permutation(len(imgs))
    a, b = perm[:896], perm[896:1792]
    ref_a = D.GaussianStats.from_features(D.digits_outputs(classifier, imgs[a])[0])
    real = D.score_digits(imgs[b], labels[b], classifier, ref=ref_a)
    noise = D.score_digits(np.random.default_rng(1).integers(0, 256, (896, 8, 8), dtype=np.uint8), labels[b],
                           classifier, ref=ref_a)
    collapsed = D.score_digits(imgs[labels == 3][:150], None, classifier, ref=ref_a)  # one class only
    assert real["fd_digits"] < 5 and noise["fd_digits"] > 50 * real["fd_digits"]
    assert collapsed["fd_digits"] > 20 * real["fd_digits"]
    assert real["acc_digits"] > 0.9 and noise["acc_digits"] < 0.3
    assert "acc_digits" not in collapsed
    wrong = D.score_digits(imgs[b], (labels[b] + 1) % 10, classifier, ref=ref_a)
    assert wrong["acc_digits"] < 0.1 and wrong["fd_digits"] == pytest.approx(real["fd_digits"])


def test_digits_classifier_is_deterministic_and_cached(classifier, tmp_path, monkeypatch):
    assert D.classifier_path().exists()
    again = D.train_classifier()
    for k, v in classifier.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_uvit_fid_digits_npz_with_json(digits, classifier, tmp_path):
    imgs, labels = digits
    np.savez(tmp_path / "s.npz", imgs[:600], labels[:600])
    code, out, err = _invoke_main(["fid", str(tmp_path / "s.npz"), "--json", str(tmp_path / "r.json")])
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["metrics"]) == {"fd_digits", "acc_digits"}
    assert r["metrics"]["acc_digits"] > 0.9 and r["metrics"]["fd_digits"] < 20
    assert r["protocol"]["mode"] == "digits" and "NOT comparable" in r["protocol"]["pipeline"]
    assert r["protocol"]["count"] == 600 and r["protocol"]["sha256"]
    # fid-stats of all real digits as a reference file gives the built-in reference's number.
    np.savez(tmp_path / "real.npz", imgs)
    code, _, err = _invoke_main(["fid-stats", str(tmp_path / "real.npz"), "--out", str(tmp_path / "st.npz")])
    assert code == 0, err
    via_file = evaluate(tmp_path / "s.npz", tmp_path / "st.npz", mode="digits").metrics["fd_digits"]
    assert via_file == pytest.approx(r["metrics"]["fd_digits"], rel=1e-9)
    with pytest.raises(Exception, match="built with --mode digits"):
        evaluate(smooth_images(4, 8, 0), tmp_path / "st.npz", mode="pytorch_fid")


@pytest.mark.parametrize("args,match", [
    (["fid", "{tmp}/missing.npz"], "does not exist"),
    (["fid", "{tmp}/nan.npz", "--mode", "pytorch_fid", "--ref", "{tmp}/nan.npz"], "NaN or inf"),
    (["fid", "{tmp}/empty"], "holds no images"),
    (["fid", "{tmp}/rgb.npz", "--metrics", "fid,kid", "--ref", "{tmp}/rgb.npz"], "unknown metric kid"),
    (["fid", "{tmp}/rgb.npz", "--ref", "fid_stats_imagenet64_guided_diffusion.npz"], "drive.google.com"),
    (["fid", "{tmp}/rgb.npz", "--ref", "VIRTUAL_imagenet256_labeled.npz"], "imagenet/256/VIRTUAL"),
    (["fid", "{tmp}/rgb.npz", "--ref", "{tmp}/rgb.npz", "--mode", "bicubic"], "unknown --mode"),
    (["fid-stats", "{tmp}/rgb.npz", "--out", "{tmp}/x.json"], "written as .npz"),
])
def test_cli_errors_are_one_line_without_traceback(tmp_path, monkeypatch, args, match):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    (tmp_path / "empty").mkdir()
    f = smooth_images(4, 8, 0).astype(np.float32)
    f[1, 1, 1, 1] = np.inf
    np.savez(tmp_path / "nan.npz", f)
    np.savez(tmp_path / "rgb.npz", smooth_images(4, 8, 0))
    code, out, err = _invoke_main([a.format(tmp=tmp_path) for a in args])
    assert code == 2
    assert "Traceback" not in err + out
    assert match in " ".join(err.split()), err


def test_cli_inception_metrics_end_to_end(tmp_path, monkeypatch):
    """IS, precision and recall (no 2048x2048 sqrtm) through the CLI with a random-weight FID Inception."""
    write_random_inception(tmp_path / "th")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    a = write_pngs(tmp_path / "a", smooth_images(6, 16, 0))
    np.savez(tmp_path / "ref.npz", smooth_images(6, 16, 1))
    code, out, err = _invoke_main(["fid", str(a), "--ref", str(tmp_path / "ref.npz"), "--metrics",
                                   "is,precision,recall", "--batch-size", "4", "--json", str(tmp_path / "r.json")])
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["metrics"]) == {"is", "precision", "recall"} and r["metrics"]["is"] >= 1.0
    p = r["protocol"]
    assert p["mode"] == "pytorch_fid" and p["ref_kind"] == "images" and p["resolution"] == "16x16"
    assert p["inception_weights_sha256"] and p["ref_sha256"] and "2x-1" in p["pipeline"]
    assert list((D.cache_dir() / "ref_features").glob(f"{p['ref_sha256'][:20]}_pytorch_fid_*.npz"))  # cached
    # Statistics with per-image features from `uvit fid-stats` give the same precision/recall as the images.
    code, _, err = _invoke_main(["fid-stats", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "st.npz"),
                                 "--features", "--batch-size", "6"])
    assert code == 0, err
    again = evaluate(a, tmp_path / "st.npz", metrics="precision,recall", batch_size=4).metrics
    assert again == {k: r["metrics"][k] for k in ("precision", "recall")}
    # The 16x16 reference does not match 8x8 samples: refused rather than silently compared.
    np.savez(tmp_path / "small.npz", smooth_images(6, 8, 2))
    with pytest.raises(Exception, match="score both sets at one resolution"):
        evaluate(tmp_path / "small.npz", tmp_path / "st.npz", metrics="precision")
