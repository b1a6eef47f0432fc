"""The kernel registry: use() validation and restore, fallback order, devices, MINIDIFF_KERNELS."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minidiff import kernels
from minidiff.kernels import machine, registry


@pytest.fixture(autouse=True)
def restore_choice(monkeypatch):
    """Each test starts from the current choice and leaves it (and the cache) as it found it."""
    monkeypatch.setattr(registry, "_choice", registry._choice)
    yield
    monkeypatch.undo()
    registry._selected.clear()


@pytest.fixture
def fake_op():
    """A test-only op with a reference and a numba version that say which one ran."""
    op = "_test_only_op"
    registry.register(op, "reference")(lambda x: "reference")
    registry.register(op, "numba")(lambda x: "numba")
    yield op, registry.dispatcher(op)
    registry._TABLE.pop(op, None)
    registry._selected.pop(op, None)


needs_numba = pytest.mark.skipif(not kernels.available()["numba"][0], reason=kernels.available()["numba"][1])
needs_native = pytest.mark.skipif(
    not kernels.available()["native"][0], reason=kernels.available()["native"][1]
)
needs_cuda = pytest.mark.skipif(not kernels.available()["cuda"][0], reason=kernels.available()["cuda"][1])


class DeviceArray:
    """Stands for a CuPy array in the dispatcher: not a NumPy array, a type from the cupy package."""

    __module__ = "cupy._core.core"
    __cuda_array_interface__ = {}


class OtherDeviceArray:
    """Another array type with the CUDA array interface (a PyTorch tensor's class has it too)."""

    __cuda_array_interface__ = {}


def test_names_and_availability():
    assert kernels.IMPLEMENTATIONS == ("reference", "numba", "native", "cuda")
    status = kernels.available()
    assert set(status) == set(kernels.IMPLEMENTATIONS)
    assert status["reference"][0] is True
    assert all(isinstance(ok, bool) and isinstance(why, str) and why for ok, why in status.values())


def test_every_op_has_a_reference_and_only_available_implementations():
    for op in (
        "im2col",
        "col2im",
        "group_norm_forward",
        "group_norm_backward",
        "softmax_forward",
        "softmax_backward",
    ):
        impls = kernels.implementations(op)
        assert "reference" in impls
        assert all(kernels.available()[name][0] for name in impls)
        assert getattr(kernels, op).__doc__ == impls["reference"].__doc__


def test_use_rejects_unknown_names():
    with pytest.raises(ValueError, match="'auto', 'reference', 'numba', 'native', 'cuda'"):
        kernels.use("opencl")
    with pytest.raises(ValueError):
        kernels.register("im2col", "fortran")


def test_use_refuses_an_implementation_that_is_not_available(monkeypatch):
    monkeypatch.setitem(
        registry._AVAILABLE, "native", (False, "the native extension minidiff._native is not built (test)")
    )
    before = kernels.current()
    with pytest.raises(RuntimeError, match="'native'.*not built"):
        kernels.use("native")
    assert kernels.current() == before


@pytest.mark.skipif(kernels.available()["native"][0], reason="the native extension is built here")
def test_use_native_without_the_extension_says_it_is_not_built():
    with pytest.raises(RuntimeError, match="not built"):
        kernels.use("native")


def test_use_persists_and_the_context_manager_restores():
    kernels.use("auto")
    kernels.use("reference")
    assert kernels.current() == "reference"
    with kernels.use("auto"):
        assert kernels.current() == "auto"
        with kernels.use("reference"):
            assert kernels.current() == "reference"
        assert kernels.current() == "auto"
    assert kernels.current() == "reference"
    with pytest.raises(KeyError), kernels.use("auto"):
        raise KeyError("restores on the way out of an exception too")
    assert kernels.current() == "reference"


def test_selection_runs_the_chosen_implementation():
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4))
    for name in kernels.implementations("im2col"):
        with kernels.use(name):
            assert kernels.which("im2col") == name
            np.testing.assert_array_equal(
                kernels.im2col(x, 3, 3, (1, 1), (1, 1)),
                kernels.implementations("im2col")["reference"](x, 3, 3, (1, 1), (1, 1)),
            )


def test_auto_picks_the_fastest_present():
    with kernels.use("auto"):
        for op in ("im2col", "group_norm_forward", "softmax_forward"):
            present = kernels.implementations(op)
            assert kernels.which(op) == next(n for n in ("native", "numba", "reference") if n in present)


@needs_numba
def test_missing_implementations_fall_back_in_speed_order(fake_op, monkeypatch):
    op, dispatch = fake_op
    monkeypatch.setitem(registry._AVAILABLE, "native", (True, "pretend it is built"))
    with kernels.use("native"):  # the op has no native version: the next fastest runs
        assert dispatch(np.zeros(1)) == "numba"
    with kernels.use("auto"):
        assert dispatch(np.zeros(1)) == "numba"
    with kernels.use("numba"):
        assert dispatch(np.zeros(1)) == "numba"
    with kernels.use("reference"):
        assert dispatch(np.zeros(1)) == "reference"


@needs_native
@needs_numba
def test_native_choice_falls_back_to_numba():
    with kernels.use("native"):
        assert kernels.which("im2col") == "native"
        assert kernels.which("adam_update") == "numba"  # there is no native Adam


@needs_numba
def test_non_numpy_arrays_run_the_reference(fake_op):
    """CuPy arrays (anything that is not a NumPy array) always get the xp reference."""
    _, dispatch = fake_op
    with kernels.use("numba"):
        assert dispatch(np.zeros(1)) == "numba"
        assert dispatch(object()) == "reference"


@needs_numba
def test_numba_softmax_on_other_axes_runs_the_reference():
    x = np.random.default_rng(1).standard_normal((3, 4, 5))
    reference = kernels.implementations("softmax_forward")["reference"]
    with kernels.use("numba"):
        for axis in (0, 1, -2, 2, -1):
            np.testing.assert_allclose(
                kernels.softmax_forward(x, axis=axis, scale=0.5), reference(x, axis, 0.5), rtol=1e-12
            )


def test_environment_variable_is_read_once(monkeypatch):
    monkeypatch.setattr(registry, "_choice", None)  # as if nothing had been selected yet
    monkeypatch.setenv("MINIDIFF_KERNELS", "Reference ")
    assert kernels.current() == "reference"
    monkeypatch.setenv("MINIDIFF_KERNELS", "auto")
    assert kernels.current() == "reference"


def test_environment_variable_errors_name_the_variable(monkeypatch):
    monkeypatch.setattr(registry, "_choice", None)
    monkeypatch.setenv("MINIDIFF_KERNELS", "fastest")
    with pytest.raises(ValueError, match="MINIDIFF_KERNELS"):
        kernels.current()
    with kernels.use("reference"):  # an explicit choice overrides a bad variable
        assert kernels.which("im2col") == "reference"
    monkeypatch.setitem(registry._AVAILABLE, "numba", (False, "numba is not installed (test)"))
    monkeypatch.setenv("MINIDIFF_KERNELS", "numba")
    with pytest.raises(RuntimeError, match="MINIDIFF_KERNELS.*not installed"):
        kernels.im2col(np.zeros((1, 1, 2, 2)), 1, 1, (1, 1), (0, 0))


def test_environment_variable_in_a_fresh_process():
    code = "from minidiff import kernels; print(kernels.current(), kernels.which('im2col'))"
    env = dict(os.environ, MINIDIFF_KERNELS="reference")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["reference", "reference"]


# -- the CUDA kernels: device arrays, use("cuda"), which(device=...) -----------------------------


@pytest.fixture
def fake_gpu_op(monkeypatch):
    """A test-only op with reference, numba and cuda versions that say which one ran; CUDA counts
    as usable (whatever this machine has) unless a test says otherwise."""
    monkeypatch.setattr(machine, "cuda_missing", None)
    monkeypatch.setitem(registry._AVAILABLE, "cuda", (True, "pretend there is a GPU"))
    op = "_test_only_gpu_op"
    for impl in ("reference", "numba", "cuda"):
        registry.register(op, impl)(lambda x, impl=impl: impl)
    yield op, registry.dispatcher(op)
    registry._TABLE.pop(op, None)
    registry._selected.clear()


@needs_numba
def test_numpy_arrays_never_run_the_cuda_kernels(fake_gpu_op):
    op, dispatch = fake_gpu_op
    cases = [("auto", "numba"), ("numba", "numba"), ("reference", "reference"), ("cuda", "numba")]
    for choice, expected in cases:
        with kernels.use(choice):
            assert dispatch(np.zeros(1)) == expected, choice
            assert kernels.which(op) == expected


@needs_numba
def test_device_arrays_run_the_cuda_kernels_unless_the_reference_is_chosen(fake_gpu_op):
    op, dispatch = fake_gpu_op
    cases = [("auto", "cuda"), ("numba", "cuda"), ("cuda", "cuda"), ("reference", "reference")]
    for choice, expected in cases:
        with kernels.use(choice):
            assert dispatch(DeviceArray()) == expected, choice
            assert kernels.which(op, device="cuda") == expected
            assert kernels.which(op, device="cuda:1") == expected
    assert dispatch(object()) == "reference"  # neither a NumPy nor a device array
    # the CUDA kernels create their outputs with CuPy: other arrays with the CUDA array interface
    # (a PyTorch tensor's class has it, on the CPU too) are not theirs
    assert dispatch(OtherDeviceArray()) == "reference"


@needs_numba
def test_device_arrays_run_the_reference_where_cuda_is_not_usable(fake_gpu_op, monkeypatch):
    op, dispatch = fake_gpu_op
    monkeypatch.setitem(registry._AVAILABLE, "cuda", (False, "no CUDA GPU here (test)"))
    with kernels.use("auto"):
        assert dispatch(DeviceArray()) == "reference"
        assert kernels.which(op, device="cuda") == "reference"
        assert set(kernels.implementations(op, device="cuda")) == {"reference"}
    before = kernels.current()
    with pytest.raises(RuntimeError, match=r"'cuda'.*not available: no CUDA GPU here \(test\)"):
        kernels.use("cuda")
    assert kernels.current() == before


@needs_numba
def test_device_arrays_of_an_op_without_a_cuda_version_run_the_reference(fake_op):
    op, dispatch = fake_op
    with kernels.use("numba"):
        assert dispatch(DeviceArray()) == "reference"
        assert kernels.which(op, device="cuda") == "reference"


def test_implementations_by_device(fake_gpu_op):
    op, _ = fake_gpu_op
    cpu = kernels.implementations(op)
    assert "cuda" not in cpu and cpu == kernels.implementations(op, device="cpu")
    assert set(kernels.implementations(op, device="cuda")) == {"reference", "cuda"}
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'.*'tpu'"):
        kernels.implementations(op, device="tpu")
    with pytest.raises(ValueError, match="device must be"):
        kernels.which(op, device="gpu")


def test_cuda_versions_are_registered_only_where_numba_cuda_imports(monkeypatch):
    monkeypatch.setattr(machine, "cuda_missing", "numba.cuda cannot be imported (test)")
    op = "_test_only_cpu_only_op"
    try:
        registry.register(op, "reference")(lambda x: "reference")
        registry.register(op, "cuda")(lambda x: "cuda")
        assert set(registry._TABLE[op]) == {"reference"}
    finally:
        registry._TABLE.pop(op, None)


@needs_cuda
def test_use_cuda_leaves_numpy_arrays_to_auto():
    with kernels.use("auto"):
        auto = {op: kernels.which(op) for op in ("im2col", "softmax_forward", "adam_update")}
    with kernels.use("cuda"):
        assert kernels.current() == "cuda"
        assert {op: kernels.which(op) for op in auto} == auto
        x = np.random.default_rng(0).standard_normal((1, 2, 4, 4))
        np.testing.assert_array_equal(
            kernels.im2col(x, 3, 3, (1, 1), (1, 1)),
            kernels.implementations("im2col")["reference"](x, 3, 3, (1, 1), (1, 1)),
        )


def test_without_a_cuda_driver_numba_cuda_is_not_even_imported():
    """``import minidiff`` on a machine without a GPU pays nothing for the CUDA kernels."""
    if machine.cuda_driver_present():
        pytest.skip("this machine has a CUDA driver")
    code = (
        "import sys; from minidiff import kernels; print('numba.cuda' in sys.modules); "
        "print(kernels.available()['cuda'][1])\n"
        "try:\n    kernels.use('cuda')\nexcept RuntimeError as exc:\n    print(exc)"
    )
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True
    )
    imported, why, error = out.stdout.splitlines()
    assert imported == "False"
    assert why.startswith("no CUDA driver library")
    assert error.startswith("kernel implementation 'cuda' (from use()) is not available: no CUDA driver")


def test_cuda_kernels_launch_on_cupys_current_stream(monkeypatch):
    from types import SimpleNamespace

    from minidiff import backend
    from minidiff.kernels import _cuda

    current = SimpleNamespace(ptr=1234)
    fake_cupy = SimpleNamespace(cuda=SimpleNamespace(get_current_stream=lambda: current))
    monkeypatch.setattr(backend, "_cupy", fake_cupy)  # what get_array_module loads for CuPy arrays
    monkeypatch.setattr(_cuda, "cuda", SimpleNamespace(external_stream=lambda ptr: ("external", ptr)))
    assert _cuda.launch_stream((np.zeros(3), 2.0)) == 0  # NumPy (the simulator): Numba's default
    assert _cuda.launch_stream((np.zeros(3), DeviceArray())) == ("external", 1234)
    current.ptr = 0  # CuPy's default stream is the legacy default stream, Numba's too
    assert _cuda.launch_stream((DeviceArray(),)) == 0


def test_cuda_status_says_why_kernels_cannot_be_compiled(monkeypatch):
    class Device:
        name, compute_capability = b"Test GPU", (9, 0)

    class Driver:
        def is_available(self):
            return True

        def get_current_device(self):
            return Device()

        def jit(self, fn):
            raise OSError("libnvrtc.so.12: cannot open shared object file")

    monkeypatch.setattr(machine, "cuda_missing", None)
    monkeypatch.setattr(machine, "simulated", lambda: False)
    monkeypatch.setattr(machine, "cuda", Driver())
    ok, why = machine.cuda_status()
    assert not ok
    assert why.startswith("numba-cuda cannot compile and run a kernel on Test GPU (OSError: libnvrtc")
    assert 'pip install "numba-cuda[cu12]"' in why


def test_cuda_status_says_why_a_driver_without_a_gpu_is_not_usable(monkeypatch):
    class Driver:
        def __init__(self, error=None):
            self.error = error

        def is_available(self):
            if self.error:
                raise self.error
            return False

    monkeypatch.setattr(machine, "cuda_missing", None)
    monkeypatch.setattr(machine, "simulated", lambda: False)
    monkeypatch.setattr(machine, "cuda", Driver())
    assert machine.cuda_status() == (
        False,
        "numba.cuda found no usable CUDA GPU (cuda.is_available() is False)",
    )
    monkeypatch.setattr(machine, "cuda", Driver(OSError("driver version too old")))
    ok, why = machine.cuda_status()
    assert not ok and why == "the CUDA driver failed to start (OSError: driver version too old)"
