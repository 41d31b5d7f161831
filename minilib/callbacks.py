"""Lessons 04, 05 and 05b: the callbacks that plug into ``minilib.learner.Runner``.

04: ``AvgStats`` / ``AvgStatsCallback`` (loss and metrics averaged over SAMPLES, not over batches).
05: ``Recorder`` (lr per param group, loss; plots) and ``ParamScheduler`` (a schedule per param group).
05b: ``LR_Find`` (the learning-rate finder). Beyond the lessons: ``ProgressCallback`` (a tqdm bar in a
terminal, one plain line per epoch elsewhere) and ``DeviceCallback`` (train on a GPU with the same Runner).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from contextlib import suppress

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from minilib import contract
from minilib.learner import Callback, CancelTrainException, listify, silent

__all__ = [
    "AvgStats",
    "AvgStatsCallback",
    "Recorder",
    "ParamScheduler",
    "LR_Find",
    "ProgressCallback",
    "DeviceCallback",
]


def _item(x) -> float:
    """A Python float from a loss or metric, without autograd's warning about tensors that need grad."""
    return x.detach().item() if isinstance(x, torch.Tensor) else float(x)


class AvgStats:
    """Running totals of ``loss * bs`` and ``metric * bs`` over one pass, divided by the sample count.

    Weighting by batch size makes ``avg_stats`` the loss of the whole set even when the last batch is
    short; a plain mean of batch means would give a batch of 1 the weight of a batch of 1000.
    """

    def __init__(self, metrics, in_train: bool):
        self.metrics, self.in_train = listify(metrics), in_train
        for m in self.metrics:
            if not callable(m):
                contract.fail("AvgStats", "metrics", "callables (pred, yb) -> value", m, TypeError)
        self.reset()

    def reset(self) -> None:
        # Python floats: float64 totals, and no autograd graph kept alive across batches.
        self.tot_loss, self.count = 0.0, 0
        self.tot_mets = [0.0] * len(self.metrics)

    @property
    def all_stats(self) -> list[float]:
        return [self.tot_loss] + self.tot_mets

    @property
    def avg_stats(self) -> list[float]:
        """``[loss, *metrics]`` averaged over the samples seen since ``reset`` (NaN before any)."""
        if not self.count:
            return [math.nan] * (1 + len(self.metrics))
        return [o / self.count for o in self.all_stats]

    @property
    def names(self) -> list[str]:
        return ["loss"] + [getattr(m, "__name__", type(m).__name__) for m in self.metrics]

    def accumulate(self, run) -> None:
        self.add(run.loss, run.pred, run.yb)

    def add(self, loss, pred, yb) -> None:
        """Count a batch of ``len(yb)`` samples whose mean loss is ``loss``."""
        bn = len(yb)
        self.tot_loss += _item(loss) * bn
        self.count += bn
        for i, m in enumerate(self.metrics):
            self.tot_mets[i] += _item(m(pred, yb)) * bn

    def state_dict(self) -> dict:
        """The totals (plain numbers: a checkpoint stores them with ``torch.save``)."""
        return {"tot_loss": self.tot_loss, "tot_mets": list(self.tot_mets), "count": self.count}

    def load_state_dict(self, sd: dict) -> None:
        self.tot_loss, self.tot_mets, self.count = (
            float(sd["tot_loss"]),
            list(sd["tot_mets"]),
            int(sd["count"]),
        )

    def __repr__(self) -> str:
        if not self.count:
            return ""
        return f"{'train' if self.in_train else 'valid'}: {self.avg_stats}"


class AvgStatsCallback(Callback):
    """Keeps ``train_stats`` and ``valid_stats`` (``AvgStats``) for the current epoch.

    Shows both after each epoch through ``run.logger`` (``print``, as the lesson does, unless a
    ``ProgressCallback`` has put its own in place), unless ``print_stats=False``. A logger that fails
    (a broken pipe after ``| head``, a closed stdout) stops the showing, never the fit.
    ``state_dict()`` holds both passes' totals, the one in progress included.
    """

    def __init__(self, metrics, print_stats: bool | None = None):
        self.train_stats, self.valid_stats = AvgStats(metrics, True), AvgStats(metrics, False)
        self.print_stats = print_stats

    def begin_epoch(self):
        self.train_stats.reset()
        self.valid_stats.reset()

    def after_loss(self):
        stats = self.train_stats if self.in_train else self.valid_stats
        with torch.no_grad():
            stats.accumulate(self.run)

    def after_epoch(self):
        if self.print_stats is False:
            return
        try:
            self.logger(self.train_stats)
            self.logger(self.valid_stats)
        except (OSError, ValueError):  # a broken pipe or a closed stdout must not end the training:
            self.print_stats = False  # stop showing; the numbers stay in train_stats/valid_stats

    def state_dict(self) -> dict:
        return {"train": self.train_stats.state_dict(), "valid": self.valid_stats.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.train_stats.load_state_dict(sd["train"])
        self.valid_stats.load_state_dict(sd["valid"])


class Recorder(Callback):
    """Records, for every TRAINING batch, the lr of each param group and the loss.

    ``lrs[g]`` is the list of lrs of param group ``g``; ``losses`` a list of floats. A param group
    added during the fit gets its own list, NaN for the batches before it existed, so that every list
    lines up with ``losses``. The plots return a ``matplotlib.figure.Figure`` (built without pyplot:
    nothing is shown, nothing global is touched). ``state_dict()`` holds the lists.
    """

    def begin_fit(self):
        self.lrs = [[] for _ in self.opt.param_groups]
        self.losses = []

    def after_batch(self):
        if not self.in_train:
            return
        groups = self.opt.param_groups
        if len(groups) < len(self.lrs):
            raise RuntimeError(
                f"Recorder: the optimizer has {len(groups)} param groups, but lrs were recorded for "
                f"{len(self.lrs)}: a group removed during a fit cannot be matched to its list"
            )
        self.lrs += [[math.nan] * len(self.losses) for _ in range(len(groups) - len(self.lrs))]
        for pg, lrs in zip(groups, self.lrs, strict=True):
            lrs.append(float(pg["lr"]))
        self.losses.append(_item(self.loss))

    def state_dict(self) -> dict:
        return {"lrs": [list(lrs) for lrs in self.lrs], "losses": list(self.losses)}

    def load_state_dict(self, sd: dict) -> None:
        self.lrs, self.losses = [list(lrs) for lrs in sd["lrs"]], list(sd["losses"])

    def _lrs(self, pgid: int) -> list[float]:
        if not -len(self.lrs) <= pgid < len(self.lrs):
            want = f"the index of one of the {len(self.lrs)} param groups"
            contract.fail("Recorder", "pgid", want, pgid, IndexError)
        return self.lrs[pgid]

    @staticmethod
    def _n(losses: list, skip_last: int) -> int:
        return max(len(losses) - contract.positive_int("Recorder", minimum=0, skip_last=skip_last), 0)

    def plot_lr(self, pgid: int = -1) -> Figure:
        """The lr of param group ``pgid`` against the training batch."""
        fig = Figure()
        ax = fig.add_subplot()
        ax.plot(self._lrs(pgid))
        ax.set_xlabel("batch")
        ax.set_ylabel("learning rate")
        return fig

    def plot_loss(self, skip_last: int = 0) -> Figure:
        """The training loss against the batch, without the last ``skip_last`` batches."""
        fig = Figure()
        ax = fig.add_subplot()
        ax.plot(self.losses[: self._n(self.losses, skip_last)])
        ax.set_xlabel("batch")
        ax.set_ylabel("loss")
        return fig

    def plot(self, skip_last: int = 0, pgid: int = -1) -> Figure:
        """Loss against the lr of param group ``pgid`` on a log x axis: the LR finder's picture."""
        lrs, n = self._lrs(pgid), self._n(self.losses, skip_last)
        fig = Figure()
        ax = fig.add_subplot()
        ax.set_xscale("log")
        ax.plot(lrs[:n], self.losses[:n])
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("loss")
        return fig


class ParamScheduler(Callback):
    """Before each training batch, set ``pg[pname] = f(n_epochs / epochs)`` for every param group.

    ``sched_funcs`` is one schedule for all groups, or a list/tuple with one per group (discriminative
    learning rates: e.g. one for the weights, one for the biases). A count mismatch is a ValueError.
    ``pname`` must already be a key of the optimizer's param groups (a typo would schedule nothing),
    and a scheduled value that is not finite, or a negative lr, stops the fit before it is set: one
    NaN lr makes every weight NaN, a negative one makes SGD climb the loss.
    """

    _order = 1

    def __init__(self, pname: str, sched_funcs: Callable | list | tuple):
        if not isinstance(pname, str):
            contract.fail("ParamScheduler", "pname", "a str such as 'lr'", pname, TypeError)
        funcs = list(sched_funcs) if isinstance(sched_funcs, (list, tuple)) else [sched_funcs]
        for f in funcs:
            if not callable(f):
                contract.fail("ParamScheduler", "sched_funcs", "callables pos -> value", f, TypeError)
        self.pname, self.sched_funcs = pname, sched_funcs

    def begin_fit(self):
        groups = self.opt.param_groups
        for pg in groups:
            contract.one_of("ParamScheduler", "pname", self.pname, [k for k in pg if k != "params"])
        self._funcs_for(groups)  # a count mismatch stops the fit before its first batch

    def _funcs_for(self, groups: list) -> list:
        """One schedule per param group, as the optimizer has them now (a group may join mid-fit)."""
        if not isinstance(self.sched_funcs, (list, tuple)):
            return [self.sched_funcs] * len(groups)  # one schedule: every group, one added mid-fit too
        if len(self.sched_funcs) != len(groups):
            got = f"{len(self.sched_funcs)} schedules for {len(groups)} param groups"
            contract.fail("ParamScheduler", "sched_funcs", "one schedule, or one per param group", got)
        return list(self.sched_funcs)

    def set_param(self) -> None:
        pos = self.n_epochs / self.epochs
        funcs = self._funcs_for(self.opt.param_groups)
        values = [f(pos) for f in funcs]
        for i, (f, v) in enumerate(zip(funcs, values, strict=True)):  # all checked before any is set
            where = f"{self.pname} from schedule {_sched_name(f)} (param group {i}) at pos {pos:.6g}"
            for x in v if isinstance(v, tuple) else (v,):  # a tuple: Adam's betas
                if contract.finite_number("ParamScheduler", **{where: x}) < 0 and self.pname == "lr":
                    contract.fail("ParamScheduler", where, "a finite number >= 0", x)
        for pg, v in zip(self.opt.param_groups, values, strict=True):
            pg[self.pname] = v

    def begin_batch(self):
        if self.in_train:
            self.set_param()


def _sched_name(f) -> str:
    """``sched_lin(0.5, 0.1)`` for a minilib schedule (its repr), the function's name for a function."""
    return getattr(f, "__qualname__", None) or repr(f)


class LR_Find(Callback):
    """The LR finder: raise the lr exponentially from ``min_lr`` to ``max_lr`` over ``max_iter`` batches.

    Batch ``i`` trains at ``min_lr * (max_lr / min_lr) ** (i / max_iter)``; the sweep stops (a
    ``CancelTrainException``) once the loss exceeds 10x the best so far, or after the batch at
    ``max_lr`` (``max_iter + 1`` batches). It never validates. Read the result with ``Recorder.plot``.
    """

    _order = 1

    def __init__(self, max_iter: int = 100, min_lr: float = 1e-6, max_lr: float = 10):
        contract.positive_int("LR_Find", max_iter=max_iter)
        contract.finite_number("LR_Find", positive=True, min_lr=min_lr, max_lr=max_lr)
        if not min_lr < max_lr:
            contract.fail("LR_Find", "max_lr", f"> min_lr ({min_lr!r})", max_lr)
        self.max_iter, self.min_lr, self.max_lr = max_iter, min_lr, max_lr
        self.best_loss = math.inf

    def begin_fit(self):
        self.best_loss = math.inf

    def begin_batch(self):
        if not self.in_train:
            return
        pos = self.n_iter / self.max_iter
        lr = self.min_lr * (self.max_lr / self.min_lr) ** pos
        for pg in self.opt.param_groups:
            pg["lr"] = lr

    def after_step(self):
        loss = _item(self.loss)
        if self.n_iter >= self.max_iter or not loss <= self.best_loss * 10:  # NaN counts as diverged
            raise CancelTrainException()
        self.best_loss = min(self.best_loss, loss)

    def begin_validate(self):
        return True  # skip validation: the finder only needs the training losses


class ProgressCallback(Callback):
    """A progress bar over epochs and batches (tqdm) with the running loss and metrics.

    On a terminal: an epoch bar and a batch bar, and one summary line per epoch above them. When the
    output is not a terminal (CI logs, a file, pytest's capture): no bar, just the summary line per
    epoch, so logs stay clean. ``file`` defaults to ``sys.stdout`` as it is when the fit begins.
    For the fit it takes ``run.logger``: what the other callbacks log during an epoch (AvgStatsCallback's
    stats) goes into that epoch's line. On a runner whose logger is ``silent`` (DDPCallback's ranks other
    than 0) it shows nothing. The running metrics come from ``run.avg_stats``, if there is one. The
    display never kills a training run: once writing fails (a closed stdout, a broken pipe after
    ``| head``), it stops displaying and the fit goes on.
    """

    _order = 10  # after the others: show what they computed for this batch
    # Until begin_fit, and after a write failed: nothing to show. after_fit runs even when an earlier
    # callback's begin_fit failed, and must not then hide that error behind an AttributeError.
    out = mbar = pbar = None
    tty = False
    logged = ()

    def __init__(self, file=None, beta: float = 0.98):
        self.file, self.beta = file, beta

    def _show(self, write, *args) -> None:
        """Call ``write(*args)``, which writes to the output; if that fails, stop displaying for good."""
        if self.out is None:
            return
        try:
            write(*args)
        except (OSError, ValueError):  # BrokenPipeError, "I/O operation on closed file"
            self.out = None
            for bar in (self.pbar, self.mbar):
                with suppress(OSError, ValueError, AttributeError):
                    bar.close()  # deregisters it from tqdm even though the final write fails
            self.mbar = self.pbar = None

    def begin_fit(self):
        self.out = None if self.run.logger is silent else self.file if self.file is not None else sys.stdout
        self.mbar = self.pbar = None
        self.smooth, self.n_smooth, self.logged = 0.0, 0, []
        self.run.logger = self.log  # the Runner gives its own back after the fit
        self._show(self._open)

    def log(self, *items) -> None:
        """The runner's logger during the fit: keep ``items`` for the epoch's line."""
        self.logged.append(items)

    def _open(self) -> None:
        isatty = getattr(self.out, "isatty", None)
        self.tty = bool(isatty()) if callable(isatty) else False
        self.mbar = tqdm(total=self.epochs, desc="epoch", unit="epoch", file=self.out, disable=not self.tty)

    def _new_pbar(self, desc: str) -> None:
        if self.pbar is not None:
            self.pbar.close()
        self.pbar = tqdm(
            total=self.iters,
            initial=self.iter,
            desc=desc,
            unit="batch",
            leave=False,
            file=self.out,
            disable=not self.tty,
        )

    def begin_epoch(self):
        self._show(self._new_pbar, "train")

    def begin_validate(self):
        self._show(self._new_pbar, "valid")

    def after_batch(self):
        if self.in_train:
            # Exponential moving average of the loss, debiased (the first batches are not pulled to 0).
            self.n_smooth += 1
            self.smooth = self.beta * self.smooth + (1 - self.beta) * _item(self.loss)
        if self.pbar is None or not self.tty:
            return
        postfix = {}
        if self.n_smooth:
            postfix["loss"] = f"{self.smooth / (1 - self.beta**self.n_smooth):.4f}"
        stats = getattr(self.run, "avg_stats", None)
        if stats is not None:
            s = stats.train_stats if self.in_train else stats.valid_stats
            for name, v in zip(s.names[1:], s.avg_stats[1:], strict=True):
                postfix[name] = f"{v:.4f}"
        self._show(self._advance, postfix)

    def _advance(self, postfix: dict) -> None:
        self.pbar.set_postfix(postfix, refresh=False)
        self.pbar.update(1)

    def epoch_line(self) -> str:
        """``epoch 2/3  train: loss 0.2311 accuracy 0.9312  valid: loss ...`` for the epoch just done:
        what was logged during it, or the smoothed training loss where no stats were logged."""
        parts = [f"epoch {self.epoch + 1}/{self.epochs}"]
        if self.n_smooth and not any(isinstance(x, AvgStats) for items in self.logged for x in items):
            parts.append(f"train: loss {self.smooth / (1 - self.beta**self.n_smooth):.4f}")
        parts += [_describe(items) for items in self.logged]
        return "  ".join(p for p in parts if p)

    def after_epoch(self):
        self._show(self._print, self.epoch_line())
        self.logged.clear()

    def _print(self, line: str) -> None:
        if self.tty:
            self.mbar.write(line, file=self.out)
            self.mbar.update(1)
        else:
            print(line, file=self.out, flush=True)

    def after_fit(self):
        for items in self.logged:  # logged after the last epoch's line
            self._show(self._print, _describe(items))
        self._show(self._close)
        self.out = None

    def _close(self) -> None:
        for bar in (self.pbar, self.mbar):
            if bar is not None:
                bar.close()
        self.mbar = self.pbar = None


def _describe(items: tuple) -> str:
    """Logged items as one line: an ``AvgStats`` as ``train: loss 0.2311 accuracy 0.9312``."""
    return " ".join(_describe_stats(x) if isinstance(x, AvgStats) else str(x) for x in items)


def _describe_stats(s: AvgStats) -> str:
    pairs = zip(s.names, s.avg_stats, strict=True)
    return (
        f"{'train' if s.in_train else 'valid'}: " + " ".join(f"{n} {v:.4f}" for n, v in pairs)
        if s.count
        else ""
    )


class DeviceCallback(Callback):
    """Moves the model to ``device`` when the fit begins and every batch as it begins.

    The optimizer keeps working: ``Module.to`` moves parameters in place, so ``opt`` still holds them.
    Give the same ``Runner`` ``DeviceCallback('cuda')`` and it trains on the GPU.
    """

    _order = -10  # before every other callback's begin_batch sees the batch

    def __init__(self, device):
        self.device = torch.device(device)

    def begin_fit(self):
        self.model.to(self.device)

    def begin_batch(self):
        self.run.xb, self.run.yb = self.xb.to(self.device), self.yb.to(self.device)

    def __repr__(self) -> str:
        return f"DeviceCallback({str(self.device)!r})"
