"""Lesson 10 (07_batchnorm), timed: one training step of the lesson's CNN, and how much of it is BatchNorm.

The CNN is lesson 07's ``get_cnn_model(data, [8,16,32,64,64], conv_layer)`` from ``minilib.cnn``: five
layers of Conv2d (no bias; k=5 then 3, stride 2), GeneralRelu() (a ReLU) and BatchNorm2d, then
AdaptiveAvgPool2d(1), flatten and Linear(64, 10), on 28x28 images at bs 512. One step is what the Runner does
per batch: forward, ``F.cross_entropy``, backward, an SGD step. It is timed twice, with ``nn.BatchNorm2d`` and
with ``minilib.kernels.FusedBatchNorm2d`` in its place (the same weights and buffers, loaded from the first),
so the difference is what fusing the norm saved.

How much of the step is the norm: each norm layer's input and output gradient are captured during one step
(hooks), and the norm layers alone are timed on them, forward+backward, best of a few rounds, in the same
process (``norm_layers_s``). Before anything is timed, each model's first step (its loss and every
parameter's gradient) is checked against the same step of a float64 copy of the ``nn.BatchNorm2d`` model.
"""

from __future__ import annotations

import copy
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import harness
from minilib.cnn import conv_layer, get_cnn_model
from minilib.kernels import FusedBatchNorm2d

NFS = (8, 16, 32, 64, 64)
BATCH = {"tiny": 8, "quick": 512, "full": 512}
# Rounds of the step, and of its norm layers alone, per set: a step is ~50-100 ms on 2 cores, and one round
# in a busy moment of a shared machine would decide a comparison of two models run seconds apart.
ROUNDS = {"tiny": 1, "quick": 10, "full": 25}
NORMS = ("nn.BatchNorm2d", "FusedBatchNorm2d")
LR = 0.1


def with_norm(model: nn.Module, norm: str) -> nn.Module:
    """A copy of `model` whose nn.BatchNorm2d layers are `norm` layers holding the same state."""
    model = copy.deepcopy(model)
    if norm == "nn.BatchNorm2d":
        return model
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
    for parent, name, child in swaps:
        if type(child) is nn.BatchNorm2d:
            fused = FusedBatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum)
            fused.load_state_dict(child.state_dict())
            setattr(parent, name, fused)
    return model


def norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]  # FusedBatchNorm2d is one too


@pytest.fixture(scope="module")
def step_problem(pytestconfig: pytest.Config):
    bs = BATCH[harness.bench_set(pytestconfig)]
    torch.manual_seed(0)
    model = get_cnn_model(SimpleNamespace(c=10), list(NFS), conv_layer)  # data: only its class count is read
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(bs, 1, 28, 28, generator=gen)  # normalised images
    y = torch.randint(0, 10, (bs,), generator=gen)
    model64 = copy.deepcopy(model).double().train()
    loss = F.cross_entropy(model64(x.double()), y)
    loss.backward()
    ref = {"loss": loss.detach()} | {n: p.grad.float() for n, p in model64.named_parameters()}
    return SimpleNamespace(bs=bs, model=model.train(), x=x, y=y, ref=ref)


def time_norm_layers_alone(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    """Each norm layer's forward+backward on the input and output gradient it saw in one step, all of them
    in turn: the best total of `repeats` rounds (after one warm-up)."""
    norms = norm_layers(model)
    inputs: dict[nn.Module, torch.Tensor] = {}
    grads: dict[nn.Module, torch.Tensor] = {}

    def keep(module, args, out):
        inputs[module] = args[0].detach()
        out.register_hook(lambda g: grads.__setitem__(module, g.detach()))

    hooks = [m.register_forward_hook(keep) for m in norms]
    try:
        F.cross_entropy(model(x), y).backward()
    finally:
        for h in hooks:
            h.remove()
    model.zero_grad(set_to_none=True)
    leaves = {m: inputs[m].requires_grad_() for m in norms}

    def run():
        for m in norms:
            leaves[m].grad = None
            m.zero_grad(set_to_none=True)
            m(leaves[m]).backward(grads[m])

    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("norm", NORMS)
def test_training_step(benchmark: Any, pytestconfig, step_problem, norm: str) -> None:
    """One SGD step of lesson 07's CNN at bs 512 with this norm, checked against a float64 step, timed, with
    its norm layers timed alone beside it."""
    p = step_problem
    benchmark.group = f"training step lesson 07 CNN bs{p.bs} cpu float32"
    model = with_norm(p.model, norm)
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(p.x), p.y)
        loss.backward()
        opt.step()
        return loss.detach()

    # Checked on a copy (so that the timed model starts from the same weights): loss and every gradient.
    check = copy.deepcopy(model)
    check_loss = F.cross_entropy(check(p.x), p.y)
    check_loss.backward()
    rtol, atol = harness.TOLERANCES["float32"]
    max_diff = harness.check_close(f"{norm} step: loss", check_loss.detach(), p.ref["loss"], rtol, atol)
    for name, param in check.named_parameters():
        want = p.ref[name]
        scale = max(want.abs().max().item(), 1e-30)  # gradients compared at the scale of their largest entry
        max_diff = max(
            max_diff,
            harness.check_close(f"{norm} step: {name} grad", param.grad / scale, want / scale, rtol, atol),
        )
    del check
    step()  # warm-up: the first use builds a C++ kernel; first-touch pages
    _, first_s, peak, how = harness.call_with_peak_memory(step, "cpu")
    repeats = ROUNDS[harness.bench_set(pytestconfig)]
    norm_s = time_norm_layers_alone(model, p.x, p.y, repeats)
    benchmark.pedantic(step, rounds=repeats, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        op="train_step",
        case="fwd+bwd+sgd",
        kernel=norm,
        device="cpu",
        dtype="float32",
        bs=p.bs,
        model=f"lesson 07's CNN (minilib.cnn.get_cnn_model), nfs={list(NFS)}, conv (no bias), ReLU, {norm}",
        norm_layers=len(norm_layers(model)),
        norm_layers_s=norm_s,
        norm_timing=f"each norm layer's forward+backward on its input and gradient, best of {repeats}",
        first_call_s=first_s,
        peak_mem_bytes=peak,
        peak_mem_method=how,
        checked_against="a step of a float64 copy with nn.BatchNorm2d (loss and every parameter's gradient)",
        rtol=rtol,
        atol=atol,
        max_abs_diff=max_diff,
    )
