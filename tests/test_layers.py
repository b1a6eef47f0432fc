"""The layering of docs/ARCHITECTURE.md, checked on the source: every import of every module
(deferred imports inside functions included) points down."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "minidiff"

# module prefix -> the minidiff modules it must never import (prefixes too)
# fmt: off
FORBIDDEN = {
    "minidiff.backend": ["minidiff.autograd", "minidiff.tensor", "minidiff.functional", "minidiff.ops",
                         "minidiff.kernels", "minidiff.nn", "minidiff.models"],
    "minidiff.kernels": ["minidiff.autograd", "minidiff.tensor", "minidiff.functional", "minidiff.ops",
                         "minidiff.nn", "minidiff.models", "minidiff.diffusion", "minidiff.optim"],
    "minidiff.autograd": ["minidiff.tensor", "minidiff.functional", "minidiff.ops", "minidiff.kernels",
                          "minidiff.nn"],
    "minidiff.ops": ["minidiff.tensor", "minidiff.functional", "minidiff.nn", "minidiff.models",
                     "minidiff.kernels.registry"],
    "minidiff.functional": ["minidiff.tensor", "minidiff.nn", "minidiff.models"],
    "minidiff.tensor": ["minidiff.nn", "minidiff.models", "minidiff.diffusion"],
    "minidiff.nn": ["minidiff.models", "minidiff.diffusion", "minidiff.train", "minidiff.io"],
    "minidiff.models": ["minidiff.diffusion", "minidiff.io", "minidiff.train", "minidiff.distributed",
                        "minidiff.metrics", "minidiff.data"],
    "minidiff.diffusion": ["minidiff.train", "minidiff.io", "minidiff.metrics", "minidiff.cli"],
}
# fmt: on
ONLY_TRAIN_IMPORTS = "minidiff.distributed"
# The tools built on the library: the core never imports them; the CLI and each other may.
TOOLS = ["minidiff.testing", "minidiff.bench"]
TOOL_USERS = TOOLS + ["minidiff.cli"]
# The only modules that may import PyTorch (the bench/ ones inside functions, while a benchmark runs).
TORCH_IMPORTERS = ["minidiff.testing.torch_unet", "minidiff.bench"]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path) -> set[str]:
    """Every minidiff module this file imports, at the top or inside a function, resolved to an
    absolute name; imports under ``if TYPE_CHECKING:`` (annotations only) are not imports."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for sub in node.body for n in ast.walk(sub))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)  # `from . import functional`
    return {m for m in found if m == "minidiff" or m.startswith("minidiff.")}


SOURCES = sorted(PACKAGE.rglob("*.py"))


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    name = module_name(path)
    imported = imports_of(path)
    wrong = sorted(
        target
        for layer, banned in FORBIDDEN.items()
        if _within(name, layer)
        for target in imported
        for b in banned
        if _within(target, b) and not _within(target, layer)
    )
    assert not wrong, f"{name} imports {wrong}, a layer above it (docs/ARCHITECTURE.md)"
    if not _within(name, "minidiff.train") and not _within(name, ONLY_TRAIN_IMPORTS):
        assert not [m for m in imported if _within(m, ONLY_TRAIN_IMPORTS)], f"{name} imports distributed/"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_the_core_does_not_import_the_tools(path):
    name = module_name(path)
    if any(_within(name, user) for user in TOOL_USERS):
        return
    wrong = sorted(m for m in imports_of(path) if any(_within(m, tool) for tool in TOOLS))
    assert not wrong, f"{name} imports {wrong}: the library core never imports its test and bench tools"


def torch_imports(path: pathlib.Path) -> list[str]:
    """The torch modules this file imports, at the top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.append(node.module or "")
    return [m for m in found if _within(m, "torch")]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_only_the_tools_import_torch(path):
    name = module_name(path)
    if not any(_within(name, allowed) for allowed in TORCH_IMPORTERS):
        assert not torch_imports(path), f"{name} imports torch; only {TORCH_IMPORTERS} may"


def test_the_checker_sees_relative_and_deferred_imports():
    assert {"minidiff.autograd", "minidiff.kernels"} <= imports_of(PACKAGE / "ops" / "norm.py")
    assert "minidiff.tensor" in imports_of(PACKAGE / "nn" / "module.py")
    assert "minidiff.train" in imports_of(PACKAGE / "cli.py")  # imported inside cmd_train
    assert "minidiff.bench.unet" in imports_of(PACKAGE / "cli.py")  # imported inside cmd_bench
    assert torch_imports(PACKAGE / "bench" / "unet.py") == ["torch"]  # inside make_steps
