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

from minilib.matmul import shape_str as _shape

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


def _check_tensors(fname: str, **tensors) -> None:
    """TypeError for a non-tensor; ValueError when the tensors are on different devices or dtypes."""
    for arg, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fname}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    devices = {arg: t.device for arg, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{fname}: all tensors must be on one device, got {devices}")


def _check_float(fname: str, **tensors) -> None:
    dtypes = {arg: t.dtype for arg, t in tensors.items()}
    if any(not t.is_floating_point() for t in tensors.values()) or len(set(dtypes.values())) > 1:
        raise ValueError(f"{fname}: expected tensors of one floating dtype, got {dtypes}")


def _check_lin(fname: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
    _check_tensors(fname, x=x, w=w, b=b)
    if x.dim() != 2 or w.dim() != 2 or b.dim() != 1:
        raise ValueError(
            f"{fname}: expected x [N, in], w [in, out] and b [out], "
            f"got x {_shape(x)}, w {_shape(w)} and b {_shape(b)}"
        )
    if x.shape[1] != w.shape[0] or b.shape[0] != w.shape[1]:
        raise ValueError(
            f"{fname}: sizes differ: x is {_shape(x)}, w is {_shape(w)}, b is {_shape(b)} "
            f"(x's columns must equal w's rows, and b's length w's columns)"
        )
    _check_float(fname, x=x, w=w, b=b)


def _grad_of(fname: str, out: torch.Tensor) -> torch.Tensor:
    g = getattr(out, "g", None)
    if not isinstance(g, torch.Tensor) or g.shape != out.shape:
        got = _shape(g) if isinstance(g, torch.Tensor) else "nothing" if g is None else type(g).__name__
        raise ValueError(
            f"{fname}: out.g must hold the gradient of the loss with respect to out (shape {_shape(out)}), "
            f"got {got}: run the backward pass of the layer after this one first"
        )
    return g


# ---------------------------------------------------------------------------------------------- forward


def lin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A linear layer, ``x @ w + b``: x is ``[N, in]``, w ``[in, out]`` (the lesson's layout), b ``[out]``."""
    _check_lin("lin", x, w, b)
    return x @ w + b


def relu(x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    """``max(x, 0) - shift``. The lesson tries ``shift=0.5``: a ReLU's output has mean ~0.4 on unit
    inputs, and subtracting it brings the next layer's input back near mean 0."""
    _check_tensors("relu", x=x)
    return x.clamp_min(0.0) - shift


def _targets(fname: str, output: torch.Tensor, targ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``output`` and ``targ`` as two ``[N]`` tensors of output's dtype, or a ValueError.

    The lesson's model ends in a ``[N, 1]`` column while the targets are ``[N]``: subtracting them
    directly would broadcast to ``[N, N]`` and give a silently wrong loss, hence ``squeeze(-1)``.
    """
    _check_tensors(fname, output=output, targ=targ)
    out = output.squeeze(-1) if output.dim() == 2 and output.shape[1] == 1 else output
    t = targ.squeeze(-1) if targ.dim() == 2 and targ.shape[1] == 1 else targ
    if out.dim() != 1 or t.shape != out.shape or out.shape[0] == 0:
        raise ValueError(
            f"{fname}: expected output [N] or [N, 1] and targ [N] with the same N > 0, "
            f"got output {_shape(output)} and targ {_shape(targ)}"
        )
    if not output.is_floating_point():
        raise ValueError(f"{fname}: output must be a floating point tensor, got {output.dtype}")
    return out, t.to(output.dtype)  # integer digit labels are fine targets for this toy regression


def mse(output: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
    """Mean squared error between a ``[N, 1]`` (or ``[N]``) output and ``[N]`` targets."""
    out, t = _targets("mse", output, targ)
    return (out - t).pow(2).mean()


# --------------------------------------------------------------------------------------------- backward


def mse_grad(inp: torch.Tensor, targ: torch.Tensor) -> None:
    """d mse / d inp = 2 (inp - targ) / N, stored in ``inp.g`` with inp's own shape."""
    out, t = _targets("mse_grad", inp, targ)
    with torch.no_grad():
        inp.g = (2.0 * (out - t) / out.shape[0]).reshape(inp.shape)


def relu_grad(inp: torch.Tensor, out: torch.Tensor) -> None:
    """ReLU passes the gradient where its input was positive and blocks it elsewhere: ``inp.g``."""
    _check_tensors("relu_grad", inp=inp, out=out)
    if inp.shape != out.shape:
        raise ValueError(f"relu_grad: inp and out must have one shape, got {_shape(inp)} and {_shape(out)}")
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
    _check_lin("lin_grad", inp, w, b)
    _check_tensors("lin_grad", inp=inp, out=out)
    if out.shape != (inp.shape[0], w.shape[1]):
        raise ValueError(
            f"lin_grad: out must be {inp.shape[0]}x{w.shape[1]} (inp's rows by w's columns), "
            f"got {_shape(out)}"
        )
    g = _grad_of("lin_grad", out)
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
        if not hasattr(self, "out"):
            raise RuntimeError(
                f"{type(self).__name__}.backward: the module has not been called yet, so there is no "
                f"output to take gradients from; call it on its inputs first"
            )
        self.bwd(self.out, *self.args)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Lin(Module):
    """``inp @ w + b``, holding its weight ``w`` ``[in, out]`` and bias ``b`` ``[out]``."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor):
        _check_tensors("Lin", w=w, b=b)
        if w.dim() != 2 or b.dim() != 1 or b.shape[0] != w.shape[1]:
            raise ValueError(f"Lin: expected w [in, out] and b [out], got w {_shape(w)} and b {_shape(b)}")
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
