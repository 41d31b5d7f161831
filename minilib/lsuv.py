"""Lesson 11's opening (07a_lsuv): Layer-wise Sequential Unit-Variance init, measured rather than derived.

Kaiming's formula is derived for one kind of layer; LSUV ("All you need is a good init") instead runs
a real batch through the model and fixes each layer in turn until its output has mean 0 and std 1:
the notebook's ``lsuv_module`` hooks a ``ConvLayer``, then loops subtracting the output mean from the
layer's ``bias`` (which is minus the GeneralRelu's ``sub``), then loops dividing its ``weight`` by the
output std. Afterwards every std is 1 but the means are not 0: the second loop scales the ReLU's output
and so undoes the first. ``get_batch`` gives the batch as the model sees it (after the Runner's
``begin_batch`` transforms); ``find_modules`` and ``is_lin_layer`` pick the layers to initialise.

Where minilib departs from the notebook:
- ``lsuv_module(model, m, xb)`` takes the model as an argument; the exported ``nb_07a.py`` version read a
  global ``mdl`` and an undefined hook function, and could not run.
- Both loops run under ``no_grad`` and are bounded by ``max_iters``: a layer that does not converge is a
  RuntimeError naming it, the loop and the last value (the notebook's ``while`` could spin forever), and
  a statistic that is not finite, or a std of 0 (dividing the weight by it would give inf), is a
  RuntimeError at once. The hook is removed however the function ends. A layer outside ``model``, or
  without a weight and a bias, is refused before anything is hooked or changed.
- ``get_batch`` takes a batch without touching the DataLoader's other batches and leaves the runner's
  callbacks ready for a fit (as the notebook's, it sets ``run.xb``/``run.yb`` and calls ``begin_batch``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minilib import contract
from minilib.cnn import GeneralRelu
from minilib.hooks import Hook

__all__ = ["ConvLayer", "get_batch", "find_modules", "is_lin_layer", "lsuv_module", "lsuv_init"]


class ConvLayer(nn.Module):
    """A ``Conv2d`` (with a bias) then ``GeneralRelu(sub=sub, **kwargs)``.

    ``weight`` is the conv's weight; ``bias`` is ``-sub``, the shift AFTER the ReLU, so that moving it
    moves the layer's output mean by exactly as much (LSUV's first loop).
    """

    def __init__(self, ni: int, nf: int, ks: int = 3, stride: int = 2, sub: float = 0.0, **kwargs):
        super().__init__()
        contract.positive_int("ConvLayer", ni=ni, nf=nf, ks=ks, stride=stride)
        contract.finite_number("ConvLayer", sub=sub)  # not None: ``bias`` is ``-sub``
        self.conv = nn.Conv2d(ni, nf, ks, padding=ks // 2, stride=stride, bias=True)
        self.relu = GeneralRelu(sub=sub, **kwargs)

    def forward(self, x):
        return self.relu(self.conv(x))

    @property
    def bias(self) -> float:
        return -self.relu.sub

    @bias.setter
    def bias(self, v) -> None:
        self.relu.sub = -contract.finite_number("ConvLayer", bias=v)

    @property
    def weight(self) -> nn.Parameter:
        return self.conv.weight


def get_batch(dl, run):
    """One batch of ``dl`` as the model sees it: ``run.xb``/``run.yb`` after the callbacks' ``begin_batch``
    (the Runner's batch transforms: ``mnist_view``, a device move)."""
    run.xb, run.yb = next(iter(dl))
    for cb in run.cbs:
        cb.set_runner(run)
    run("begin_batch")
    return run.xb, run.yb


def find_modules(m: nn.Module, cond) -> list[nn.Module]:
    """The modules of ``m`` for which ``cond`` holds, outermost first: a match is not searched further."""
    if cond(m):
        return [m]
    return sum((find_modules(o, cond) for o in m.children()), [])


def is_lin_layer(l: nn.Module) -> bool:
    """The notebook's "linear" layers: Conv1d/2d/3d, Linear, and ReLU."""
    return isinstance(l, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.ReLU))


def _record(hook, mod, inp, outp) -> None:
    d = outp.detach()
    hook.mean, hook.std = d.mean().item(), d.std().item()


def _layer_name(model: nn.Module, m: nn.Module) -> str:
    """``ConvLayer model[2]``: the layer's class and where it sits in the model, on one line."""
    where = next((name for name, mod in model.named_modules() if mod is m), None)
    return f"{type(m).__name__} " + (f"model.{where}" if where else "(not in the model)")


def _measure(model, h: Hook, m, xb) -> None:
    model(xb)
    if not (math.isfinite(h.mean) and math.isfinite(h.std)) or h.std == 0:
        raise RuntimeError(
            f"lsuv_module: the output of {_layer_name(model, m)} has mean {h.mean} and std {h.std}: no "
            "finite, non-zero std to scale by (check the batch and the layers before it)"
        )


def _shift_bias(m: nn.Module, mean: float) -> None:
    """``m.bias -= mean``: a ConvLayer's bias is a number (a property); a plain layer's is a tensor."""
    if isinstance(m.bias, torch.Tensor):
        m.bias.sub_(mean)
    else:
        m.bias = m.bias - mean


def lsuv_module(model: nn.Module, m: nn.Module, xb: torch.Tensor, *, tol: float = 1e-3, max_iters: int = 50):
    """Run ``xb`` through ``model`` and fix ``m`` (a ``ConvLayer`` or anything with ``bias`` and ``weight``):
    first ``m.bias -= mean`` until |mean| < tol, then ``m.weight /= std`` until |std - 1| < tol.

    Returns the last (mean, std) of ``m``'s output. Each loop gives up after ``max_iters`` passes with a
    RuntimeError. The order is the notebook's, which leaves the mean off zero (see the spec).
    """
    tol = contract.finite_number("lsuv_module", positive=True, tol=tol)
    contract.positive_int("lsuv_module", max_iters=max_iters)
    contract.part_of("lsuv_module", "m", m, "model", model, having=("weight", "bias"))  # before any change
    h = Hook(m, _record)
    try:
        with torch.no_grad():
            for loop, done, fix in (
                ("mean", lambda: abs(h.mean) < tol, lambda: _shift_bias(m, h.mean)),
                ("std", lambda: abs(h.std - 1) < tol, lambda: m.weight.div_(h.std)),
            ):
                for _ in range(max_iters):
                    _measure(model, h, m, xb)
                    if done():
                        break
                    fix()
                else:
                    last = h.mean if loop == "mean" else h.std
                    raise RuntimeError(
                        f"lsuv_module: the {loop} loop on {_layer_name(model, m)} did not converge in "
                        f"{max_iters} iterations (last {loop} {last:.6g}, tol {tol:g})"
                    )
    finally:
        h.remove()
    return h.mean, h.std


def lsuv_init(model: nn.Module, xb: torch.Tensor, **kw) -> list[tuple[float, float]]:
    """``lsuv_module`` on every ``ConvLayer`` of ``model``, in order (each after the ones before it are
    fixed, as the paper does); returns each one's (mean, std)."""
    return [lsuv_module(model, m, xb, **kw) for m in find_modules(model, lambda o: isinstance(o, ConvLayer))]
