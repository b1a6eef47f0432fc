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
    assert "jit cache" in settings and "NUMBA_CACHE_DIR" in settings


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


# A Numba kernel with cache=True, compiled in a fresh process; prints where its cache went.
_COMPILE_A_CACHED_KERNEL = """
import numpy as np
import minidiff
from minidiff import kernels
x = np.random.default_rng(0).standard_normal((2, 4, 3, 3)).astype(np.float32)
with kernels.use("numba"):
    kernels.group_norm_forward(x, None, None, 2, 1e-5)
import numba
print(numba.config.CACHE_DIR)
print(minidiff.runtime.jit_cache_note())
"""


def _package_cache_files():
    import minidiff

    package = os.path.dirname(minidiff.__file__)
    return {os.path.join(d, f) for d, _, fs in os.walk(package) for f in fs if f.endswith((".nbi", ".nbc"))}


@pytest.mark.parametrize("numba_first", [False, True], ids=["minidiff-first", "numba-first"])
def test_jit_cache_goes_to_the_user_cache_not_the_package(tmp_path, numba_first):
    before = _package_cache_files()
    code = ("import numba\n" if numba_first else "") + _COMPILE_A_CACHED_KERNEL
    cache_dir, note, _ = _run(
        code, XDG_CACHE_HOME=str(tmp_path), NUMBA_CACHE_DIR=None, MINIDIFF_CACHE=None
    )
    expected = tmp_path / "minidiff" / "numba"
    assert cache_dir == str(expected) and note.startswith(str(expected))
    assert list(expected.rglob("*.nbi")), "the kernel was not cached in the user cache folder"
    assert _package_cache_files() == before  # nothing written into the installed package


def test_jit_cache_follows_the_users_choice(tmp_path):
    cache_dir, note, _ = _run(_COMPILE_A_CACHED_KERNEL, MINIDIFF_CACHE=str(tmp_path / "c"), NUMBA_CACHE_DIR=None)
    assert cache_dir == str(tmp_path / "c" / "numba") and list((tmp_path / "c" / "numba").rglob("*.nbi"))
    cache_dir, note, _ = _run(_COMPILE_A_CACHED_KERNEL, NUMBA_CACHE_DIR=str(tmp_path / "mine"))
    assert cache_dir == str(tmp_path / "mine") and note == f"{tmp_path / 'mine'} (as set in NUMBA_CACHE_DIR)"
