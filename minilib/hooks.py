"""Lesson 10 (06_cuda_cnn_hooks_init): looking inside a training model with PyTorch's forward hooks.

To see why training goes wrong, the notebook records each layer's output statistics while the model
trains: first with a hand-made ``SequentialModel`` that keeps means and stds, then with
``register_forward_hook``, then with ``Hook`` and ``Hooks`` (a ``ListContainer`` of hooks that removes
them all when its ``with`` block ends). ``append_stats`` keeps the mean, the std and a 40-bin histogram of
each output; ``get_hist`` turns the histograms into "the colorful dimension" (bins x batches, log
counts) and ``get_min`` into the share of activations stuck near zero. The 2022 course moved this into
a callback, ``ActivationStats``, which minilib has too.

Where minilib departs from the notebook:
- ``Hook`` has no ``__del__``: the module keeps the hook function, which holds the ``Hook``, so dropping
  the Python object never removed the hook anyway. ``remove()``, ``Hooks``' ``with`` block or
  ``ActivationStats`` remove them.
- ``ListContainer`` reads a bool TENSOR as a mask (the notebook's ``isinstance(idx[0], bool)`` is False
  for one, so it used True/False as the indices 1/0: a silently wrong answer) and refuses a mask of
  another length with an IndexError (the notebook: a bare assert).
- ``append_stats`` stores floats and CPU tensors, never the activations (the notebook's ``outp.data.mean()``
  kept 0-d tensors), picks its histogram range from the module (``(-7, 7)`` after a GeneralRelu with
  ``sub``, else ``(0, 10)``) and records it on the hook as ``hist_range``, which ``get_min`` reads.
- ``get_min`` gives 0, not NaN, for a batch without a single activation in the histogram's range.
- ``Hooks`` prints as ``Hooks (N items)`` (the Hook objects themselves say nothing useful).
"""

from __future__ import annotations

from functools import partial

import torch
from matplotlib.figure import Figure
from torch import nn

from minilib import contract
from minilib.learner import Callback, listify

__all__ = [
    "children",
    "Hook",
    "ListContainer",
    "Hooks",
    "append_stats",
    "get_hist",
    "get_min",
    "ActivationStats",
]


def children(m: nn.Module) -> list[nn.Module]:
    """The direct sub-modules of ``m``, as a list."""
    return list(m.children())


class Hook:
    """A forward hook on ``m`` calling ``f(hook, module, inp, outp)`` after each forward of ``m``.

    ``f`` gets the Hook itself first, so it can keep what it measures on it (``hook.stats``). The module
    holds the hook until ``remove()`` (which may be called twice).
    """

    def __init__(self, m: nn.Module, f):
        if not isinstance(m, nn.Module):
            contract.fail("Hook", "m", "an nn.Module", m, TypeError)
        if not callable(f):
            contract.fail("Hook", "f", "a callable f(hook, module, inp, outp)", f, TypeError)
        self.module_name = type(m).__name__
        self.handle = m.register_forward_hook(partial(f, self))

    def remove(self) -> None:
        self.handle.remove()  # a RemovableHandle forgets an id it already removed: twice is harmless

    def __repr__(self) -> str:
        return f"Hook({self.module_name})"


class ListContainer:
    """A list that numpy-style indexing reaches: an int, a slice, a list of ints, or a boolean mask of
    the container's length (a list of bools or a bool tensor)."""

    def __init__(self, items):
        self.items = listify(items)

    def __getitem__(self, idx):
        if isinstance(idx, (int, slice)):
            return self.items[idx]
        if not isinstance(idx, torch.Tensor) and hasattr(idx, "__array__"):
            idx = torch.as_tensor(idx)  # a numpy array: its bools are numpy's, not Python's
        if isinstance(idx, torch.Tensor):
            idx = idx.tolist() if idx.dim() else idx.item()
            if not isinstance(idx, list):
                return self.items[idx]
        idx = list(idx)
        if idx and all(isinstance(i, bool) for i in idx):
            if len(idx) != len(self):
                raise IndexError(
                    f"{type(self).__name__}: a boolean mask must have one entry per item: "
                    f"the mask has {len(idx)}, the container {len(self)}"
                )
            return [o for keep, o in zip(idx, self.items, strict=True) if keep]
        return [self.items[i] for i in idx]

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __setitem__(self, i, o) -> None:
        self.items[i] = o

    def __delitem__(self, i) -> None:
        del self.items[i]

    def __repr__(self) -> str:
        res = f"{type(self).__name__} ({len(self)} items)\n{self.items[:10]}"
        if len(self) > 10:
            res = res[:-1] + "...]"
        return res


class Hooks(ListContainer):
    """One ``Hook(m, f)`` per module of ``ms`` (a list of modules, or an ``nn.Sequential``: its layers).

    A context manager: leaving the ``with`` block removes every hook, also when an exception leaves it.
    """

    def __init__(self, ms, f):
        modules = list(
            [ms] if isinstance(ms, nn.Module) and not isinstance(ms, (nn.Sequential, nn.ModuleList)) else ms
        )
        # All checked before any is hooked: a Hooks that failed half-way would leave hooks nobody can remove.
        contract.module("Hooks", **{f"ms[{i}]": m for i, m in enumerate(modules)})
        super().__init__([Hook(m, f) for m in modules])

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __del__(self):
        # Unlike a lone Hook, the container is held by no module, so dropping it does run this.
        self.remove()

    def __delitem__(self, i) -> None:
        self[i].remove()
        super().__delitem__(i)

    def remove(self) -> None:
        for h in getattr(self, "items", ()):  # () when __init__ failed: __del__ still runs then
            h.remove()

    def __repr__(self) -> str:
        return f"Hooks ({len(self)} items)"


def _last_leaf(mod: nn.Module) -> nn.Module:
    """The module whose output ``mod`` returns, for a chain of layers: its last leaf."""
    while True:
        kids = list(mod.children())
        if not kids:
            return mod
        mod = kids[-1]


def _hist_range(mod: nn.Module) -> tuple[float, float]:
    """(-7, 7) where the output comes from a GeneralRelu with ``sub`` (it goes below 0), else (0, 10)."""
    last = _last_leaf(mod)
    shifted = type(last).__name__ == "GeneralRelu" and getattr(last, "sub", None) is not None
    return (-7.0, 7.0) if shifted else (0.0, 10.0)


def append_stats(hook, mod, inp, outp) -> None:
    """Append the output's mean, std (floats) and 40-bin histogram (a CPU tensor) to ``hook.stats``.

    Nothing here refers to the output afterwards, so the activations and their graph are freed as usual.
    """
    if not hasattr(hook, "stats"):
        hook.stats = ([], [], [])
    hook.hist_range = _hist_range(mod)
    means, stds, hists = hook.stats
    d = outp.detach()
    means.append(d.mean().item())
    stds.append(d.std().item())
    hists.append(d.float().histc(40, *hook.hist_range).cpu())


def _hists(fname: str, h) -> torch.Tensor:
    hists = getattr(h, "stats", ([], [], []))[2]
    if not hists:
        contract.fail(fname, "h", "a hook that has recorded at least one batch (append_stats)", h)
    return torch.stack(hists).t().float()  # bins x batches


def get_hist(h) -> torch.Tensor:
    """The colorful dimension: the hook's histograms as an image, bins (rows) x batches (columns),
    as ``log1p`` of the counts (a few huge bins would otherwise hide the rest)."""
    return _hists("get_hist", h).log1p()


def get_min(h) -> torch.Tensor:
    """Per batch, the share of the activations (of those in the histogram's range) in the bins around
    zero: the first two bins for ``(0, 10)``, bins 19-21 for ``(-7, 7)``, as the notebook.

    A ReLU unit stuck at 0 lands there; a high share means many units do nothing. (With ``sub`` the dead
    units sit at ``-sub``: at -0.4 that is bin 18, which the notebook's 19-21 miss.)"""
    h1 = _hists("get_min", h)
    lo, hi = (19, 22) if tuple(getattr(h, "hist_range", (0.0, 10.0))) == (-7.0, 7.0) else (0, 2)
    return h1[lo:hi].sum(0) / h1.sum(0).clamp_min(1)


class ActivationStats(Callback):
    """Hooks the modules of the model (``mod_filter(m)`` true; None: every leaf) when the fit begins and
    records their ``append_stats`` during TRAINING batches; removes every hook when the fit ends (also
    after an exception: the Runner runs ``after_fit`` then). ``.hooks`` stays readable after the fit."""

    def __init__(self, mod_filter=None):
        if mod_filter is not None and not callable(mod_filter):
            contract.fail(
                "ActivationStats", "mod_filter", "None or a callable module -> bool", mod_filter, TypeError
            )
        self.mod_filter = mod_filter
        self.hooks = None

    def _wanted(self, m: nn.Module) -> bool:
        return self.mod_filter(m) if self.mod_filter is not None else not any(True for _ in m.children())

    def begin_fit(self):
        if self.hooks is not None:
            self.hooks.remove()  # a second fit: start afresh, never hook a module twice
        self.hooks = Hooks([m for m in self.model.modules() if self._wanted(m)], _append_stats_in_training)

    def after_fit(self):
        if self.hooks is not None:
            self.hooks.remove()

    def plot_stats(self) -> Figure:
        """Mean and std of each hooked module's output, per training batch (the lesson's two plots)."""
        fig = Figure(figsize=(10, 4))
        ax_mean, ax_std = fig.subplots(1, 2)
        for i, h in enumerate(self._recorded()):
            ax_mean.plot(h.stats[0], label=f"{i}: {h.module_name}")
            ax_std.plot(h.stats[1])
        ax_mean.set(title="means", xlabel="batch")
        ax_std.set(title="stds", xlabel="batch")
        ax_mean.legend(fontsize="small")
        return fig

    def color_dim(self) -> Figure:
        """One image per module: x the batch, y the histogram bin (the lowest values at the bottom),
        colour the log of the count. A bright bottom row is units stuck at zero."""
        hooks = self._recorded()
        fig = Figure(figsize=(3 * len(hooks), 3))
        for ax, h in zip(listify(fig.subplots(1, len(hooks), squeeze=False)[0]), hooks, strict=True):
            ax.imshow(get_hist(h).numpy(), origin="lower", aspect="auto")
            ax.set(title=h.module_name, xlabel="batch", ylabel="bin")
        return fig

    def dead_chart(self) -> Figure:
        """``get_min`` of each module per batch: the share of its activations near zero (0 to 1)."""
        hooks = self._recorded()
        fig = Figure(figsize=(3 * len(hooks), 3))
        for ax, h in zip(listify(fig.subplots(1, len(hooks), squeeze=False)[0]), hooks, strict=True):
            ax.plot(get_min(h).numpy())
            ax.set_ylim(0, 1)
            ax.set(title=h.module_name, xlabel="batch")
        return fig

    def _recorded(self) -> list[Hook]:
        if self.hooks is None or not any(hasattr(h, "stats") for h in self.hooks):
            contract.fail("ActivationStats", "the plot", "made after a fit that trained", "no statistics yet")
        return [h for h in self.hooks if hasattr(h, "stats")]


def _append_stats_in_training(hook, mod, inp, outp) -> None:
    if mod.training:  # the Runner puts the model in eval() to validate: record the training batches only
        append_stats(hook, mod, inp, outp)
