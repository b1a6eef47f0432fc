"""Two ranks under mpiexec against one process: the same weights, the same files, resume across
rank counts, and a failing rank stopping the run. Each run is tiny (8x8 digits, a small U-Net, a
few steps) and has a timeout, so a hang fails the test instead of blocking."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_runs import tiny_run

from minidiff import io
from minidiff.train import TrainConfig, Trainer, load_model

pytest.importorskip("mpi4py")
MPIEXEC = shutil.which(
    "mpiexec", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
)
pytestmark = [
    pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install mpich)"),
    pytest.mark.usefixtures("private_cache"),
]

WORKER = str(Path(__file__).with_name("worker.py"))
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 60  # seconds for one mpiexec run; they take a few

# every source of randomness in play (label dropout, flips, model dropout), and a learning rate
# high enough from the first step that the weights move far more than rounding does
CONFIG = tiny_run(
    steps=3,
    lr=2e-3,
    warmup_steps=1,
    sample_every=100,
    checkpoint_every=1,
    class_dropout=0.3,
    flip=True,
    model={"dropout": 0.2},
)


def environment(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_LOCAL", "OMPI_"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def mpirun(n, *args, module=False, **env):
    command = [MPIEXEC, "-n", str(n), sys.executable] + (["-m", "minidiff"] if module else [WORKER])
    return subprocess.run(
        command + [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=environment(**env),
        cwd=REPO,
    )


def write_config(tmp_path, **overrides) -> Path:
    values = copy.deepcopy(CONFIG)
    values.update(overrides)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    return path


def one_process(tmp_path, steps, name="one", **overrides) -> Trainer:
    config = TrainConfig.from_dict({**copy.deepcopy(CONFIG), "steps": steps, **overrides})
    trainer = Trainer(config, tmp_path / name, progress=False)
    trainer.fit()
    return trainer


def checkpoint_arrays(out):
    arrays, state, _ = io.load_checkpoint(Path(out), groups=("model", "ema", "optimizer"))
    return arrays, state


def assert_same_run(two_ranks_out, trainer):
    """The checkpoint of a run matches an in-process one-process trainer: weights, EMA and Adam
    moments equal up to the rounding of the gradient sum; the steps, the generator states and the
    batch position exactly."""
    arrays, state = checkpoint_arrays(two_ranks_out)
    names = [n for n, _ in trainer.model.named_parameters()]
    start = Trainer(trainer.config, trainer.out_dir / "start", progress=False)  # the initial weights
    moved = max(float(np.abs(p.data - q.data).max()) for p, q in zip(trainer.params, start.params))
    assert moved > 1e-3  # the steps changed the weights far beyond the tolerance below
    for name, p, shadow in zip(names, trainer.params, trainer.ema.shadow):
        np.testing.assert_allclose(arrays["model"][name], p.data, rtol=0, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(arrays["ema"][name], shadow, rtol=0, atol=1e-6, err_msg=name)
    for name, m, v in zip(names, trainer.optimizer.m, trainer.optimizer.v):
        np.testing.assert_allclose(arrays["optimizer"][f"m.{name}"], m, rtol=1e-3, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(arrays["optimizer"][f"v.{name}"], v, rtol=1e-3, atol=1e-10, err_msg=name)
    mine = trainer.state()
    for key in ("step", "rng", "batches"):
        assert json.loads(json.dumps(state[key])) == json.loads(json.dumps(mine[key])), key


@pytest.mark.parametrize("batch", [8, 7])  # 7: shares of 3 and 4, weighted 3/7 and 4/7
def test_two_ranks_train_the_one_process_run(tmp_path, batch):
    config = write_config(tmp_path, batch_size=batch)
    report = tmp_path / "report.json"
    done = mpirun(2, config, tmp_path / "two", "--report", report, MINIDIFF_BUCKET_MB="0.01")
    assert done.returncode == 0, done.stderr
    assert_same_run(tmp_path / "two", one_process(tmp_path, 3, batch_size=batch))
    ranks = json.loads(report.read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["size"] == 2 for r in ranks)
    for key in ("params", "ema", "optimizer", "rng", "step"):  # the ranks agree to the bit
        assert ranks[0][key] == ranks[1][key], key
    threads = max(1, (os.cpu_count() or 1) // 2)  # ranks x threads = cores
    assert all(
        r["threads"] == r["numba_threads"] == threads and r["blas_threads"] == [threads] for r in ranks
    )


def test_rank_zero_alone_writes_and_prints(tmp_path):
    config = write_config(tmp_path, steps=2)
    out = tmp_path / "run"
    done = mpirun(2, "train", "--config", config, "--out", out, module=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("finished at step 2") == 1, done.stdout  # one summary, from rank 0
    assert "train" in done.stderr and done.stderr.count("2/2") >= 1  # one progress bar
    assert "rank" not in done.stderr
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr" and [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "LATEST",
        "step-00000001",
        "step-00000002",
    ]
    assert (out / "loss.png").is_file() and (out / "samples" / "step-00000002.png").is_file()
    assert_same_run(out, one_process(tmp_path, 2))  # minidiff train under mpiexec: the same weights


@pytest.mark.parametrize("ranks_after", [1, 2])
def test_a_two_rank_checkpoint_resumes_with_any_rank_count(tmp_path, ranks_after):
    config = write_config(tmp_path, steps=2)
    out = tmp_path / "run"
    assert mpirun(2, config, out).returncode == 0
    if ranks_after == 1:
        trainer = Trainer.resume(out, progress=False, steps=4)
        trainer.fit()
    else:
        done = mpirun(2, config, out, "--resume", "--steps", 4)
        assert done.returncode == 0, done.stderr
    assert checkpoint_arrays(out)[1]["step"] == 4
    assert_same_run(out, one_process(tmp_path, 4))


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_stops_every_rank(tmp_path, how):
    config = write_config(tmp_path, steps=50)
    out = tmp_path / "run"
    start = time.monotonic()
    done = mpirun(2, config, out, "--fail-at", 3, "--fail-rank", 1, "--how", how)
    assert time.monotonic() - start < 30  # the other rank did not wait for a partner that is gone
    assert done.returncode != 0
    if how == "raise":
        assert "rank 1 of 2 failed: RuntimeError: injected failure at step 3" in done.stderr
    # the last checkpoint written before the failure loads: step 1, since step 2's is kept only
    # once the loss of step 3 is known to be sane, and step 3 never finished
    model, _, state = load_model(out)
    assert state["step"] == 1


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    config = write_config(tmp_path, steps=50, checkpoint_every=100)
    out = tmp_path / "run"
    report = tmp_path / "report.json"
    done = mpirun(2, config, out, "--fail-at", 3, "--fail-rank", 1, "--how", "term", "--report", report)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("interrupted at step 3") == 1, done.stdout  # from rank 0 alone
    ranks = json.loads(report.read_text())
    assert [r["step"] for r in ranks] == [3, 3] and ranks[0]["params"] == ranks[1]["params"]
    assert checkpoint_arrays(out)[1]["step"] == 3  # the step that stopped, saved by rank 0
    assert_same_run(out, one_process(tmp_path, 3, checkpoint_every=100))


def test_rank_zero_alone_claims_the_folder(tmp_path):
    # rank 1 reaches fit() after rank 0 has begun writing config.json and loss.csv there: it
    # must neither take them for another run's nor be refused rank 0's lock
    config = write_config(tmp_path, steps=2)
    out = tmp_path / "run"
    done = mpirun(2, config, out, "--stagger", 2)
    assert done.returncode == 0, done.stderr
    assert checkpoint_arrays(out)[1]["step"] == 2
    again = mpirun(2, config, out)  # a fresh run into it now: every rank refuses, none aborts
    assert again.returncode != 0
    assert again.stderr.count("RunExistsError") == 2 and "stopping every rank" not in again.stderr
    assert checkpoint_arrays(out)[1]["step"] == 2  # the run is untouched


def test_minidiff_train_refuses_a_folder_holding_a_run_on_every_rank(tmp_path):
    config = write_config(tmp_path, steps=1)
    out = tmp_path / "run"
    assert mpirun(2, "train", "--config", config, "--out", out, module=True).returncode == 0
    done = mpirun(2, "train", "--config", config, "--out", out, module=True)
    assert done.returncode == 2, done.stderr
    assert "already holds a run" in done.stderr and "stopping every rank" not in done.stderr
