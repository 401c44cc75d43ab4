"""Run directories: numbered names, the latest run, resume rules and metrics.jsonl truncation on resume."""

from __future__ import annotations

import json

import pytest

from uvit_cli.errors import UvitError
from uvit_cli.recipe import load_recipe, replace
from uvit_cli.run import (METRICS, MetricsLog, check_resume_compatible, latest_run, new_run_dir, read_metrics,
                          recipe_differences, run_name, write_recipe)


def test_run_dirs_are_numbered_after_the_highest_existing_one(tmp_path):
    r = load_recipe("digits_uvit_tiny")
    assert run_name(r, 3) == "00003-digits-U-ViT-Tiny2"
    assert new_run_dir(tmp_path / "none", r).name.startswith("00000-")
    (tmp_path / "00000-x").mkdir()
    (tmp_path / "00007-y").mkdir()
    (tmp_path / "notes").mkdir()
    assert new_run_dir(tmp_path, r).name.startswith("00008-")


def test_latest_run_holds_a_recipe_and_matches_the_name(tmp_path):
    r = load_recipe("digits_uvit_tiny")
    other = replace(r, name="other")
    for i, rec in ((1, r), (2, other)):
        d = tmp_path / run_name(rec, i)
        d.mkdir()
        write_recipe(d, rec)
    (tmp_path / "00009-empty").mkdir()               # no recipe: not a run
    assert latest_run(tmp_path).name.startswith("00002-")
    assert latest_run(tmp_path, "digits").name.startswith("00001-")
    assert latest_run(tmp_path / "missing") is None


def test_resume_allows_length_and_intervals_but_not_the_model(tmp_path):
    r = load_recipe("digits_uvit_tiny")
    check_resume_compatible(r, replace(r, train={"steps": 9000, "log_every": 3}, sample={"steps": 5}), tmp_path)
    # a run that ran out of memory resumes with activation checkpointing (the same gradients)
    check_resume_compatible(r, replace(r, model={"grad_checkpoint": True, "checkpoint_policy": "mlp"}), tmp_path)
    assert recipe_differences(r, replace(r, model={"embed_dim": 64})) == ["model.embed_dim"]
    with pytest.raises(UvitError, match="model.embed_dim"):
        check_resume_compatible(r, replace(r, model={"embed_dim": 64}), tmp_path)


def test_metrics_log_drops_lines_past_the_resumed_step(tmp_path):
    log = MetricsLog(tmp_path)
    for step in (10, 20, 30, 40):
        log.write({"step": step, "loss": step / 10})
    (tmp_path / METRICS).open("a").write("not json\n")     # a torn last line of a killed run
    MetricsLog(tmp_path, resume_step=20).write({"step": 30, "loss": 9.0})
    rows = read_metrics(tmp_path)
    assert [(m["step"], m["loss"]) for m in rows] == [(10, 1.0), (20, 2.0), (30, 9.0)]
    assert all(json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines())


def test_a_resume_with_changed_settings_is_recorded_as_an_amendment(tmp_path):
    from uvit_cli.run import amend_recipe, read_amendments

    r = load_recipe("digits_uvit_tiny")
    assert amend_recipe(tmp_path, r, 0) == [] and read_amendments(tmp_path) == []
    longer = replace(r, train={"steps": 5000}, sample={"steps": 10})
    assert amend_recipe(tmp_path, longer, 600) == ["train.steps", "sample.steps"]
    rows = read_amendments(tmp_path)
    assert [(a["step"], a["key"], a["from"], a["to"]) for a in rows] == [(600, "train.steps", 3000, 5000),
                                                                        (600, "sample.steps", 25, 10)]
    assert load_recipe(tmp_path / "recipe.yaml") == longer
