"""Shared test setup: hypothesis profiles, the CUDA simulator, the tests/ import path, float64 leaves.

Hypothesis profiles (pick one with the HYPOTHESIS_PROFILE environment variable):

    ci        15 examples per property, derandomized (the same examples every run); the default
    dev       40 examples per property
    thorough  300 examples per property, for a long run before a release

    HYPOTHESIS_PROFILE=thorough python -m pytest tests/ops

CUDA kernels without a GPU: unless NUMBA_ENABLE_CUDASIM is already set, this file sets it to 1
when there is no usable GPU (CuPy is not installed, or finds no CUDA device), before anything
imports numba. The Numba CUDA kernels then run in Numba's simulator, each thread a Python thread
on NumPy arrays, and tests/kernels/test_cuda_kernels.py checks them there; on a machine with a
GPU they run on the device, on CuPy arrays. ``NUMBA_ENABLE_CUDASIM=0`` turns the simulator off
(the CUDA tests are then skipped without a GPU).

Known minidiff bugs: a test that demonstrates one carries ``@pytest.mark.minidiff_bug("...")``
and runs as a strict xfail, so the suite stays usable while the bug is open and fails loudly
(XPASS strict) once it is fixed and the marker should go. ``MINIDIFF_KNOWN_BUGS=fail`` runs
those tests as ordinary tests, to see the failures themselves.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def _usable_gpu() -> bool:
    """Whether CuPy imports and sees a CUDA device (asked without importing numba)."""
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or a CUDA runtime or driver error
        return False


# Numba reads NUMBA_ENABLE_CUDASIM when it is first imported: this must precede the imports below.
if "NUMBA_ENABLE_CUDASIM" not in os.environ and not _usable_gpu():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Test modules import the shared strategies as ``from strategies import ...``. pytest's default
# import mode already puts tests/ on sys.path for this conftest; say so explicitly all the same,
# so the import does not depend on the import mode. (A path edit belongs here, never in minidiff.)
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from strategies import leaf  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=40, deadline=None)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "minidiff_bug(reason): the test demonstrates an open minidiff bug (a strict xfail; "
        "MINIDIFF_KNOWN_BUGS=fail runs it as a plain test)",
    )


def pytest_collection_modifyitems(config, items):
    show = os.environ.get("MINIDIFF_KNOWN_BUGS", "") == "fail"
    for item in items:
        for mark in item.iter_markers("minidiff_bug"):
            reason = mark.args[0] if mark.args else mark.kwargs.get("reason", "")
            if not show:
                item.add_marker(pytest.mark.xfail(strict=True, reason=f"minidiff bug: {reason}"))


@pytest.fixture(scope="session")
def make_leaf():
    """``make_leaf(array, requires_grad=True)``: a float64 leaf Tensor viewing ``array``.

    Session-scoped so that hypothesis tests may use it (function-scoped fixtures are not
    reset between examples). The same helper is ``strategies.leaf``.
    """
    return leaf


@pytest.fixture
def rng():
    """A fresh, seeded NumPy generator for example-based tests."""
    return np.random.default_rng(0)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A cache folder of the test's own (MINIDIFF_CACHE): the classifier and feature caches never
    reach the home directory. Modules that train or evaluate use it for every test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MINIDIFF_CACHE", str(cache))
    return cache
