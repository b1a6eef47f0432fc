"""Kernel benchmark: every registered kernel op, every implementation, against PyTorch.

    python bench/kernels.py                     # or, without the repository: minidiff bench
    minidiff bench --quick --ops softmax        # one shape per op, 3 repeats
    minidiff bench --ops group_norm --repeats 20 --json gn.json

First the machine's ceilings, in the same run: float32 GEMM GFLOP/s (the median over
1024^2..2048^2 matmuls) and copy bandwidth GB/s (``np.copyto`` of a 256 MiB float32 array, read
plus write bytes). Then, for every kernel op that has an input factory in ``FACTORIES`` below and
for every implementation registered on this machine: the median time over repeats after warm-up
(the first call compiles the Numba kernels), the ratio to the reference implementation, the ratio
to the same work in PyTorch (CPU) where it has it, and the achieved GB/s (bytes the op must read
and write, at least) or GFLOP/s as a fraction of the ceiling. Ratios are time over time: below 1
is faster. Each implementation's outputs are also compared with the reference's once.

PyTorch runs in this process, under the settings minidiff applies at import (minidiff.runtime)
and with the OpenMP runtime the native kernels loaded: the allocator that keeps freed memory
spares PyTorch's ops the page faults of fresh buffers too, and some of them (the group norm +
SiLU forward, for one) run several times faster here than in a process of their own, so the
ratios to PyTorch do not flatter minidiff.

A new kernel op shows up as a "no factory" row until a factory is added here: a function that
builds a ``Case`` (arguments, bytes moved, the PyTorch equivalent) from one shape spec, registered
with ``@factory(op, full=[specs], tiny=[specs])``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from collections.abc import Callable

import numpy as np

from .harness import (
    F32,
    Case,
    bench_case,
    command_parser,
    error_note,
    format_table,
    import_torch,
    machine,
    make_row,
    measure_ceilings,
    positive_int,
    torch_on_every_core,
    write_report,
)

IMPL_ORDER = ("reference", "numba", "native")
REPEATS = {"full": 10, "quick": 3}
# Ceiling runs: (GEMM sizes, repeats per size, copy MiB, copy repeats). "tiny" is for tests only:
# an 8 MiB copy fits in cache, so it is no memory ceiling.
CEILING_RUNS = {
    "full": ((1024, 1536, 2048), 5, 256, 7),
    "quick": ((1024, 2048), 3, 256, 3),
    "tiny": ((128,), 2, 8, 2),
}


# -- cases and their factories ---------------------------------------------------------------


FACTORIES: dict[str, tuple[Callable, dict[str, list]]] = {}


def factory(op: str, *, full: list, tiny: list):
    """Register ``make(rng, *spec) -> Case`` as the input factory of kernel ``op``.

    ``full`` holds the realistic shape specs (``--quick`` takes the first), ``tiny`` smoke-test ones.
    """

    def register(make):
        FACTORIES[op] = (make, {"full": list(full), "tiny": list(tiny)})
        return make

    return register


def _dims(shape) -> str:
    return "(" + ",".join(str(d) for d in shape) + ")"


def _randn(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def _grad_wrt(torch, fn, inputs, gy):
    """A callable timing only the backward of ``fn(*inputs)`` for the output gradient ``gy``."""
    leaves = [torch.from_numpy(a.copy()).requires_grad_() for a in inputs]
    y = fn(*leaves)
    gy = torch.from_numpy(gy)
    return lambda: torch.autograd.grad(y, leaves, gy, retain_graph=True)


def _no_grad(torch, fn, *inputs):
    tensors = [torch.from_numpy(a) for a in inputs]

    def call():
        with torch.no_grad():
            return fn(*tensors)

    return call


# im2col / col2im: the convolutions of the digits and CIFAR U-Nets (x shape, kernel, stride, padding)
CONV_SHAPES = dict(
    full=[((64, 32, 16, 16), 3, 1, 1), ((32, 128, 32, 32), 3, 1, 1), ((64, 64, 8, 8), 3, 2, 1)],
    tiny=[((2, 4, 6, 6), 3, 1, 1)],
)


def _conv_geometry(x_shape, k, s, p):
    N, C, H, W = x_shape
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    return f"x{_dims(x_shape)} k{k} s{s} p{p}", (N, C * k * k, Ho * Wo)


@factory("im2col", **CONV_SHAPES)
def _im2col_case(rng, x_shape, k, s, p):
    x = _randn(rng, x_shape)
    label, cols_shape = _conv_geometry(x_shape, k, s, p)

    def torch_work(torch):
        return _no_grad(torch, lambda t: torch.nn.functional.unfold(t, k, padding=p, stride=s), x)

    return Case(
        label, (x, k, k, (s, s), (p, p)), bytes=F32 * (x.size + math.prod(cols_shape)), torch=torch_work
    )


@factory("col2im", **CONV_SHAPES)
def _col2im_case(rng, x_shape, k, s, p):
    label, cols_shape = _conv_geometry(x_shape, k, s, p)
    cols = _randn(rng, cols_shape)
    H, W = x_shape[2:]

    def torch_work(torch):
        fold = torch.nn.functional.fold
        return _no_grad(torch, lambda t: fold(t, (H, W), k, padding=p, stride=s), cols)

    nbytes = F32 * (cols.size + math.prod(x_shape))
    return Case(label, (cols, x_shape, k, k, (s, s), (p, p)), bytes=nbytes, torch=torch_work)


# the 3x3 convolutions of the default U-Net, padding 1 (x shape, output channels, stride):
# GFLOP/s
CONV_SPECS = dict(
    full=[
        ((32, 32, 32, 32), 32, 1),
        ((32, 64, 16, 16), 64, 1),
        ((32, 128, 8, 8), 64, 1),
        ((32, 64, 16, 16), 64, 2),
    ],
    tiny=[((2, 4, 6, 6), 5, 1), ((2, 4, 7, 7), 5, 2)],
)


def _conv_label_and_flops(x_shape, out_channels, stride):
    N, C, H, W = x_shape
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1  # kernel 3, padding 1
    label = f"x{_dims(x_shape)} o{out_channels} k3 s{stride} p1"
    return label, 2 * N * out_channels * C * 9 * Ho * Wo, (N, out_channels, Ho, Wo)


@factory("conv2d", **CONV_SPECS)
def _conv2d_case(rng, x_shape, out_channels, stride):
    x, weight = _randn(rng, x_shape), 0.1 * _randn(rng, (out_channels, x_shape[1], 3, 3))
    label, flops, _ = _conv_label_and_flops(x_shape, out_channels, stride)

    def torch_work(torch):
        conv = torch.nn.functional.conv2d
        return _no_grad(torch, lambda x, w: conv(x, w, stride=stride, padding=1), x, weight)

    return Case(label, (x, weight, (stride, stride), (1, 1)), flops=flops, torch=torch_work)


# ... and its weight gradient, from x and the output gradient gy: GFLOP/s
@factory("conv2d_weight_grad", **CONV_SPECS)
def _conv2d_weight_grad_case(rng, x_shape, out_channels, stride):
    label, flops, gy_shape = _conv_label_and_flops(x_shape, out_channels, stride)
    x, gy = _randn(rng, x_shape), _randn(rng, gy_shape)
    weight_shape = (out_channels, x_shape[1], 3, 3)

    def torch_work(torch):
        grad = torch.nn.grad.conv2d_weight
        return _no_grad(torch, lambda x, gy: grad(x, weight_shape, gy, stride=stride, padding=1), x, gy)

    return Case(label, (x, gy, (3, 3), (stride, stride), (1, 1)), flops=flops, torch=torch_work)


# group norm: the U-Net's norm layers (x shape, groups); eps as in the U-Net
NORM_SHAPES = dict(full=[((64, 64, 16, 16), 8), ((32, 128, 32, 32), 32)], tiny=[((2, 8, 4, 4), 4)])
EPS = 1e-5


def _group_stats(z, groups):
    """mean and rstd (N, groups) of z, as the forward kernels return them."""
    zg = z.reshape(z.shape[0], groups, -1).astype(np.float64)
    mean = zg.mean(axis=2)
    rstd = 1 / np.sqrt(zg.var(axis=2) + EPS)
    return mean.astype(np.float32), rstd.astype(np.float32)


def _affine(rng, C):
    return 1 + 0.1 * _randn(rng, (C,)), 0.1 * _randn(rng, (C,))


@factory("group_norm_forward", **NORM_SHAPES)
def _group_norm_forward_case(rng, x_shape, groups):
    x, (w, b) = _randn(rng, x_shape), _affine(rng, x_shape[1])

    def torch_work(torch):
        gn = torch.nn.functional.group_norm
        return _no_grad(torch, lambda x, w, b: gn(x, groups, w, b, EPS), x, w, b)

    return Case(
        f"x{_dims(x_shape)} g{groups}", (x, w, b, groups, EPS), bytes=F32 * 2 * x.size, torch=torch_work
    )


@factory("group_norm_backward", **NORM_SHAPES)
def _group_norm_backward_case(rng, x_shape, groups):
    x, gy, (w, b) = _randn(rng, x_shape), _randn(rng, x_shape), _affine(rng, x_shape[1])
    mean, rstd = _group_stats(x, groups)

    def torch_work(torch):
        gn = torch.nn.functional.group_norm
        return _grad_wrt(torch, lambda x, w, b: gn(x, groups, w, b, EPS), (x, w, b), gy)

    args = (gy, x, w, mean, rstd, groups)
    return Case(f"x{_dims(x_shape)} g{groups}", args, bytes=F32 * 3 * x.size, torch=torch_work)


def _torch_group_norm_silu(torch, groups):
    F = torch.nn.functional
    return lambda x, w, b, shift: F.silu(F.group_norm(x + shift[:, :, None, None], groups, w, b, EPS))


# group norm + SiLU of x + shift: the second norm of a U-Net residual block (shift: the projected
# time embedding, one value per sample and channel)
@factory("group_norm_silu_forward", **NORM_SHAPES)
def _group_norm_silu_forward_case(rng, x_shape, groups):
    x, (w, b) = _randn(rng, x_shape), _affine(rng, x_shape[1])
    shift = _randn(rng, x_shape[:2])

    def torch_work(torch):
        return _no_grad(torch, _torch_group_norm_silu(torch, groups), x, w, b, shift)

    label = f"x{_dims(x_shape)} g{groups} +shift"
    return Case(label, (x, w, b, shift, groups, EPS), bytes=F32 * 2 * x.size, torch=torch_work)


@factory("group_norm_silu_backward", **NORM_SHAPES)
def _group_norm_silu_backward_case(rng, x_shape, groups):
    x, gy, (w, b) = _randn(rng, x_shape), _randn(rng, x_shape), _affine(rng, x_shape[1])
    shift = _randn(rng, x_shape[:2])
    mean, rstd = _group_stats(x + shift[:, :, None, None], groups)

    def torch_work(torch):
        return _grad_wrt(torch, _torch_group_norm_silu(torch, groups), (x, w, b, shift), gy)

    label = f"x{_dims(x_shape)} g{groups} +shift"
    args = (gy, x, w, b, shift, mean, rstd, groups)
    return Case(label, args, bytes=F32 * 3 * x.size, torch=torch_work)


# softmax over the last axis: attention scores (batch * heads, queries, keys) at 16x16 and 8x8
SOFTMAX_SHAPES = dict(full=[((32, 256, 256),), ((64, 64, 64),)], tiny=[((2, 8, 8),)])


@factory("softmax_forward", **SOFTMAX_SHAPES)
def _softmax_forward_case(rng, shape):
    x = _randn(rng, shape)

    def torch_work(torch):
        return _no_grad(torch, lambda t: torch.softmax(t, -1), x)

    return Case(f"x{_dims(shape)} rows", (x,), bytes=F32 * 2 * x.size, torch=torch_work)


@factory("softmax_backward", **SOFTMAX_SHAPES)
def _softmax_backward_case(rng, shape):
    x, gy = _randn(rng, shape), _randn(rng, shape)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    y = e / e.sum(axis=-1, keepdims=True)

    def torch_work(torch):
        return _grad_wrt(torch, lambda t: torch.softmax(t, -1), (x,), gy)

    return Case(f"x{_dims(shape)} rows", (gy, y), bytes=F32 * 3 * x.size, torch=torch_work)


# diffusion steps on image batches: training (digits 64 x 1x16x16, CIFAR 128 x 3x32x32) for
# q_sample and the loss; sampling (40 digits, 64 CIFAR images) for the sampler steps
TRAIN_SHAPES = dict(full=[((64, 1, 16, 16),), ((128, 3, 32, 32),)], tiny=[((2, 1, 4, 4),)])
SAMPLE_SHAPES = dict(full=[((40, 1, 16, 16),), ((64, 3, 32, 32),)], tiny=[((2, 1, 4, 4),)])


def _schedule(T=1000):
    """sqrt(abar) and sqrt(1 - abar) of the linear schedule (float64 tables, as the kernels take)."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    return np.sqrt(abar), np.sqrt(1 - abar)


@factory("q_sample", **TRAIN_SHAPES)
def _q_sample_case(rng, shape):
    x0, noise = _randn(rng, shape), _randn(rng, shape)
    sqrt_abar, sqrt_one_minus_abar = _schedule()
    t = rng.integers(0, sqrt_abar.size, shape[0])

    def torch_work(torch):
        a, s = (torch.from_numpy(v.astype(np.float32)) for v in (sqrt_abar, sqrt_one_minus_abar))
        tt, view = torch.from_numpy(t), (-1,) + (1,) * (len(shape) - 1)
        return _no_grad(torch, lambda x0, e: a[tt].view(view) * x0 + s[tt].view(view) * e, x0, noise)

    args = (x0, noise, sqrt_abar, sqrt_one_minus_abar, t)
    return Case(f"x{_dims(shape)}", args, bytes=F32 * 3 * x0.size, torch=torch_work)


@factory("mse_loss_forward", **TRAIN_SHAPES)
def _mse_loss_forward_case(rng, shape):
    pred, target = _randn(rng, shape), _randn(rng, shape)

    def torch_work(torch):
        return _no_grad(torch, torch.nn.functional.mse_loss, pred, target)

    return Case(f"x{_dims(shape)}", (pred, target), bytes=F32 * 2 * pred.size, torch=torch_work)


@factory("mse_loss_backward", **TRAIN_SHAPES)
def _mse_loss_backward_case(rng, shape):
    pred, target = _randn(rng, shape), _randn(rng, shape)
    gloss = np.ones((), np.float32)

    def torch_work(torch):
        p = torch.from_numpy(pred.copy()).requires_grad_()
        loss = torch.nn.functional.mse_loss(p, torch.from_numpy(target))
        g = torch.from_numpy(gloss)
        return lambda: torch.autograd.grad(loss, p, g, retain_graph=True)

    args = (pred, target, gloss)
    return Case(f"x{_dims(shape)}", args, bytes=F32 * 3 * pred.size, torch=torch_work)


@factory("ddpm_step", **SAMPLE_SHAPES)
def _ddpm_step_case(rng, shape):
    x_t, x0, noise = _randn(rng, shape), _randn(rng, shape), _randn(rng, shape)
    c0, ct, sigma = 0.05, 0.95, 0.1  # a mid-chain step: posterior coefficients and sigma_t

    def torch_work(torch):
        return _no_grad(torch, lambda x_t, x0, e: c0 * x0.clamp(-1, 1) + ct * x_t + sigma * e, x_t, x0, noise)

    args = (x_t, x0, noise, c0, ct, sigma)
    label = f"x{_dims(shape)} clip +noise"
    return Case(label, args, {"clip": True}, bytes=F32 * 4 * x_t.size, torch=torch_work)


@factory("ddim_step", **SAMPLE_SHAPES)
def _ddim_step_case(rng, shape):
    x_t, eps, x0 = _randn(rng, shape), _randn(rng, shape), _randn(rng, shape)
    a, s, a_prev = 0.6, 0.8, 0.7  # eta = 0: no noise; clipping recomputes eps from x0
    direction = math.sqrt(1 - a_prev**2)

    def torch_work(torch):
        def step(x_t, x0):
            x0 = x0.clamp(-1, 1)
            return a_prev * x0 + direction * ((x_t - a * x0) / s)

        return _no_grad(torch, step, x_t, x0)

    args = (x_t, eps, x0, None, a, s, a_prev, direction, 0.0)
    return Case(
        f"x{_dims(shape)} clip eta=0", args, {"clip": True}, bytes=F32 * 3 * x_t.size, torch=torch_work
    )


# optimizer updates of one parameter array: the whole digits U-Net (701,345 parameters) as one
# array, one conv weight of the CIFAR U-Net, the whole CIFAR U-Net (35.7M)
PARAM_SHAPES = dict(full=[((701_345,),), ((128, 128, 3, 3),), ((35_700_000,),)], tiny=[((3, 5),)])
LR, BETAS, ADAM_EPS, DECAY = 2e-4, (0.9, 0.999), 1e-8, 0.9999


@factory("adam_update", **PARAM_SHAPES)
def _adam_update_case(rng, shape):
    param, grad, m = _randn(rng, shape), _randn(rng, shape), 0.1 * _randn(rng, shape)
    v = np.abs(_randn(rng, shape))

    def torch_work(torch):  # torch.optim.Adam's default (single-tensor) step on one parameter
        p = torch.from_numpy(param.copy()).requires_grad_()
        p.grad = torch.from_numpy(grad)
        opt = torch.optim.Adam([p], lr=LR, betas=BETAS, eps=ADAM_EPS)
        return opt.step

    args = (param, grad, m, v, LR, *BETAS, ADAM_EPS, 10)
    return Case(f"p{_dims(shape)}", args, bytes=F32 * 7 * param.size, torch=torch_work)


@factory("ema_update", **PARAM_SHAPES)
def _ema_update_case(rng, shape):
    shadow, param = _randn(rng, shape), _randn(rng, shape)

    def torch_work(torch):  # shadow.lerp_(param, 1 - decay): PyTorch's EMA (swa_utils) expression
        sh, p = torch.from_numpy(shadow.copy()), torch.from_numpy(param)
        return lambda: sh.lerp_(p, 1 - DECAY)

    return Case(f"p{_dims(shape)}", (shadow, param, DECAY), bytes=F32 * 3 * shadow.size, torch=torch_work)


# -- the run ---------------------------------------------------------------------------------


def _impl_rank(impl):
    return (IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER), impl)


def registered_ops() -> list[str]:
    """Every kernel op with at least one implementation on this machine: those with a factory
    first, in the order of ``FACTORIES``, then the rest by name."""
    from minidiff import kernels
    from minidiff.kernels import registry

    names = set(FACTORIES) | set(getattr(registry, "_TABLE", {})) | set(dir(kernels))
    order = {op: i for i, op in enumerate(FACTORIES)}
    ops = []
    for name in sorted(names, key=lambda n: (order.get(n, len(order)), n)):
        try:
            if not name.startswith("_") and kernels.implementations(name):
                ops.append(name)
        except (KeyError, TypeError):
            continue
    return ops


def select_ops(patterns=None) -> list[str]:
    """Registered ops whose name contains one of ``patterns`` (all ops when None)."""
    ops = registered_ops()
    if not patterns:
        return ops
    patterns = [p for text in patterns for p in text.split(",") if p]
    chosen = [op for op in ops if any(p in op for p in patterns)]
    if not chosen:
        raise ValueError(f"--ops {' '.join(patterns)} matches no kernel op; known: {', '.join(ops)}")
    return chosen


def run(ops=None, *, repeats=None, quick=False, shapes="full", progress=None) -> dict:
    """Measure the ceilings, then every selected op; return the report (what the JSON holds)."""
    from minidiff import kernels

    selected = select_ops(ops)
    repeats = repeats or REPEATS["quick" if quick else "full"]
    warmup = 1 if quick else 2
    say = progress or (lambda text: None)
    torch = import_torch()
    with torch_on_every_core(torch):
        say("measuring the ceilings (GEMM, copy)")
        ceilings = measure_ceilings(
            *CEILING_RUNS["tiny" if shapes == "tiny" else "quick" if quick else "full"]
        )
        rows = []
        for op in selected:
            impls = kernels.implementations(op)
            impls = {k: impls[k] for k in sorted(impls, key=_impl_rank)}
            if op not in FACTORIES:
                note = "no factory: add one to FACTORIES in minidiff/bench/kernels.py"
                rows.append(make_row(op, "-", ", ".join(impls), note=note))
                continue
            make, specs = FACTORIES[op]
            for spec in specs[shapes][:1] if quick else specs[shapes]:
                try:
                    case = make(np.random.default_rng(0), *spec)
                except Exception as exc:
                    rows.append(make_row(op, str(spec), "-", note="factory " + error_note(exc)))
                    continue
                say(f"{op} {case.shape}")
                rows.extend(bench_case(op, case, impls, torch, ceilings, repeats, warmup))
                del case
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(torch),
        "options": {"ops": ops, "repeats": repeats, "quick": quick, "shapes": shapes, "warmup": warmup},
        "ceilings": ceilings,
        "rows": rows,
    }


# -- the command line ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, default_json: str | None) -> None:
    """The options of ``bench/kernels.py`` and ``minidiff bench`` (the same for both)."""
    parser.add_argument(
        "--ops",
        nargs="+",
        metavar="OP",
        help="only the kernel ops whose name contains one of these (e.g. --ops im2col softmax, "
        "or --ops group_norm,softmax); default: every registered op",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        help=f"timed repeats per measurement (default {REPEATS['full']}; {REPEATS['quick']} with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="one shape per op, few repeats, shorter ceiling runs"
    )
    parser.add_argument(
        "--json",
        default=default_json,
        help=f"where to write the JSON (default: {default_json})"
        if default_json
        else "where to write the JSON (default: minidiff-bench.json; with --unet, minidiff-bench-unet.json)",
    )
    parser.add_argument(
        "--shapes",
        choices=("full", "tiny"),
        default="full",
        help="tiny: smoke-test shapes and ceilings, for tests; its numbers mean nothing (default: full)",
    )


def run_from_args(args) -> int:
    """Run what the parsed options ask, write the JSON, print the table last."""
    report = run(
        args.ops,
        repeats=args.repeats,
        quick=args.quick,
        shapes=args.shapes,
        progress=lambda text: print(text, file=sys.stderr, flush=True),
    )
    write_report(report, args.json, format_table(report))
    return 0


def main(argv=None, *, prog=None, default_json="minidiff-bench.json") -> int:
    options = command_parser(prog, __doc__)
    add_arguments(options, default_json)
    args = options.parse_args(argv)
    try:
        return run_from_args(args)
    except ValueError as exc:  # --ops that matches nothing
        options.error(str(exc))
