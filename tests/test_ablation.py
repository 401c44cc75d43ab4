"""`uvit ablate`: a two-variant suite end to end (results, figures, table), resume and --only, exact continuation of
an interrupted variant, clear errors for bad suites, and every shipped suite's variants as valid recipes."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from uvit_cli.ablation import SuiteError, load_suite, shipped_suites, variant_recipes
from uvit_cli.ablation.report import advantage, check_claim, verdict
from uvit_cli.ablation.suite import Claim, suite_from_dict
from uvit_cli.checkpoint import list_states, load_weights
from uvit_cli.cli import main

# A tiny model, a tiny batch, a short sampler and few monitor samples: each variant trains in about a second.
TINY = {"model.num_layers": 3, "model.embed_dim": 32, "model.num_heads": 2, "model.num_classes": 0,
        "model.null_class": False, "train.p_uncond": 0.0, "train.batch_size": 16, "train.warmup_steps": 2,
        "train.log_every": 1, "train.sample_every": 0, "train.save_every": 2, "sample.steps": 4,
        "sample.cfg_scale": 1.0, "eval.monitor_samples": 24, "data.num_workers": 0}


def suite_dict(**changes) -> dict:
    raw = {"name": "tiny", "base": "digits_uvit_tiny", "overrides": dict(TINY), "steps": 4, "eval_every": 2,
           "metric": "fd_digits", "lower_is_better": True, "metric_label": "FD (digits)",
           "variants": {"base": {}, "skip_none": {"model.skip": "none"}},
           "factors": {"long_skip": {"title": "Figure 2 (a): long skip", "finding": "concat is best",
                                     "variants": {"base": "concat (U-ViT)", "skip_none": "no long skip"},
                                     "claims": ["base > skip_none"]}}}
    raw.update(changes)
    return raw


def write_suite(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "suite.yml"
    path.write_text(yaml.safe_dump(suite_dict(**changes), sort_keys=False))
    return path


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["ablate", *map(str, argv)])
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and a busy CI machine makes extra OpenMP threads spin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mtimes(run_dir: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}


def test_two_variant_suite_writes_results_figure_and_table_then_resume_skips(tmp_path, capsys):
    suite, out = write_suite(tmp_path), tmp_path / "out"
    code, text = run([suite, "--out", out], capsys)
    assert code == 0, text

    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["variant"], r["step"]) for r in rows} == {("base", 2), ("base", 4), ("skip_none", 2), ("skip_none", 4)}
    for r in rows:
        assert r["factor"] == "long_skip" and r["metric"] == "fd_digits" and r["value"] == r["fd_digits"]
        assert math.isfinite(r["value"]) and r["value"] > 0 and r["eval_samples"] == 24
        assert r["wall_s"] > 0 and r["label"] in ("concat (U-ViT)", "no long skip")
    for v in ("base", "skip_none"):  # wall time accumulates along the run
        w = {r["step"]: r["wall_s"] for r in rows if r["variant"] == v}
        assert w[4] > w[2]
    # The variants really differ (same seed and data, different architecture) and each run kept its recipe.
    assert {r["value"] for r in rows if r["step"] == 4 and r["variant"] == "base"} != \
        {r["value"] for r in rows if r["step"] == 4 and r["variant"] == "skip_none"}
    assert yaml.safe_load((out / "runs/skip_none/recipe.yaml").read_text())["model"]["skip"] == "none"

    png = out / "figures" / "long_skip.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 300 and im.size[1] > 200

    table = (out / "results.md").read_text()
    values = {r["variant"]: r["value"] for r in rows if r["step"] == 4}
    best = min(values, key=values.get)
    assert "| 1 | `%s` |" % best in table and "| 2 | `%s` |" % max(values, key=values.get) in table
    holds = advantage(values["base"], values["skip_none"], True) > 0.05
    assert f"| `base > skip_none` | {values['base']:.4g} vs {values['skip_none']:.4g} |" in table
    assert f"**Reproduced at this scale:** {'reproduced' if holds else 'not reproduced'}" in table
    assert "![Figure 2 (a): long skip](figures/long_skip.png)" in table
    assert yaml.safe_load((out / "suite.yaml").read_text())["steps"] == 4

    # Again without --resume: refused. With --resume: both variants are skipped, nothing is retrained.
    code, text = run([suite, "--out", out], capsys)
    assert code == 2 and "--resume" in text
    before = {v: _mtimes(out / "runs" / v) for v in ("base", "skip_none")}
    metrics_before = (out / "runs/base/metrics.jsonl").read_text()
    code, text = run([suite, "--out", out, "--resume"], capsys)
    assert code == 0, text
    assert "skipped" in text
    assert {v: _mtimes(out / "runs" / v) for v in ("base", "skip_none")} == before
    assert (out / "runs/base/metrics.jsonl").read_text() == metrics_before

    # The report can be redrawn from the output directory alone.
    (out / "results.md").unlink()
    code, text = run([out, "--report-only"], capsys)
    assert code == 0, text
    assert (out / "results.md").read_text() == table


def test_only_filters_and_an_interrupted_variant_continues_exactly(tmp_path, capsys):
    suite = write_suite(tmp_path)
    full, cut = tmp_path / "full", tmp_path / "cut"
    code, text = run([suite, "--out", full, "--only", "skip_none"], capsys)
    assert code == 0, text
    assert sorted(p.name for p in (full / "runs").iterdir()) == ["skip_none"]
    assert {json.loads(ln)["variant"] for ln in (full / "results.jsonl").read_text().splitlines()} == {"skip_none"}
    assert "| — | `base` |" in (full / "results.md").read_text()  # not run yet: listed, unranked
    assert "**Reproduced at this scale:** incomplete" in (full / "results.md").read_text()

    # Stop the same variant half-way (as an interruption would), then resume it to the end.
    code, text = run([suite, "--out", cut, "--only", "long_skip", "--steps", "2"], capsys)
    assert code == 0, text
    assert [s for s, _ in list_states(cut / "runs/skip_none")] == [2]
    code, text = run([suite, "--out", cut, "--only", "skip_none", "--resume"], capsys)
    assert code == 0, text
    a, _ = load_weights(full / "runs/skip_none/ema.safetensors")
    b, _ = load_weights(cut / "runs/skip_none/ema.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    fa = [json.loads(ln) for ln in (full / "runs/skip_none/metrics.jsonl").read_text().splitlines()]
    fb = [json.loads(ln) for ln in (cut / "runs/skip_none/metrics.jsonl").read_text().splitlines()]
    key = "monitor/fd_digits"
    assert [(m["step"], m[key]) for m in fa if key in m] == [(m["step"], m[key]) for m in fb if key in m]

    code, text = run([suite, "--out", cut, "--only", "skip_nne"], capsys)
    assert code == 2 and "skip_nne" in text and "did you mean 'skip_none'" in text


@pytest.mark.parametrize("change, words", [
    ({"variants": {"base": {}, "skip_none": {"model.skipp": "none"}}}, ["skip_none", "model.skipp", "'skip'"]),
    ({"variants": {"base": {}, "skip_none": {"model.patch_size": 3}}}, ["skip_none", "model.patch_size"]),
    ({"variants": {"base": {}, "skip_none": {"model.skip": "sideways"}}}, ["skip_none", "model.skip", "concat_linear"]),
    ({"variants": {"base": {}, "skip_none": {"modle.skip": "none"}}}, ["skip_none", "modle", "'model'"]),
    ({"metric": "fid"}, ["metric 'fid'", "fd_digits"]),
    ({"metric": "acc_digits"}, ["acc_digits"]),   # unconditional samples have no class accuracy
    # an Inception suite whose reference is missing fails before training, not after it
    ({"metric": "fid", "overrides": {**TINY, "eval.mode": "pytorch_fid", "eval.ref": "missing_stats.npz"}},
     ["monitor cannot score variant 'base'", "missing_stats.npz"]),
])
def test_bad_variant_overlays_name_the_variant_and_the_key(tmp_path, capsys, change, words):
    code, text = run([write_suite(tmp_path, **change), "--out", tmp_path / "o"], capsys)
    assert code == 2
    for w in words:
        assert w in text, (w, text)
    assert not (tmp_path / "o" / "runs").exists()  # nothing trained before the suite was checked


@pytest.mark.parametrize("change, words", [
    ({"stepz": 3}, ["'stepz'", "did you mean 'steps'"]),
    ({"steps": 0}, ["steps", ">= 1"]),
    ({"base": "digits_uvit_tinny"}, ["base", "digits_uvit_tiny"]),
    ({"factors": {"long_skip": {"variants": {"base": "a", "skip_non": "b"}}}}, ["skip_non", "did you mean 'skip_none'"]),
    ({"factors": {"long_skip": {"variants": ["base"]}}}, ["skip_none", "belong to no factor"]),
    ({"factors": {"long_skip": {"variants": ["base", "skip_none"], "claims": ["base better skip_none"]}}},
     ["A > B"]),
    ({"factors": {"long_skip": {"variants": ["base", "skip_none"], "claims": ["base > conv_none"]}}},
     ["conv_none", "not a variant of this factor"]),
    ({"variants": {"base": {}, "skip none": {}}}, ["'skip none'", "directory"]),
])
def test_bad_suites_give_clear_errors(tmp_path, change, words):
    with pytest.raises(SuiteError) as e:
        load_suite(write_suite(tmp_path, **change))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_claims_and_verdicts():
    s = suite_from_dict(suite_dict())
    c = Claim("base", ">", "skip_none")
    assert check_claim(c, {"base": 10.0, "skip_none": 12.0}, s).holds           # 17 % better
    assert not check_claim(c, {"base": 10.0, "skip_none": 10.3}, s).holds       # within the 5 % tolerance
    assert check_claim(Claim("base", "~", "skip_none"), {"base": 10.0, "skip_none": 10.3}, s).holds
    assert check_claim(Claim("base", ">=", "skip_none"), {"base": 10.3, "skip_none": 10.0}, s).holds
    assert not check_claim(Claim("base", ">=", "skip_none"), {"base": 12.0, "skip_none": 10.0}, s).holds
    assert check_claim(c, {"base": 10.0}, s).holds is None
    higher = suite_from_dict(suite_dict(lower_is_better=False))
    assert not check_claim(c, {"base": 10.0, "skip_none": 12.0}, higher).holds
    checks = [check_claim(c, {"base": 1.0, "skip_none": 2.0}, s), check_claim(c, {"base": 2.0, "skip_none": 1.0}, s)]
    assert verdict(checks[:1]) == "reproduced" and verdict(checks[1:]) == "not reproduced"
    assert verdict(checks) == "partly (1 of 2 claims)" and verdict([check_claim(c, {}, s)]) == "incomplete"


def test_every_shipped_suite_resolves_to_valid_recipes():
    paths = {p.stem: p for p in shipped_suites()}
    assert {"digits_fig2", "digits_scaling", "cifar10_fig2", "cifar10_scaling"} <= set(paths)
    from uvit_cli.build import build_model

    for name, path in paths.items():
        suite = load_suite(path)
        recipes = variant_recipes(suite)
        assert set(recipes) == set(suite.variants)
        for variant, r in recipes.items():
            assert r.train.steps == suite.steps and r.train.eval_every == suite.eval_every
            assert r.train.seed == recipes["base"].train.seed  # one seed, so one data order, for every variant
            with torch.device("meta"):
                build_model(r)
        for f in suite.factors.values():
            assert f.claims and "base" in f.labels, (name, f.name)
        if name.startswith("cifar10"):  # the paper's protocol: U-ViT-S/2, FID on 10K samples every 50K iterations
            base = recipes["base"]
            assert (base.model.num_layers, base.model.embed_dim, base.model.patch_size) == (13, 512, 2)
            assert base.eval.monitor_samples == 10_000 and suite.eval_every == 50_000 and suite.metric == "fid"
            assert base.data.name == "cifar10" and base.conditioning == "none"
    scaling = variant_recipes(load_suite(paths["cifar10_scaling"]))
    assert sorted(r.model.num_layers for n, r in scaling.items() if n.startswith("depth") or n == "base") == [9, 13, 17]
    assert sorted(r.model.embed_dim for n, r in scaling.items() if n.startswith("width") or n == "base") == \
        [256, 512, 768]
    assert sorted(r.model.patch_size for n, r in scaling.items() if n.startswith("patch") or n == "base") == \
        [1, 2, 4, 8]


def test_dry_run_lists_variants_without_training(tmp_path, capsys):
    code, text = run(["digits_fig2", "--dry-run", "--out", tmp_path / "o"], capsys)
    assert code == 0, text
    for v in ("skip_linear_sum", "time_adaln", "pos_none", "model.skip=none"):
        assert v in text
    assert not (tmp_path / "o").exists()


def test_seeds_and_nfe_evaluations_end_to_end(tmp_path, capsys):
    """``seeds: 2`` trains each variant twice (train.seed + 0, + 1) into its own run; ``eval_steps`` scores the final
    weights at each sampler step count (the recipe's own count reuses the monitor's value); the report shows mean +-
    sd, judges claims by the spread, and has one column per NFE; a later eval_steps entry is added on --resume
    without retraining."""
    import numpy as np
    from scipy.stats import t as student

    suite, out = write_suite(tmp_path, seeds=2, eval_steps=[2, 4]), tmp_path / "out"
    code, text = run([suite, "--out", out], capsys)
    assert code == 0, text
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["base", "base+seed1", "skip_none", "skip_none+seed1"]
    seeds = {n: yaml.safe_load((out / "runs" / n / "recipe.yaml").read_text())["train"]["seed"] for n in runs}
    assert seeds["base+seed1"] == seeds["base"] + 1 and seeds["skip_none+seed1"] == seeds["skip_none"] + 1

    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    main = [r for r in rows if "sampler_steps" not in r]
    nfe = [r for r in rows if "sampler_steps" in r]
    assert {(r["variant"], r["seed"], r["step"]) for r in main} == \
        {(v, k, s) for v in ("base", "skip_none") for k in (0, 1) for s in (2, 4)}
    assert {(r["variant"], r["seed"], r["sampler_steps"], r["nfe"]) for r in nfe} == \
        {(v, k, s, s) for v in ("base", "skip_none") for k in (0, 1) for s in (2, 4)}  # dpm_solver fast: NFE = steps
    value = {(r["variant"], r["seed"]): r["value"] for r in main if r["step"] == 4}
    for r in nfe:  # 4 steps is the recipe's own count: the monitor's value
        if r["sampler_steps"] == 4:
            assert r["value"] == value[(r["variant"], r["seed"])]
    assert value[("base", 0)] != value[("base", 1)]  # another seed, another model

    table = (out / "results.md").read_text()
    mean = {v: np.mean([value[(v, k)] for k in (0, 1)]) for v in ("base", "skip_none")}
    sd = {v: np.std([value[(v, k)] for k in (0, 1)], ddof=1) for v in ("base", "skip_none")}
    assert f"{mean['base']:.4g} ± {sd['base']:.2g}" in table and "t-test" in table
    margin = student.ppf(0.975, 2) * np.sqrt((sd["base"] ** 2 + sd["skip_none"] ** 2) / 2)
    holds = mean["skip_none"] - mean["base"] > margin
    assert (f"| `base > skip_none` | {mean['base']:.4g} ± {sd['base']:.2g} vs "
            f"{mean['skip_none']:.4g} ± {sd['skip_none']:.2g} |") in table
    assert f"**Reproduced at this scale:** {'reproduced' if holds else 'not reproduced'}" in table
    assert "| variant | NFE 2 | NFE 4 |" in table
    assert (out / "figures" / "long_skip_nfe.png").read_bytes()[:4] == b"\x89PNG"

    # A new NFE on --resume: evaluated from the kept weights, nothing retrained.
    before = {n: _mtimes(out / "runs" / n) for n in runs}
    suite3 = write_suite(tmp_path, seeds=2, eval_steps=[2, 3, 4])
    code, text = run([suite3, "--out", out, "--resume"], capsys)
    assert code == 0, text
    assert {n: _mtimes(out / "runs" / n) for n in runs} == before
    rows = [json.loads(ln) for ln in (out / "results.jsonl").read_text().splitlines()]
    assert {r["sampler_steps"] for r in rows if "sampler_steps" in r} == {2, 3, 4}
    assert "| variant | NFE 2 | NFE 3 | NFE 4 |" in (out / "results.md").read_text()


def test_claims_with_seeds_use_the_spread_of_the_means():
    from uvit_cli.ablation.report import Stat, spread_margin

    s = suite_from_dict(suite_dict(seeds=3))
    c = Claim("base", ">", "skip_none")
    noisy = {"base": Stat(10.0, 0.5, 3), "skip_none": Stat(11.0, 0.5, 3)}     # 9 % better, but noisy seeds
    tight = {"base": Stat(10.0, 0.2, 3), "skip_none": Stat(11.0, 0.2, 3)}
    assert spread_margin(noisy["base"], noisy["skip_none"]) == pytest.approx(2.776 * (0.5 / 3) ** 0.5, rel=1e-3)
    assert not check_claim(c, noisy, s).holds and check_claim(Claim("base", "~", "skip_none"), noisy, s).holds
    assert check_claim(c, tight, s).holds                   # the same gap clears a small spread
    one_seed = check_claim(c, {"base": 10.0, "skip_none": 11.0}, s)   # plain values: the fixed tie tolerance
    assert one_seed.holds and one_seed.margin == s.tie_tolerance


def test_dry_run_prints_the_command_and_the_trainings(tmp_path, capsys):
    code, text = run(["digits_long_skip_13", "--dry-run", "--out", tmp_path / "o", "--seeds", "2"], capsys)
    assert code == 0, text
    assert "5 variants x 2 seed(s) = 10 trainings" in text
    assert f"uvit ablate digits_long_skip_13 --out {tmp_path / 'o'} --seeds 2" in text
    assert not (tmp_path / "o").exists()
