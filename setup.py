"""Build the optional native kernels, the extension ``minidiff._native`` (C++17, pybind11, OpenMP).

The project metadata lives in pyproject.toml; this file only adds the extension. The build is
optional: without a working C++ compiler the install still succeeds and minidiff runs its
reference and Numba kernels (``minidiff.kernels.available()`` then says why native is missing).
A compiler without OpenMP (Apple clang) gives a single-threaded extension.

    pip install .                            # or, in a checkout:
    python setup.py build_ext --inplace
"""

import glob
import sys

from setuptools import setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # only without build isolation: pyproject.toml's build requirements have it
    Pybind11Extension = build_ext = None

# (compile flags, link flags) per compiler type; others build without OpenMP.
OPENMP_FLAGS = {"unix": (["-fopenmp"], ["-fopenmp"]), "msvc": (["/openmp"], [])}
# ... and without: the OpenMP pragmas are then ignored, on purpose (the kernels run on one thread).
NO_OPENMP_FLAGS = {"unix": (["-Wno-unknown-pragmas"], [])}
# -fno-trapping-math: minidiff never enables floating-point traps, and without it GCC keeps the
# loops with a float-to-int conversion or a clamp (the vectorized exp of SiLU) scalar, six times
# slower. It changes no result (unlike -ffast-math: no reassociation, no contraction).
OPTIMIZE_FLAGS = {"unix": ["-O3", "-fno-trapping-math"]}


def warn(message):
    # setup.py output is only seen with `pip install -v`; stderr keeps it out of captured stdout.
    print(f"\nWARNING (minidiff): {message}\n", file=sys.stderr)


if build_ext is not None:

    class OptionalBuildExt(build_ext):
        """build_ext that tries with OpenMP, then without, then gives up with a warning."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # no compiler at all fails here, before build_extension
                warn(f"could not build the native kernels ({exc}); minidiff will use the others")

        def build_extension(self, ext):
            kind = self.compiler.compiler_type
            base_compile = list(ext.extra_compile_args) + OPTIMIZE_FLAGS.get(kind, [])
            base_link = list(ext.extra_link_args)
            errors = []
            for label, (compile_flags, link_flags) in (
                ("with OpenMP", OPENMP_FLAGS.get(kind, ([], []))),
                ("without OpenMP", NO_OPENMP_FLAGS.get(kind, ([], []))),
            ):
                ext.extra_compile_args = base_compile + compile_flags
                ext.extra_link_args = base_link + link_flags
                try:
                    super().build_extension(ext)
                except Exception as exc:  # CompileError, LinkError, missing compiler, ...
                    errors.append(f"{label}: {exc}")
                    self.force = True  # rebuild every object on the next attempt
                    continue
                if errors:
                    warn(f"built {ext.name} without OpenMP, so its kernels run on one thread. {errors[0]}")
                return
            warn(f"could not build {ext.name}, so minidiff will run its other kernels. {errors[-1]}")


def extensions():
    if Pybind11Extension is None:
        warn("pybind11 is not installed: skipping the native kernels")
        return []
    return [
        Pybind11Extension(
            "minidiff._native",
            sorted(glob.glob("kernels/*.cpp")),
            include_dirs=["kernels"],
            depends=sorted(glob.glob("kernels/*.h")),  # rebuild when a header changes
            cxx_std=17,
            optional=True,  # setuptools then also skips copying it in place when it is missing
        )
    ]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": OptionalBuildExt} if build_ext is not None else {},
)
