"""Checkpoints on disk (minidiff.io): round trips, LATEST, pruning, resolution, atomicity, corruption."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from minidiff import io
from minidiff.io import (
    LATEST,
    STATE_FILE,
    CheckpointError,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)


def arrays_for(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {
        "model": {
            "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
            "conv.bias": rng.standard_normal(4).astype(np.float32),
        },
        "ema": {"conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)},
        "optimizer": {
            "m.conv.weight": rng.standard_normal((4, 3, 3, 3)),
            "steps": np.arange(5, dtype=np.int64),
        },
    }


def state_for(step: int) -> dict:
    return {
        "step": step,
        "config": {"lr": 1e-3, "model": {"channel_mults": [1, 2]}},
        "rng": {"s": 2**100 + step},
    }


def save(root, step, keep=2, **kwargs):
    return save_checkpoint(root, f"step-{step:08d}", arrays_for(step), state_for(step), keep=keep, **kwargs)


def latest_name(root) -> str:
    return (root / LATEST).read_text().strip()


def visible_dirs(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir())


def hidden_entries(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


# -- round trip, LATEST, keep ----------------------------------------------------------------------


def test_round_trip_is_exact(tmp_path):
    root = tmp_path / "checkpoints"
    where = save(root, 7)
    assert where == root / "step-00000007"
    assert sorted(os.listdir(where)) == [
        "ema.safetensors",
        "model.safetensors",
        "optimizer.safetensors",
        STATE_FILE,
    ]
    arrays, state, directory = load_checkpoint(root, groups=("model", "ema", "optimizer"))
    assert directory == where
    assert state == state_for(7)  # 128-bit ints and nested dicts survive the JSON
    expected = arrays_for(7)
    assert set(arrays) == set(expected)
    for group in expected:
        assert set(arrays[group]) == set(expected[group])
        for name, value in expected[group].items():
            got = arrays[group][name]
            assert got.dtype == value.dtype and got.shape == value.shape
            np.testing.assert_array_equal(got, value)


def test_load_reads_only_the_requested_groups(tmp_path):
    save(tmp_path, 1)
    arrays, _, _ = load_checkpoint(tmp_path, groups=("ema",))
    assert list(arrays) == ["ema"]
    arrays, _, _ = load_checkpoint(tmp_path)  # default: the model
    assert list(arrays) == ["model"]


def test_non_contiguous_arrays_are_saved(tmp_path):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    save_checkpoint(tmp_path, "a", {"model": {"t": base.T, "s": base[:, ::2]}}, {})
    arrays, _, _ = load_checkpoint(tmp_path)
    np.testing.assert_array_equal(arrays["model"]["t"], base.T)
    np.testing.assert_array_equal(arrays["model"]["s"], base[:, ::2])


def test_latest_names_the_newest_and_only_keep_remain(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 6):
        save(root, step, keep=2)
        assert latest_name(root) == f"step-{step:08d}"
        expected = [f"step-{s:08d}" for s in range(max(1, step - 1), step + 1)]
        assert visible_dirs(root) == expected
        assert hidden_entries(root) == []  # no temp dirs or temp LATEST files left behind
    _, state, _ = load_checkpoint(root)
    assert state["step"] == 5


@pytest.mark.parametrize("keep", [1, 3])
def test_keep(tmp_path, keep):
    for step in range(1, 6):
        save(tmp_path, step, keep=keep)
    assert visible_dirs(tmp_path) == [f"step-{s:08d}" for s in range(6 - keep, 6)]


def test_pruning_leaves_foreign_directories_alone(tmp_path):
    foreign = tmp_path / "exports"
    foreign.mkdir(parents=True)
    (foreign / "keep-me.txt").write_text("user data")
    for step in range(1, 4):
        save(tmp_path, step, keep=2)
    assert (foreign / "keep-me.txt").read_text() == "user data"
    assert visible_dirs(tmp_path) == ["exports", "step-00000002", "step-00000003"]


def test_keep_counts_the_most_recently_written(tmp_path):
    save(tmp_path, 6, keep=1)
    save(tmp_path, 2, keep=1)
    assert latest_name(tmp_path) == "step-00000002"
    assert visible_dirs(tmp_path) == ["step-00000002"]


def test_saving_the_same_name_again_replaces_it(tmp_path):
    save(tmp_path, 1)
    save_checkpoint(tmp_path, "step-00000001", arrays_for(9), state_for(9))
    arrays, state, _ = load_checkpoint(tmp_path)
    assert state["step"] == 9
    np.testing.assert_array_equal(arrays["model"]["conv.bias"], arrays_for(9)["model"]["conv.bias"])
    assert visible_dirs(tmp_path) == ["step-00000001"]


# -- resolve_checkpoint ----------------------------------------------------------------------------


def test_resolve_from_run_folder_checkpoints_folder_and_checkpoint_folder(tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    save(root, 1)
    save(root, 2)
    newest = root / "step-00000002"
    assert resolve_checkpoint(run) == newest
    assert resolve_checkpoint(root) == newest
    assert resolve_checkpoint(newest) == newest
    older = root / "step-00000001"
    assert resolve_checkpoint(older) == older  # an explicit older checkpoint is honoured
    assert resolve_checkpoint(str(run)) == newest  # str paths work too
    _, state, _ = load_checkpoint(older)
    assert state["step"] == 1


def test_resolve_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        resolve_checkpoint(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_checkpoint(missing)


def test_resolve_non_checkpoint_folder(tmp_path):
    (tmp_path / "somefile.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="is not a checkpoint") as info:
        load_checkpoint(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_latest_naming_a_missing_directory(tmp_path):
    save(tmp_path, 1)
    (tmp_path / LATEST).write_text("step-00000099\n")
    # LATEST is a hint: the newest complete checkpoint on disk is used
    assert resolve_checkpoint(tmp_path).name == "step-00000001"
    for child in tmp_path.iterdir():
        if child.is_dir():
            import shutil

            shutil.rmtree(child)
    with pytest.raises(CheckpointError, match="step-00000099") as info:
        load_checkpoint(tmp_path)
    assert LATEST in str(info.value)


def test_empty_latest_is_reported_as_such(tmp_path):
    save(tmp_path, 1)
    (tmp_path / LATEST).write_text("")
    assert resolve_checkpoint(tmp_path).name == "step-00000001"
    (tmp_path / "step-00000001" / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match=LATEST):
        load_checkpoint(tmp_path)


# -- atomicity -------------------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def test_failure_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save(root, 1)
    save(root, 2)
    before = {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    real_save_file = io.checkpoint.save_file
    calls = []

    def failing_save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) > 1:  # the first group is written, the second fails
            raise Boom("disk full")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(io.checkpoint, "save_file", failing_save_file)
    with pytest.raises(Boom):
        save(root, 3)
    assert len(calls) == 2
    assert latest_name(root) == "step-00000002"
    assert visible_dirs(root) == ["step-00000001", "step-00000002"]
    assert hidden_entries(root) == []  # the temp directory is gone
    after = {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert after == before  # nothing was touched, nothing pruned
    _, state, _ = load_checkpoint(root)
    assert state["step"] == 2

    monkeypatch.setattr(io.checkpoint, "save_file", real_save_file)
    save(root, 3)  # and the next save works normally
    assert latest_name(root) == "step-00000003"


def test_failure_while_writing_state_keeps_the_previous_checkpoint(tmp_path):
    save(tmp_path, 1)
    with pytest.raises(TypeError):  # not JSON-serialisable
        save_checkpoint(tmp_path, "step-00000002", arrays_for(2), {"bad": object()})
    assert latest_name(tmp_path) == "step-00000001"
    assert visible_dirs(tmp_path) == ["step-00000001"]
    assert hidden_entries(tmp_path) == []


def test_failed_overwrite_of_the_same_name_keeps_the_old_contents(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def failing_save_file(*args, **kwargs):
        raise Boom("io error")

    monkeypatch.setattr(io.checkpoint, "save_file", failing_save_file)
    with pytest.raises(Boom):
        save_checkpoint(tmp_path, "step-00000001", arrays_for(9), state_for(9))
    _, state, _ = load_checkpoint(tmp_path)
    assert state["step"] == 1
    assert hidden_entries(tmp_path) == []


# -- corrupt and incomplete checkpoints ------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    save(tmp_path, 1)
    return tmp_path / "step-00000001"


def test_corrupt_state_json(checkpoint):
    (checkpoint / STATE_FILE).write_text('{"step": 1, "config": ')
    with pytest.raises(CheckpointError, match="state.json is corrupt") as info:
        load_checkpoint(checkpoint.parent)
    assert str(checkpoint) in str(info.value)


def test_missing_state_json_in_the_latest_checkpoint(checkpoint):
    (checkpoint / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match="state.json") as info:
        load_checkpoint(checkpoint.parent)
    assert str(checkpoint) in str(info.value)


def test_missing_state_json_in_a_bare_folder_is_not_a_checkpoint(checkpoint):
    (checkpoint / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(checkpoint)


@pytest.mark.parametrize("group", ["model", "ema", "optimizer"])
def test_missing_array_file(checkpoint, group):
    (checkpoint / f"{group}.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"{group}.safetensors"):
        load_checkpoint(checkpoint.parent, groups=("model", "ema", "optimizer"))


@pytest.mark.parametrize(
    "damage",
    ["truncated", "garbage", "empty", "header-only"],
)
def test_corrupt_array_file(checkpoint, damage):
    file = checkpoint / "model.safetensors"
    data = file.read_bytes()
    corrupt = {
        "truncated": data[: len(data) - 7],
        "garbage": b"\x13\x37 this is not a safetensors file \xff" * 3,
        "empty": b"",
        "header-only": data[:8],
    }[damage]
    file.write_bytes(corrupt)
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_checkpoint(checkpoint.parent)
    assert str(file) in str(info.value)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_state_is_plain_json(checkpoint):
    state = json.loads((checkpoint / STATE_FILE).read_text())
    assert state == state_for(1)
