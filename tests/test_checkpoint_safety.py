"""Safe loading, crash-safe writing and architecture checks of ldm/checkpoint.py."""
from __future__ import annotations

import builtins
import subprocess

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.parsing import AttributeDict

from ldm.checkpoint import (CheckpointError, InertObject, UnsafeCheckpointError, load_checkpoint, load_state_dict,
                            load_weights, save_checkpoint, save_safetensors)


class _WritesFile:
    """Unpickling an instance would create `target` through builtins.exec."""

    def __init__(self, target: str, via=builtins.exec):
        self.target, self.via = target, via

    def __reduce__(self):
        if self.via is builtins.exec:
            return builtins.exec, (f"open({self.target!r}, 'w').write('pwned')",)
        return self.via, (["touch", self.target],)


@pytest.mark.parametrize("via", [builtins.exec, subprocess.call])
def test_code_running_pickle_is_refused_and_names_the_global(tmp_path, via):
    target = tmp_path / "created_by_pickle"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": _WritesFile(str(target), via)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    assert not target.exists()
    assert f".{via.__name__}" in str(info.value) and str(path) in str(info.value)


def test_legacy_lightning_checkpoint_loads_through_inert_standins(tmp_path):
    # what a checkpoint of the original code (Lightning 1.x) carries besides tensors
    path = tmp_path / "legacy.ckpt"
    weights = {"model.w": torch.randn(3, 2)}
    torch.save({
        "state_dict": weights, "global_step": 7,
        "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.25), "k": np.int64(3)}},
        "hyper_parameters": AttributeDict(cfg=OmegaConf.create({"lr": 1e-4, "ch_mult": [1, 2]})),
    }, path)
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt["state_dict"]["model.w"], weights["model.w"]) and ckpt["global_step"] == 7
    (key, state), = ckpt["callbacks"].items()
    assert issubclass(key, InertObject) and key is not ModelCheckpoint
    assert key.legacy_name == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert state["best_model_score"] == 0.25 and state["k"] == 3 and isinstance(state["k"], np.int64)
    assert type(ckpt["hyper_parameters"]) is dict and isinstance(ckpt["hyper_parameters"]["cfg"], InertObject)


def test_safetensors_and_ckpt_round_trip_with_tied_weights(tmp_path):
    lin = torch.nn.Linear(4, 4)
    sd = {"a": lin.weight, "b": lin.weight, "t": torch.arange(6.).reshape(2, 3).t(), "bias": lin.bias}
    for name in ("w.safetensors", "w.ckpt"):
        save_checkpoint({"state_dict": sd}, tmp_path / name)
        back = load_state_dict(tmp_path / name)
        assert set(back) == set(sd)
        for k in sd:
            assert torch.equal(back[k], sd[k].detach())
    save_safetensors(sd, tmp_path / "direct.safetensors")
    assert torch.equal(load_state_dict(tmp_path / "direct.safetensors")["t"], sd["t"])
    assert not list(tmp_path.glob("*.tmp-*"))


def test_truncated_checkpoint_names_the_path(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.randn(64, 64)}}, good)
    data = good.read_bytes()
    for suffix, payload in ((".ckpt", data[: len(data) // 2]), (".pt", data[:100])):
        bad = tmp_path / f"truncated{suffix}"
        bad.write_bytes(payload)
        with pytest.raises(CheckpointError, match=str(bad)):
            load_checkpoint(bad)
    save_safetensors({"w": torch.randn(64, 64)}, tmp_path / "w.safetensors")
    st = tmp_path / "cut.safetensors"
    st.write_bytes((tmp_path / "w.safetensors").read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_checkpoint(st)
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_checkpoint(tmp_path / "nowhere.ckpt")


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)

    def disk_full(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_state_dict(path)["w"], torch.zeros(3))
    assert not list(tmp_path.glob("*.tmp-*"))


class _Net(torch.nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.enc = torch.nn.Linear(3, width)
        self.dec = torch.nn.Linear(width, 3)
        self.register_buffer("scale", torch.ones(()))


def test_load_weights_reports_missing_unexpected_and_shapes():
    net = _Net()
    sd = _Net(width=5).state_dict()
    sd.pop("dec.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_weights(net, sd, source="model.ckpt")
    msg = str(info.value)
    assert "model.ckpt" in msg and "dec.bias" in msg and "extra.weight" in msg
    assert "enc.weight (checkpoint (5, 3), model (4, 3))" in msg
    assert "1 missing keys" in msg and "1 unexpected keys" in msg


def test_load_weights_truncates_long_lists_with_counts():
    net = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(20)])
    with pytest.raises(CheckpointError, match=r"40 missing keys: .* and 28 more"):
        load_weights(net, {})


def test_load_weights_ignore_prefixes_and_non_strict():
    net, other = _Net(), _Net()
    sd = other.state_dict()
    sd["loss.discriminator.w"] = torch.zeros(2)
    del sd["dec.weight"]
    with pytest.raises(CheckpointError):
        load_weights(net, sd)
    missing, unexpected = load_weights(net, sd, ignore_prefixes=("loss.", "dec."))
    assert missing == [] and unexpected == []
    assert torch.equal(net.enc.weight, other.enc.weight)
    assert not torch.equal(net.dec.weight, other.dec.weight)  # ignored, so not loaded
    missing, unexpected = load_weights(_Net(), sd, strict=False)
    assert missing == ["dec.weight"] and unexpected == ["loss.discriminator.w"]
