"""Beyond the lessons: the same Runner on several processes (``torch.distributed``, DDP).

``DDPCallback`` turns every process of a process group into one worker of a data-parallel fit, through
the Runner's events alone. For the fit it:

- wraps ``learn.model`` in ``DistributedDataParallel``, which averages the gradients across processes in
  ``backward`` (so W processes at batch size B take the steps of one process at W x B), and unwraps it
  in ``after_fit``, which runs even when the fit ends by an exception;
- swaps ``learn.data`` for loaders that give each process its share: training batches from a
  ``DistributedSampler`` (``set_epoch`` each epoch: a new order, the same on every rank), validation
  samples split WITHOUT padding, and restores the caller's ``learn.data`` in ``after_fit``;
- sums ``run.avg_stats``' totals (loss x bs, metric x bs, count) across processes at the end of each
  pass, so every rank reports the whole set's numbers, and leaves out of the training totals the
  samples the sampler repeats to pad the set (they train, but are not counted twice);
- raises after ``backward`` when a parameter got no gradient (DDP would leave its bucket unreduced
  and the ranks would step apart, silently), unless ``find_unused_parameters=True`` lets DDP handle it;
- broadcasts rank 0's buffers (BatchNorm's running statistics) before each validation pass, so that
  every rank validates, and ends the fit with, the same model (DDP broadcasts them only before each
  training forward, and each rank's last batch then moves its own);
- silences ``run.logger`` on ranks other than 0: only rank 0 prints.

Lesson 03 asked whether validation numbers stay right when batch sizes vary, and answered by weighting
batch means by batch size. Across processes the same question bites harder: PyTorch's
``DistributedSampler`` pads a set whose size is not a multiple of the world size with repeated samples,
so that every rank runs as many batches (training needs that: DDP's gradient all-reduce waits for every
rank). Validation needs no such lockstep, so minilib splits it exactly (rank r takes samples r, r+W, ...)
and validates with the plain module: no collective runs per validation batch, so shards of different
lengths cannot deadlock (DDP's ``forward`` may broadcast buffers), and the summed totals count every
validation sample exactly once.

The process group is the caller's: ``init_process_group`` picks the backend (gloo on CPU, nccl on CUDA)
and its ``timeout`` bounds every collective, so a rank that fails ends the others with an error rather
than leaving them waiting. With ``torchrun``, which starts the processes and sets RANK, WORLD_SIZE and
MASTER_ADDR/PORT, ``init_process_group(backend)`` is all a script needs (see examples/train_mnist.py).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import RandomSampler
from torch.utils.data import Sampler as TorchSampler
from torch.utils.data.distributed import DistributedSampler

from minilib import contract
from minilib import data as mdata
from minilib.callbacks import AvgStats
from minilib.learner import Callback, silent

__all__ = ["DDPCallback", "ShardSampler"]


class ShardSampler(TorchSampler):
    """Rank ``rank`` of ``num_replicas`` takes indices ``rank, rank + num_replicas, ...``, in order.

    Unlike ``DistributedSampler`` it never pads: the shards' lengths differ by at most one and together
    hold every index exactly once, which is what counting a validation set needs.
    """

    def __init__(self, n: int, num_replicas: int, rank: int):
        self.n, self.num_replicas, self.rank = n, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


def _loader_spec(dl, which: str) -> tuple[int, bool, dict]:
    """A loader's batch size, whether it shuffles, and the DataLoader keywords to keep when rebuilding it."""
    if isinstance(dl, TorchDataLoader):
        if dl.batch_size is None:
            raise TypeError(
                f"DDPCallback: learn.data.{which} must batch with batch_size=, got a torch DataLoader with a "
                f"custom batch_sampler ({type(dl.batch_sampler).__name__}), which DDPCallback cannot split"
            )
        keep = {
            "drop_last": dl.drop_last and which == "train_dl",  # validation counts every sample
            "collate_fn": dl.collate_fn,
            "num_workers": dl.num_workers,
            "pin_memory": dl.pin_memory,
            "worker_init_fn": dl.worker_init_fn,
            "persistent_workers": dl.persistent_workers,
        }
        if dl.num_workers > 0:  # torch refuses these two without worker processes
            keep["prefetch_factor"] = dl.prefetch_factor
            keep["multiprocessing_context"] = dl.multiprocessing_context
        return dl.batch_size, isinstance(dl.sampler, RandomSampler), keep
    if isinstance(dl, mdata.DataLoader):  # the lesson's own loader
        return dl.sampler.bs, dl.sampler.shuffle, {"collate_fn": dl.collate_fn}
    raise TypeError(
        f"DDPCallback: learn.data.{which} must be a torch.utils.data.DataLoader or a "
        f"minilib.data.DataLoader, got {type(dl).__name__}"
    )


class DDPCallback(Callback):
    """Data-parallel training on every process of the default process group; see the module docstring.

    ``seed`` seeds the training order (``DistributedSampler``'s seed; ``set_epoch`` adds the epoch), and
    must be the same on every rank, as it is by default. ``process_group``: a group from
    ``torch.distributed.new_group`` (e.g. one with its own ``timeout``) instead of the default one.
    ``find_unused_parameters``: DDP's own, for models whose forward skips some parameters (it costs a
    walk over the autograd graph every step); without it such a model stops the fit with a RuntimeError.
    One per Runner: a second one would wrap the wrapped model and shard the shards (a ValueError).
    """

    # Before AvgStatsCallback (0) so that its totals are summed before it prints them; after
    # DeviceCallback (-10) so that the model is on its device when DDP wraps it.
    _order = -5

    def __init__(self, seed: int = 0, process_group=None, find_unused_parameters: bool = False):
        self.seed = contract.positive_int("DDPCallback", minimum=0, seed=seed)
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            contract.fail(
                "DDPCallback",
                "process_group",
                "None or a torch.distributed.ProcessGroup",
                process_group,
                TypeError,
            )
        self.process_group, self.find_unused_parameters = process_group, bool(find_unused_parameters)
        self._reset()

    def set_runner(self, run) -> None:
        if any(isinstance(cb, DDPCallback) and cb is not self for cb in run.cbs):
            why = "one DDPCallback per Runner (a second would wrap the wrapped model and shard the shards)"
            contract.fail("Runner", "cbs", why, "a second DDPCallback")
        super().set_runner(run)

    def _reset(self) -> None:
        self.ddp_model = None  # the DistributedDataParallel wrapper during a fit
        self.module = None  # the plain module it wraps
        self.given_data = None  # the caller's learn.data, put back after the fit
        self.train_sampler = None
        self._hooks, self._got_grad = [], set()  # which parameters received a gradient in this batch
        self._uncounted = None  # the train totals before a batch that holds padding

    # ---- begin_fit: check, wrap, shard, silence

    def begin_fit(self):
        # set_runner sees a second instance; the same one twice (cbs=[ddp, ddp], run.cbs *= 2) only here.
        if sum(isinstance(cb, DDPCallback) for cb in self.run.cbs) > 1:
            why = "one DDPCallback per Runner (a second would wrap the wrapped model and shard the shards)"
            contract.fail("Runner", "cbs", why, "the same DDPCallback twice")
        learn = self.run.learn
        specs = {which: _loader_spec(getattr(learn.data, which), which) for which in ("train_dl", "valid_dl")}
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "DDPCallback: no default process group: call torch.distributed.init_process_group(...) "
                "in every process before fit (under torchrun, init_process_group(backend) is enough)"
            )
        group = self.process_group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self._shard_data(learn, specs)
        self.module = learn.model
        device = next(self.module.parameters()).device
        # Constructing DDP broadcasts rank 0's parameters and buffers: every rank starts from the same model.
        self.ddp_model = DistributedDataParallel(
            self.module,
            device_ids=[device] if device.type == "cuda" else None,
            process_group=group,
            find_unused_parameters=self.find_unused_parameters,
        )
        learn.model = self.ddp_model
        if not self.find_unused_parameters:
            for p in self.module.parameters():
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._got_grad_for))
        if self.rank != 0:
            self.run.logger = silent  # the Runner gives its own back after the fit

    def _shard_data(self, learn, specs: dict) -> None:
        data = learn.data
        (train_bs, shuffle, train_kw), (valid_bs, _, valid_kw) = specs["train_dl"], specs["valid_dl"]
        train_ds, valid_ds = data.train_dl.dataset, data.valid_dl.dataset
        # drop_last=False pads the training set to a multiple of the world size: every rank must run as
        # many batches, or DDP's all-reduce in backward would wait forever for the rank that stopped.
        self.train_sampler = DistributedSampler(
            train_ds, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle, seed=self.seed
        )
        sharded = copy.copy(data)  # keeps data.c and whatever else the caller's DataBunch carries
        sharded.train_dl = TorchDataLoader(
            train_ds, batch_size=train_bs, sampler=self.train_sampler, **train_kw
        )
        valid_sampler = ShardSampler(len(valid_ds), self.world_size, self.rank)
        sharded.valid_dl = TorchDataLoader(valid_ds, batch_size=valid_bs, sampler=valid_sampler, **valid_kw)
        # Rank r's share is positions r, r + W, ... of the padded order: those at n or beyond repeat samples.
        self.train_bs, self.n_real = train_bs, len(range(self.rank, len(train_ds), self.world_size))
        self.given_data = data
        learn.data = sharded

    def _got_grad_for(self, p) -> None:
        self._got_grad.add(id(p))

    # ---- the epoch: a new training order; the plain module for validation; whole-set totals

    def begin_epoch(self):
        self.train_sampler.set_epoch(self.epoch)
        self.run.learn.model = self.ddp_model

    # ---- each training batch: padding left uncounted, every parameter given a gradient

    def _train_stats(self) -> AvgStats | None:
        stats = getattr(self.run, "avg_stats", None)  # the runner's AvgStatsCallback, found by its name
        return stats.train_stats if stats is not None else None

    def begin_batch(self):
        self._got_grad.clear()
        stats, n_real = self._train_stats(), self.n_real - self.iter * self.train_bs
        if self.in_train and stats is not None and n_real < len(self.yb):
            self._uncounted = (n_real, stats.state_dict())

    def after_backward(self):
        missing = [
            n for n, p in self.module.named_parameters() if p.requires_grad and id(p) not in self._got_grad
        ]
        if self._hooks and missing:
            raise RuntimeError(
                f"DDPCallback: parameter {missing[0]!r} got no gradient ({len(missing)} in all): DDP "
                "would leave the gradients of its bucket unreduced and the ranks would step apart. Freeze it "
                "(requires_grad_(False)) or pass DDPCallback(find_unused_parameters=True)"
            )

    def after_batch(self):
        # The sampler's padding trains (every rank must take as many steps) but must not be counted:
        # if AvgStats counted this batch, count its real rows alone.
        if self._uncounted is None:
            return
        (n_real, before), stats = self._uncounted, self._train_stats()
        self._uncounted = None
        if stats.count == before["count"]:
            return  # not counted (cancelled before after_loss)
        stats.load_state_dict(before)
        if n_real > 0:
            with torch.no_grad():
                pred, yb = self.pred[:n_real], self.yb[:n_real]
                stats.add(self.loss_func(pred, yb), pred, yb)

    # ---- validation with the plain module and rank 0's buffers; whole-set totals

    def begin_validate(self):
        # Validate with the plain module: DDP's forward may broadcast buffers, a collective that ranks with
        # different numbers of validation batches would not all reach. The weights are the same tensors.
        self.run.learn.model = self.module
        self._broadcast_buffers()
        self._sum_totals("train_stats")

    def after_cancel_train(self):
        self._broadcast_buffers()  # a fit cancelled mid-epoch: the ranks' last batches moved their own

    def after_epoch(self):
        self._sum_totals("valid_stats")

    def _broadcast_buffers(self) -> None:
        group = self.process_group
        src = 0 if group is None else dist.get_global_rank(group, 0)
        with torch.no_grad():
            for b in self.module.buffers():
                dist.broadcast(b, src=src, group=group)

    def _sum_totals(self, which: str) -> None:
        """Replace ``run.avg_stats``' totals of one pass by their sums over the ranks (float64)."""
        stats = getattr(self.run, "avg_stats", None)
        if stats is None:
            return
        s: AvgStats = getattr(stats, which)
        totals = torch.tensor(
            [s.tot_loss, *s.tot_mets, s.count], dtype=torch.float64, device=self._comm_device()
        )
        dist.all_reduce(totals, group=self.process_group)
        s.tot_loss, *s.tot_mets, count = totals.tolist()
        s.count = round(count)

    def _comm_device(self) -> torch.device:
        # nccl only moves CUDA tensors; gloo moves CPU ones.
        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # ---- after_fit (also after an exception): the caller's model and data, the print flags, as they were

    def after_fit(self):
        if self.module is not None:
            self.run.learn.model = self.module
        if self.given_data is not None:
            self.run.learn.data = self.given_data
        for h in self._hooks:
            h.remove()
        # Drop the wrapper now: its reducer's gradient hooks must not outlive the fit.
        self._reset()

    def __repr__(self) -> str:
        return f"DDPCallback(seed={self.seed})"
