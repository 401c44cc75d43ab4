"""Training: the loss falls, exact resume after a real kill -9, DDP equals one process, accumulation, bad input."""

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from uvit_cli.checkpoint import list_states, load_latest_state
from uvit_cli.errors import UvitError
from uvit_cli.recipe import load_recipe
from uvit_cli.run import read_metrics
from uvit_cli.train import train

TINY = ["model.num_layers=3", "model.embed_dim=32", "model.num_heads=2", "train.batch_size=32",
        "train.sample_every=0", "train.log_every=1", "train.warmup_steps=5", "data.num_workers=0"]


def tiny_recipe(*extra):
    return load_recipe("digits_uvit_tiny", TINY + list(extra))


def _env():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _uvit(*args, **kw):
    return subprocess.run([sys.executable, "-m", "uvit_cli", *args], capture_output=True, text=True, env=_env(), **kw)


def _state(run_dir):
    state, _ = load_latest_state(run_dir)
    return state


def _assert_same_state(a, b, atol=0.0):
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], atol=atol, rtol=0, msg=f"{key}.{k}")
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(pa[k], pb[k], atol=atol, rtol=0)


def test_loss_falls_clearly_on_digits(tmp_path):
    """A much shorter version of the README's main job: the loss falls clearly and the run dir is complete."""
    r = load_recipe("digits_uvit_tiny", ["train.steps=150", "train.batch_size=64", "train.log_every=10",
                                         "train.save_every=150", "train.sample_every=150", "sample.steps=5"])
    train(r, tmp_path, device="cpu")
    losses = [m["loss"] for m in read_metrics(tmp_path)]
    assert len(losses) == 15
    assert losses[-1] < 0.6 * losses[0], losses
    for name in ("recipe.yaml", "metrics.jsonl", "ema.safetensors", "model.safetensors",
                 "samples/step-00000150.png"):
        assert (tmp_path / name).exists(), name
    assert load_recipe(tmp_path / "recipe.yaml") == r
    rec = read_metrics(tmp_path)[-1]
    assert {"lr", "grad_norm", "img_per_s", "peak_mem_gb", "data_frac"} <= set(rec)


def test_the_log_shows_the_share_of_time_spent_waiting_for_data(tmp_path, monkeypatch):
    """data_frac is the share of a logged window spent fetching batches: near 1 behind a slow stream, small otherwise."""
    from uvit_cli.data.stream import TrainStream

    fast = tiny_recipe("train.steps=6", "train.log_every=3", "train.save_every=6")
    train(fast, tmp_path / "fast", device="cpu")
    quick = [m["data_frac"] for m in read_metrics(tmp_path / "fast") if "loss" in m]

    example = TrainStream._example

    def slow(self, g, gen):   # 32 samples x 20 ms: a batch takes 0.64 s, far more than the tiny model's step
        time.sleep(0.02)
        return example(self, g, gen)

    monkeypatch.setattr(TrainStream, "_example", slow)
    train(fast, tmp_path / "slow", device="cpu")
    starved = [m["data_frac"] for m in read_metrics(tmp_path / "slow") if "loss" in m]
    assert len(quick) == len(starved) == 2
    assert all(0.75 < f <= 1 for f in starved), starved
    assert all(0 <= f < 0.5 for f in quick), quick


def test_resume_after_kill_is_bit_exact(tmp_path):
    """N steps straight == N/2 steps, kill -9, resume: weights, EMA, optimizer state and losses bit for bit."""
    n = 40
    common = ["digits_uvit_tiny", *sum((["--set", s] for s in TINY), []), "--set", f"train.steps={n}",
              "--set", "train.save_every=10", "--device", "cpu"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    res = _uvit("train", *common, "--run-dir", str(straight))
    assert res.returncode == 0, res.stderr

    proc = subprocess.Popen([sys.executable, "-m", "uvit_cli", "train", *common, "--run-dir", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 120
    while time.time() < deadline and not any(s >= 20 for s, _ in list_states(killed)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = max(s for s, _ in list_states(killed))
    assert stopped_at < n, "the run finished before it could be killed"
    res = _uvit("train", *common, "--run-dir", str(killed))
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stderr

    _assert_same_state(_state(straight), _state(killed))
    la = [(m["step"], m["loss"]) for m in read_metrics(straight)]
    lb = [(m["step"], m["loss"]) for m in read_metrics(killed)]
    assert la == lb and len(la) == n


def test_ctrl_c_keeps_a_checkpoint_of_the_current_step_and_resumes_to_the_same_weights(tmp_path):
    """SIGINT mid-run: a checkpoint of that step (no save was due), exit 130 with the resume command; the resumed
    run ends bit for bit where an uninterrupted one does."""
    n = 30
    common = ["digits_uvit_tiny", *sum((["--set", s] for s in TINY), []), "--set", f"train.steps={n}",
              "--set", "train.save_every=1000", "--device", "cpu"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert _uvit("train", *common, "--run-dir", str(straight)).returncode == 0

    proc = subprocess.Popen([sys.executable, "-m", "uvit_cli", "train", *common, "--run-dir", str(stopped)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 120
    while time.time() < deadline and not any(m["step"] >= 8 for m in read_metrics(stopped)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    states = list_states(stopped)
    assert len(states) == 1 and 8 <= states[0][0] < n
    assert f"at step {states[0][0]} of {n}" in err and f"--run-dir {stopped}" in err and "Traceback" not in err

    res = _uvit("train", *common, "--run-dir", str(stopped))
    assert res.returncode == 0 and "resumed from" in res.stderr, res.stderr
    _assert_same_state(_state(straight), _state(stopped))


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path, caplog):
    r = tiny_recipe("train.steps=20", "train.save_every=10")
    train(r, tmp_path, device="cpu")
    newest = list_states(tmp_path)[-1][1]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    state, path = load_latest_state(tmp_path)
    assert state["step"] == 10 and path != newest
    assert "unreadable" in caplog.text


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny_recipe("train.steps=2"), a, device="cpu")
    train(tiny_recipe("train.steps=2", "train.grad_accum=4"), b, device="cpu")
    _assert_same_state(_state(a), _state(b), atol=1e-6)


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_the_global_batch(tmp_path):
    """One step of 2 gloo ranks with batch b each equals one step of 1 rank with batch 2b (within 1e-6)."""
    sets = sum((["--set", s] for s in TINY), []) + ["--set", "train.steps=1", "--set", "train.save_every=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    res = _uvit("train", "digits_uvit_tiny", *sets, "--run-dir", str(one), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "uvit_cli", "train", "digits_uvit_tiny", *sets, "--run-dir", str(two),
                          "--device", "cpu"], capture_output=True, text=True, env=_env())
    assert res.returncode == 0, res.stderr
    sa, sb = _state(one), _state(two)
    assert sb["world_size"] == 2 and len(sb["rng"]) == 2
    _assert_same_state(sa, sb, atol=1e-6)


def test_refuses_batch_that_does_not_split(tmp_path):
    r = tiny_recipe("train.steps=1", "train.batch_size=30", "train.grad_accum=3")
    with pytest.raises(UvitError, match="does not split"):
        import uvit_cli.distributed as d

        orig = d.world_size
        d.world_size = lambda: 4
        try:
            train(r, tmp_path, device="cpu")
        finally:
            d.world_size = orig


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import uvit_cli.train as T

    r = tiny_recipe("train.steps=20", "train.save_every=5", "train.log_every=5")
    real = T.build_schedule
    calls = {"n": 0}

    def poisoned_schedule(recipe):
        schedule = real(recipe)
        loss = schedule.loss

        def poisoned(*args):
            calls["n"] += 1
            out = loss(*args)
            return out * float("nan") if calls["n"] > 7 else out

        schedule.loss = poisoned
        return schedule

    monkeypatch.setattr(T, "build_schedule", poisoned_schedule)
    with pytest.raises(UvitError, match="NaN or inf"):
        train(r, tmp_path, device="cpu")
    assert [s for s, _ in list_states(tmp_path)] == [5]
    state = _state(tmp_path)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_cli_dry_run_and_resume_rules(tmp_path, uvit):
    run = tmp_path / "run"
    res = uvit("train", "digits_uvit_tiny", "--dry-run", "--run-dir", str(run))
    assert res.returncode == 0, res.stderr
    assert "1,489,038 parameters" in res.stdout and "1,797 examples" in res.stdout and "10 classes" in res.stdout
    assert not run.exists()
    res = uvit("train", "digits_uvit_tiny", *sum((["--set", s] for s in TINY), []), "--set", "train.steps=2",
                "--set", "train.save_every=1", "--run-dir", str(run))
    assert res.returncode == 0, res.stderr
    res = uvit("train", "digits_uvit_tiny", "--no-resume", "--run-dir", str(run))
    assert res.returncode == 2 and "already holds checkpoints" in res.stderr
    res = uvit("train", "digits_uvit_tiny", *sum((["--set", s] for s in TINY), []), "--set", "train.steps=1",
               "--run-dir", str(run))
    assert res.returncode == 2 and "already at step 2" in res.stderr
    assert load_recipe(run / "recipe.yaml").train.steps == 2          # the record is untouched
    res = uvit("train", "digits_uvit_tiny", *sum((["--set", s] for s in TINY), []), "--set", "train.lr=0.5",
                "--run-dir", str(run))
    assert res.returncode == 2 and "train.lr" in res.stderr and "different recipe" in res.stderr


def test_model_that_does_not_fit_the_data_fails_before_training(tmp_path, uvit):
    from PIL import Image

    folder = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (folder / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (i * 50, 0, 0)).save(folder / c / f"{i}.png")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  img_size: 16\n  patch_size: 4\n  embed_dim: 32\n  num_heads: 2\n  num_layers: 3\n"
                      f"  num_classes: 5\ndata:\n  name: folder\n  source: {folder}\n  crop: none\n")
    res = uvit("train", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert res.returncode == 2 and "2 classes but model.num_classes is 5" in res.stderr
    res = uvit("train", str(recipe), "--set", "model.num_classes=2", "--set", "model.img_size=32",
                "--run-dir", str(tmp_path / "run"))
    assert res.returncode == 2 and "does not match the model's 32x32" in res.stderr
    res = uvit("train", str(recipe), "--set", f"data.source={tmp_path / 'nope'}", "--run-dir", str(tmp_path / "r"))
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_monitor_metric_is_logged_with_its_protocol(tmp_path):
    """eval_every runs the digits monitor on the EMA model and labels it as a monitor with its protocol card."""
    r = tiny_recipe("train.steps=4", "train.save_every=4", "train.eval_every=2", "eval.monitor_samples=20",
                    "sample.steps=3")
    train(r, tmp_path, device="cpu")
    recs = [m for m in read_metrics(tmp_path) if "monitor/fd_digits" in m]
    assert [m["step"] for m in recs] == [2, 4]
    assert all(m["monitor/fd_digits"] > 0 and 0 <= m["monitor/acc_digits"] <= 1 for m in recs)
    card = recs[0]["monitor_protocol"]
    assert card["count"] == 20 and card["guidance_w"] == r.sample.cfg_scale and "NOT comparable" in card["pipeline"]


def test_ema_update_and_warmup():
    from uvit_cli.train import ema_rate, update_ema

    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    want = {k: 0.9 * a.state_dict()[k] + 0.1 * b.state_dict()[k] for k in a.state_dict()}
    update_ema(a, b, 0.9)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, want[k])
    assert ema_rate(0.9999, 0, warmup=False) == 0.9999            # official: constant from step 0
    assert ema_rate(0.9999, 0, warmup=True) == pytest.approx(0.1)  # warmed up: the init is forgotten fast
    assert ema_rate(0.999, 10_000, warmup=True) == 0.999


def test_multi_node_options_pass_through_to_torchrun(tmp_path, monkeypatch, uvit):
    """uvit train --nnodes N --node-rank R --master-addr HOST re-runs itself under torchrun with a static rendezvous
    at HOST (the argv is captured, nothing is launched); one node stays --standalone."""
    import uvit_cli.distributed as D

    launched = []
    monkeypatch.setattr(D.subprocess, "call", lambda cmd: launched.append(cmd) or 0)
    run = tmp_path / "run"
    args = ["train", "digits_uvit_tiny", "--nproc-per-node", "8", "--nnodes", "4", "--node-rank=2",
            "--master-addr", "node0.cluster", "--master-port", "29555", "--run-dir", str(run), "--set",
            "train.steps=3"]
    monkeypatch.setattr(sys, "argv", ["uvit", *args])
    assert uvit(*args).returncode == 0
    cmd = launched[-1]
    i = cmd.index("uvit_cli") - 1          # torchrun's own options end at `-m uvit_cli`
    assert cmd[i - 10:i] == ["--nproc-per-node", "8", "--nnodes", "4", "--node-rank", "2", "--master-addr",
                             "node0.cluster", "--master-port", "29555"]
    assert cmd[i:] == ["-m", "uvit_cli", "train", "digits_uvit_tiny", "--run-dir", str(run), "--set", "train.steps=3"]
    assert "--standalone" not in cmd

    # one node: standalone, and a new run directory chosen once for every rank
    args = ["train", "digits_uvit_tiny", "--nproc-per-node", "2", "--runs", str(tmp_path / "runs")]
    monkeypatch.setattr(sys, "argv", ["uvit", *args])
    assert uvit(*args).returncode == 0
    cmd = launched[-1]
    assert cmd[cmd.index("--nnodes"):cmd.index("uvit_cli") - 1] == ["--nnodes", "1", "--standalone"]
    assert cmd[-2:] == ["--run-dir", str(tmp_path / "runs" / "00000-digits-U-ViT-Tiny2")]

    # the mistakes: several nodes without a shared run directory, without node 0's address, a rank out of range
    for bad, msg in ((["--nnodes", "2", "--master-addr", "h"], "pass --run-dir"),
                     (["--nnodes", "2", "--run-dir", str(run)], "needs --master-addr"),
                     (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h", "--run-dir", str(run)],
                      "node ranks are 0..1")):
        args = ["train", "digits_uvit_tiny", *bad]
        monkeypatch.setattr(sys, "argv", ["uvit", *args])
        res = uvit(*args)
        assert res.returncode == 2 and msg in res.stderr, res.stderr
    assert len(launched) == 2


@pytest.mark.parametrize("extra", [
    ["diffusion.formulation=flow", "train.time_sampling=logit_normal", "train.loss_weighting=min_snr"],
    ["diffusion.prediction=v", "train.loss_weighting=min_snr"],
], ids=["flow-logit-normal-min-snr", "vp-v-min-snr"])
def test_new_objectives_learn_and_resume_exactly(tmp_path, extra):
    """Flow matching with logit-normal times and Min-SNR weights (and v-prediction) train through the same loop:
    the loss falls, and a run stopped at step 3 and resumed equals the uninterrupted one bit for bit (the time
    draw is still a function of the stream position alone)."""
    full = tiny_recipe("train.steps=25", "train.log_every=5", "train.save_every=25", *extra)
    train(full, tmp_path / "full", device="cpu")
    losses = [m["loss"] for m in read_metrics(tmp_path / "full") if "loss" in m]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0], losses
    train(tiny_recipe("train.steps=3", "train.save_every=3", *extra), tmp_path / "cut", device="cpu")
    train(tiny_recipe("train.steps=6", "train.save_every=3", *extra), tmp_path / "cut", device="cpu")
    ref = tiny_recipe("train.steps=6", "train.save_every=3", *extra)
    train(ref, tmp_path / "ref", device="cpu")
    _assert_same_state(_state(tmp_path / "cut"), _state(tmp_path / "ref"))


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_lr_decay_follows_its_curve_and_resumes_exactly(tmp_path, decay):
    """train.lr_decay: the logged LR rises over the warm-up, then falls along the cosine / line to lr * lr_final at
    the last step; a run cut mid-decay and resumed equals the uninterrupted one bit for bit (the scheduler state
    travels with the checkpoint)."""
    steps, warm, lr, final = 20, 5, 1e-3, 0.1
    opts = [f"train.steps={steps}", f"train.lr={lr}", f"train.lr_decay={decay}", f"train.lr_final={final}",
            f"train.save_every={steps}"]
    train(tiny_recipe(*opts), tmp_path / "full", device="cpu")
    logged = {m["step"]: m["lr"] for m in read_metrics(tmp_path / "full") if "lr" in m}
    for step, value in logged.items():
        k = step - 1                                    # the LR used by step k + 1 (the first step is k = 0)
        u = max(k - warm, 0) / (steps - warm)
        shape = 0.5 * (1 + math.cos(math.pi * u)) if decay == "cosine" else 1 - u
        want = lr * k / warm if k < warm else lr * (final + (1 - final) * shape)
        assert value == pytest.approx(want, rel=1e-6, abs=1e-12), (step, value, want)
    late = [logged[s] for s in sorted(logged) if s > warm + 1]
    assert all(a > b for a, b in zip(late, late[1:])) and late[-1] < 0.2 * lr
    # The same run, saved every 8 steps; drop the checkpoints after step 8 (as a kill at step 9 would) and resume.
    cut = [*opts, "train.save_every=8", "train.keep_last=3"]
    train(tiny_recipe(*cut), tmp_path / "cut", device="cpu")
    for step, path in list_states(tmp_path / "cut"):
        if step > 8:
            path.unlink()
    assert [s for s, _ in list_states(tmp_path / "cut")] == [8]
    train(tiny_recipe(*cut), tmp_path / "cut", device="cpu")
    _assert_same_state(_state(tmp_path / "cut"), _state(tmp_path / "full"))


def test_a_recipe_shortened_below_its_warm_up_trains_and_says_the_decay_never_starts(tmp_path, caplog):
    """`--set train.steps=4` on a recipe with a 100-step warm-up and a cosine decay (the built-in flow job) is a
    smoke run, not a mistake: it trains on the warm-up ramp and warns that the decay never starts."""
    r = load_recipe("digits_flow_uvit_tiny", TINY + ["train.steps=4", "train.warmup_steps=10"])
    assert r.train.lr_decay == "cosine"
    with caplog.at_level("WARNING", logger="uvit_cli.train"):
        train(r, tmp_path / "run", device="cpu")
    assert "the cosine decay never starts" in caplog.text
    lrs = [m["lr"] for m in read_metrics(tmp_path / "run") if "lr" in m]
    assert lrs and all(a < b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < r.train.lr   # still rising
