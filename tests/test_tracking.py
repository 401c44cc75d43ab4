"""Experiment trackers: a digits run logs its scalars, the labelled monitor metric, the EMA grids and the recipe to
TensorBoard and (offline) wandb, resumes the same wandb run, and a missing extra is a clear error before training."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from uvit_cli.errors import UvitError
from uvit_cli.recipe import RecipeError, load_recipe
from uvit_cli.run import METRICS, TENSORBOARD, WANDB_ID, read_metrics
from uvit_cli.train import train

TINY = ["model.num_layers=3", "model.embed_dim=32", "model.num_heads=2", "train.batch_size=16", "train.log_every=1",
        "train.warmup_steps=2", "data.num_workers=0", "sample.steps=2", "train.steps=4", "train.save_every=2",
        "train.sample_every=2"]
SCALARS = {"loss", "lr", "grad_norm", "img_per_s", "data_frac", "peak_mem_gb"}


def _sets(*items):
    return sum((["--set", s] for s in items), [])


def test_a_digits_run_writes_tensorboard_scalars_grids_and_the_monitor(tmp_path, uvit):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = tmp_path / "run"
    res = uvit("train", "digits_uvit_tiny", *_sets(*TINY, "train.log_to=[jsonl,tensorboard]", "train.eval_every=4",
                                                    "eval.monitor_samples=20"), "--run-dir", run, "--device", "cpu")
    assert res.returncode == 0, res.output
    assert (run / METRICS).is_file()                                   # jsonl is always on
    acc = event_accumulator.EventAccumulator(str(run / TENSORBOARD), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert SCALARS | {"monitor/fd_digits", "monitor/acc_digits"} <= set(tags["scalars"])
    jsonl = {m["step"]: m for m in read_metrics(run) if "loss" in m}
    for key in SCALARS:                                                # the same numbers as metrics.jsonl
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2, 3, 4]
        np.testing.assert_allclose([e.value for e in events], [jsonl[s][key] for s in (1, 2, 3, 4)], rtol=1e-6)
    monitor = next(m for m in read_metrics(run) if "monitor/fd_digits" in m)
    assert acc.Scalars("monitor/fd_digits")[0].value == pytest.approx(monitor["monitor/fd_digits"], rel=1e-6)
    text = {k: acc.Tensors(f"{k}/text_summary")[0].tensor_proto.string_val[0].decode() for k in
            ("recipe", "monitor_protocol")}                            # the recipe as the run's config, the card
    assert "embed_dim: 32" in text["recipe"] and "log_to:\n  - jsonl\n  - tensorboard" in text["recipe"]
    assert json.loads(text["monitor_protocol"]) == monitor["monitor_protocol"]
    images = acc.Images("samples/ema_grid")
    assert [e.step for e in images] == [2, 4]
    import io
    shown = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(shown, np.asarray(Image.open(run / "samples" / "step-00000004.png").convert("RGB")))


def _wandb_records(path: Path):
    """The protobuf records of a .wandb file (a 7-byte header, then LevelDB-log blocks of 32 KiB holding chunks of
    crc32 (4), length (2), type (1: full, 2: first, 3: middle, 4: last) and data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, out, pos, buf = path.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:                                  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        buf += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _finished_records(path: Path, timeout: float = 60.0):
    """The records of a segment once wandb's core process has written its exit record (it writes asynchronously,
    so run.finish() may return a moment before the file is complete)."""
    import time

    deadline = time.time() + timeout
    while True:
        records = _wandb_records(path) if path.exists() else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            return records
        time.sleep(0.2)


def _history(records) -> dict[int, dict]:
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            out.setdefault(int(row["_step"]), {}).update(row)
    return out


def test_wandb_offline_logs_the_run_and_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                 "WANDB_DISABLE_GIT": "true", "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                 "WANDB_CONFIG_DIR": str(tmp_path / "config")}.items():
        monkeypatch.setenv(k, v)
    run = tmp_path / "run"
    r = load_recipe("digits_uvit_tiny", [*TINY, "train.log_to=[jsonl,wandb]", "train.wandb_project=uvit-test"])
    train(r, run, device="cpu")
    run_id = (run / WANDB_ID).read_text().strip()
    first = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(first) == 1
    records = _finished_records(first[0] / f"run-{run_id}.wandb")
    run_rec = next(x.run for x in records if x.WhichOneof("record_type") == "run")
    assert run_rec.run_id == run_id and run_rec.project == "uvit-test" and run_rec.display_name == run.name
    config = {i.key: json.loads(i.value_json) for i in run_rec.config.update}
    assert config["train"]["log_to"] == ["jsonl", "wandb"] and config["model"]["embed_dim"] == 32
    hist = _history(records)
    jsonl = {m["step"]: m for m in read_metrics(run)}
    assert sorted(hist) == [1, 2, 3, 4]
    for s in (1, 2, 3, 4):
        assert hist[s]["loss"] == pytest.approx(jsonl[s]["loss"], rel=1e-6)
        assert SCALARS <= set(hist[s])
    assert hist[4]["samples/ema_grid/_type"] == "image-file"           # the EMA grid as an image, pixel for pixel
    shown = Image.open(first[0] / "files" / hist[4]["samples/ema_grid/path"]).convert("RGB")
    np.testing.assert_array_equal(np.asarray(shown),
                                  np.asarray(Image.open(run / "samples" / "step-00000004.png").convert("RGB")))

    # Resume with more steps: the same wandb run id, history continuing at step 5.
    train(load_recipe("digits_uvit_tiny", [*TINY, "train.steps=6", "train.log_to=[jsonl,wandb]",
                                           "train.wandb_project=uvit-test"]), run, device="cpu")
    assert (run / WANDB_ID).read_text().strip() == run_id
    segments = sorted((run / "wandb").glob("offline-run-*"))          # every segment is of the one run id
    assert all(p.name.endswith(run_id) for p in segments)
    steps = sorted(s for seg in segments for s in _history(_finished_records(seg / f"run-{run_id}.wandb")))
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_missing_tracker_package_is_an_error_naming_the_extra_before_training(tmp_path, monkeypatch, uvit):
    import importlib.util

    import uvit_cli.tracking as tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    run = tmp_path / "run"
    with pytest.raises(UvitError, match=r'pip install "uvit\[wandb\]"'):
        train(load_recipe("digits_uvit_tiny", [*TINY, "train.log_to=[jsonl,wandb]"]), run, device="cpu")
    assert not run.exists()                                            # nothing was started
    res = uvit("train", "digits_uvit_tiny", *_sets(*TINY, "train.log_to=[wandb]"), "--run-dir", run)
    assert res.returncode == 2 and "uvit[wandb]" in res.stderr and not run.exists()


def test_log_to_names_are_checked_by_the_recipe():
    with pytest.raises(RecipeError, match="tensorboard"):
        load_recipe("digits_uvit_tiny", ["train.log_to=[jsonl,tensorbord]"])
    assert load_recipe("digits_uvit_tiny").train.log_to == ("jsonl",)


def test_a_resumed_run_replaces_the_tensorboard_events_past_its_checkpoint(tmp_path):
    """Killed after logging steps 3-4 but checkpointed at 2: the resumed run logs 3-6 again, and TensorBoard shows
    each step once, with the resumed values (like metrics.jsonl)."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from uvit_cli.checkpoint import list_states

    run = tmp_path / "run"
    sets = [*TINY, "train.sample_every=0", "train.log_to=[jsonl,tensorboard]"]
    train(load_recipe("digits_uvit_tiny", sets), run, device="cpu")
    list_states(run)[-1][1].unlink()                                   # as if killed before the step-4 checkpoint
    train(load_recipe("digits_uvit_tiny", [*sets, "train.steps=6"]), run, device="cpu")
    acc = event_accumulator.EventAccumulator(str(run / TENSORBOARD))
    acc.Reload()
    events = acc.Scalars("loss")
    jsonl = [(m["step"], m["loss"]) for m in read_metrics(run)]
    assert [e.step for e in events] == [s for s, _ in jsonl] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([e.value for e in events], [v for _, v in jsonl], rtol=1e-6)
