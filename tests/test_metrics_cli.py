"""`uvit fid` / `uvit fid-stats` end to end, and the digits domain metric (CPU, no Inception weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from metrics_fixtures import photo_crops, write_pngs, write_random_inception
from uvit_cli.data.digits import load_digits_uint8
from uvit_cli.files import cache_dir
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
def classifier():
    # Trained once per session (seconds) into the cache directory conftest gives every test (UVIT_CACHE), where
    # test_digits_classifier_is_deterministic_and_cached looks for it.
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


def test_digits_classifier_is_deterministic_and_cached(classifier, tmp_path_factory, monkeypatch):
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
    same = evaluate(tmp_path / "s.npz", tmp_path / "s.npz", mode="digits").metrics["fd_digits"]
    assert abs(same) < 1e-6  # a set against itself (scipy sqrtm numerics)
    with pytest.raises(Exception, match="built with --mode digits"):
        evaluate(photo_crops(4, 8, 0), tmp_path / "st.npz", mode="pytorch_fid")


@pytest.mark.parametrize("args,match", [
    (["fid", "{tmp}/missing.npz"], "does not exist"),
    (["fid", "{tmp}/nan.npz", "--mode", "pytorch_fid", "--ref", "{tmp}/nan.npz"], "NaN or inf"),
    (["fid", "{tmp}/empty"], "holds no images"),
    (["fid", "{tmp}/rgb.npz", "--metrics", "fid,kd", "--ref", "{tmp}/rgb.npz"], "unknown metric kd"),
    (["fid", "{tmp}/rgb.npz", "--ref", "fid_stats_imagenet64_guided_diffusion.npz"], "drive.google.com"),
    (["fid", "{tmp}/rgb.npz", "--ref", "VIRTUAL_imagenet256_labeled.npz"], "imagenet/256/VIRTUAL"),
    (["fid", "{tmp}/rgb.npz", "--ref", "{tmp}/rgb.npz", "--mode", "bicubic"], "unknown --mode"),
    (["fid-stats", "{tmp}/rgb.npz", "--out", "{tmp}/x.json"], "written as .npz"),
])
def test_cli_errors_are_one_line_without_traceback(tmp_path, monkeypatch, args, match):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    (tmp_path / "empty").mkdir()
    f = photo_crops(4, 8, 0).astype(np.float32)
    f[1, 1, 1, 1] = np.inf
    np.savez(tmp_path / "nan.npz", f)
    np.savez(tmp_path / "rgb.npz", photo_crops(4, 8, 0))
    code, out, err = _invoke_main([a.format(tmp=tmp_path) for a in args])
    assert code == 2
    assert "Traceback" not in err + out
    assert match in " ".join(err.split()), err


def test_cli_inception_metrics_end_to_end(tmp_path, monkeypatch):
    """IS, precision and recall (no 2048x2048 sqrtm) through the CLI with a random-weight FID Inception."""
    write_random_inception(tmp_path / "th")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    a = write_pngs(tmp_path / "a", photo_crops(4, 16, 0))
    np.savez(tmp_path / "ref.npz", photo_crops(4, 16, 1))
    code, out, err = _invoke_main(["fid", str(a), "--ref", str(tmp_path / "ref.npz"), "--metrics",
                                   "is,precision,recall", "--batch-size", "4", "--json", str(tmp_path / "r.json")])
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["metrics"]) == {"is", "precision", "recall"} and r["metrics"]["is"] >= 1.0
    p = r["protocol"]
    assert p["mode"] == "pytorch_fid" and p["ref_kind"] == "images" and p["resolution"] == "16x16"
    assert p["inception_weights_sha256"] and p["ref_sha256"] and "2x-1" in p["pipeline"]
    assert list((cache_dir() / "ref_features").glob(f"{p['ref_sha256'][:20]}_pytorch_fid_*.npz"))  # cached
    # Statistics with per-image features from `uvit fid-stats` give the same precision/recall as the images.
    code, _, err = _invoke_main(["fid-stats", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "st.npz"),
                                 "--features", "--batch-size", "4"])
    assert code == 0, err
    again = evaluate(a, tmp_path / "st.npz", metrics="precision,recall", batch_size=4).metrics
    assert again == {k: r["metrics"][k] for k in ("precision", "recall")}
    # The 16x16 reference does not match 8x8 samples: refused rather than silently compared.
    np.savez(tmp_path / "small.npz", photo_crops(4, 8, 2))
    with pytest.raises(Exception, match="score both sets at one resolution"):
        evaluate(tmp_path / "small.npz", tmp_path / "st.npz", metrics="precision")


# ---------------------------------------------------------------- scoring a model (the trainer's monitor, runs)

def _digits_recipe(steps=4):
    from uvit_cli.recipe import load_recipe

    return load_recipe("digits_uvit_tiny", [f"sample.steps={steps}", "sample.sampler=dpm_solver_pp_2m"])


def test_evaluate_model_digits_protocol_and_batch_independence(classifier):
    from uvit_cli.build import build_model
    from uvit_cli.metrics import evaluate_model

    recipe = _digits_recipe()
    torch.manual_seed(0)
    model = build_model(recipe)
    with D.one_thread():  # a tiny model: avoids thread oversubscription on busy 2-core CI machines
        a = evaluate_model(model, recipe, num_samples=24, batch_size=24, seed=3)
        b = evaluate_model(model, recipe, num_samples=24, batch_size=8, seed=3)
    assert set(a) == {"fd_digits", "acc_digits", "protocol"}
    assert a["fd_digits"] == pytest.approx(b["fd_digits"], rel=1e-6)  # per-sample seeds: batch size is irrelevant
    assert a["acc_digits"] == b["acc_digits"]
    card = a["protocol"]
    assert card["count"] == 24 and card["guidance_w"] == 2.0 and card["weights"] == "ema"
    assert card["sampler"] == "dpm_solver_pp_2m" and card["steps"] == 4 and card["nfe"] == 4
    assert card["class_sampling"] == "balanced" and card["seeds"].startswith("3..26")
    assert model.training  # the caller's mode is restored


def test_uvit_fid_on_a_run_directory_samples_then_scores(tmp_path, monkeypatch, classifier):
    from uvit_cli.build import build_model
    from uvit_cli.checkpoint import save_weights
    from uvit_cli.run import RUN_EMA
    from uvit_cli.recipe import dump_recipe
    from uvit_cli.run import write_recipe

    recipe = _digits_recipe(steps=3)
    run = tmp_path / "runs" / "00000-digits-U-ViT-Tiny2"
    run.mkdir(parents=True)
    write_recipe(run, recipe)
    save_weights(run / RUN_EMA, build_model(recipe).state_dict(), dump_recipe(recipe), kind="ema")
    monkeypatch.chdir(tmp_path)
    code, out, err = _invoke_main(["fid", "--num-samples", "30", "--json", "r.json"])  # bare: the latest run
    assert code == 0, err + out
    r = json.loads((tmp_path / "r.json").read_text())
    files = list((run / "eval").glob("samples_digits_30_*.npz"))
    assert len(files) == 1 and not list((run / "eval").glob("*.parts"))
    with np.load(files[0]) as z:
        assert z["arr_0"].shape == (30, 8, 8, 1) and (z["arr_1"] == np.arange(30) % 10).all()
    assert set(r["metrics"]) == {"fd_digits", "acc_digits"}
    card = r["protocol"]
    assert card["checkpoint_sha256"] and card["weights"] == "ema" and Path(card["samples_file"]).resolve() == files[0]
    mtime = files[0].stat().st_mtime_ns
    code, _, err = _invoke_main(["fid", str(run), "--num-samples", "30", "--json", "r2.json"])
    assert code == 0, err
    assert files[0].stat().st_mtime_ns == mtime  # the kept samples were reused, not redrawn
    assert json.loads((tmp_path / "r2.json").read_text())["metrics"] == r["metrics"]


def _tiny_run(tmp_path: Path) -> Path:
    from uvit_cli.build import build_model
    from uvit_cli.checkpoint import save_weights
    from uvit_cli.recipe import dump_recipe
    from uvit_cli.run import RUN_EMA, write_recipe

    recipe = _digits_recipe(steps=3)
    run = tmp_path / "runs" / "00000-digits-U-ViT-Tiny2"
    run.mkdir(parents=True)
    write_recipe(run, recipe)
    torch.manual_seed(0)
    save_weights(run / RUN_EMA, build_model(recipe).state_dict(), dump_recipe(recipe), kind="ema")
    return run


def test_uvit_fid_sweep_scores_each_value_as_its_own_run_would(tmp_path, monkeypatch, classifier):
    run = _tiny_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out, err = _invoke_main(["fid", str(run), "-n", "20", "--sweep", "sample.cfg_scale=1,3", "--json",
                                   "sweep.json"])
    assert code == 0, err + out
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert doc["sweep"] == "sample.cfg_scale" and doc["values"] == [1, 3]
    assert [r["protocol"]["guidance_w"] for r in doc["results"]] == [1.0, 3.0]
    files = sorted((run / "eval").glob("samples_digits_20_*.npz"))
    assert len(files) == 2   # one kept sample set per value
    with np.load(files[0]) as a, np.load(files[1]) as b:
        assert not np.array_equal(a["arr_0"], b["arr_0"])   # guidance changed the images
    assert doc["results"][0]["metrics"] != doc["results"][1]["metrics"]
    png = tmp_path / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Scoring one value alone reuses that value's samples and gives the sweep's numbers.
    stamps = {f: f.stat().st_mtime_ns for f in files}
    code, _, err = _invoke_main(["fid", str(run), "-n", "20", "--set", "sample.cfg_scale=3", "--json", "one.json"])
    assert code == 0, err
    assert json.loads((tmp_path / "one.json").read_text())["metrics"] == doc["results"][1]["metrics"]
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    # Without --json the figure goes beside the run's samples; list values sweep too.
    code, out, err = _invoke_main(["fid", str(run), "-n", "10", "--sweep",
                                   "sample.guidance_interval=[0,1],[0.3,0.7]"])
    assert code == 0, err + out
    assert (run / "eval" / "sweep_guidance_interval.png").is_file()


@pytest.mark.parametrize("args, match", [
    (["--sweep", "sample.steps=3,0"], "sample.steps: must be positive"),       # refused before any sampling
    (["--sweep", "train.lr=1,2"], "only sampling settings sweep"),
    (["--sweep", "sample.cfg=1,2"], "did you mean 'cfg_scale'"),
    (["--sweep", "sample.cfg_scale=2"], "at least two values"),
    (["--sweep", "sample.cfg_scale=1,2", "--samples-out", "{tmp}/s.npz"], "a sweep samples once per value"),
])
def test_uvit_fid_sweep_refuses_bad_input_before_sampling(tmp_path, monkeypatch, args, match):
    run = _tiny_run(tmp_path)
    code, out, err = _invoke_main(["fid", str(run), "-n", "4", *[a.format(tmp=tmp_path) for a in args]])
    assert code != 0 and match in err + out, err + out
    assert "Traceback" not in err
    assert not (run / "eval").exists()


def test_uvit_fid_sweep_needs_a_model(tmp_path, digits):
    np.savez(tmp_path / "s.npz", digits[0][:10, :, :, None])
    code, out, err = _invoke_main(["fid", str(tmp_path / "s.npz"), "--sweep", "sample.cfg_scale=1,2"])
    assert code != 0 and "holds images already" in err + out


def test_sweep_best_values_respect_each_metric_direction():
    from uvit_cli.metrics.sweep import best_values

    results = [{"metrics": {"fd_digits": 5.0, "acc_digits": 0.90}}, {"metrics": {"fd_digits": 4.0, "acc_digits": 0.99}},
               {"metrics": {"fd_digits": 4.0, "acc_digits": 0.95}}]
    assert best_values("sample.cfg_scale", [1, 2, 3], results) == {"fd_digits": 2, "acc_digits": 2}
    results[2]["metrics"]["acc_digits"] = 0.999
    assert best_values("sample.cfg_scale", [1, 2, 3], results) == {"fd_digits": 2, "acc_digits": 3}
