"""Atomic, pickle-free persistence: training state, weights, and what a failed write leaves behind."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lcdistill.checkpoint import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    load_state,
    load_weights,
    save_state,
    save_weights,
)
from lcdistill.errors import UserError
from lcdistill.training import rng_state, set_rng_state


def assert_same(a, b, where="state", ordered=True):
    """Equal values of equal kinds (a tuple may come back as a list, an OrderedDict as a dict)."""
    kinds = (torch.Tensor, dict, (list, tuple), bool, int, float, str, type(None))
    kind = next(k for k in kinds if isinstance(a, k))
    assert isinstance(b, kind) and isinstance(a, bool) == isinstance(b, bool), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        keys_a, keys_b = (list(a), list(b)) if ordered else (sorted(a), sorted(b))
        assert keys_a == keys_b, f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]", ordered)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]", ordered)
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def real_training_state() -> dict:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.randn(2, 3, 5, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def test_state_round_trip(tmp_path):
    state = {
        **real_training_state(),
        "int_keys": {0: torch.tensor([1.0]), 7: {"nested": torch.arange(3)}, 12: None},
        "mixed": [1, 2.5, "x", None, True, [torch.ones(2, 2, dtype=torch.bfloat16)]],
        "empty": {},
        "counters": {"epoch": 3, "best_top1": 71.25, "nan": float("inf")},
        "rng": rng_state(),
        "scalar": torch.tensor(5, dtype=torch.int64),
    }
    path = tmp_path / "ckpt" / "last.safetensors"
    save_state(path, state)
    back = load_state(path)
    assert_same(state, back)
    assert list(back["int_keys"]) == [0, 7, 12] and all(isinstance(k, int) for k in back["int_keys"])
    assert list(back["optimizer"]["state"]) == list(state["optimizer"]["state"])
    assert [p.name for p in path.parent.iterdir()] == ["last.safetensors"]


def test_optimizer_state_loads_back_into_an_optimizer(tmp_path):
    state = real_training_state()
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(36, 2))
    model.load_state_dict(back["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(back["optimizer"])
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], state["optimizer"]["state"][0]["momentum_buffer"])


def test_rng_state_round_trip_restores_the_streams(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_state(tmp_path / "rng.safetensors", {"rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)  # move every stream on
    set_rng_state(load_state(tmp_path / "rng.safetensors")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_colliding_tensor_paths_stay_apart(tmp_path):
    # {"a.b": x} and {"a": {"b": y}} flatten to the same dotted path; so do 1 and "1".
    state = {"a.b": torch.zeros(2), "a": {"b": torch.ones(2)}, "k": {1: torch.full((1,), 5.0), "1": torch.full((1,), 6.0)}}
    save_state(tmp_path / "c.safetensors", state)
    assert_same(state, load_state(tmp_path / "c.safetensors"))


def test_unstorable_objects_are_refused_before_writing(tmp_path):
    path = tmp_path / "s.safetensors"
    save_state(path, {"epoch": 1})
    for bad in ({"x": object()}, {(1, 2): 3}):
        with pytest.raises(TypeError):
            save_state(path, bad)
    assert load_state(path) == {"epoch": 1}


def test_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write_text(path, "old contents")

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write("new contents, half writ")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"], "temporary file left behind"


def test_interrupted_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    save_state(path, {"epoch": 1, "w": torch.ones(3)})

    import lcdistill.checkpoint as checkpoint

    real_save_file = checkpoint.save_file

    def save_then_interrupt(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)  # the bytes reach the temp file...
        raise KeyboardInterrupt  # ...then Ctrl-C before the rename

    monkeypatch.setattr(checkpoint, "save_file", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_state(path, {"epoch": 2, "w": torch.zeros(3)})
    back = load_state(path)
    assert back["epoch"] == 1 and torch.equal(back["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_write_creates_parent_folders_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "x.json"
    atomic_write_json(path, {"v": 1})
    atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 2}


def test_load_state_errors(tmp_path):
    with pytest.raises(UserError, match="cannot be read"):
        load_state(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="cannot be read"):
        load_state(tmp_path / "junk.safetensors")
    save_weights(tmp_path / "weights.safetensors", {"w": torch.ones(1)})
    with pytest.raises(UserError, match="not an lcdistill checkpoint"):
        load_state(tmp_path / "weights.safetensors")


# ---- weights files -----------------------------------------------------------------------------------
def test_weights_round_trip_with_metadata(tmp_path):
    from safetensors import safe_open

    model = torch.nn.Linear(3, 2)
    save_weights(tmp_path / "w.safetensors", model.state_dict(), {"lcdistill": {"classes": ["a", "b"]}})
    back = load_weights(tmp_path / "w.safetensors")
    assert_same(dict(model.state_dict()), back, ordered=False)  # safetensors sorts its keys
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["lcdistill"]) == {"classes": ["a", "b"]}


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_pth_state_dicts_load(tmp_path, wrap):
    model = torch.nn.Linear(3, 2)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # as DDP saves it
    torch.save({wrap: state, "epoch": 3} if wrap else state, tmp_path / "w.pth")
    back = load_weights(tmp_path / "w.pth")
    assert set(back) == {"weight", "bias"} and torch.equal(back["weight"], model.weight)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_payload_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"weight": torch.ones(1), "x": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UserError) as info:
        load_weights(tmp_path / "evil.pth")
    assert not marker.exists()
    line = info.value.line()
    assert "refused" in line and "evil.pth" in line
    assert "would call" in line  # names what the file tried to run
    for unsafe in ("weights_only` set to `False`", "weights_only=False", "can still be loaded", "add_safe_globals", "\x1b["):
        assert unsafe not in line, f"{unsafe!r} in {line!r}"


def test_weights_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_weights(tmp_path / "none.pth")
    (tmp_path / "bad.safetensors").write_text("nope")
    with pytest.raises(UserError, match="cannot be read"):
        load_weights(tmp_path / "bad.safetensors")
    torch.save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(UserError, match="no state dict"):
        load_weights(tmp_path / "list.pth")
