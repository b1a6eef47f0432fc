"""The kernel benchmark (minidiff.bench.kernels, bench/kernels.py, ``minidiff bench``).

Runs use ``--shapes tiny`` (smoke-test shapes, an 8 MiB copy): these tests check what the
benchmark produces, never how fast anything is."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from minidiff import kernels
from minidiff.bench import harness
from minidiff.bench import kernels as benchmark
from minidiff.cli import main as cli_main

ROW_KEYS = {
    "op",
    "shape",
    "impl",
    "median_ms",
    "vs_reference",
    "vs_torch",
    "throughput",
    "unit",
    "ceiling_pct",
    "max_abs_diff",
    "note",
}


def tiny_run(tmp_path, *ops):
    path = tmp_path / "kernels.json"
    code = benchmark.main(["--quick", "--shapes", "tiny", "--json", str(path), "--ops", *ops])
    assert code == 0
    return json.loads(path.read_text())


def test_ceilings_are_positive():
    c = harness.measure_ceilings(*benchmark.CEILING_RUNS["tiny"])
    assert c["gemm_gflops"] > 0 and math.isfinite(c["gemm_gflops"])
    assert c["copy_gbs"] > 0 and math.isfinite(c["copy_gbs"])


def test_quick_run_writes_rows_and_json(tmp_path, capsys):
    pytest.importorskip("torch")
    report = tiny_run(tmp_path, "im2col", "softmax_forward")
    assert {"date", "machine", "options", "ceilings", "rows"} <= set(report)
    assert report["machine"]["cores"] >= 1
    assert report["ceilings"]["copy_gbs"] > 0
    for op in ("im2col", "softmax_forward"):
        rows = [r for r in report["rows"] if r["op"] == op]
        assert {r["impl"] for r in rows} == set(kernels.implementations(op)) | {"torch"}
        assert len({r["shape"] for r in rows}) == 1  # --quick: one shape per op
        for r in rows:
            assert set(r) == ROW_KEYS
            assert r["median_ms"] > 0 and r["note"] == ""
            assert r["unit"] == "GB/s" and r["throughput"] > 0 and r["ceiling_pct"] > 0
            assert r["vs_reference"] > 0 and r["vs_torch"] > 0
        assert next(r for r in rows if r["impl"] == "reference")["vs_reference"] == 1.0
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1].startswith("softmax_forward") and "torch" in out[-1]  # the table comes last


def test_every_factory_runs_every_implementation(tmp_path):
    """Catches a factory left behind by a kernel whose signature changed."""
    report = tiny_run(tmp_path, *benchmark.FACTORIES)
    assert report["rows"]
    for r in report["rows"]:
        assert r["median_ms"] is not None and r["note"] == "", r


def test_without_torch_the_column_says_na(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(benchmark, "import_torch", lambda: None)
    report = tiny_run(tmp_path, "group_norm_forward")
    assert report["rows"] and all(r["impl"] != "torch" and r["vs_torch"] is None for r in report["rows"])
    table = capsys.readouterr().out.splitlines()
    assert all(" n/a " in line for line in table if line.startswith("group_norm_forward"))


def test_an_op_without_factory_is_a_note(monkeypatch, tmp_path):
    monkeypatch.delitem(benchmark.FACTORIES, "softmax_backward")
    report = tiny_run(tmp_path, "softmax_backward")
    (row,) = report["rows"]
    assert row["median_ms"] is None and row["note"].startswith("no factory")


def test_outputs_are_checked_against_the_reference():
    x = np.ones((4, 4), np.float32)
    case = harness.Case("x(4,4)", (x,), bytes=2 * x.nbytes)
    impls = {"reference": lambda x: 2 * x, "numba": lambda x: 2 * x + 1, "native": lambda x: x[0, 5]}
    ceilings = {"gemm_gflops": 1.0, "copy_gbs": 1.0}
    rows = harness.bench_case("double", case, impls, None, ceilings, repeats=1, warmup=0)
    ref, wrong, broken = rows
    assert ref["note"] == "" and ref["max_abs_diff"] is None
    assert wrong["note"].startswith("differs from the reference") and wrong["median_ms"] > 0
    assert broken["note"].startswith("error: IndexError") and broken["median_ms"] is None


def test_unknown_ops_filter_fails_with_the_known_ops(capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--ops", "no_such_op", "--shapes", "tiny"])
    assert exc.value.code == 2
    assert "im2col" in capsys.readouterr().err


def test_cli_bench_help():
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "--help"])
    assert exc.value.code == 0


def test_cli_bench_runs(tmp_path):
    path = tmp_path / "out" / "bench.json"
    assert cli_main(["bench", "--quick", "--shapes", "tiny", "--ops", "col2im", "--json", str(path)]) == 0
    assert {r["op"] for r in json.loads(path.read_text())["rows"]} == {"col2im"}


def test_module_does_not_import_torch():
    code = "import sys, minidiff.bench.kernels; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the U-Net benchmark (minidiff.bench.unet, bench/unet.py, ``minidiff bench --unet``) -----------

TINY_UNET = [
    "--batch",
    "2",
    "--image-size",
    "8",
    "--channels",
    "8",
    "--mults",
    "1",
    "2",
    "--norm-groups",
    "4",
]


def test_cli_bench_unet_runs(tmp_path):
    """A toy model, one round: both frameworks measured in their own processes, the same
    parameter count, the ratios those of the times."""
    pytest.importorskip("torch")
    path = tmp_path / "unet.json"
    args = ["bench", "--unet", *TINY_UNET, "--repeats", "1", "--rounds", "1", "--json", str(path)]
    assert cli_main(args) == 0
    report = json.loads(path.read_text())
    assert report["config"]["batch"] == 2 and report["config"]["channel_mults"] == [1, 2]
    mine, theirs = report["results"]["minidiff"], report["results"]["torch"]
    assert mine["params"] == theirs["params"] > 0
    for key in ("train_ms", "sample_ms", "peak_mb"):
        assert mine[key] > 0 and theirs[key] > 0
        assert report["ratios"][key] == pytest.approx(mine[key] / theirs[key])


def test_cli_bench_options_of_the_other_mode_are_refused(capsys):
    assert cli_main(["bench", "--batch", "4"]) == 2
    assert "--batch only apply with --unet" in capsys.readouterr().err
    assert cli_main(["bench", "--unet", "--ops", "softmax", "--quick"]) == 2
    assert "--ops, --quick only apply without --unet" in capsys.readouterr().err


def test_cli_bench_unet_without_torch_says_so(monkeypatch, capsys):
    monkeypatch.setattr(harness, "import_torch", lambda: None)
    assert cli_main(["bench", "--unet", *TINY_UNET]) == 1
    assert "compares against PyTorch, which is not installed" in capsys.readouterr().err


def test_unet_benchmark_module_does_not_import_torch():
    code = "import sys, minidiff.bench.unet, minidiff.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the Stable Diffusion benchmark (minidiff.bench.sd, bench/sd.py) -------------------------------


def test_sd_bench_tiny_runs_both_frameworks_on_one_folder(tmp_path, capsys):
    """The tiny configs: diffusers builds the folder, both frameworks load it in their own
    processes and give the same output; times, memory and ratios reported."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from minidiff.bench import sd

    path = tmp_path / "sd.json"
    assert sd.main(["--tiny", "--parts", "unet", "--repeats", "1", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert set(report["results"]) == {"unet"} and "image" not in report
    for row in report["results"].values():
        assert row["max_abs_diff"] <= 1e-4 * row["max_abs_theirs"]
        for fw in ("minidiff", "torch"):
            assert row[fw]["seconds"] > 0 and row[fw]["peak_mb"] >= row[fw]["loaded_mb"] > 0
        assert row["time_ratio"] == pytest.approx(row["minidiff"]["seconds"] / row["torch"]["seconds"])
    assert "U-Net forward, 2x4x16x16 + 2x77x32" in capsys.readouterr().out


def test_cli_bench_sd_options_are_refused_elsewhere(capsys):
    assert cli_main(["bench", "--tiny", "--quick"]) == 2
    assert "--tiny only apply with --sd" in capsys.readouterr().err
    assert cli_main(["bench", "--sd", "--unet"]) == 2
    assert "give --sd or --unet, not both" in capsys.readouterr().err


def test_trained_run_takes_a_checkpoint_or_trains(capsys):
    """The quality benchmarks' run: a checkpoint as given, untrained; else the trained folder, or
    None with the reason when training stopped early."""

    class Trainer:
        def __init__(self, result):
            self.result = result

        def fit(self):
            return self.result

    def refuse():
        raise AssertionError("a given checkpoint trains nothing")

    assert harness.trained_run("runs/given", "runs/out", refuse) == ("runs/given", None)
    run, seconds = harness.trained_run(None, "runs/out", lambda: Trainer({"status": "finished"}))
    assert run == "runs/out" and seconds >= 0
    stopped = {"status": "diverged", "stage": "autoencoder", "step": 7}
    assert harness.trained_run(None, "runs/out", lambda: Trainer(stopped))[0] is None
    assert "training diverged in autoencoder at step 7" in capsys.readouterr().err
