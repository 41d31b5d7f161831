"""Train the lessons' MNIST model (784-50-10, SGD, cross-entropy) with the Runner, on one process or several.

    python examples/train_mnist.py                        # one process
    torchrun --nproc-per-node 2 examples/train_mnist.py   # two processes on this machine

Several machines (each runs the same command; HOST is one of them, reachable from the others):

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        --rdzv-id mnist examples/train_mnist.py

torchrun starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
``init_process_group`` reads them. Run by plain ``python``, the script makes a process group of one, so the
very same code path runs (DDPCallback, DistributedSampler): that is why one process and two print the
same validation numbers up to float rounding. ``--bs`` is the GLOBAL batch size, split evenly over the
processes, so both take the same steps (DDP averages the gradients of the W shares of each batch).
``--plain`` trains without torch.distributed at all: the lessons' Runner as it is (a different shuffle).

A job that survives a killed worker: ``--checkpoint PATH`` saves the training state there (rank 0 writes)
after every epoch and every ``--save-every`` training batches, and a job that finds it resumes from it:

    torchrun --nproc-per-node 2 --max-restarts 3 examples/train_mnist.py --checkpoint ckpt.pt

torchrun restarts every worker when one dies; each reads the same checkpoint and the job ends with the
parameters an uninterrupted job ends with. ``--die-at-batch N`` makes the demonstration deterministic:
rank ``--die-rank`` SIGKILLs itself right after training batch N (before any save there), on the first
attempt only (torchrun's TORCHELASTIC_RESTART_COUNT is 0), as if the machine had killed it.

The defaults are lesson 05's (batch 512, lr 0.3, 3 epochs). At lesson 03's batch 64 and lr 0.5 the
training is chaotic enough to amplify float rounding into visibly different numbers: there, even ONE
process ends its first epoch at valid loss 0.566 with one thread and 0.502 with two (measured); two
processes sum a batch's gradient in another order than one, so they part ways the same way.

The data: the MNIST sample (10,000 test images, 8,000 train / 2,000 valid) from $MINILIB_DATA, or the
full set with ``--full``. Normalised with the training set's mean and std, as lesson 02 does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from minilib.callbacks import AvgStatsCallback, DeviceCallback, ProgressCallback
from minilib.checkpoint import CheckpointCallback, read_checkpoint
from minilib.data import DataBunch, Dataset, get_data, get_dls, normalize
from minilib.distributed import DDPCallback
from minilib.learner import Callback, Learner, Runner, get_model
from minilib.loss import accuracy


class TrainTimer(Callback):
    """Seconds spent in the training passes (validation excluded), and the samples they trained on."""

    def begin_fit(self):
        self.seconds, self.samples = 0.0, 0

    def begin_epoch(self):
        self._start = time.perf_counter()

    def after_batch(self):
        if self.in_train:
            self.samples += self.xb.shape[0]

    def begin_validate(self):
        self.seconds += time.perf_counter() - self._start


class DieAt(Callback):
    """SIGKILL this process right after training batch ``n_iter`` (counted over the fit), before any save
    there, if it is rank ``rank`` on the job's first attempt: the README's worker killed mid-epoch."""

    _order = 10  # before CheckpointCallback (20): the batch is done, its save never happens

    def __init__(self, n_iter: int, rank: int, my_rank: int):
        self.at, self.rank, self.my_rank = n_iter, rank, my_rank

    def after_batch(self):
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if self.in_train and self.n_iter == self.at and first_attempt and self.my_rank == self.rank:
            print(f"rank {self.rank}: killing myself (SIGKILL) after training batch {self.at}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--bs", type=int, default=512, help="global batch size, split over the processes")
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--nh", type=int, default=50, help="hidden units")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full", action="store_true", help="the full MNIST training set, not the sample")
    p.add_argument("--plain", action="store_true", help="no torch.distributed: the lessons' Runner alone")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / W)")
    p.add_argument("--json", default=None, help="write rank 0's results to this file")
    p.add_argument("--checkpoint", default=None, help="save the training state here; resume from it if there")
    p.add_argument("--save-every", type=int, default=5, help="with --checkpoint: also save every N batches")
    p.add_argument("--die-at-batch", type=int, default=None, help="demo: SIGKILL after this training batch")
    p.add_argument("--die-rank", type=int, default=1, help="demo: which rank --die-at-batch kills")
    p.add_argument("--save-model", default=None, help="write rank 0's final model state_dict to this file")
    return p.parse_args(argv)


def attempt_store(timeout: timedelta) -> dist.Store:
    """torchrun's store (its agent hosts it), with this attempt's own key prefix.

    torchrun keeps one store for the whole job, and a worker group restarted by ``--max-restarts`` joins
    it with the same keys as the group that died (torch 2.13 adds no per-attempt prefix for
    ``init_process_group``'s ``env://``): a restarted gloo worker could read its dead peer's address,
    fail with "connectFullMesh ... Connection refused", and the next attempt hang. Seen here, with and
    without ``--standalone``; prefixing the keys with TORCHELASTIC_RESTART_COUNT keeps attempts apart.
    """
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def start_processes(plain: bool) -> tuple[int, int, torch.device]:
    """Join torchrun's process group, or make a group of one; the rank, world size and device."""
    if plain:
        return 0, 1, torch.device("cpu")
    cuda = torch.cuda.is_available()
    timeout = timedelta(minutes=5)  # a rank that dies or hangs ends the others' collectives with an error
    if "RANK" in os.environ:  # started by torchrun
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl" if cuda else "gloo"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(
                backend, store=attempt_store(timeout), rank=rank, world_size=world, timeout=timeout
            )
        else:
            dist.init_process_group(backend, timeout=timeout)
    else:  # plain python: a group of one, in memory
        backend, store = "nccl" if cuda else "gloo", dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def mnist_data(full: bool, bs: int) -> DataBunch:
    x_train, y_train, x_valid, y_valid = get_data(sample=not full)
    m, s = x_train.mean(), x_train.std()
    train_ds = Dataset(normalize(x_train, m, s), y_train)
    valid_ds = Dataset(normalize(x_valid, m, s), y_valid)
    return DataBunch(*get_dls(train_ds, valid_ds, bs), c=10)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, device = start_processes(args.plain)
    if args.bs % world:
        raise SystemExit(f"train_mnist: --bs {args.bs} must be a multiple of the {world} processes")
    torch.set_num_threads(args.threads or max((os.cpu_count() or 1) // world, 1))
    torch.manual_seed(args.seed)  # the same shuffle (--plain) and initial weights on every rank

    data = mnist_data(args.full, args.bs // world)
    learn = Learner(*get_model(data, lr=args.lr, nh=args.nh), F.cross_entropy, data)
    cbs = [AvgStatsCallback([accuracy]), ProgressCallback(), TrainTimer()]
    if device.type == "cuda":
        cbs.append(DeviceCallback(device))
    if not args.plain:
        cbs.append(DDPCallback(seed=args.seed))
    if args.checkpoint:
        cbs.append(CheckpointCallback(args.checkpoint, every_batches=args.save_every))
        if rank == 0 and Path(args.checkpoint).exists():
            pos = read_checkpoint(args.checkpoint)["position"]
            print(f"resuming from {args.checkpoint}: epoch {pos['epoch']}, batch {pos['batch']}", flush=True)
    if args.die_at_batch is not None:
        cbs.append(DieAt(args.die_at_batch, args.die_rank, rank))
    run = Runner(cbs)
    run.fit(args.epochs, learn)

    loss, acc = run.avg_stats.valid_stats.avg_stats
    timer = run.train_timer
    result = {
        "processes": world,
        "threads_per_process": torch.get_num_threads(),
        "plain": args.plain,
        "bs_global": args.bs,
        "epochs": args.epochs,
        "valid_loss": loss,
        "valid_accuracy": acc,
        # every rank trained on its share for the same time: the job's rate is the sum of the shares
        "train_samples": timer.samples * world,
        "train_seconds": timer.seconds,
        "samples_per_s": timer.samples * world / timer.seconds if timer.seconds else float("nan"),
    }
    if rank == 0:
        print(
            f"valid loss {loss:.6f} accuracy {acc:.6f} over {run.avg_stats.valid_stats.count} samples; "
            f"{world} process(es) x {torch.get_num_threads()} thread(s), batch {args.bs // world} each; "
            f"training {result['samples_per_s']:.0f} samples/s",
            flush=True,
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        if args.save_model:
            torch.save(learn.model.state_dict(), args.save_model)
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
