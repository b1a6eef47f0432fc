"""The process settings minidiff applies at import (minidiff/runtime.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from minidiff.cli import main


def _malloc_note(**env):
    code = "import minidiff; print(minidiff.runtime.malloc_note())"
    env = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(platform.system() != "Linux", reason="mallopt is glibc's")
def test_import_tunes_the_allocator_on_linux():
    assert "keeps freed memory for reuse" in _malloc_note(MINIDIFF_MALLOC="")


def test_the_user_can_keep_the_allocator_defaults():
    assert _malloc_note(MINIDIFF_MALLOC="system") == "the allocator's defaults (MINIDIFF_MALLOC=system)"


def test_apply_is_idempotent():
    import minidiff

    note = minidiff.runtime.malloc_note()
    minidiff.runtime.apply()
    assert minidiff.runtime.malloc_note() == note != "not applied"


def test_info_reports_the_process_settings(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    settings = out[out.index("process settings:") :]
    assert "blas" in settings and "malloc" in settings and "GOMP_SPINCOUNT" in settings


def _run(code, **env):
    env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split("\n")


_TIMEOUT_AND_NOTE = (
    "import minidiff, os; print(os.environ['OPENBLAS_THREAD_TIMEOUT']); print(minidiff.runtime.blas_note())"
)


def test_import_sets_the_openblas_thread_timeout():
    code = _TIMEOUT_AND_NOTE
    value, note, _ = _run(code, OPENBLAS_THREAD_TIMEOUT=None)
    assert value == "4" and note == "idle OpenBLAS threads sleep at once (OPENBLAS_THREAD_TIMEOUT=4)"


def test_the_user_can_keep_their_openblas_thread_timeout():
    code = _TIMEOUT_AND_NOTE
    value, note, _ = _run(code, OPENBLAS_THREAD_TIMEOUT="12")
    assert value == "12" and note == "OpenBLAS thread timeout as set (OPENBLAS_THREAD_TIMEOUT=12)"


_OMP_NOTE = "import minidiff; print(minidiff.runtime.omp_note())"


def test_import_sets_how_openmp_workers_wait():
    (note, _) = _run(_OMP_NOTE, OMP_WAIT_POLICY=None, GOMP_SPINCOUNT=None)
    assert note.startswith("OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=3000 ")


def test_the_user_can_keep_their_openmp_wait_settings():
    (note, _) = _run(_OMP_NOTE, OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT="100")
    assert note.startswith("OMP_WAIT_POLICY=ACTIVE, GOMP_SPINCOUNT=100 ")


# Thread states ("R" running, "S" sleeping) of this process's threads but the main one, a few
# milliseconds after some matrix products: a spinning OpenBLAS thread shows as running.
_STATES_AFTER_PRODUCTS = """
import os, threading, time
import numpy as np
{imports}
a = np.random.default_rng(0).standard_normal((600, 600)).astype(np.float32)
for _ in range(3):
    a @ a
time.sleep(0.005)
states = []
for tid in os.listdir("/proc/self/task"):
    if int(tid) != threading.get_native_id():
        with open(f"/proc/self/task/{{tid}}/stat") as f:
            states.append(f.read().rsplit(")", 1)[1].split()[0])
print("".join(states) or "-")
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="reads thread states from /proc")
def test_openblas_threads_sleep_after_products_even_when_numpy_came_first():
    control = _run(_STATES_AFTER_PRODUCTS.format(imports=""), OPENBLAS_THREAD_TIMEOUT=None)[0]
    if "R" not in control:
        pytest.skip(f"this NumPy's BLAS threads do not spin after a product (states {control})")
    # numpy (and its OpenBLAS, threads started) before minidiff: minidiff restarts them
    states = _run(_STATES_AFTER_PRODUCTS.format(imports="import minidiff"), OPENBLAS_THREAD_TIMEOUT=None)[0]
    assert "R" not in states, f"thread states {states}: an OpenBLAS thread still spins"
