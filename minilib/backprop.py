"""Lesson 02 (02_fully_connected): a 784-50-1 network's forward and backward pass, written by hand.

The forward pass is three functions (`lin`, `relu`, `mse`); the backward pass is the chain rule run
in reverse, one ``*_grad`` function per forward function, each reading the gradient of its output
(``out.g``) and storing the gradient of each of its inputs in a ``.g`` attribute (the lesson's
design: it mutates its arguments on purpose, as autograd's ``.grad`` does).

Then the lesson refactors: `Module` remembers its arguments and output when called, so ``backward()``
needs no arguments; `Lin`, `Relu` and `Mse` are Modules; `Model` chains them and runs their backward
passes in reverse order. The spec tests check every ``.g`` against PyTorch's autograd.

Gradients are values, not part of any graph, so every backward runs under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minilib import contract

__all__ = [
    "lin",
    "relu",
    "mse",
    "mse_grad",
    "relu_grad",
    "lin_grad",
    "WEIGHT_GRADS",
    "Module",
    "Lin",
    "Relu",
    "Mse",
    "Model",
]


# ---------------------------------------------------------------------------------------------- forward


def lin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A linear layer, ``x @ w + b``: x [N, in], w [in, out] (the lesson's layout), b [out]."""
    contract.linear("lin", x=x, w=w, b=b)  # ranks, sizes, one device, one float dtype
    return x @ w + b


def relu(x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    """``max(x, 0) - shift``. The lesson tries ``shift=0.5``: a ReLU's output has mean ~0.4 on unit
    inputs, and subtracting it brings the next layer's input back near mean 0."""
    contract.float_tensor("relu", x=x)
    contract.finite_number("relu", shift=shift)
    return x.clamp_min(0.0) - shift


def mse(output: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a ``[N, 1]`` (or ``[N]``) output against ``[N]`` targets.

    ``output - targ`` would broadcast ``[N, 1] - [N]`` to ``[N, N]``, every prediction minus every
    target, a silently wrong loss: hence ``squeeze(-1)``. Integer digit labels are fine targets for
    the lesson's toy regression, so they are cast to the output's dtype.
    """
    contract.regression("mse", output=output, targ=targ)
    return (output.squeeze(-1) - targ.squeeze(-1).to(output.dtype)).pow(2).mean()


# --------------------------------------------------------------------------------------------- backward


def mse_grad(inp: torch.Tensor, targ: torch.Tensor) -> None:
    """d mse / d inp = 2 (inp - targ) / N, stored in ``inp.g`` with inp's own shape."""
    contract.regression("mse_grad", inp=inp, targ=targ)
    with torch.no_grad():
        diff = inp.squeeze(-1) - targ.squeeze(-1).to(inp.dtype)
        inp.g = (2.0 * diff / inp.shape[0]).reshape(inp.shape)


def _grad_of(fname: str, out: torch.Tensor) -> torch.Tensor:
    """``out.g``, left on ``out`` by the backward step of the layer after this one: the chain rule's input."""
    contract.tensor(fname, out=out)
    g = getattr(out, "g", None)
    if not (isinstance(g, torch.Tensor) and g.shape == out.shape):
        need = f"d loss / d out ({contract.shape(out)}): run the next layer's backward first"
        contract.fail(fname, "out.g", need, g)
    return g


def relu_grad(inp: torch.Tensor, out: torch.Tensor) -> None:
    """ReLU passes the gradient where its input was positive and blocks it elsewhere: ``inp.g``."""
    contract.tensor("relu_grad", inp=inp, out=out)
    if inp.shape != out.shape:
        shapes = f"inp {contract.shape(inp)}, out {contract.shape(out)}"
        raise ValueError(f"relu_grad: inp and out must have one shape, got {shapes}")
    g = _grad_of("relu_grad", out)
    with torch.no_grad():
        inp.g = (inp > 0).to(g.dtype) * g


def _w_grad_outer(inp: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The lesson's first version: one [in, out] outer product per sample, summed over the batch."""
    return (inp.unsqueeze(-1) * g.unsqueeze(1)).sum(0)


def _w_grad_einsum(inp: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The same sum of outer products, said in index notation: no [N, in, out] intermediate."""
    return torch.einsum("bi,bj->ij", inp, g)


def _w_grad_matmul(inp: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A sum over the batch of products is a matrix product: ``inp.t() @ out.g`` (the final version)."""
    return inp.t() @ g


# The three ways the lesson writes w.g (name -> (inp, out.g) -> [in, out]), in lesson order; the tests
# show they agree and the benchmarks may time them.
WEIGHT_GRADS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "outer": _w_grad_outer,
    "einsum": _w_grad_einsum,
    "matmul": _w_grad_matmul,
}


def lin_grad(inp: torch.Tensor, out: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
    """Gradients of ``out = inp @ w + b`` from ``out.g``, by the chain rule.

    ``inp.g = out.g @ w.T``, ``w.g = inp.T @ out.g`` (see `WEIGHT_GRADS`), ``b.g = out.g.sum(0)``.
    """
    contract.linear("lin_grad", inp=inp, w=w, b=b)
    g = _grad_of("lin_grad", out)
    if out.shape != (inp.shape[0], w.shape[1]):
        contract.fail("lin_grad", "out", f"{inp.shape[0]}x{w.shape[1]} (inp's rows by w's columns)", out)
    with torch.no_grad():
        inp.g = g @ w.t()
        w.g = _w_grad_matmul(inp, g)
        b.g = g.sum(0)


# ------------------------------------------------------------------------------------------- refactored


class Module:
    """A layer that remembers its call, so its backward pass needs no arguments.

    ``module(*args)`` keeps ``args`` and the result ``out``, then returns ``out``; ``backward()`` calls
    ``bwd(out, *args)``, which subclasses write to set ``.g`` on each input from ``out.g``.
    """

    def __call__(self, *args):
        self.args = args
        self.out = self.forward(*args)
        return self.out

    def forward(self, *args):
        raise NotImplementedError(f"{type(self).__name__}.forward is not implemented")

    def bwd(self, out, *args):
        raise NotImplementedError(f"{type(self).__name__}.bwd is not implemented")

    def backward(self) -> None:
        """Run ``bwd`` (which subclasses write) on the output and arguments kept from the last call."""
        if not hasattr(self, "out"):
            raise RuntimeError(f"{type(self).__name__}.backward: the module has not been called yet")
        self.bwd(self.out, *self.args)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _layer(fname: str, **wb: torch.Tensor) -> None:
    """A layer's weight [in, out] (the lesson's layout) and bias [out], named as the caller names them."""
    (wn, w), (bn, b) = wb.items()
    contract.float_tensor(fname, **wb)
    contract.ndim(fname, wn, w, 2, "[in, out]")
    if b.shape != w.shape[1:]:
        contract.fail(fname, bn, f"[out] with out = {wn}'s columns ({w.shape[1]})", b)


class Lin(Module):
    """``inp @ w + b``, holding its weight ``w`` ``[in, out]`` and bias ``b`` ``[out]``."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor):
        _layer("Lin", w=w, b=b)
        self.w, self.b = w, b

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return lin(inp, self.w, self.b)

    def bwd(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        lin_grad(inp, out, self.w, self.b)

    def __repr__(self) -> str:
        return f"Lin({self.w.shape[0]}, {self.w.shape[1]})"


class Relu(Module):
    """``max(inp, 0) - shift`` (shift 0 by default; the lesson tries 0.5)."""

    def __init__(self, shift: float = 0.0):
        self.shift = shift

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return relu(inp, self.shift)

    def bwd(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        relu_grad(inp, out)  # a constant shift does not change the slope

    def __repr__(self) -> str:
        return f"Relu(shift={self.shift})" if self.shift else "Relu()"


class Mse(Module):
    """Mean squared error; its backward needs no ``out.g``, the loss being where the chain starts."""

    def forward(self, inp: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
        return mse(inp, targ)

    def bwd(self, out: torch.Tensor, inp: torch.Tensor, targ: torch.Tensor) -> None:
        mse_grad(inp, targ)


class Model:
    """The lesson's 784-50-1 regression net: ``Lin(w1, b1)``, ``Relu()``, ``Lin(w2, b2)``, then ``Mse``.

    ``model(x, targ)`` returns the loss; ``model.backward()`` then fills ``.g`` on ``x``, ``w1``, ``b1``,
    ``w2`` and ``b2`` (the very tensors passed in: the layers hold them, not copies).
    """

    def __init__(self, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor):
        _layer("Model", w1=w1, b1=b1)
        _layer("Model", w2=w2, b2=b2)
        if w2.shape[0] != w1.shape[1]:
            contract.fail("Model", "w2", f"[{w1.shape[1]}, out] (its rows = w1's columns)", w2)
        self.layers = [Lin(w1, b1), Relu(), Lin(w2, b2)]
        self.loss = Mse()

    def __call__(self, x: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.loss(x, targ)

    def backward(self) -> None:
        self.loss.backward()
        for layer in reversed(self.layers):
            layer.backward()

    def __repr__(self) -> str:
        return f"Model({', '.join(map(repr, self.layers))}, loss=Mse())"
