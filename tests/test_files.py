"""File primitives: atomic writes with normal permissions, deterministic safetensors bytes, the weights_only reader,
and the up-front output check."""

from __future__ import annotations

import argparse
import os
import stat
import struct

import pytest
import torch

from uvit_cli.checkpoint import save_weights
from uvit_cli.errors import UvitError
from uvit_cli.files import (atomic_path, prepare_output, read_state_dict, safetensors_bytes, sha256_file,
                            write_safetensors)


def test_saving_the_same_weights_twice_gives_the_same_bytes(tmp_path):
    sd = {"b": torch.ones(3), "a": torch.arange(6.0).view(2, 3), "c": torch.zeros(2, dtype=torch.int64)}
    meta = {f"k{i}": str(i) for i in range(12)}          # many keys: hash-map order would differ between runs
    save_weights(tmp_path / "one.safetensors", sd, "recipe: 1", step=5, weights="ema", **meta)
    save_weights(tmp_path / "two.safetensors", dict(reversed(sd.items())), "recipe: 1", step=5, weights="ema",
                 **dict(reversed(meta.items())))
    assert sha256_file(tmp_path / "one.safetensors") == sha256_file(tmp_path / "two.safetensors")
    back = read_state_dict(tmp_path / "one.safetensors")
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    raw = safetensors_bytes(sd, {"x": "y"})
    assert struct.unpack("<Q", raw[:8])[0] % 8 == 0          # the tensor data stays 8-byte aligned


def test_outputs_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_safetensors(tmp_path / "w.safetensors", {"x": torch.ones(2)})
        with atomic_path(tmp_path / "s.pt") as tmp:
            torch.save({"a": 1}, tmp)
    finally:
        os.umask(old)
    for name in ("w.safetensors", "s.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_state_dict_reader_refuses_pickled_objects(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "ok.pth")
    assert torch.equal(read_state_dict(tmp_path / "ok.pth")["w"], torch.ones(2))       # nested state dict unwrapped
    torch.save({"args": argparse.Namespace(lr=1)}, tmp_path / "evil.pth")    # an arbitrary object
    with pytest.raises(UvitError, match="weights_only=True"):
        read_state_dict(tmp_path / "evil.pth")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(UvitError, match="truncated"):
        read_state_dict(tmp_path / "cut.safetensors")


def test_prepare_output_checks_without_creating_anything(tmp_path):
    (tmp_path / "file").write_text("x")
    assert prepare_output(tmp_path / "new" / "deep" / "g.png", "--out") == tmp_path / "new" / "deep" / "g.png"
    assert not (tmp_path / "new").exists()
    with pytest.raises(UvitError, match="--out .* is a folder"):
        prepare_output(tmp_path, "--out")
    with pytest.raises(UvitError, match="file, not a folder"):
        prepare_output(tmp_path / "file" / "g.png", "--npz")
    with pytest.raises(UvitError, match="--out-dir .* is a file"):
        prepare_output(tmp_path / "file", "--out-dir", directory=True)
    with pytest.raises(UvitError, match="cannot write"):
        prepare_output("/proc/uvit-test/g.png", "--out")
    assert not list(tmp_path.glob(".uvit-write-probe-*"))
