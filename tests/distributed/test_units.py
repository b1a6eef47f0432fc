"""The pieces of minidiff.distributed that need no second process: shares of a batch, the
sharded random draws, the buckets and when they start, the backward hook, the thread plan."""

from __future__ import annotations

import numpy as np
import pytest

import minidiff
from minidiff.distributed import GradientAverager, ShardedGenerator, World, shard_bounds, thread_plan


def test_shards_cover_the_batch_in_rank_order():
    for n, size in [(8, 2), (7, 2), (32, 3), (5, 5)]:
        bounds = [shard_bounds(n, r, size) for r in range(size)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(h - lo for lo, h in bounds) - min(h - lo for lo, h in bounds) <= 1
    with pytest.raises(ValueError, match="batch of 1 images cannot be split across 2 ranks"):
        shard_bounds(1, 0, 2)


def test_sharded_draws_are_rows_of_the_one_process_draws():
    whole, parts = np.random.default_rng(5), []
    expected = (
        whole.integers(0, 20, size=7),
        whole.standard_normal((7, 3), dtype=np.float32),
        whole.random(7),
    )
    for rank in range(2):
        rng = np.random.default_rng(5)
        lo, hi = shard_bounds(7, rank, 2)
        g = ShardedGenerator(rng).shard(lo, hi, 7)
        parts.append(
            (
                g.integers(0, 20, size=hi - lo),
                g.standard_normal((hi - lo, 3), dtype=np.float32),
                g.random(hi - lo),
            )
        )
        assert rng.bit_generator.state == whole.bit_generator.state  # in step with one process
    for i, full in enumerate(expected):
        np.testing.assert_array_equal(np.concatenate([p[i] for p in parts]), full)
    g = ShardedGenerator(np.random.default_rng(0)).shard(0, 4, 8)
    with pytest.raises(ValueError, match=r"draw of shape \(3,\) is not one row per image of this rank's 4"):
        g.random(3)


class RecordingComm:
    """Sums nothing (one rank), records what started when."""

    def __init__(self, log):
        self.log = log

    def start(self, buffer):
        self.log.append(("start", buffer.size))
        return len(self.log)

    def progress(self, handles):
        pass

    def wait(self, handles):
        self.log.append(("wait", len(handles)))


def chain(widths, seed=0):
    rng = np.random.default_rng(seed)
    weights = [
        minidiff.tensor(rng.standard_normal((a, b)).astype(np.float32), requires_grad=True)
        for a, b in zip(widths, widths[1:])
    ]
    x = minidiff.tensor(rng.standard_normal((3, widths[0])).astype(np.float32))
    return weights, x


def forward(weights, x):
    for w in weights:
        x = (x @ w).tanh()
    return x.sum()


def test_buckets_fill_in_reverse_order_and_start_during_backward():
    weights, x = chain([4, 8, 8, 8, 2])
    log, reported = [], []
    averager = GradientAverager(weights, RecordingComm(log), bucket_bytes=8 * 8 * 4)
    assert [[w.shape for w in b.params] for b in averager.buckets] == [[(8, 2)], [(8, 8)], [(8, 8)], [(4, 8)]]
    ready = averager.ready

    def watch(p):
        reported.append(p)
        log.append(("ready", p.shape))
        ready(p)

    averager.ready = watch
    loss = forward(weights, x)
    averager.backward(loss, weight=0.5)
    assert log.index(("start", 16)) < log.index(("ready", (4, 8)))  # sent while backward went on
    assert [e for e in log if e[0] == "start"] == [("start", 16), ("start", 64), ("start", 64), ("start", 32)]
    assert log[-1] == ("wait", 4) and sorted(map(id, reported)) == sorted(map(id, weights))
    expected_weights, x2 = chain([4, 8, 8, 8, 2])
    forward(expected_weights, x2).backward()
    for w, e in zip(weights, expected_weights):  # the weighted gradient, written back
        np.testing.assert_array_equal(w.grad, 0.5 * e.grad)


def test_a_parameter_without_a_gradient_adds_zeros():
    weights, x = chain([4, 8, 2])
    unused = minidiff.tensor(np.ones(5, np.float32), requires_grad=True)
    averager = GradientAverager(weights + [unused], RecordingComm([]))
    averager.backward(forward(weights, x), weight=1.0)
    np.testing.assert_array_equal(unused.grad, np.zeros(5, np.float32))


def test_backward_reports_each_leaf_once_with_its_final_gradient():
    w = minidiff.tensor(np.array([1.0, 2.0]), requires_grad=True)
    seen = {}
    y = (w * w).sum() + (w * 3.0).sum()  # two paths into w: final only once both are in
    y.backward(grad_ready=lambda leaf: seen.setdefault(id(leaf), leaf.grad.copy()))
    assert list(seen) == [id(w)]
    np.testing.assert_array_equal(seen[id(w)], 2 * w.data + 3.0)


def test_a_world_of_one_communicates_nothing():
    world = World()
    assert (world.rank, world.size, world.is_root) == (0, 1, True)
    rng = np.random.default_rng(0)
    assert world.generator(rng) is rng and world.averager([]) is None
    assert world.sum(2.5) == 2.5 and world.any(True) and not world.any(False)
    assert world.shard(8) == (0, 8)
    answer = ["config.json"]
    assert world.from_root(answer) is answer


def test_the_thread_plan_shares_the_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert thread_plan(4).threads == 4 and thread_plan(32).threads == 1
    monkeypatch.setenv("MPI_LOCALNRANKS", "2")
    plan = thread_plan()
    assert (plan.local_ranks, plan.threads) == (2, 8)
    assert plan.describe().startswith("2 ranks on this machine x 8 threads")


def test_ranks_without_mpi4py_are_refused_by_name(monkeypatch):
    import sys

    from minidiff.distributed import DistributedError, setup

    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py fails
    with pytest.raises(
        DistributedError, match=r"one of 2 MPI ranks but mpi4py cannot be imported.*minidiff\[mpi\]"
    ):
        setup()


def test_one_process_never_imports_mpi(tmp_path):
    import os
    import subprocess
    import sys

    code = (
        "import sys; from minidiff.train import TrainConfig, Trainer; "
        "t = Trainer(TrainConfig.from_dict(dict(dataset='digits', image_size=8, steps=1, batch_size=4, "
        "model={'base_channels': 8, 'channel_mults': (1,), 'attn_resolutions': (), 'norm_groups': 4})), "
        f"{str(tmp_path)!r}, progress=False); t.fit(); "
        "assert 'mpi4py' not in sys.modules and t.world.size == 1 and t.averager is None"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "MPI_LOCAL", "OMPI_"))}
    env["MINIDIFF_CACHE"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(__import__("pathlib").Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr


def test_minidiff_info_says_what_each_rank_runs(monkeypatch):
    from minidiff.cli import info_lines

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("MPI_LOCALNRANKS", "4")
    (line,) = [line for line in info_lines() if line.strip().startswith("threads")]
    assert "4 ranks on this machine x 2 threads" in line and "for 8 cores (MPI_LOCALNRANKS=4)" in line


def test_one_process_trainers_refuse_mpiexec(monkeypatch, tmp_path):
    # text to image and CLIP train in one process: under mpiexec each rank would write one folder
    from minidiff.train.clip import CLIPTrainConfig, train_clip
    from minidiff.train.t2i import T2IConfig, T2ITrainer

    monkeypatch.setenv("PMI_SIZE", "2")
    with pytest.raises(ValueError, match="text-to-image training runs in one process.*without mpiexec"):
        T2ITrainer(T2IConfig(), tmp_path / "t2i", progress=False)
    with pytest.raises(ValueError, match="CLIP training runs in one process, not across 2 MPI ranks"):
        train_clip(CLIPTrainConfig(), tmp_path / "clip", progress=False)
    assert not (tmp_path / "t2i").exists() and not (tmp_path / "clip").exists()
