"""docs/theory.md points each equation at a function: every name it gives in backticks as
``Class.method`` or ``function`` of the modules it cites must exist, so the pointers cannot go stale."""

from __future__ import annotations

import pathlib
import re

import pytest

from minidiff import kernels
from minidiff.diffusion import gaussian
from minidiff.models import autoencoder_kl

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "theory.md"
MODULES = [gaussian, autoencoder_kl, kernels]


def cited_names():
    names = set()
    for code in re.findall(r"`([^`]+)`", DOC.read_text()):
        for name in re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)(?:\(|$)", code):
            head = name.split(".")[0]
            if head in {
                "kernels",
                "GaussianDiffusion",
                "DiagonalGaussian",
                "AutoencoderKL",
            } or head.startswith("_"):
                names.add(name)
    return sorted(names)


def exists(name) -> bool:
    parts = name.split(".")
    if parts[0] == "kernels":
        return callable(getattr(kernels, parts[1], None))
    if parts[0] == "GaussianDiffusion" and len(parts) > 1:
        # an instance: the schedule's arrays and T are set in __init__
        return hasattr(gaussian.GaussianDiffusion(T=10), parts[1])
    for module in MODULES:
        if hasattr(module, parts[0]):
            return len(parts) == 1 or hasattr(getattr(module, parts[0]), parts[1])
    return False


def test_the_document_cites_the_functions():
    names = cited_names()
    assert {"GaussianDiffusion.q_sample", "DiagonalGaussian.kl", "_normal_kl", "kernels.q_sample"} <= set(
        names
    )


@pytest.mark.parametrize("name", cited_names())
def test_cited_function_exists(name):
    assert exists(name), f"docs/theory.md cites {name}, which minidiff does not define"
