"""Optimizers, gradient clipping, warm-up and EMA, against torch.optim and hand-written formulas."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from minidiff.nn import Parameter
from minidiff.optim import EMA, SGD, Adam, AdamW, clip_grad_norm, warmup_lr
from minidiff.testing import tolerance

torch = pytest.importorskip("torch")

TOL = tolerance(np.float64)
SHAPES = [(3, 4), (5,), (2, 1, 3)]
STEPS = 10


def make_params(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [Parameter(rng.standard_normal(s), dtype="float64") for s in shapes]


def gradients(seed=1, steps=STEPS, shapes=SHAPES):
    """A fixed sequence of gradients: grads[step][param]."""
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s) for s in shapes] for _ in range(steps)]


def run_ours(opt, params, grads):
    history = []
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = None if g is None else g.copy()
        opt.step()
        history.append([p.numpy().copy() for p in params])
    return history


def run_torch(make_opt, params, grads):
    tparams = [torch.tensor(p.numpy(), dtype=torch.float64, requires_grad=True) for p in params]
    opt = make_opt(tparams)
    history = []
    for step_grads in grads:
        for p, g in zip(tparams, step_grads, strict=True):
            p.grad = None if g is None else torch.from_numpy(g.copy())
        opt.step()
        history.append([p.detach().numpy().copy() for p in tparams])
    return history


def assert_same_trajectory(ours, theirs, tol=TOL):
    assert len(ours) == len(theirs)
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            np.testing.assert_allclose(x, y, err_msg=f"step {step + 1}, parameter {i}", **tol)


# -- against torch.optim ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=1e-3),
        dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6),
        dict(lr=0.01, weight_decay=0.1),  # L2 regularization: added to the gradient
    ],
)
def test_adam_matches_torch(kwargs):
    params, grads = make_params(), gradients()
    ours = run_ours(Adam(params, **kwargs), params, grads)
    theirs = run_torch(lambda ps: torch.optim.Adam(ps, **kwargs), make_params(), grads)
    assert_same_trajectory(ours, theirs)
    assert not np.allclose(ours[-1][0], make_params()[0].numpy())  # it moved


@pytest.mark.parametrize("kwargs", [dict(lr=1e-3), dict(lr=0.02, weight_decay=0.1, betas=(0.85, 0.95))])
def test_adamw_matches_torch(kwargs):
    params, grads = make_params(), gradients()
    ours = run_ours(AdamW(params, **kwargs), params, grads)
    theirs = run_torch(lambda ps: torch.optim.AdamW(ps, **kwargs), make_params(), grads)
    assert_same_trajectory(ours, theirs)


def test_adam_decoupled_flag_is_adamw():
    params_a, params_b, grads = make_params(), make_params(), gradients()
    a = run_ours(Adam(params_a, lr=0.01, weight_decay=0.1, decoupled=True), params_a, grads)
    b = run_ours(AdamW(params_b, lr=0.01, weight_decay=0.1), params_b, grads)
    assert_same_trajectory(a, b)


def test_adam_matches_torch_when_some_gradients_are_missing():
    """A parameter skipped (grad None) keeps its own step count for the bias corrections, as in
    torch.optim.Adam (not the optimizer-wide count)."""
    params, grads = make_params(), gradients()
    for step in range(4):
        grads[step][1] = None  # parameter 1 is unused for the first four steps
    ours = run_ours(Adam(params, lr=0.01), params, grads)
    theirs = run_torch(lambda ps: torch.optim.Adam(ps, lr=0.01), make_params(), grads)
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("kwargs", [dict(lr=0.1), dict(lr=0.05, momentum=0.9), dict(lr=0.01, momentum=0.5)])
def test_sgd_matches_torch(kwargs):
    params, grads = make_params(), gradients()
    for step in range(2):
        grads[step][2] = None  # skipped parameters stay put and start their momentum later
    ours = run_ours(SGD(params, **kwargs), params, grads)
    theirs = run_torch(lambda ps: torch.optim.SGD(ps, **kwargs), make_params(), grads)
    assert_same_trajectory(ours, theirs)


def test_zero_grad():
    params = make_params()
    opt = Adam(params)
    for p in params:
        p.grad = np.ones(p.shape)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def test_float32_parameters_stay_float32():
    p = Parameter(np.ones(3), dtype="float32")
    opt = Adam([p], lr=0.1)
    p.grad = np.ones(3, dtype=np.float32)
    opt.step()
    assert p.dtype == np.float32 and opt.m[0].dtype == np.float32


# -- state dicts ------------------------------------------------------------------------------------


def _resume_matches(make_opt, deep_copy_state):
    """Run 10 steps; separately, run 5, save, restore into a fresh optimizer over copies of the
    parameters, and run the last 5: the trajectories must be identical."""
    grads = gradients()
    params = make_params()
    opt = make_opt(params)
    first = run_ours(opt, params, grads[:5])
    state = opt.state_dict()
    if deep_copy_state:
        state = copy.deepcopy(state)
    saved_params = [p.numpy().copy() for p in params]
    rest = run_ours(opt, params, grads[5:])

    resumed = [Parameter(v, dtype="float64") for v in saved_params]
    opt2 = make_opt(resumed)
    opt2.load_state_dict(state)
    assert opt2.step_count == 5
    rest2 = run_ours(opt2, resumed, grads[5:])
    for a, b in zip(rest, rest2, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    assert len(first) == 5


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: Adam(ps, lr=0.01),
        lambda ps: AdamW(ps, lr=0.01, weight_decay=0.05),
        lambda ps: SGD(ps, lr=0.1),
    ],
    ids=["adam", "adamw", "sgd"],
)
def test_state_dict_round_trip(make_opt):
    _resume_matches(make_opt, deep_copy_state=True)


@pytest.mark.parametrize(
    "make_opt", [lambda ps: Adam(ps, lr=0.01), lambda ps: AdamW(ps, lr=0.01)], ids=["adam", "adamw"]
)
def test_adam_state_dict_is_a_snapshot(make_opt):
    """The saved moments must not be the live arrays that later steps update in place."""
    _resume_matches(make_opt, deep_copy_state=False)


def test_sgd_momentum_state_dict_round_trip():
    """The momentum buffers are part of the state."""
    _resume_matches(lambda ps: SGD(ps, lr=0.1, momentum=0.9), deep_copy_state=True)


def test_adam_load_state_dict_restores_lr_and_copies():
    params = make_params()
    opt = Adam(params, lr=0.01)
    for p in params:
        p.grad = np.ones(p.shape)
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    state["lr"] = 0.5
    opt2 = Adam(make_params(), lr=0.01)
    opt2.load_state_dict(state)
    assert opt2.lr == 0.5 and opt2.step_count == 1
    state["m"][0][...] = 99.0
    assert not np.any(opt2.m[0] == 99.0)


def test_adam_load_state_dict_rejects_mismatched_state():
    opt = Adam(make_params(), lr=0.01)
    state = copy.deepcopy(opt.state_dict())
    short = dict(state, m=state["m"][:2], v=state["v"][:2])
    with pytest.raises(ValueError, match="3 parameters"):
        Adam(make_params()).load_state_dict(short)
    bad = copy.deepcopy(state)
    bad["v"][1] = np.zeros(6)
    with pytest.raises(ValueError, match=r"v\[1\]"):
        Adam(make_params()).load_state_dict(bad)


# -- argument checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: SGD(make_params(), lr=0.0),
        lambda: Adam(make_params(), lr=-1e-3),
        lambda: AdamW(make_params(), lr=0),
        lambda: Adam([], lr=1e-3),
        lambda: SGD(iter([]), lr=1e-3),
        lambda: Adam(make_params(), betas=(1.0, 0.999)),
        lambda: Adam(make_params(), betas=(0.9, -0.1)),
    ],
    ids=["sgd-lr0", "adam-lr-neg", "adamw-lr0", "adam-empty", "sgd-empty-iter", "adam-beta1", "adam-beta2"],
)
def test_bad_arguments_raise_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_parameters_must_require_grad():
    from minidiff import tensor

    with pytest.raises(TypeError, match="requires_grad"):
        Adam([tensor(np.ones(2))])
    with pytest.raises(TypeError):
        SGD([np.ones(2)], lr=0.1)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SGD(make_params(), lr=0.1, momentum=-0.5),
        lambda: Adam(make_params(), eps=-1e-8),
        lambda: AdamW(make_params(), weight_decay=-0.01),
        lambda: EMA(make_params(), decay=1.5),
    ],
    ids=["sgd-momentum", "adam-eps", "adamw-decay", "ema-decay"],
)
def test_invalid_hyper_parameters_raise_value_error(make):
    """Values torch.optim rejects (and an EMA decay outside [0, 1], which diverges)."""
    with pytest.raises(ValueError):
        make()


# -- gradient clipping -------------------------------------------------------------------------------


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 100.0])
def test_clip_grad_norm_matches_torch(max_norm):
    params = make_params()
    grads = gradients(steps=1)[0]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.copy()
    params.append(Parameter(np.ones(2), dtype="float64"))  # no gradient: ignored by both
    total = clip_grad_norm(params, max_norm)

    tparams = [torch.tensor(p.numpy(), requires_grad=True) for p in params]
    for p, g in zip(tparams[:-1], grads, strict=True):
        p.grad = torch.from_numpy(g.copy())
    expected = torch.nn.utils.clip_grad_norm_(tparams, max_norm)
    assert isinstance(total, float)
    np.testing.assert_allclose(total, expected.item(), **TOL)
    np.testing.assert_allclose(total, np.sqrt(sum((g**2).sum() for g in grads)), **TOL)
    for p, q in zip(params[:-1], tparams[:-1], strict=True):
        np.testing.assert_allclose(p.grad, q.grad.numpy(), **TOL)
    assert params[-1].grad is None
    if total > max_norm:
        clipped = np.sqrt(sum((p.grad**2).sum() for p in params[:-1]))
        assert clipped == pytest.approx(max_norm, rel=1e-5)


def test_clip_grad_norm_without_gradients():
    assert clip_grad_norm(make_params(), 1.0) == 0.0


# -- learning-rate warm-up ---------------------------------------------------------------------------


def test_warmup_lr():
    base, warm = 2e-4, 5000
    assert warmup_lr(0, base, warm) == pytest.approx(base / warm)
    assert warmup_lr(99, base, warm) == pytest.approx(base * 100 / warm)
    assert warmup_lr(warm - 1, base, warm) == pytest.approx(base)
    assert warmup_lr(warm, base, warm) == base
    assert warmup_lr(10**7, base, warm) == base
    lrs = [warmup_lr(s, base, warm) for s in range(warm + 10)]
    assert all(b >= a for a, b in zip(lrs[:-1], lrs[1:], strict=True))
    assert warmup_lr(0, base, 0) == base and warmup_lr(3, base, -1) == base


# -- EMA --------------------------------------------------------------------------------------------


def test_ema_with_warm_up_against_the_formula():
    params = make_params()
    ema = EMA(params, decay=0.95)
    rng = np.random.default_rng(3)
    shadow = [p.numpy().copy() for p in params]
    for k in range(40):
        for p in params:
            p.data = p.data + rng.standard_normal(p.shape)
        ema.update()
        d = min(0.95, (1 + k) / (10 + k))  # warm-up: 0.1, 2/11, 3/12, ... until it reaches 0.95
        shadow = [d * s + (1 - d) * p.numpy() for s, p in zip(shadow, params, strict=True)]
        for s, ours in zip(shadow, ema.shadow, strict=True):
            np.testing.assert_allclose(ours, s, **TOL)
    assert ema.updates == 40


def test_ema_first_update_mostly_follows_the_parameters():
    p = Parameter(np.zeros(2), dtype="float64")
    ema = EMA([p], decay=0.9999)
    p.data = np.ones(2)
    ema.update()  # decay 1/10
    np.testing.assert_allclose(ema.shadow[0], [0.9, 0.9], **TOL)


def test_ema_copy_to():
    params = make_params()
    ema = EMA(params, decay=0.5)
    for p in params:
        p.data = p.data + 1.0
    ema.update()
    target = make_params(seed=9)
    ema.copy_to(target)
    for s, t in zip(ema.shadow, target, strict=True):
        np.testing.assert_array_equal(t.numpy(), s)
        assert t.data is not s


def _ema_resume(deep_copy_state):
    params = make_params()
    ema = EMA(params, decay=0.9)
    rng = np.random.default_rng(4)
    moves = [[rng.standard_normal(p.shape) for p in params] for _ in range(10)]

    def move_and_update(e, ps, k):
        for p, m in zip(ps, moves[k], strict=True):
            p.data = p.data + m
        e.update()

    for k in range(5):
        move_and_update(ema, params, k)
    state = ema.state_dict()
    if deep_copy_state:
        state = copy.deepcopy(state)
    saved = [p.numpy().copy() for p in params]
    for k in range(5, 10):
        move_and_update(ema, params, k)

    params2 = [Parameter(v, dtype="float64") for v in saved]
    ema2 = EMA(params2, decay=0.5)
    ema2.load_state_dict(state)
    assert ema2.updates == 5 and ema2.decay == 0.9
    for k in range(5, 10):
        move_and_update(ema2, params2, k)
    for a, b in zip(ema.shadow, ema2.shadow, strict=True):
        np.testing.assert_array_equal(a, b)


def test_ema_state_dict_round_trip():
    _ema_resume(deep_copy_state=True)


def test_ema_state_dict_is_a_snapshot():
    """The saved averages must not be the live arrays that update() changes in place."""
    _ema_resume(deep_copy_state=False)


def test_ema_load_state_dict_rejects_wrong_length():
    ema = EMA(make_params())
    state = copy.deepcopy(ema.state_dict())
    state["shadow"] = state["shadow"][:1]
    with pytest.raises(ValueError, match="averages"):
        EMA(make_params()).load_state_dict(state)
