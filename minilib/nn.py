"""Lesson 03 (03_minibatch_training): the pieces of a training loop, rebuilt one refactor at a time.

``DummyModule`` re-creates how ``nn.Module`` finds its layers (``__setattr__`` registration);
``SequentialModel`` holds a list of layers through ``nn.ModuleList``; ``Optimizer`` is plain SGD
(``step`` and ``zero_grad`` under ``torch.no_grad``); ``fit`` trains and validates, averaging the
validation loss and accuracy over SAMPLES (weighted by batch size) rather than over batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from minilib import contract
from minilib.loss import accuracy

__all__ = ["DummyModule", "SequentialModel", "Optimizer", "fit"]


class DummyModule:
    """The lesson's stand-in for ``nn.Module``: every public attribute set on it is registered as a layer.

    ``DummyModule(784, 50, 10)`` builds the lesson's model, ``l1`` -> ``relu`` -> ``l2``; without
    arguments it is empty and layers are added by setting attributes. Calling it applies the
    registered layers in the order they were set. Names starting with ``_`` are not registered:
    the registry itself, ``self._modules``, is set through the same ``__setattr__``, and registering
    it would mean reading ``self._modules`` before it exists.
    """

    def __init__(self, n_in: int | None = None, nh: int | None = None, n_out: int | None = None):
        self._modules: dict[str, object] = {}  # skipped by __setattr__: the registry is not a layer
        sizes = (n_in, nh, n_out)
        if any(s is not None for s in sizes):
            contract.positive_int("DummyModule", n_in=n_in, nh=nh, n_out=n_out)
            self.l1 = nn.Linear(n_in, nh)
            self.relu = nn.ReLU()
            self.l2 = nn.Linear(nh, n_out)

    def __setattr__(self, k: str, v) -> None:
        if not k.startswith("_"):
            self._modules[k] = v
        super().__setattr__(k, v)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._modules})"

    def parameters(self) -> Iterable[nn.Parameter]:
        """Every parameter of every registered layer, in registration order."""
        for layer in self._modules.values():
            if hasattr(layer, "parameters"):
                yield from layer.parameters()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._modules.values():
            x = layer(x)
        return x

    def train(self, mode: bool = True) -> DummyModule:
        """Switch every registered layer to training (or, with ``mode=False``, evaluation) mode."""
        for layer in self._modules.values():
            if hasattr(layer, "train"):
                layer.train(mode)
        return self

    def eval(self) -> DummyModule:
        return self.train(False)


class SequentialModel(nn.Module):
    """Applies ``layers`` in order. ``nn.ModuleList`` registers them, so ``parameters()`` finds them all."""

    def __init__(self, layers: Iterable[nn.Module]):
        super().__init__()
        layers = list(layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, nn.Module):  # a plain function would be skipped by parameters()
                contract.fail("SequentialModel", f"layers[{i}]", "an nn.Module", layer, TypeError)
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Optimizer:
    """Plain SGD: ``p -= lr * p.grad`` for every parameter, as ``torch.optim.SGD(params, lr)`` does.

    Both methods run under ``torch.no_grad()``: a parameter is a leaf tensor that requires grad, and
    autograd refuses an in-place change of one it is tracking (RuntimeError); the update is not part
    of the model's computation, so it must not be recorded either.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 0.5):
        self.params, self.lr = list(params), contract.finite_number("Optimizer", lr=lr)
        contract.nonempty("Optimizer", params=self.params)
        contract.tensor("Optimizer", **{f"params[{i}]": p for i, p in enumerate(self.params)})
        if self.lr < 0:
            contract.fail("Optimizer", "lr", "a finite number >= 0", lr)

    def step(self) -> None:
        with torch.no_grad():
            for p in self.params:
                if p.grad is not None:  # a parameter that took no part in the loss has no gradient yet
                    # add_ with alpha is SGD's own update, so both round identically, step for step.
                    p.add_(p.grad, alpha=-self.lr)

    def zero_grad(self) -> None:
        """Zero the gradients in place. backward() ADDS to .grad, which is what makes accumulation work."""
        with torch.no_grad():
            for p in self.params:
                if p.grad is not None:
                    p.grad.zero_()

    def __repr__(self) -> str:
        return f"Optimizer({len(self.params)} tensors, lr={self.lr})"


def fit(
    epochs: int,
    model: Callable,
    loss_func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    opt,
    train_dl: Iterable,
    valid_dl: Iterable,
) -> list[tuple[float, float]]:
    """Train ``epochs`` times over ``train_dl``, validating after each; return [(valid_loss, valid_acc)].

    ``loss_func`` must return a batch MEAN (as ``F.cross_entropy`` does). The validation numbers are
    sums of ``batch mean * batch size`` divided by the number of samples: the lesson averaged batch
    means, which weighs a last batch of 1 sample as much as a full one. ``model.train()`` before
    training and ``model.eval()`` before validating switch layers such as dropout and batchnorm;
    validation runs under ``torch.no_grad()``: no backward, so no graph or activations are kept.
    """
    contract.positive_int("fit", minimum=0, epochs=epochs)
    history = []
    for _ in range(epochs):
        model.train()
        for xb, yb in train_dl:
            loss = loss_func(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()

        model.eval()
        tot_loss, tot_acc, n = 0.0, 0.0, 0
        with torch.no_grad():
            for xb, yb in valid_dl:
                pred = model(xb)
                bs = len(yb)
                tot_loss += loss_func(pred, yb).item() * bs
                tot_acc += accuracy(pred, yb).item() * bs
                n += bs
        if n == 0:
            contract.fail("fit", "valid_dl", "a loader that yields samples to average over", "none")
        history.append((tot_loss / n, tot_acc / n))
    return history
