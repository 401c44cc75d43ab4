"""The sampling bars of `uvit sample` and `uvit fid RUN` move while a chunk is drawn (counted from the network
evaluations, not only at chunk ends) and show a rate and an ETA."""

from __future__ import annotations

import pytest

TINY = ["model.num_layers=3", "model.embed_dim=32", "model.num_heads=2", "train.batch_size=32",
        "train.sample_every=0", "train.log_every=1", "train.warmup_steps=1", "data.num_workers=0", "train.steps=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from uvit_cli.recipe import load_recipe
    from uvit_cli.train import train

    run = tmp_path_factory.mktemp("progress") / "run"
    train(load_recipe("digits_uvit_tiny", TINY), run, device="cpu")
    return run


def _recording_bars(monkeypatch, module):
    """Replace ``module.progress_bar`` by the real bar whose updates are recorded as (task description,
    completed, total, speed, time remaining) after each update."""
    from uvit_cli.cli import progress

    seen = []

    def bar(*args, **kw):
        p = progress.progress_bar(*args, **kw)
        update = p.update

        def recorded(task_id, **fields):
            update(task_id, **fields)
            t = p._tasks[task_id]
            seen.append((t.description, t.completed, t.total, t.speed, t.time_remaining))

        p.update = recorded
        return p

    monkeypatch.setattr(module, "progress_bar", bar)
    return seen


@pytest.mark.parametrize("command", ["fid", "sample"])
def test_the_sampling_bar_moves_within_a_chunk_and_shows_rate_and_eta(command, run, tmp_path, monkeypatch, uvit):
    import importlib

    module = importlib.import_module(f"uvit_cli.cli.{command}")
    seen = _recording_bars(monkeypatch, module)
    n = 32                                                     # two chunks of 16
    if command == "fid":
        args = ["fid", run, "-n", n, "--set", "sample.steps=200", "--samples-out", tmp_path / "s.npz"]
        task = "sampling"
    else:
        args = ["sample", run, "--n", n, "--steps", 200, "--npz", tmp_path / "s.npz"]
        task = "sample"
    res = uvit(*args, "--device", "cpu")
    assert res.returncode == 0, res.output

    mine = [s for s in seen if s[0] == task]
    assert mine and mine[-1][1:3] == (n, n), mine[-1:]
    assert any(0 < s[1] < n and s[1] % 16 for s in mine), [s[1] for s in mine]   # moved within a chunk
    assert any(s[3] and s[4] is not None for s in mine if s[1] < n), mine          # a rate and an ETA before the end
