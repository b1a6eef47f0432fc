"""minidiff.testing.check_function: it passes a correct op and fails each way an op can be wrong."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import minidiff.functional as F
from minidiff.autograd import Function
from minidiff.testing import GradcheckError, check_function

RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, 4))
Y = RNG.standard_normal((3, 4))


class Square(Function):
    """x * x, with a backward that is right or off by a factor."""

    factor = 2.0

    def forward(self, x):
        self.save_for_backward(x)
        return x * x

    def backward(self, gy):
        (x,) = self.saved
        return self.factor * x * gy


class WrongSquare(Square):
    factor = 3.0


class Product(Function):
    """x * y, with the gradient of y wrong (that of x right)."""

    def forward(self, x, y):
        self.save_for_backward(x, y)
        return x * y

    def backward(self, gy):
        x, y = self.saved
        return gy * y, gy * (x + 1)


def test_a_correct_op_passes():
    check_function(Square.apply, [X], reference=lambda a: a * a)
    check_function(F.mul, [X, Y], reference=np.multiply)


def test_a_non_contiguous_input_reaches_the_op_as_it_is():
    layouts = []

    def op(t):
        layouts.append(t.data.flags.c_contiguous)
        return F.exp(t)

    check_function(op, [X.T], reference=np.exp, dtypes=[np.float64], grad=False)
    assert layouts == [False]


def test_a_wrong_backward_fails():
    with pytest.raises(GradcheckError, match="input 0"):
        check_function(WrongSquare.apply, [X], reference=lambda a: a * a)


def test_a_wrong_forward_fails():
    with pytest.raises(AssertionError, match="forward in float32"):
        check_function(Square.apply, [X], reference=lambda a: a * a * (1 + 1e-3))


def test_a_forward_off_by_more_than_the_float64_tolerance_fails():
    with pytest.raises(AssertionError, match="forward in float64"):
        check_function(Square.apply, [X], reference=lambda a: a * a + 1e-7, dtypes=[np.float64])


def test_a_changed_dtype_fails():
    with pytest.raises(AssertionError, match="dtype float64"):
        check_function(lambda t: F.cast(t, "float64"), [X], reference=lambda a: a, grad=False)


def test_a_changed_shape_fails():
    def op(t):
        return F.sum(t, axis=0, keepdims=True)

    with pytest.raises(AssertionError, match=r"output shape \(1, 4\), reference \(4,\)"):
        check_function(op, [X], reference=lambda a: a.sum(axis=0))


def test_grad_names_the_inputs_whose_gradient_is_checked():
    check_function(Product.apply, [X, Y], reference=np.multiply, grad=[True, False])
    with pytest.raises(GradcheckError, match="input 1"):
        check_function(Product.apply, [X, Y], reference=np.multiply)


def test_non_float_inputs_pass_through():
    labels = np.array([0, 3, 1])

    def ref(logits, labels):
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return -log_p[np.arange(len(labels)), labels].mean()

    check_function(F.cross_entropy, [X, labels], reference=ref)
    check_function(lambda t, scale: F.mul(t, scale), [X, 2.5], reference=lambda a, s: a * s)


def test_bad_arguments():
    with pytest.raises(TypeError, match="input 0 is float32"):
        check_function(F.exp, [X.astype(np.float32)], reference=np.exp)
    with pytest.raises(ValueError, match="grad has 1 entries for 2 inputs"):
        check_function(F.mul, [X, Y], reference=np.multiply, grad=[True])


def test_importing_the_tools_does_not_import_torch():
    code = "import sys, minidiff.testing; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
