"""The ``minidiff`` command line."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return "not installed"
    except Exception as exc:  # a package that is present but fails to import
        return f"broken ({type(exc).__name__}: {exc})"


def info_lines() -> list[str]:
    """What ``minidiff info`` prints: versions, devices, kernel implementations."""
    import minidiff
    from minidiff import backend, kernels

    lines = [f"minidiff {minidiff.__version__}", f"python {platform.python_version()} ({sys.executable})"]
    lines.append("packages:")
    for module in ("numpy", "scipy", "numba", "numba_cuda", "cupy", "torch"):
        lines.append(f"  {module:<11} {_version(module)}")
    lines.append("devices:")
    lines.append(f"  cpu         {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    reason = backend.cuda_unavailable_reason()
    if reason is None:
        cupy = backend.Device("cuda").xp
        for i in range(cupy.cuda.runtime.getDeviceCount()):
            name = cupy.cuda.runtime.getDeviceProperties(i)["name"]
            name = name.decode() if isinstance(name, bytes) else name
            lines.append(f"  cuda:{i:<6} {name}")
    else:
        lines.append(f"  cuda        unavailable: {reason}")
    lines.append(f"kernels (selected: {kernels.current()}):")
    for name, (ok, why) in kernels.available().items():
        lines.append(f"  {name:<11} {'available' if ok else 'missing'}: {why}")
    return lines


def cmd_info(args) -> int:
    print("\n".join(info_lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minidiff",
        description="Diffusion models and autodiff from scratch on NumPy and CuPy.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser(
        "info", help="versions, devices and available kernel implementations",
        description="Print versions, devices (CPU; GPU via CuPy, or why not) and which kernel "
        "implementations (reference, numba, native) are available.",
    )
    info.set_defaults(run=cmd_info)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
