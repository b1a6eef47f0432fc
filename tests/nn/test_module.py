"""nn.Module: the parameter tree, state dicts, modes and dtype conversion."""

from __future__ import annotations

import numpy as np
import pytest

import minidiff as md
from minidiff.nn import Conv2d, Dropout, GroupNorm, Linear, Module, Parameter, Sequential, SiLU


class Block(Module):
    def __init__(self, rng):
        self.norm = GroupNorm(2, 4)
        self.conv = Conv2d(4, 4, 3, padding=1, rng=rng)
        self.drop = Dropout(0.5, rng=np.random.default_rng(1))

    def forward(self, x):
        return self.conv(self.drop(self.norm(x)))


class Net(Module):
    """Parameters directly on the module, a sub-module, a list and a tuple of modules, a None."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.scale = Parameter(rng.standard_normal(4))
        self.stem = Conv2d(2, 4, 1, rng=rng)
        self.blocks = [Block(rng), SiLU(), Block(rng)]
        self.head = (Linear(4, 3, rng=rng), Linear(3, 2, bias=False, rng=rng))
        self.nothing = None
        self.note = "not a module"

    def forward(self, x):
        h = self.stem(x) * md.functional.reshape(self.scale, (1, 4, 1, 1))
        for b in self.blocks:
            h = b(h)
        h = h.mean(axis=(2, 3))
        return self.head[1](self.head[0](h))


EXPECTED_NAMES = [
    "scale",
    "stem.weight",
    "stem.bias",
    "blocks.0.norm.weight",
    "blocks.0.norm.bias",
    "blocks.0.conv.weight",
    "blocks.0.conv.bias",
    "blocks.2.norm.weight",
    "blocks.2.norm.bias",
    "blocks.2.conv.weight",
    "blocks.2.conv.bias",
    "head.0.weight",
    "head.0.bias",
    "head.1.weight",
]


def _x(seed=0):
    return md.tensor(np.random.default_rng(seed).standard_normal((2, 2, 5, 5)))


# -- the tree -------------------------------------------------------------------------------


def test_named_parameters_order_and_names():
    net = Net()
    named = list(net.named_parameters())
    assert [n for n, _ in named] == EXPECTED_NAMES
    assert all(isinstance(p, Parameter) and p.requires_grad for _, p in named)
    assert [p.shape for _, p in named][:3] == [(4,), (4, 2, 1, 1), (4,)]


def test_parameters_are_the_same_objects_in_the_same_order():
    net = Net()
    params = net.parameters()
    assert [id(p) for p in params] == [id(p) for _, p in net.named_parameters()]
    assert params[1] is net.stem.weight and params[-1] is net.head[1].weight
    assert net.num_parameters() == sum(p.size for p in params) == 4 + 12 + 2 * (8 + 148) + 15 + 6


def test_named_modules():
    names = [n for n, _ in Net().named_modules()]
    assert names == [
        "",
        "stem",
        "blocks.0",
        "blocks.0.norm",
        "blocks.0.conv",
        "blocks.0.drop",
        "blocks.1",
        "blocks.2",
        "blocks.2.norm",
        "blocks.2.conv",
        "blocks.2.drop",
        "head.0",
        "head.1",
    ]


def test_names_do_not_depend_on_the_values():
    assert [n for n, _ in Net(0).named_parameters()] == [n for n, _ in Net(5).named_parameters()]


def test_sequential_names():
    seq = Sequential(Linear(2, 3), SiLU(), Linear(3, 1))
    assert [n for n, _ in seq.named_parameters()] == [
        "layers.0.weight",
        "layers.0.bias",
        "layers.2.weight",
        "layers.2.bias",
    ]


def test_zero_grad_clears_every_gradient():
    net = Net()
    net(_x()).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


# -- state dicts -------------------------------------------------------------------------------


def test_state_dict_holds_copies():
    net = Net()
    state = net.state_dict()
    assert list(state) == EXPECTED_NAMES
    assert all(isinstance(v, np.ndarray) for v in state.values())
    before = net.stem.weight.numpy().copy()
    state["stem.weight"][...] = 123.0  # editing the dict leaves the model alone
    np.testing.assert_array_equal(net.stem.weight.numpy(), before)
    net.stem.weight.data[...] = -7.0  # and the other way round
    assert np.all(state["stem.weight"] == 123.0)


def test_state_dict_round_trip():
    a, b = Net(seed=0).eval(), Net(seed=1).eval()
    x = _x()
    assert not np.allclose(a(x).numpy(), b(x).numpy())
    b.load_state_dict(a.state_dict())
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert n1 == n2
        np.testing.assert_array_equal(p1.numpy(), p2.numpy())
        assert p1.data is not p2.data
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())


def test_load_state_dict_copies_and_keeps_the_dtype():
    net = Net()
    state = {k: v.astype(np.float64) + 1.0 for k, v in Net(seed=3).state_dict().items()}
    net.load_state_dict(state)
    assert all(p.dtype == np.float32 for p in net.parameters())
    np.testing.assert_allclose(net.scale.numpy(), state["scale"], rtol=1e-6)
    state["scale"][...] = 0.0  # the model does not alias the source
    assert np.all(net.scale.numpy() != 0.0)


def test_load_state_dict_accepts_tensors():
    net, other = Net(0), Net(1)
    net.load_state_dict({n: p for n, p in other.named_parameters()})
    np.testing.assert_array_equal(net.stem.weight.numpy(), other.stem.weight.numpy())
    assert net.stem.weight.data is not other.stem.weight.data


def test_load_state_dict_missing_key():
    net = Net()
    state = net.state_dict()
    del state["blocks.2.conv.bias"]
    with pytest.raises(KeyError, match=r"blocks\.2\.conv\.bias"):
        net.load_state_dict(state)


def test_load_state_dict_unexpected_key():
    net = Net()
    state = net.state_dict()
    state["extra.weight"] = np.zeros(3, dtype=np.float32)
    with pytest.raises(KeyError, match=r"extra\.weight"):
        net.load_state_dict(state)


def test_load_state_dict_missing_and_unexpected_are_both_listed():
    net = Net()
    state = net.state_dict()
    state["head.2.weight"] = state.pop("head.1.weight")
    with pytest.raises(KeyError) as info:
        net.load_state_dict(state)
    assert "head.1.weight" in str(info.value) and "head.2.weight" in str(info.value)


def test_load_state_dict_wrong_shape():
    net = Net()
    state = net.state_dict()
    state["head.0.weight"] = np.zeros((3, 5), dtype=np.float32)
    with pytest.raises(ValueError, match=r"head\.0\.weight") as info:
        net.load_state_dict(state)
    assert "(3, 4)" in str(info.value) and "(3, 5)" in str(info.value)


def test_failed_load_changes_nothing():
    net = Net()
    before = net.state_dict()
    state = {k: v + 1 for k, v in before.items()}
    state["head.0.weight"] = np.zeros((3, 5), dtype=np.float32)  # the last key checked is bad
    with pytest.raises(ValueError):
        net.load_state_dict(state)
    after = net.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_non_strict_load_ignores_missing_and_unexpected_keys():
    net, other = Net(0), Net(1)
    state = other.state_dict()
    del state["scale"]
    state["bogus"] = np.ones(2)
    old_scale = net.scale.numpy().copy()
    net.load_state_dict(state, strict=False)
    np.testing.assert_array_equal(net.scale.numpy(), old_scale)
    np.testing.assert_array_equal(net.stem.weight.numpy(), other.stem.weight.numpy())


def test_non_strict_load_still_rejects_wrong_shapes():
    net = Net()
    state = net.state_dict()
    state["scale"] = np.zeros(5)
    with pytest.raises(ValueError, match="scale"):
        net.load_state_dict(state, strict=False)


# -- modes ------------------------------------------------------------------------------------


def test_train_and_eval_propagate_to_every_module():
    net = Net()
    assert all(m.training for m in net.modules())
    assert net.eval() is net
    assert not any(m.training for m in net.modules())
    assert not net.blocks[2].drop.training and not net.head[1].training
    assert net.train() is net
    assert all(m.training for m in net.modules())
    net.train(False)
    assert not any(m.training for m in net.modules())


def test_dropout_active_only_in_training():
    drop = Dropout(0.5, rng=np.random.default_rng(0))
    x = md.tensor(np.ones((50, 40)))
    y = drop(x).numpy()
    assert set(np.unique(y)) <= {0.0, 2.0}
    assert 0.4 < (y == 0).mean() < 0.6  # 2000 draws: p=0.5 within 4.5 standard errors
    drop.eval()
    np.testing.assert_array_equal(drop(x).numpy(), x.numpy())


def test_eval_makes_a_model_with_dropout_deterministic():
    net, x = Net(), _x()
    a, b = net(x).numpy(), net(x).numpy()
    assert not np.array_equal(a, b)  # fresh dropout masks
    net.eval()
    np.testing.assert_array_equal(net(x).numpy(), net(x).numpy())
    net.train()
    assert not np.array_equal(net(x).numpy(), net(x).numpy())


def test_dropout_rejects_bad_p():
    with pytest.raises(ValueError):
        Dropout(1.5)
    with pytest.raises(ValueError):
        Dropout(-0.1)


# -- dtypes ------------------------------------------------------------------------------------


def test_to_dtype_converts_every_parameter():
    net = Net().eval()
    x = _x()
    out32 = net(x).numpy()
    net(x).sum().backward()
    ids = [id(p) for p in net.parameters()]
    assert net.to(np.float64) is net
    assert [id(p) for p in net.parameters()] == ids  # converted in place
    assert all(p.dtype == np.float64 and p.grad is None and p.requires_grad for p in net.parameters())
    out64 = net(x.to(np.float64))
    assert out64.dtype == np.float64
    np.testing.assert_allclose(out64.numpy(), out32, rtol=1e-4, atol=1e-5)
    net.to("cpu", dtype=np.float32)
    assert all(p.dtype == np.float32 for p in net.parameters())
    np.testing.assert_allclose(net(x).numpy(), out32, rtol=1e-6, atol=1e-7)


def test_to_dtype_keeps_the_state_dict_names():
    net = Net().to(np.float64)
    state = net.state_dict()
    assert list(state) == EXPECTED_NAMES
    assert all(v.dtype == np.float64 for v in state.values())


@pytest.mark.parametrize("dtype", [np.float16, np.int32])
def test_to_rejects_unsupported_dtypes(dtype):
    """Parameters must stay in a dtype minidiff computes in (float32/float64), as tensor() requires."""
    net = Net()
    with pytest.raises(TypeError):
        net.to(dtype)
