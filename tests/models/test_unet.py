"""The DDPM U-Net against an independent PyTorch implementation (minidiff/testing/torch_unet.py).

Every parameter of both models is set to the same random values (the zero-initialized layers
included: with conv_out at zero the output would be trivially 0), then the forward output and
one training step's parameter gradients are compared as relative errors
``max|a - b| / max|b|`` (b: PyTorch) against the float32 rtol of the shared table.
"""

from __future__ import annotations

import numpy as np
import pytest

import minidiff as md
import minidiff.functional as F
from minidiff.models import UNet, timestep_embedding
from minidiff.testing import tolerance

torch = pytest.importorskip("torch")
TF = torch.nn.functional

from minidiff.testing.torch_unet import TorchUNet, sinusoidal_embedding  # noqa: E402  (needs torch)

REL = tolerance(np.float32)["rtol"]  # 1e-4

SMALL = dict(
    in_channels=1,
    base_channels=32,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    image_size=16,
    norm_groups=8,
)


def rel_error(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), np.finfo(np.float64).tiny))


def _args(config):
    c = dict(config)
    return (
        c.pop("in_channels"),
        c.pop("base_channels"),
        c.pop("channel_mults"),
        c.pop("num_res_blocks"),
        c.pop("attn_resolutions"),
        c.pop("image_size"),
    ), c


def build_pair(config, seed=0):
    """A minidiff UNet and the torch reference with identical, fully random parameters."""
    args, kwargs = _args(config)
    ours = UNet(*args, **kwargs, seed=seed)
    ref = TorchUNet(*args, **kwargs)
    ours_named = list(ours.named_parameters())
    ref_named = list(ref.named_parameters())
    assert len(ours_named) == len(ref_named), (
        f"minidiff has {len(ours_named)} parameter tensors, the reference {len(ref_named)}"
    )
    rng = np.random.default_rng(seed + 1)
    with torch.no_grad():
        for (name, p), (ref_name, q) in zip(ours_named, ref_named, strict=True):
            assert p.shape == tuple(q.shape), f"{name} {p.shape} vs reference {ref_name} {tuple(q.shape)}"
            assert name.rsplit(".", 1)[-1] == ref_name.rsplit(".", 1)[-1], f"{name} vs {ref_name}"
            if p.ndim >= 2:  # conv / linear / embedding weights: +-1/sqrt(fan_in)
                fan_in = int(np.prod(p.shape[1:]))
                value = rng.uniform(-1, 1, p.shape) / np.sqrt(fan_in)
            elif ".norm" in f".{name}" and name.endswith("weight"):  # GroupNorm scales near 1
                value = 1.0 + 0.2 * rng.standard_normal(p.shape)
            else:  # biases and GroupNorm shifts
                value = 0.2 * rng.standard_normal(p.shape)
            p.data = value.astype(np.float32)
            q.copy_(torch.from_numpy(value.astype(np.float32)))
    return ours, ref


def _inputs(config, batch=2, seed=3, num_classes=None):
    rng = np.random.default_rng(seed)
    size, c = config["image_size"], config["in_channels"]
    x = rng.standard_normal((batch, c, size, size)).astype(np.float32)
    t = rng.integers(0, 1000, size=batch)
    y = rng.integers(0, num_classes + 1, size=batch) if num_classes else None  # null class included
    target = rng.standard_normal(x.shape).astype(np.float32)
    return x, t, y, target


# -- parameter counts ----------------------------------------------------------------


def test_parameter_count_of_the_cifar10_model():
    assert UNet(3, 128, (1, 2, 2, 2), 2, (16,), 32).num_parameters() == 35_746_307


def test_parameter_count_of_a_small_model():
    assert UNet(1, 32, (1, 2, 2), 1, (8,), 32).num_parameters() == 1_112_801
    ref = TorchUNet(1, 32, (1, 2, 2), 1, (8,), 32)
    assert sum(p.numel() for p in ref.parameters()) == 1_112_801


def test_reference_parameter_count_of_the_cifar10_model():
    ref = TorchUNet(3, 128, (1, 2, 2, 2), 2, (16,), 32)
    assert sum(p.numel() for p in ref.parameters()) == 35_746_307


def test_parameter_names_are_unique_and_stable():
    names = [n for n, _ in UNet(**SMALL).named_parameters()]
    assert len(names) == len(set(names))
    assert names[:4] == ["temb_dense0.weight", "temb_dense0.bias", "temb_dense1.weight", "temb_dense1.bias"]
    assert names[-2:] == ["conv_out.weight", "conv_out.bias"]
    assert names == [n for n, _ in UNet(**SMALL, seed=7).named_parameters()]


def test_zero_initialized_layers_make_the_initial_output_zero():
    model = UNet(**SMALL)
    x, t, _, _ = _inputs(SMALL)
    with md.no_grad():
        out = model(md.tensor(x), t)
    assert out.shape == x.shape and out.dtype == np.float32
    assert np.all(out.numpy() == 0)


def test_seed_makes_initialization_reproducible():
    a, b, c = UNet(**SMALL, seed=1), UNet(**SMALL, seed=1), UNet(**SMALL, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert any(not np.array_equal(sa[k], sc[k]) for k in sa if sa[k].any())


# -- the timestep embedding ------------------------------------------------------------


@pytest.mark.parametrize("dim", [8, 32, 33])
def test_timestep_embedding_against_reference(dim):
    t = np.array([0, 1, 17, 999])
    ours = timestep_embedding(t, dim, dtype=np.float64)
    ref = sinusoidal_embedding(torch.from_numpy(t), dim).numpy()
    assert ours.shape == (4, dim)
    np.testing.assert_allclose(ours, ref, **tolerance(np.float64))
    # an independent spot check of the formula: column i is sin(t * 10000^(-i/(half-1)))
    half = dim // 2
    np.testing.assert_allclose(ours[2, 1], np.sin(17 * 10000.0 ** (-1 / (half - 1))), rtol=1e-12)
    np.testing.assert_allclose(ours[2, half + 1], np.cos(17 * 10000.0 ** (-1 / (half - 1))), rtol=1e-12)


# -- against PyTorch ------------------------------------------------------------------------


def test_forward_matches_torch():
    ours, ref = build_pair(SMALL)
    x, t, _, _ = _inputs(SMALL)
    with md.no_grad():
        out = ours(md.tensor(x), t).numpy()
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    assert np.abs(expected).max() > 1e-2  # not trivially zero
    err = rel_error(out, expected)
    assert err < REL, f"forward: relative error {err:.3g}"


def test_class_conditional_forward_matches_torch():
    config = dict(SMALL, num_classes=3)
    ours, ref = build_pair(config, seed=5)
    x, t, y, _ = _inputs(config, batch=4, num_classes=3)
    with md.no_grad():
        out = ours(md.tensor(x), t, y).numpy()
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    err = rel_error(out, expected)
    assert err < REL, f"forward: relative error {err:.3g}"
    # the label matters
    with md.no_grad():
        other = ours(md.tensor(x), t, (y + 1) % 4).numpy()
    assert rel_error(other, out) > 1e-3


def _training_step_gradients(config, seed, num_classes=None):
    ours, ref = build_pair(config, seed=seed)
    x, t, y, target = _inputs(config, num_classes=num_classes)
    ours.zero_grad()
    loss = F.mse_loss(ours(md.tensor(x), t, y) if num_classes else ours(md.tensor(x), t), md.tensor(target))
    loss.backward()
    args = (torch.from_numpy(x), torch.from_numpy(t)) + ((torch.from_numpy(y),) if num_classes else ())
    ref_loss = TF.mse_loss(ref(*args), torch.from_numpy(target))
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= REL * abs(ref_loss.item())
    failures = []
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        if p.grad is None:
            failures.append(f"{name}: no gradient")
            continue
        assert p.grad.dtype == np.float32
        if name.endswith("attn.to_k.bias"):
            # Exactly zero: the key bias adds q_i . b to every score of query i, and the softmax
            # over keys ignores a per-row shift. Both sides hold rounding noise (~1e-11) whose
            # relative error is meaningless, so check them against the table's float32 atol.
            atol = tolerance(np.float32)["atol"]
            if not (np.abs(p.grad).max() <= atol and q.grad.abs().max().item() <= atol):
                failures.append(f"{name}: should be ~0, got {np.abs(p.grad).max():.3g}")
            continue
        err = rel_error(p.grad, q.grad.numpy())
        if not err < REL:
            failures.append(f"{name}: relative error {err:.3g}")
    summary = "; ".join(failures[:8])
    assert not failures, f"{len(failures)} parameter gradients differ from PyTorch: {summary}"


def test_training_step_gradients_match_torch():
    _training_step_gradients(SMALL, seed=11)


def test_class_conditional_training_step_gradients_match_torch():
    _training_step_gradients(dict(SMALL, num_classes=3), seed=13, num_classes=3)


# -- argument checks --------------------------------------------------------------------


@pytest.mark.parametrize("t", [np.array([1]), np.array([1, 2, 3]), np.array([[1], [2]]), np.array(5)])
def test_bad_t_shape_raises(t):
    model = UNet(**SMALL)
    x = md.tensor(np.zeros((2, 1, 16, 16)))
    with pytest.raises(ValueError, match="t must have shape"):
        model(x, t)


def test_class_label_required_exactly_when_conditional():
    x = md.tensor(np.zeros((2, 1, 16, 16)))
    t = np.array([1, 2])
    with pytest.raises(ValueError):
        UNet(**SMALL, num_classes=3)(x, t)
    with pytest.raises(ValueError):
        UNet(**SMALL)(x, t, np.array([0, 1]))


@pytest.mark.parametrize(
    "kwargs",
    [dict(SMALL, norm_groups=5), dict(SMALL, image_size=15), dict(SMALL, base_channels=12)],
)
def test_bad_configuration_raises(kwargs):
    with pytest.raises(ValueError):
        UNet(**kwargs)


def test_dropout_is_active_only_in_training():
    ours, _ = build_pair(dict(SMALL, dropout=0.5), seed=17)
    x, t, _, _ = _inputs(SMALL)
    with md.no_grad():
        ours.eval()
        a, b = ours(md.tensor(x), t).numpy(), ours(md.tensor(x), t).numpy()
        ours.train()
        c = ours(md.tensor(x), t).numpy()
    np.testing.assert_array_equal(a, b)
    assert rel_error(c, a) > 1e-3
