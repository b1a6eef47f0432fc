"""A minidiff module against its PyTorch twin (a diffusers or transformers module): the same
weights by name, the same inputs, then the outputs and every gradient compared."""

from __future__ import annotations

import numpy as np
import torch

import minidiff as md


def copy_weights(torch_module, module) -> None:
    """Load the torch module's parameters into the minidiff module by name (strict)."""
    state = {k: v.detach().numpy() for k, v in torch_module.named_parameters()}
    module.load_state_dict(state)


def compare_with_torch(
    module, torch_module, inputs, call=None, torch_call=None, grad_inputs=None, rtol=1e-4, atol=1e-5, seed=0
):
    """Run ``module(*inputs)`` and ``torch_module(*inputs)`` (or the given ``call(module, *ts)``
    / ``torch_call(torch_module, *ts)``) on float64 copies of ``inputs`` (arrays; None stays
    None), backpropagate the same random output gradient, and assert that the outputs, the
    gradients of the inputs named by index in ``grad_inputs`` (all float inputs by default) and
    of every parameter agree. The torch module is converted to float64 first."""
    torch_module = torch_module.double()
    copy_weights(torch_module, module)
    call = call or (lambda m, *ts: m(*ts))
    torch_call = torch_call or (lambda m, *ts: m(*ts))
    floats = [i for i, a in enumerate(inputs) if a is not None and np.asarray(a).dtype.kind == "f"]
    grad_inputs = floats if grad_inputs is None else grad_inputs

    ours = [
        None
        if a is None
        else md.tensor(
            np.asarray(a, np.float64) if i in floats else np.asarray(a),
            dtype=np.float64 if i in floats else None,
            requires_grad=i in grad_inputs,
        )
        for i, a in enumerate(inputs)
    ]
    theirs = [
        None
        if a is None
        else torch.tensor(
            np.asarray(a, np.float64) if i in floats else np.asarray(a), requires_grad=i in grad_inputs
        )
        for i, a in enumerate(inputs)
    ]
    out = call(module, *ours)
    expected = torch_call(torch_module, *theirs)
    gy = np.random.default_rng(seed).standard_normal(out.shape)
    (out * md.tensor(gy, dtype=np.float64)).sum().backward()
    (expected * torch.tensor(gy)).sum().backward()

    np.testing.assert_allclose(out.numpy(), expected.detach().numpy(), rtol=rtol, atol=atol, err_msg="output")
    for i in grad_inputs:
        np.testing.assert_allclose(
            ours[i].grad, theirs[i].grad.numpy(), rtol=rtol, atol=atol, err_msg=f"gradient of input {i}"
        )
    torch_params = dict(torch_module.named_parameters())
    for name, p in module.named_parameters():
        tp = torch_params[name]
        if tp.grad is None:  # unused by this forward in torch: ours must be zero or absent
            assert p.grad is None or not np.any(p.grad), name
            continue
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=rtol, atol=atol, err_msg=name)
    return out
