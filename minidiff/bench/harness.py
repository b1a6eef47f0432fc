"""What every benchmark shares: timing, the comparison with the reference and with PyTorch in
the same run, the machine, and the report (JSON, then the table printed last).

A measurement is the median over repeated samples after warm-up calls (``median_seconds``); a
ratio is time over time (below 1: faster), both sides measured in the same process and run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

F32 = 4  # bytes per float32 element
# An implementation whose outputs differ from the reference's by more than this is flagged in the
# notes (a sanity check only: tests/kernels holds the real tolerances).
RTOL, ATOL = 1e-3, 1e-3


@dataclass
class Case:
    """One workload of one op: what every implementation is called with, and what it moves."""

    shape: str  # the label in the table, e.g. "x(64,32,16,16) k3 s1 p1"
    args: tuple
    kwargs: dict = field(default_factory=dict)
    bytes: int = 0  # bytes read + written by one call (the minimum traffic), for GB/s
    flops: int = 0  # floating-point operations of one call, for GEMM-like work (then GFLOP/s)
    torch: Callable | None = None  # torch module -> zero-argument callable doing the same work


# -- measuring -------------------------------------------------------------------------------


def median_seconds(fn, repeats: int, warmup: int = 2, min_sample_s: float = 0.005) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` samples, after ``warmup`` calls.

    Calls shorter than ``min_sample_s`` are looped within a sample (timer resolution, overhead).
    """
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    inner = max(1, min(1000, int(min_sample_s / max(once, 1e-9))))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - start) / inner)
    return float(np.median(samples))


def measure_ceilings(gemm_sizes=(1024, 1536, 2048), gemm_repeats=5, copy_mib=256, copy_repeats=7) -> dict:
    """This machine's float32 GEMM GFLOP/s and copy GB/s (read + write bytes), measured now."""
    rng = np.random.default_rng(0)
    rates = []
    for n in gemm_sizes:
        a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
        out = np.empty((n, n), np.float32)
        np.matmul(a, b, out=out)  # warm-up: BLAS threads, pages of out
        for _ in range(gemm_repeats):
            start = time.perf_counter()
            np.matmul(a, b, out=out)
            rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    src = np.ones(copy_mib * 2**20 // F32, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # warm-up: touches every page of dst
    seconds = median_seconds(lambda: np.copyto(dst, src), copy_repeats, warmup=0, min_sample_s=0)
    return {
        "gemm_gflops": float(np.median(rates)),
        "copy_gbs": 2 * src.nbytes / seconds / 1e9,
        "gemm_sizes": list(gemm_sizes),
        "copy_mib": copy_mib,
    }


def _copies(args) -> list:
    return [a.copy() if isinstance(a, np.ndarray) else a for a in args]


def _outputs(fn, args, kwargs) -> list:
    """The arrays one call produces, on copies of ``args``: what it returns, then the inputs
    (ops that update in place, like optimizer steps, return nothing)."""
    args = _copies(args)
    result = fn(*args, **kwargs)
    results = list(result) if isinstance(result, (tuple, list)) else [result]
    return results + [a for a in args if isinstance(a, np.ndarray)]


def _compare(outs, ref_outs) -> tuple[float, bool]:
    """(largest absolute difference, whether every output agrees within RTOL, ATOL)."""
    if len(outs) != len(ref_outs):
        return math.inf, False
    worst, agree = 0.0, True
    for a, b in zip(outs, ref_outs):
        if a is None or b is None:
            agree = agree and (a is None) == (b is None)
            continue
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            return math.inf, False
        if a.size:
            worst = max(worst, float(np.abs(a - b).max()))
            agree = agree and bool(np.allclose(a, b, rtol=RTOL, atol=ATOL))
    return worst, agree


def make_row(op, shape, impl, seconds=None, note=""):
    return {
        "op": op,
        "shape": shape,
        "impl": impl,
        "median_ms": None if seconds is None else 1e3 * seconds,
        "vs_reference": None,
        "vs_torch": None,
        "throughput": None,
        "unit": None,
        "ceiling_pct": None,
        "max_abs_diff": None,
        "note": note,
    }


def error_note(exc) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"error: {type(exc).__name__}: {text}"[:160]


def bench_case(op, case, impls, torch, ceilings, repeats, warmup) -> list[dict]:
    """Rows for one case: each implementation, then PyTorch (when it has this work)."""
    rows, ref_outs = [], None
    pristine = _copies(case.args)  # the timed calls of in-place ops (Adam, EMA) change case.args
    for impl, fn in impls.items():
        try:
            outs = _outputs(fn, pristine, case.kwargs)  # also compiles Numba kernels before timing
            seconds = median_seconds(lambda fn=fn: fn(*case.args, **case.kwargs), repeats, warmup)
        except Exception as exc:  # a kernel that fails is a row that says so, not a failed run
            rows.append(make_row(op, case.shape, impl, note=error_note(exc)))
            continue
        row = make_row(op, case.shape, impl, seconds)
        if impl == "reference":
            ref_outs = outs
        elif ref_outs is not None:
            diff, agree = _compare(outs, ref_outs)
            row["max_abs_diff"] = diff if math.isfinite(diff) else None
            if not agree:
                row["note"] = f"differs from the reference (max |diff| {diff:.3g})"
        rows.append(row)
    if torch is not None and case.torch is not None:
        try:
            seconds = median_seconds(case.torch(torch), repeats, warmup)
            rows.append(make_row(op, case.shape, "torch", seconds))
        except Exception as exc:
            rows.append(make_row(op, case.shape, "torch", note=error_note(exc)))
    times = {r["impl"]: r["median_ms"] for r in rows if r["median_ms"] is not None}
    for row in rows:
        ms = row["median_ms"]
        if ms is None:
            continue
        if "reference" in times:
            row["vs_reference"] = ms / times["reference"]
        if "torch" in times:
            row["vs_torch"] = ms / times["torch"]
        if case.flops:
            row["throughput"], row["unit"] = case.flops / ms / 1e6, "GFLOP/s"
            row["ceiling_pct"] = 100 * row["throughput"] / ceilings["gemm_gflops"]
        elif case.bytes:
            row["throughput"], row["unit"] = case.bytes / ms / 1e6, "GB/s"
            row["ceiling_pct"] = 100 * row["throughput"] / ceilings["copy_gbs"]
    return rows


def import_torch():
    """The torch module, or None where PyTorch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def require_torch(benchmark: str, packages: str = "torch==2.13.0, the CPU build"):
    """The torch module for a benchmark that compares against it; a RuntimeError naming the
    benchmark and what to install where PyTorch is not installed."""
    torch = import_torch()
    if torch is None:
        raise RuntimeError(f"{benchmark}, which is not installed (pip install {packages})")
    return torch


def machine(torch=None) -> dict:
    """The machine, the versions and the kernel implementations the numbers were measured with."""
    from minidiff import kernels

    versions = {"python": platform.python_version(), "numpy": np.__version__, "numba": None}
    try:
        import numba

        versions["numba"] = numba.__version__
    except ImportError:
        pass
    versions["torch"] = torch.__version__ if torch is not None else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        **versions,
        "kernels": {name: why for name, (ok, why) in kernels.available().items()},
    }


@contextlib.contextmanager
def torch_on_every_core(torch):
    """PyTorch's intra-op threads on every core while the block runs, as minidiff's kernels and
    NumPy's BLAS use them (nothing to do without torch)."""
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# -- the report ------------------------------------------------------------------------------


def _ms(ms) -> str:
    return "-" if ms is None else f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def _ratio(value, missing) -> str:
    return missing if value is None else f"{value:.2f}"


def format_table(report) -> str:
    """The table ``run`` measured, with the machine and the ceilings above it."""
    c, m, o = report["ceilings"], report["machine"], report["options"]
    sizes = "/".join(f"{n}^2" for n in c["gemm_sizes"])
    lines = [
        f"kernel benchmark {report['date']}: {m['processor']}, {m['cores']} cores; "
        f"numpy {m['numpy']}, numba {m['numba'] or 'missing'}, torch {m['torch'] or 'missing'}",
        f"ceilings: float32 GEMM {c['gemm_gflops']:.1f} GFLOP/s (median over {sizes} matmuls), "
        f"copy {c['copy_gbs']:.1f} GB/s (np.copyto of {c['copy_mib']} MiB, read + write)",
        f"median of {o['repeats']} after {o['warmup']} warm-up calls; /ref, /torch: time over time "
        "(below 1: faster); % ceil: of the copy GB/s (or the GEMM GFLOP/s); over 100%: the "
        "data sits in cache, or two threads beat the one-thread np.copyto",
        "",
    ]
    header = ("op", "shape", "impl", "ms", "/ref", "/torch", "throughput", "% ceil", "note")
    table = [header]
    for r in report["rows"]:
        rate = r["throughput"]
        table.append(
            (
                r["op"],
                r["shape"],
                r["impl"],
                _ms(r["median_ms"]),
                _ratio(r["vs_reference"], "-"),
                _ratio(r["vs_torch"], "n/a"),
                "-" if rate is None else f"{rate:.1f} {r['unit']}",
                "-" if rate is None else f"{r['ceiling_pct']:.0f}%",
                r["note"],
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    right = {3, 4, 5, 6, 7}
    for row in table:
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def write_report(report: dict, path, table: str) -> None:
    """Write the JSON report to path (its folder created), then print the table last."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    print(table)


def command_parser(prog, description) -> argparse.ArgumentParser:
    """The parser of a benchmark's command line, its module docstring as the help text."""
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def trained_run(checkpoint, out, make_trainer) -> tuple[str | None, float | None]:
    """``(run folder, training seconds)`` for a quality benchmark: ``checkpoint`` as given (no
    training), or ``out`` once ``make_trainer().fit()`` has trained there; the folder is None
    (the reason printed) when the training did not finish."""
    if checkpoint is not None:
        return checkpoint, None
    start = time.perf_counter()
    result = make_trainer().fit()
    seconds = time.perf_counter() - start
    if result["status"] != "finished":
        stage = f" in {result['stage']}" if "stage" in result else ""
        print(f"training {result['status']}{stage} at step {result['step']}", file=sys.stderr)
        return None, seconds
    return out, seconds


def dated_machine() -> dict:
    """Today's date and the machine, the heading of a quality report."""
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
