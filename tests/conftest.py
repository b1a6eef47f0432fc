"""Shared test setup: hypothesis profiles, the tests/ import path, float64 leaf tensors.

Hypothesis profiles (pick one with the HYPOTHESIS_PROFILE environment variable):

    ci        15 examples per property, derandomized (the same examples every run); the default
    dev       40 examples per property
    thorough  300 examples per property, for a long run before a release

    HYPOTHESIS_PROFILE=thorough python -m pytest tests/ops

Known minidiff bugs: a test that demonstrates one carries ``@pytest.mark.minidiff_bug("...")``
and runs as a strict xfail, so the suite stays usable while the bug is open and fails loudly
(XPASS strict) once it is fixed and the marker should go. ``MINIDIFF_KNOWN_BUGS=fail`` runs
those tests as ordinary tests, to see the failures themselves.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

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
