"""Beyond the lessons: a fit that survives being killed (``CheckpointCallback``).

Lesson 04's Runner holds a training run's whole state in memory; a process killed mid-fit loses it. To
continue EXACTLY where it stopped, bit for bit, a checkpoint must hold more than the weights:

- the model's parameters and buffers (BatchNorm's running statistics), and the optimizer's state
  (momentum buffers, Adam's moments and step counts, the learning rate a schedule last set);
- where the loop was: the epoch, the training batches done in it, ``n_epochs`` (what a ParamScheduler
  reads) and ``n_iter``;
- every random state: torch's (dropout, the loader's shuffle), numpy's and Python's;
- the order of the epoch in progress. A shuffled torch DataLoader draws its order from the global
  generator (or its own ``generator=``) when its iterator is made and first advanced, that is before the
  epoch's first batch. So the random state at the START of the epoch is saved too: on resume it is put
  back, the loader's iterator made again and advanced past the batches already done (their data is
  loaded and dropped), then the random state of the moment of the save is put back;
- each callback's ``state_dict()`` (the Recorder's lists, AvgStatsCallback's totals of a pass in
  progress).

A save is atomic: the state is written to a temporary file beside ``path`` (``.<name>.<16 hex>.tmp``),
flushed and fsync'ed, renamed over ``path`` (``os.replace``, atomic on POSIX and Windows), and the folder
fsync'ed so that the rename itself survives a power cut. A process killed at any instant leaves the old
checkpoint or the new one, never a partial one; a temporary file left by a killed save is removed by the
next save. A checkpoint is read with ``torch.load(weights_only=True)``: it can hold tensors, numbers,
strings and containers, never code. (The file itself, written and read so, is ``minilib._checkpoint_file``.)

With ``DDPCallback``, rank 0 writes the file: the model and optimizer it holds are every rank's (DDP keeps
them equal), and the per-rank parts (random states, the callbacks' state of a pass in progress, which
each rank counts over its own share) are gathered to rank 0 and saved side by side. Every rank resumes
from the same file, each taking its own part.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from minilib import contract
from minilib._checkpoint_file import FORMAT, atomic_save, read_checkpoint, temp_files
from minilib.learner import Callback

__all__ = ["CheckpointCallback", "atomic_save", "read_checkpoint", "temp_files", "FORMAT"]

# ---------------------------------------------------------------------------------------------------
# Random states: torch (CPU and CUDA), numpy, Python, and the generators a loader carries.


def _loader_generators(dl) -> list[torch.Generator]:
    """The torch generators ``dl`` draws its order from, besides the global one: its own ``generator=``
    and its sampler's (a DataLoader passes the first to the RandomSampler it makes; a user's sampler may
    carry another). Each once, in a fixed order."""
    found: list[torch.Generator] = []
    for owner in (
        dl,
        getattr(dl, "sampler", None),
        getattr(getattr(dl, "batch_sampler", None), "sampler", None),
    ):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and not any(g is h for h in found):
            found.append(g)
    return found


def random_state(dl=None) -> dict:
    """Every random state the next batches may draw from, as tensors, numbers and tuples (weights_only)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else [],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
        "loader": [g.get_state() for g in _loader_generators(dl)] if dl is not None else [],
    }


def set_random_state(state: dict, dl=None) -> None:
    """Put back what ``random_state`` saved (the loader's generators: those of ``dl``)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if dl is not None:
        for g, s in zip(_loader_generators(dl), state["loader"], strict=True):
            g.set_state(s)


# ---------------------------------------------------------------------------------------------------
# Does a checkpoint fit this run? Every check before anything is loaded: a refusal changes nothing.


def _tensor_difference(where: str, now: torch.Tensor, saved, dtype: bool = True) -> str | None:
    if not isinstance(saved, torch.Tensor):
        return f"{where}: the checkpoint holds {contract.describe(saved)}, the run a tensor"
    if saved.shape != now.shape:
        return f"{where}: shape {contract.shape(saved)} in the checkpoint, {contract.shape(now)} in the run"
    if dtype and saved.dtype != now.dtype:
        return f"{where}: dtype {saved.dtype} in the checkpoint, {now.dtype} in the run"
    return None


def model_difference(model: torch.nn.Module, saved: dict) -> str | None:
    """The first key, shape or dtype in which ``saved`` is not a state dict of ``model``; None if none."""
    now = model.state_dict()
    for key in now:
        if key not in saved:
            return f"model key {key!r} is not in the checkpoint"
        why = _tensor_difference(f"model key {key!r}", now[key], saved[key])
        if why:
            return why
    for key in saved:
        if key not in now:
            return f"model key {key!r} of the checkpoint is not in the model"
    return None


def optimizer_difference(opt: torch.optim.Optimizer, saved: dict) -> str | None:
    """The first param group, parameter or state tensor in which ``saved`` does not fit ``opt``."""
    groups, saved_groups = opt.param_groups, saved.get("param_groups", [])
    if len(saved_groups) != len(groups):
        return f"the optimizer has {len(groups)} param groups, the checkpoint {len(saved_groups)}"
    params = []
    for i, (g, sg) in enumerate(zip(groups, saved_groups, strict=True)):
        if len(sg["params"]) != len(g["params"]):
            n, n_saved = len(g["params"]), len(sg["params"])
            return f"optimizer param group {i} has {n} parameters, the checkpoint {n_saved}"
        # Another kind of optimizer (SGD's state in an Adam): loading would replace the group's
        # hyperparameters by ones its step does not know, and the fit would fail later, already changed.
        ours, theirs = g.keys() - {"params"}, sg.keys() - {"params"}
        if ours != theirs:
            key = min(ours - theirs or theirs - ours)
            whose = "the run's, not the checkpoint's" if key in ours else "the checkpoint's, not the run's"
            return (
                f"optimizer param group {i}: hyperparameter {key!r} is {whose} (saved by another optimizer?)"
            )
        params += list(zip(sg["params"], g["params"], strict=True))
    for saved_id, p in params:
        for k, v in saved.get("state", {}).get(saved_id, {}).items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:  # 0-d: a step count, not shaped like p
                why = _tensor_difference(f"optimizer state {k!r} of parameter {saved_id}", p, v, dtype=False)
                if why:
                    return why
    return None


# ---------------------------------------------------------------------------------------------------
# The callback.


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """The module DDP wraps (its state dict's keys have no ``module.`` prefix), or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class _Rest:
    """The rest of a pass: an iterator already advanced past the batches a resumed fit had done; its
    ``len`` is still the whole pass's, as ``run.iters``."""

    def __init__(self, it: Iterator, total: int):
        self.it, self.total = it, total

    def __iter__(self) -> Iterator:
        return self.it

    def __len__(self) -> int:
        return self.total


class CheckpointCallback(Callback):
    """Save the training state to ``path`` after every epoch (and every ``every_batches`` training
    batches); with ``resume=True``, a fit that finds a checkpoint at ``path`` continues from it.

    See the module docstring for what is saved and why. Reachable as ``run.checkpoint``;
    ``run.checkpoint.saves`` counts the saves of this process's fits.
    """

    # After every other callback: its begin_epoch is the last thing before the loader's iterator is
    # made (the order's random draws), and its saves see this batch's Recorder and AvgStats updates.
    _order = 20

    def __init__(self, path: str | os.PathLike, *, every_batches: int | None = None, resume: bool = True):
        if not isinstance(path, (str, os.PathLike)):
            contract.fail("CheckpointCallback", "path", "a str or os.PathLike", path, TypeError)
        self.path = Path(path)
        if self.path.is_dir():
            contract.fail("CheckpointCallback", "path", "a file name, not a folder", str(self.path))
        if not self.path.parent.is_dir():
            want = f"a file in an existing folder ({self.path.parent} is not a folder)"
            contract.fail("CheckpointCallback", "path", want, str(self.path))
        if every_batches is not None:
            contract.positive_int("CheckpointCallback", every_batches=every_batches)
        if not isinstance(resume, bool):
            contract.fail("CheckpointCallback", "resume", "True or False", resume, TypeError)
        self.every_batches, self.resume = every_batches, resume
        self.saves = 0
        self._pending = None  # the checkpoint being resumed, until its epoch has begun
        self._epoch_state = None  # the random state when this epoch's loader iterator was made

    def __repr__(self) -> str:
        args = f"every_batches={self.every_batches}, resume={self.resume}"
        return f"CheckpointCallback({str(self.path)!r}, {args})"

    # ---- where this process stands among the ranks

    def _group(self):
        """The DDPCallback's process group and this rank, or (None, 0) without DDP."""
        ddp = self.run.__dict__.get("ddp")
        if ddp is None or not (dist.is_available() and dist.is_initialized()):
            return None, 0, 1
        group = getattr(ddp, "process_group", None)
        return group, dist.get_rank(group), dist.get_world_size(group)

    def _stateful(self) -> list:
        """The runner's callbacks with a ``state_dict``, this one excluded."""
        return [
            cb for cb in self.run.cbs if cb is not self and callable(getattr(type(cb), "state_dict", None))
        ]

    # ---- resuming

    def begin_fit(self):
        self._pending, self._epoch_state = None, None
        if not (self.resume and self.path.exists()):
            return
        ckpt = read_checkpoint(self.path)
        self._check(ckpt)
        _, rank, _ = self._group()
        mine = ckpt["ranks"][rank]
        _plain(self.model).load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self._load_callbacks(mine["callbacks"])
        pos = ckpt["position"]
        self.run.start_epoch = pos["epoch"]
        self.run.n_epochs, self.run.n_iter = pos["n_epochs"], pos["n_iter"]
        set_random_state(mine["random"], self.data.train_dl)
        if pos["batch"]:
            self._pending = ckpt  # the rest is put back when the epoch in progress begins again

    def _check(self, ckpt: dict) -> None:
        """Refuse (ValueError) a checkpoint that does not fit this fit, before anything is changed."""
        where = f"CheckpointCallback: the checkpoint {self.path} does not fit this run"
        why = model_difference(_plain(self.model), ckpt["model"]) or optimizer_difference(
            self.opt, ckpt["optimizer"]
        )
        if why:
            raise ValueError(f"{where}: {why}")
        _, rank, world = self._group()
        if ckpt["world_size"] != world:
            raise ValueError(
                f"{where}: it was saved by {ckpt['world_size']} processes, this fit runs {world}"
            )
        pos = ckpt["position"]
        if pos["epoch"] + (pos["batch"] > 0) > self.epochs:
            done = f"{pos['epoch']} epochs" + (
                f" and {pos['batch']} batches of the next" if pos["batch"] else ""
            )
            raise ValueError(
                f"{where}: it has completed {done}, more than the {self.epochs} epochs this fit asks for"
            )
        mine = ckpt["ranks"][rank]
        for cb in self._stateful():
            if cb.name not in mine["callbacks"]:
                raise ValueError(f"{where}: it holds no state for the callback run.{cb.name}")
        n_gen, n_saved = len(_loader_generators(self.data.train_dl)), len(mine["random"]["loader"])
        if n_gen != n_saved:
            raise ValueError(
                f"{where}: the training loader draws from {n_gen} generator(s) of its own, "
                f"the checkpoint's from {n_saved}"
            )
        if pos["batch"] and pos["iters"] != len(self.data.train_dl):
            raise ValueError(
                f"{where}: it stopped in a pass of {pos['iters']} training batches, the training loader has "
                f"{len(self.data.train_dl)}"
            )

    def _load_callbacks(self, states: dict) -> None:
        for cb in self._stateful():
            cb.load_state_dict(states[cb.name])

    def begin_epoch(self):
        ckpt, self._pending = self._pending, None
        if ckpt is None or ckpt["position"]["epoch"] != self.epoch:
            self._epoch_state = random_state(self.data.train_dl)
            return
        # Resuming mid-epoch: the loader draws this epoch's order again from the state the epoch began
        # with, and skips the batches done; then everything is as it was at the save.
        _, rank, _ = self._group()
        mine, pos = ckpt["ranks"][rank], ckpt["position"]
        self._epoch_state = mine["epoch_random"]
        set_random_state(self._epoch_state, self.data.train_dl)
        it = iter(self.run.dl)
        for _ in range(pos["batch"]):
            next(it)
        set_random_state(mine["random"], self.data.train_dl)
        self.run.dl, self.run.iter = _Rest(it, len(self.run.dl)), pos["batch"]
        self.run.n_epochs, self.run.n_iter = pos["n_epochs"], pos["n_iter"]
        self._load_callbacks(mine["callbacks"])  # after their begin_epoch reset the pass's totals

    # ---- saving

    def after_batch(self):
        if self.in_train and self.every_batches and self.n_iter % self.every_batches == 0:
            self.save(epoch=self.epoch, batch=self.iter + 1)

    def after_epoch(self):
        self.save(epoch=self.epoch + 1, batch=0)

    def save(self, epoch: int, batch: int) -> None:
        """Save the state after ``batch`` training batches of epoch ``epoch`` (at an epoch's end: 0 batches
        of the next). Under DDP every rank calls it: each sends rank 0 its random and callback state."""
        group, rank, world = self._group()
        mine = {
            "random": random_state(self.data.train_dl),
            "epoch_random": self._epoch_state if batch else None,
            "callbacks": {cb.name: cb.state_dict() for cb in self._stateful()},
        }
        ranks = [mine]
        if world > 1:
            ranks = [None] * world if rank == 0 else None
            dist.gather_object(mine, ranks, dst=dist.get_global_rank(group, 0) if group else 0, group=group)
        if rank != 0:
            return
        ckpt = {
            "format": FORMAT,
            "position": {
                "epoch": epoch,
                "batch": batch,
                "iters": self.iters if batch else 0,
                "n_epochs": float(self.n_epochs),
                "n_iter": int(self.n_iter),
            },
            "model": _plain(self.model).state_dict(),
            "optimizer": self.opt.state_dict(),
            "world_size": world,
            "ranks": ranks,
        }
        atomic_save(ckpt, self.path)
        self.saves += 1
