"""ldm.checkpoint: checkpoints load without running code from them, and bad files fail naming the path."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError, UnsafeCheckpointError, load_checkpoint, load_state_dict


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"model.weight": torch.randn(3, 4, generator=g), "model.bias": torch.randn(3, generator=g)}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_lightning_style_checkpoint_round_trip(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": _state(), "global_step": 17, "epoch": 2}, path)
    ckpt = load_checkpoint(path)
    assert ckpt["global_step"] == 17 and ckpt["epoch"] == 2
    _assert_same(ckpt["state_dict"], _state())


def test_memory_mapped_load_gives_the_same_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": _state(), "global_step": 17}, path)
    ckpt = load_checkpoint(path, mmap=True)
    assert ckpt["global_step"] == 17
    _assert_same(ckpt["state_dict"], _state())
    legacy = tmp_path / "legacy.ckpt"  # the pre-zip format cannot be mapped; it is read as usual
    torch.save({"state_dict": _state()}, legacy, _use_new_zipfile_serialization=False)
    _assert_same(load_checkpoint(legacy, mmap=True)["state_dict"], _state())


def test_bare_state_dict_is_wrapped(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(_state(), path)
    _assert_same(load_state_dict(path), _state())


def test_safetensors_round_trip(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_state(), str(path))
    _assert_same(load_state_dict(path), _state())


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_checkpoint(missing)


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _state(), "payload": _RunsCode(str(marker))}, f)
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_file_is_a_checkpoint_error(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": _state()}, good)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        load_checkpoint(bad)


def test_non_dict_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="list"):
        load_checkpoint(path)
