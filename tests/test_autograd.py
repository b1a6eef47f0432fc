"""The autograd engine: graph recording, backward(), accumulation, no_grad, dtypes, devices."""

from __future__ import annotations

import numpy as np
import pytest

import minidiff as md
import minidiff.functional as F
from minidiff.backend import cuda_available
from minidiff.testing import gradcheck, tolerance

TOL64 = tolerance(np.float64)


def t64(values, requires_grad=True):
    return md.tensor(np.asarray(values, dtype=np.float64), dtype="float64", requires_grad=requires_grad)


# -- gradients accumulate, graphs are freed ------------------------------------------------


def test_gradients_accumulate_on_leaves_across_backward_calls():
    x = t64([1.0, 2.0, 3.0])
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, [2.0, 4.0, 6.0], **TOL64)
    (x * 3.0).sum().backward()  # a fresh graph: adds to the stored gradient
    np.testing.assert_allclose(x.grad, [5.0, 7.0, 9.0], **TOL64)
    x.zero_grad()
    assert x.grad is None


def test_leaf_grad_is_not_shared_with_other_leaves():
    # Add hands the same gradient array to both inputs; each leaf must own its own copy.
    a, b = t64([1.0, 2.0]), t64([3.0, 4.0])
    (a + b).sum().backward()
    a.grad += 1.0  # what an in-place optimizer would do
    np.testing.assert_allclose(b.grad, [1.0, 1.0], **TOL64)


def test_second_backward_through_freed_graph_raises():
    x = t64([1.0, 2.0])
    y = (x.exp() * 2.0).sum()
    y.backward()
    with pytest.raises(RuntimeError, match=r"second time.*retain_graph=True"):
        y.backward()


def test_retain_graph_allows_a_second_backward():
    x = t64([1.0, 2.0])
    y = (x.exp() * 2.0).sum()
    y.backward(retain_graph=True)
    first = x.grad.copy()
    y.backward()
    np.testing.assert_allclose(x.grad, 2 * first, **TOL64)


def test_backward_on_non_scalar_without_grad_raises():
    x = t64(np.ones((2, 3)))
    with pytest.raises(RuntimeError, match=r"single-element.*\(2, 3\)"):
        (x * 2.0).backward()


def test_backward_with_grad_of_wrong_shape_raises():
    x = t64(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"grad has shape \(3, 2\).*\(2, 3\)"):
        (x * 2.0).backward(np.ones((3, 2)))


def test_backward_with_explicit_grad():
    x = t64([1.0, 2.0, 3.0])
    (x * x).backward(np.array([1.0, 0.5, -1.0]))
    np.testing.assert_allclose(x.grad, [2.0, 2.0, -6.0], **TOL64)


def test_backward_on_tensor_without_grad_raises():
    x = t64([1.0], requires_grad=False)
    with pytest.raises(RuntimeError, match="does not require grad"):
        (x * 2.0).backward()


def test_requires_grad_on_integer_tensor_raises():
    with pytest.raises(TypeError, match="floating-point"):
        md.tensor(np.arange(3), requires_grad=True)


# -- no_grad, detach --------------------------------------------------------------------------


def test_no_grad_builds_no_graph():
    x = t64([1.0, 2.0])
    with md.no_grad():
        assert not md.is_grad_enabled()
        y = (x * 2.0).exp().sum()
    assert md.is_grad_enabled()
    assert not y.requires_grad
    assert y.is_leaf
    with pytest.raises(RuntimeError):
        y.backward()


def test_no_grad_nests_and_restores():
    with md.no_grad():
        with md.no_grad():
            pass
        assert not md.is_grad_enabled()
    assert md.is_grad_enabled()


def test_no_grad_restores_after_an_exception():
    with pytest.raises(KeyError):
        with md.no_grad():
            raise KeyError("boom")
    assert md.is_grad_enabled()


def test_no_grad_as_decorator():
    @md.no_grad()
    def double(t):
        """Doc."""
        return t * 2.0

    x = t64([1.0, 2.0])
    y = double(x)
    assert not y.requires_grad
    assert md.is_grad_enabled()
    assert double.__name__ == "double" and double.__doc__ == "Doc."


def test_detach_cuts_the_graph_and_shares_data():
    x = t64([1.0, 2.0])
    y = x * 3.0
    d = y.detach()
    assert not d.requires_grad and d.is_leaf
    np.testing.assert_array_equal(d.numpy(), y.numpy())
    z = (d * x).sum()  # d is a constant: the gradient is d, not 2 * 3 * x
    z.backward()
    np.testing.assert_allclose(x.grad, [3.0, 6.0], **TOL64)


# -- graph shapes -----------------------------------------------------------------------------


# Regression test, minidiff bug fixed in ec78413: autograd.topological_order marks a tensor visited
# when it is pushed, not when it is expanded, so a tensor reached again on a later path is emitted
# before that path's consumer: backward processes it before all of its gradient has arrived and
# drops the rest
def test_gradient_sums_never_write_into_a_shared_gradient():
    """A node's gradient is summed in place only once it is a sum the engine made: the first
    contribution may be an array shared with another node (Add hands one array to both inputs)."""
    x = t64([1.0, 2.0])
    u, v = x * 1.0, x * 1.0
    s = u + v  # Add: u and v receive the same gradient array
    (s + u * 3.0 + u * 5.0).sum().backward()  # u gets three contributions: shared, then sums
    np.testing.assert_allclose(x.grad, [10.0, 10.0], **TOL64)  # u: 1 + 3 + 5, v: 1


def test_three_way_fan_out_sums_each_contribution_once():
    x = t64([0.5, -1.0])
    h = x * 2.0
    (h * h + h.exp() + h * 3.0).sum().backward()
    hv = 2.0 * x.numpy()
    np.testing.assert_allclose(x.grad, 2.0 * (2.0 * hv + np.exp(hv) + 3.0), **TOL64)


def test_diamond_graph_sums_both_paths():
    x = t64([0.5, -1.0, 2.0])
    a = x * x  # path 1
    b = x.exp()  # path 2
    (a + b * a).sum().backward()
    xv = x.numpy()
    expected = 2 * xv + np.exp(xv) * xv**2 + np.exp(xv) * 2 * xv
    np.testing.assert_allclose(x.grad, expected, **TOL64)


def test_same_tensor_twice_in_one_op():
    x = t64([1.5, -2.0])
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad, [3.0, -4.0], **TOL64)
    x.zero_grad()
    (x + x).sum().backward()
    np.testing.assert_allclose(x.grad, [2.0, 2.0], **TOL64)


def test_diamond_gradcheck_inputs_first():
    x = t64(np.linspace(-1, 1, 6).reshape(2, 3))
    assert gradcheck(lambda t: (t.sigmoid() * t + t.tanh() * t).sum(axis=0), x)


# Regression test, minidiff bug fixed in ec78413: autograd.topological_order marks a tensor visited
# when it is pushed, not when it is expanded, so a tensor reached again on a later path is emitted
# before that path's consumer: backward processes it before all of its gradient has arrived and
# drops the rest
def test_diamond_gradcheck():
    x = t64(np.linspace(-1, 1, 6).reshape(2, 3))

    def fn(t):
        h = t * 1.5
        return h.tanh() + h * h.sigmoid()

    assert gradcheck(fn, x)


# Regression test, minidiff bug fixed in ec78413: autograd.topological_order marks a tensor visited
# when it is pushed, not when it is expanded, so a tensor reached again on a later path is emitted
# before that path's consumer: backward processes it before all of its gradient has arrived and
# drops the rest
def test_leaf_used_by_an_op_and_by_its_input():
    # y = x * sigmoid(x) (this is silu): Mul reaches x directly and through Sigmoid.
    x = t64([0.5, -1.0, 2.0])
    (x * x.sigmoid()).sum().backward()
    xv = x.numpy()
    s = 1 / (1 + np.exp(-xv))
    np.testing.assert_allclose(x.grad, s + xv * s * (1 - s), **TOL64)


# Regression test, minidiff bug fixed in ec78413 ("h_first" failed): topological_order marked
# tensors visited on push, so h was back-propagated before the exp path had added its share.
@pytest.mark.parametrize("order", ["exp_first", "h_first"])
def test_intermediate_used_on_two_paths(order):
    x = t64([0.5, -1.0, 2.0])
    h = x * 2.0
    y = h.exp() * h if order == "exp_first" else h * h.exp()
    y.sum().backward()  # d/dx = 2 * (e^h h + e^h)
    hv = 2.0 * x.numpy()
    np.testing.assert_allclose(x.grad, 2.0 * np.exp(hv) * (hv + 1.0), **TOL64)


def test_reconverging_paths_of_equal_depth():
    x = t64([0.5, -1.0])
    a, b = x.exp(), x.tanh()
    (a * b).sum().backward()
    xv = x.numpy()
    np.testing.assert_allclose(
        x.grad, np.exp(xv) * np.tanh(xv) + np.exp(xv) * (1 - np.tanh(xv) ** 2), **TOL64
    )


def test_deep_chain_does_not_hit_recursion_limit():
    x = t64([1.0])
    y = x
    for _ in range(5000):
        y = y + 1.0
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [1.0], **TOL64)
    np.testing.assert_allclose(y.numpy(), [5001.0], **TOL64)


def test_only_leaves_requiring_grad_get_grads():
    a, b = t64([1.0]), t64([2.0], requires_grad=False)
    y = a * b
    assert y.requires_grad and not y.is_leaf
    y.sum().backward()
    assert b.grad is None
    assert y.grad is None  # intermediate tensors keep no gradient
    np.testing.assert_allclose(a.grad, [2.0], **TOL64)


def test_backward_on_a_leaf():
    x = t64([1.0, 2.0])
    x.backward(np.array([3.0, 4.0]))
    np.testing.assert_allclose(x.grad, [3.0, 4.0], **TOL64)


# -- comparisons --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "op, ref",
    [
        (lambda a, b: a < b, np.less),
        (lambda a, b: a <= b, np.less_equal),
        (lambda a, b: a > b, np.greater),
        (lambda a, b: a >= b, np.greater_equal),
        (lambda a, b: a == b, np.equal),
        (lambda a, b: a != b, np.not_equal),
    ],
)
def test_comparisons_return_bool_tensors_outside_the_graph(op, ref):
    a = t64([[1.0, 2.0, 3.0], [0.0, -1.0, 2.0]])
    b = t64([2.0, 2.0, 2.0])
    for other, other_np in ((b, b.numpy()), (2.0, 2.0)):
        out = op(a, other)
        assert isinstance(out, md.Tensor)
        assert out.dtype == np.bool_
        assert not out.requires_grad
        np.testing.assert_array_equal(out.numpy(), ref(a.numpy(), other_np))


def test_bool_of_single_element_and_ambiguous_truth_value():
    assert bool(md.tensor([2.0]) > 1.0)
    with pytest.raises(ValueError, match="ambiguous"):
        bool(md.tensor([1.0, 2.0]) > 1.0)


# -- dtypes -------------------------------------------------------------------------------------


def test_default_dtype_is_float32():
    assert md.tensor([1.0, 2.0]).dtype == np.float32
    assert md.tensor(np.ones(3, dtype=np.float64)).dtype == np.float32
    assert md.tensor(3).dtype == np.float32
    assert md.zeros(2, 3).dtype == np.float32
    assert md.ones(2).dtype == np.float32
    assert md.randn(2, generator=0).dtype == np.float32


# Regression test, minidiff bug fixed in ec78413: tensor.py zeros/ones/randn build the array in the
# requested dtype but then call tensor() without dtype=, which converts it back to the float32
# default
@pytest.mark.parametrize(
    "make",
    [md.zeros, md.ones, lambda *s, **kw: md.randn(*s, generator=0, **kw)],
    ids=["zeros", "ones", "randn"],
)
def test_factories_honour_dtype(make):
    assert make(2, 3, dtype="float64").dtype == np.float64
    assert make((2,), dtype=np.float64, requires_grad=True).dtype == np.float64


def test_integer_and_bool_arrays_keep_their_dtype():
    assert md.tensor(np.arange(3)).dtype == np.arange(3).dtype
    assert md.tensor(np.array([True, False])).dtype == np.bool_


def _chain(x, w):
    """A little network touching many ops, returning a scalar."""
    h = F.linear(x, w)
    h = F.gelu(h) + F.silu(h) * F.sigmoid(h)
    h = F.layer_norm(h, h.shape[-1])
    h = F.softmax(h, axis=-1) * F.log_softmax(h, axis=-1).exp()
    # (max is left out here: see test_max_backward_keeps_the_dtype)
    h = F.mean(h, axis=-1) + F.sum(h.abs().sqrt(), axis=-1)
    h = h**2 / (1.0 + h.tanh().relu()) - 0.5
    return F.mse_loss(h, np.zeros(h.shape))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_outputs_and_grads_keep_the_dtype_end_to_end(dtype):
    rng = np.random.default_rng(0)
    x = md.tensor(rng.standard_normal((3, 4)), dtype=dtype, requires_grad=True)
    w = md.tensor(rng.standard_normal((5, 4)), dtype=dtype, requires_grad=True)
    loss = _chain(x, w)
    assert loss.dtype == dtype
    loss.backward()
    assert x.grad.dtype == dtype
    assert w.grad.dtype == dtype


# Regression test, minidiff bug fixed in ec78413: Max.backward divided by an int64 count, so
# float32 gradients came back float64.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_backward_keeps_the_dtype(dtype):
    x = md.tensor([[1.0, 2.0], [3.0, 3.0]], dtype=dtype, requires_grad=True)
    F.max(x, axis=1).sum().backward()
    assert x.grad.dtype == dtype


@pytest.mark.parametrize(
    "op, name",
    [
        (lambda a, b: a + b, "add"),
        (lambda a, b: a - b, "sub"),
        (lambda a, b: a * b, "mul"),
        (lambda a, b: a / b, "div"),
        (lambda a, b: a**b, "pow"),
        (lambda a, b: a @ b, "matmul"),
        (lambda a, b: F.concat([a, b]), "concat"),
        (lambda a, b: F.stack([a, b]), "stack"),
    ],
)
def test_mixing_float32_and_float64_raises_type_error_naming_the_op(op, name):
    a = md.tensor(np.ones((2, 2)), dtype="float32")
    b = md.tensor(np.ones((2, 2)), dtype="float64")
    with pytest.raises(TypeError, match=rf"(?i)({name}.*float32.*float64|{name}.*float64.*float32)"):
        op(a, b)


def test_python_scalars_keep_float32():
    x = md.tensor([1.0, 2.0], requires_grad=True)
    outs = [x + 1.5, 1.5 + x, x - 2, 2 - x, x * 0.1, 0.1 * x, x / 3.0, 3.0 / x, x**2, x**0.5, 2.0**x]
    for out in outs:
        assert out.dtype == np.float32
    assert F.clip(x, 0.1, 1.5).dtype == np.float32
    assert F.masked_fill(x, md.tensor(np.array([True, False])), 7.0).dtype == np.float32


def test_numpy_scalars_keep_float32():
    x = md.tensor([1.0, 2.0])
    assert (x * np.float64(2.0)).dtype == np.float32
    assert (np.float64(2.0) * x).dtype == np.float32
    assert (x + np.float64(2.0)).dtype == np.float32


# Regression test, minidiff bug fixed in ec78413: functional.pow passes a NumPy float64 exponent to
# PowScalar unchanged, and NumPy 2 promotes float32 ** np.float64 to float64
def test_pow_with_numpy_scalar_exponent_keeps_float32():
    x = md.tensor([1.0, 2.0])
    assert (x ** np.float64(2.0)).dtype == np.float32


# Regression test, minidiff bug fixed in ec78413: functional.clip passes NumPy float64 bounds to
# np.clip unchanged; NumPy 2 promotes the float32 result to float64
def test_clip_with_numpy_scalar_bounds_keeps_float32():
    x = md.tensor([0.0, 1.0, 2.0])
    assert F.clip(x, np.float64(0.5), np.float64(1.5)).dtype == np.float32


def test_scalar_broadcasting_values_and_grads():
    x = md.tensor([1.0, 2.0, 4.0], dtype="float64", requires_grad=True)
    y = (3.0 - x) * 2.0 + 1.0 / x
    np.testing.assert_allclose(y.numpy(), (3.0 - x.numpy()) * 2.0 + 1.0 / x.numpy(), **TOL64)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, -2.0 - 1.0 / x.numpy() ** 2, **TOL64)


# -- conversions ----------------------------------------------------------------------------------


def test_item_numpy_tolist():
    x = md.tensor([[2.5]], dtype="float64")
    assert x.item() == 2.5 and isinstance(x.item(), float)
    assert isinstance(x.numpy(), np.ndarray)
    assert x.tolist() == [[2.5]]
    with pytest.raises(ValueError, match=r"item\(\).*\(2,\)"):
        md.tensor([1.0, 2.0]).item()


def test_item_of_a_loss_after_backward():
    x = t64([1.0, 2.0])
    loss = (x * x).sum()
    loss.backward()
    assert isinstance(loss.item(), float)
    np.testing.assert_allclose(loss.item(), 5.0, **TOL64)


@pytest.mark.parametrize(
    "convert", [lambda t: t.to(np.float32), lambda t: t.float(), lambda t: t.to("cpu", dtype="float32")]
)
def test_to_dtype_is_differentiable(convert):
    x = t64([1.0, 2.0, 3.0])
    y = convert(x)
    assert y.dtype == np.float32 and y.requires_grad
    (y * y).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_allclose(x.grad, 2 * x.numpy(), **tolerance(np.float32))


def test_to_same_dtype_is_a_no_op():
    x = t64([1.0])
    assert x.to(np.float64) is x
    assert x.to("cpu") is x


def test_to_dtype_gradcheck():
    x = t64([[0.3, -1.2], [2.0, 0.1]])
    assert gradcheck(lambda t: t.to(np.float64).double() * 3.0, x)


# -- devices ------------------------------------------------------------------------------------


@pytest.mark.skipif(cuda_available(), reason="this machine has CUDA")
# "cuda" is a regression test, minidiff bug fixed in ec78413: Device('cuda') computed int('').
@pytest.mark.parametrize("device", ["cuda:0", "cuda"])
def test_cuda_without_cupy_raises_a_clear_error(device):
    with pytest.raises(RuntimeError, match="CuPy"):
        md.tensor([1.0], device=device)


@pytest.mark.skipif(cuda_available(), reason="this machine has CUDA")
def test_to_cuda_without_cupy_raises_a_clear_error():
    with pytest.raises(RuntimeError, match="CuPy"):
        md.tensor([1.0]).to("cuda:0")


def test_unknown_device_raises():
    with pytest.raises(ValueError, match="unknown device"):
        md.tensor([1.0], device="tpu")


def test_device_of_cpu_tensor():
    x = md.tensor([1.0])
    assert x.device == "cpu"
    assert str(x.device) == "cpu"


# -- what functional makes, and of which class --------------------------------------------------


def test_op_outputs_have_the_class_of_their_inputs():
    class Traced(md.Tensor):
        __slots__ = ()

    x = Traced.from_array(np.ones((2, 3), np.float32), requires_grad=True)
    y = F.exp(x) * 2.0 + x
    assert type(y) is Traced and type(y.detach()) is Traced
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 2 * np.e + 1, rtol=1e-6)


def test_constant_like_follows_the_tensors_dtype_and_class():
    like = md.tensor(np.zeros(3), dtype=np.float64)
    c = F.constant_like([1, 2, 3], like)
    assert type(c) is md.Tensor and c.dtype == np.float64 and not c.requires_grad
    assert F.constant_like(np.array([True, False]), like).dtype == np.bool_  # masks stay boolean
    assert F.constant_like(like, md.tensor([1.0])) is like
    with pytest.raises(TypeError, match="cannot use a dict as a tensor"):
        F.constant_like({}, like)


def test_functional_asks_for_a_tensor_where_none_is_given():
    with pytest.raises(TypeError, match=r"exp: x must be a Tensor, got list \(make one with minidiff.tensor"):
        F.exp([1.0, 2.0])
    with pytest.raises(TypeError, match="add: at least one operand must be a Tensor"):
        F.add(1.0, np.ones(2))
    assert np.array_equal(F.add(1.0, md.tensor([1.0, 2.0])).numpy(), [2.0, 3.0])
