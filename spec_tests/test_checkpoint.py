"""Beyond the lessons: what a training run's state is (minilib.checkpoint).

Lesson 04's Runner keeps everything a fit needs in memory; kill the process and it is gone. Saving the
weights is not enough to carry on as if nothing had happened: a momentum optimizer carries its velocity,
BatchNorm its running statistics, a ParamScheduler reads where the fit is (``n_epochs``), the Recorder
and AvgStatsCallback hold lists and totals, dropout and the shuffled loader draw from random generators,
and the loader drew THIS epoch's order when the epoch began. ``CheckpointCallback`` saves all of it, each
time atomically (a temporary file, fsync, a rename), and a fit that finds a checkpoint continues from it.

The claim is exactness: on the CPU, with the same data, seed and thread count, a fit killed anywhere and
resumed, any number of times, ends bit for bit where an uninterrupted fit ends. The kills here are real:
the fit runs in a child process that SIGKILLs itself at a chosen point (after a given training batch,
before or after the save there, during validation, at an epoch's end, in the middle of writing the
checkpoint), so nothing after that point runs, no ``finally``, no ``after_fit``. The children are forked
from one worker process that has imported torch once (``python test_checkpoint.py OUT``), so each try
costs a fraction of a second; every child and the worker are bounded by timeouts and killed on expiry.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader as TorchDataLoader

from minilib.callbacks import AvgStatsCallback, ParamScheduler, Recorder
from minilib.checkpoint import CheckpointCallback, atomic_save, read_checkpoint, temp_files
from minilib.data import DataBunch, Dataset
from minilib.learner import Callback, Learner, Runner
from minilib.loss import accuracy
from minilib.schedules import combine_scheds, sched_cos
from minilib.testing import test_close

pytestmark = [
    pytest.mark.checkpoint,
    pytest.mark.skipif(not hasattr(os, "fork"), reason="the kills fork child processes (POSIX only)"),
]

# 37 training samples in batches of 8: 5 batches an epoch, the last one short; 13 validation samples: 2.
N_TRAIN, N_VALID, BS, N_IN, NH, C = 37, 13, 8, 6, 16, 3
EPOCHS, EVERY = 3, 2  # 15 training batches; a save after every second one and at every epoch's end
BATCHES_PER_EPOCH = 5
CHILD_TIMEOUT_S = 60  # one try of one fit
WORKER_TIMEOUT_S = 150  # every try of every scenario


# ---------------------------------------------------------------------------------------------------
# One fit where every kind of state matters: a shuffled loader, dropout, BatchNorm's buffers, SGD with
# momentum, a learning-rate schedule over the whole fit, the Recorder and AvgStatsCallback.


def make_learner(own_generator: bool = False) -> Learner:
    """The same data, model and optimizer every time. The script seeds every generator as a user would;
    a resumed fit seeds them too, and the checkpoint then puts back the states of the moment it was saved."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(N_TRAIN, N_IN, generator=g), torch.randint(0, C, (N_TRAIN,), generator=g)
    xv, yv = torch.randn(N_VALID, N_IN, generator=g), torch.randint(0, C, (N_VALID,), generator=g)
    # The loader's order comes from the global generator, or from its own generator=.
    loader_gen = torch.Generator().manual_seed(7) if own_generator else None
    train_dl = TorchDataLoader(Dataset(x, y), batch_size=BS, shuffle=True, generator=loader_gen)
    data = DataBunch(train_dl, TorchDataLoader(Dataset(xv, yv), batch_size=BS), c=C)
    model = nn.Sequential(
        nn.Linear(N_IN, NH), nn.BatchNorm1d(NH), nn.ReLU(), nn.Dropout(0.3), nn.Linear(NH, C)
    )
    return Learner(model, optim.SGD(model.parameters(), lr=0.1, momentum=0.9), F.cross_entropy, data)


def callbacks() -> list:
    schedule = combine_scheds([0.3, 0.7], [sched_cos(0.05, 0.4), sched_cos(0.4, 0.01)])
    return [AvgStatsCallback([accuracy], print_stats=False), Recorder(), ParamScheduler("lr", schedule)]


class CountBatches(Callback):
    """How many batches (training and validation) this process ran."""

    def begin_fit(self):
        self.train = self.valid = 0

    def after_batch(self):
        if self.in_train:
            self.train += 1
        else:
            self.valid += 1


def final_state(learn: Learner, run: Runner) -> dict:
    """What the claims compare: everything a fit ends with."""
    return {
        "model": learn.model.state_dict(),
        "optimizer": learn.opt.state_dict(),
        "recorder": {"lrs": run.recorder.lrs, "losses": run.recorder.losses},
        "avg_stats": {
            which: [*s.all_stats, s.count]
            for which, s in (("train", run.avg_stats.train_stats), ("valid", run.avg_stats.valid_stats))
        },
        "n_iter": run.n_iter,
        "n_epochs": run.n_epochs,
        "torch_random": torch.get_rng_state(),
    }


def fit(path=None, extra=(), own_generator=False, learn=None, epochs=EPOCHS, every_batches=EVERY, **ckpt_kw):
    """The fit; with ``path``, with a CheckpointCallback saving there every ``every_batches`` batches."""
    learn = learn if learn is not None else make_learner(own_generator)
    cbs = [*callbacks(), CountBatches(), *extra]
    if path is not None:
        cbs.append(CheckpointCallback(path, every_batches=every_batches, **ckpt_kw))
    run = Runner(cbs)
    run.fit(epochs, learn)
    return learn, run


def first_difference(a, b, where: str = "") -> str | None:
    """Where two states differ, with the largest difference of the first tensor that does; None if equal."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return f"{where}: {a!r} against {b!r}"
        if torch.equal(a, b):
            return None
        diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "(integers)"
        return f"{where}: tensors differ, max difference {diff}"
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return f"{where}: keys {sorted(a)} against {sorted(b)}"
        return next((d for k in a if (d := first_difference(a[k], b[k], f"{where}.{k}"))), None)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: {len(a)} items against {len(b)}"
        return next(
            (
                d
                for i, (x, y) in enumerate(zip(a, b, strict=True))
                if (d := first_difference(x, y, f"{where}[{i}]"))
            ),
            None,
        )
    return None if a == b else f"{where}: {a!r} against {b!r}"


def assert_same_state(got: dict, want: dict) -> None:
    why = first_difference(got, want)
    assert why is None, f"the resumed fit does not end as the uninterrupted one: {why}"


# ---------------------------------------------------------------------------------------------------
# The kills. A Kill callback SIGKILLs the process at one point; its _order puts it before the
# checkpoint's own callback (20) at that event, or after it (right after the save).


class Kill(Callback):
    """SIGKILL this process at ``event`` once ``run.n_iter == n_iter`` (``in_train``: a training batch, or
    a validation batch of that epoch), before the checkpoint's save there or just after it.

    ``how="pickling"`` dies inside the save instead, as ``torch.save`` serialises this callback's state;
    ``how="writing"`` lets the save start, but limits the size of any file this process writes to half the
    last checkpoint's (RLIMIT_FSIZE): the kernel kills the process (SIGXFSZ) when the write crosses it,
    in the middle of writing the temporary file."""

    def __init__(self, event: str, n_iter: int, *, in_train=True, after_save=False, how: str = "now"):
        self.event, self.n_iter_at, self.in_train_at, self.how = event, n_iter, in_train, how
        self._order = 30 if after_save else 10
        self.armed = False

    def after_batch(self):
        if (
            self.event == "after_batch"
            and self.n_iter == self.n_iter_at
            and self.in_train == self.in_train_at
        ):
            self.strike()

    def after_epoch(self):
        if self.event == "after_epoch" and self.n_iter == self.n_iter_at:
            self.strike()

    def strike(self) -> None:
        if self.how == "now":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.how == "pickling":
            self.armed = True  # the save that follows serialises a _DieWhenPickled: see state_dict
        elif self.how == "writing":
            import resource

            size = self.run.checkpoint.path.stat().st_size
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it, and would raise OSError
            resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, resource.RLIM_INFINITY))

    def state_dict(self) -> dict:
        return {"bomb": _DieWhenPickled()} if self.armed else {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _DieWhenPickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)


# Each scenario: one Kill per try that dies; a last try (no kill) then runs the fit to its end.
SCENARIOS: dict[str, dict] = {
    "no kill": {"kills": []},
    "before the first save": {"kills": [("after_batch", 1, {})]},
    "mid-epoch": {"kills": [("after_batch", 7, {})]},  # the last save was after batch 6
    "just before a save": {"kills": [("after_batch", 8, {})]},
    "right after a save": {"kills": [("after_batch", 8, {"after_save": True})]},
    "at an epoch boundary": {"kills": [("after_epoch", 10, {"after_save": True})]},
    "at an epoch's end, before its save": {"kills": [("after_epoch", 10, {})]},
    "after the last training batch": {"kills": [("after_batch", 15, {"after_save": True})]},
    "during validation": {"kills": [("after_batch", 10, {"in_train": False})]},
    "killed twice": {"kills": [("after_batch", 3, {}), ("after_batch", 12, {"after_save": True})]},
    "mid-epoch, the loader's own generator": {"kills": [("after_batch", 7, {})], "own_generator": True},
    "killed twice, the loader's own generator": {
        "kills": [("after_batch", 9, {}), ("after_batch", 10, {"in_train": False})],
        "own_generator": True,
    },
    "while pickling a save": {"kills": [("after_batch", 8, {"how": "pickling"})]},
    "while writing a save": {"kills": [("after_batch", 8, {"how": "writing"})]},
    "twice while writing saves": {
        "kills": [("after_batch", 4, {"how": "writing"}), ("after_batch", 12, {"how": "writing"})]
    },
}


def _try(scenario: dict, kill, path: Path, out: Path) -> None:
    """One try, in the forked child: the fit until it dies or ends (then its final state is saved)."""
    # Every try has a Kill (one that never strikes on the last): it is in the checkpoint, having a state_dict.
    extra = [Kill(kill[0], kill[1], **kill[2])] if kill else [Kill("never", -1)]
    learn, run = fit(path, extra=extra, own_generator=scenario.get("own_generator", False))
    state = final_state(learn, run)
    state["ran"] = {"train": run.count_batches.train, "valid": run.count_batches.valid}
    torch.save(state, out)


def _fork(fn, *args) -> int:
    """Start ``fn(*args)`` in a forked child; its pid. The child exits 0 if ``fn`` returned, else 1."""
    pid = os.fork()
    if pid == 0:  # the child: never return into the caller's code
        code = 1
        try:
            fn(*args)
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _wait(pids: list[int]) -> list[str]:
    """How each child ended ("exit 0", "exit 1", "SIGKILL", "SIGXFSZ", "timed out"), waiting at most
    CHILD_TIMEOUT_S for them all; a child still running then is killed."""
    ended: dict[int, str] = {}
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while len(ended) < len(pids):
        for pid in pids:
            if pid in ended:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done and os.WIFSIGNALED(status):
                ended[pid] = signal.Signals(os.WTERMSIG(status)).name
            elif done:
                ended[pid] = f"exit {os.WEXITSTATUS(status)}"
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                ended[pid] = "timed out"
        time.sleep(0.005)
    return [ended[pid] for pid in pids]


def _run_child(fn, *args) -> str:
    return _wait([_fork(fn, *args)])[0]


# With DDPCallback: two ranks, each a forked child, in a gloo group of their own per try. Rank 1 is
# killed mid-epoch; rank 0 then fails in the next all-reduce (its peer is gone) and exits with an error,
# as torchrun would see it; the next try starts both again, and both resume from rank 0's file.
# 37 samples (38 with the sampler's padding), 2 ranks at 8 each: 3 training batches per rank per epoch;
# a save after every batch. Killed after batch 5 (the second of epoch 1), before its save.
DDP_KILL = ("after_batch", 5, {})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_try(rank: int, port: int, kill, path: Path, out: Path) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from minilib.distributed import DDPCallback

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=30)
    )
    try:
        killer = Kill(kill[0], kill[1], **kill[2]) if kill and rank == 1 else Kill("never", -1)
        learn, run = fit(path, extra=[killer, DDPCallback()], every_batches=1)
        torch.save(final_state(learn, run), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _ddp_job(kill, path: Path, out: Path) -> list[str]:
    port = _free_port()
    return _wait([_fork(_ddp_try, rank, port, kill, path, out) for rank in range(2)])


def _gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def _position(path: Path):
    if not path.exists():
        return None
    pos = read_checkpoint(path)["position"]
    return {k: pos[k] for k in ("epoch", "batch", "n_iter")}


def worker(out: Path) -> None:
    """Every scenario, each try in a forked child; what each try left on disk; the final states."""
    torch.set_num_threads(1)
    # The reference, here: the first fit of a process pays torch's one-time set-up (2 s), which the
    # children, forked after it, inherit done. A checkpointed fit warms the save and the resume.
    torch.save(final_state(*fit()), out / "reference.pt")
    torch.save(final_state(*fit(own_generator=True)), out / "reference-own-generator.pt")
    fit(out / "warm-up.pt", epochs=1)
    fit(out / "warm-up.pt", epochs=2)
    results = {}
    for name, scenario in SCENARIOS.items():
        folder = out / re.sub(r"\W+", "_", name)
        folder.mkdir()
        path = folder / "ckpt.pt"
        tries = []
        for kill in [*scenario["kills"], None]:
            ended = _run_child(_try, scenario, kill, path, folder / "final.pt")
            temps = {p.name: p.stat().st_size for p in temp_files(path)}
            tries.append({"ended": ended, "temps": temps, "checkpoint": _position(path)})
        results[name] = {"tries": tries}
    if _gloo_available():
        (out / "ddp-reference").mkdir()
        (out / "ddp").mkdir()
        results["ddp reference"] = {
            "tries": [{"ended": _ddp_job(None, out / "ddp-reference" / "ckpt.pt", out / "ddp-reference")}]
        }
        path = out / "ddp" / "ckpt.pt"
        tries = []
        for kill in (DDP_KILL, None):
            tries.append({"ended": _ddp_job(kill, path, out / "ddp"), "checkpoint": _position(path)})
        results["ddp"] = {"tries": tries}
    torch.save(results, out / ".results.pt")
    os.replace(out / ".results.pt", out / "results.pt")


@pytest.fixture(scope="module")
def kills(tmp_path_factory) -> dict:
    """Run the worker once for the module's claims; its results and every scenario's final state."""
    out = tmp_path_factory.mktemp("kills")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out / "worker.err", "w") as err:
        # A session of its own: on expiry the worker and the children it forked are killed together.
        proc = subprocess.Popen(
            [sys.executable, __file__, str(out)], stdout=err, stderr=err, env=env, start_new_session=True
        )
        try:
            proc.wait(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = (out / "worker.err").read_text()
    if proc.returncode or not (out / "results.pt").exists():
        pytest.fail(f"the kill worker failed (exit {proc.returncode}):\n{log[-4000:]}")
    results = torch.load(out / "results.pt", weights_only=True)
    finals = {name: out / re.sub(r"\W+", "_", name) / "final.pt" for name in SCENARIOS}
    references = {False: out / "reference.pt", True: out / "reference-own-generator.pt"}
    return {"results": results, "finals": finals, "references": references, "log": log, "out": out}


def _final(kills: dict, name: str) -> dict:
    path = kills["finals"][name]
    tries = kills["results"][name]["tries"]
    assert path.exists(), f"{name}: the last try did not finish: {tries}\n{kills['log'][-3000:]}"
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------------------------------------------
# The claims, in the order a learner meets them. First: what must be saved, and why.


def test_a_shuffled_loader_draws_its_epochs_order_from_the_global_generator_as_its_iterator_starts():
    """A torch DataLoader with ``shuffle=True`` and no generator of its own draws a new order every epoch
    from torch's global generator, when its iterator is made and first advanced (before the first batch).
    So the random state a checkpoint saves at a batch of the epoch cannot give back that epoch's order:
    the state at the epoch's START must be saved too, and put back before the iterator is made again."""
    dl = TorchDataLoader(range(N_TRAIN), batch_size=BS, shuffle=True)  # batches of sample indices
    start = torch.get_rng_state()
    first_epoch, second_epoch = torch.cat(list(dl)), torch.cat(list(dl))
    assert not torch.equal(first_epoch, second_epoch)  # a new order each epoch
    torch.set_rng_state(start)
    it = iter(dl)
    first_batch = next(it)
    torch.manual_seed(123)  # what is drawn after the first batch (dropout...) does not change the order
    assert torch.equal(torch.cat([first_batch, *it]), first_epoch)


class _Interrupt(Exception):
    """Ends a fit in this process at a chosen batch (the claims about real kills run in child processes)."""


class InterruptAt(Callback):
    _order = 10  # before the checkpoint's save at that batch

    def __init__(self, n_iter: int):
        self.at = n_iter

    def after_batch(self):
        if self.in_train and self.n_iter == self.at:
            raise _Interrupt()


def _interrupted_checkpoint(path: Path, at: int = 7) -> dict:
    """The checkpoint a fit interrupted after training batch ``at`` leaves (the last save: batch 6)."""
    with pytest.raises(_Interrupt):
        fit(path, extra=[InterruptAt(at)])
    return torch.load(path, weights_only=True)


def _strip(part: str, ckpt: dict) -> None:
    mine = ckpt["ranks"][0]
    if part == "the optimizer's momentum":
        ckpt["optimizer"]["state"] = {}
    elif part == "BatchNorm's running statistics":
        ckpt["model"]["1.running_mean"].zero_()
        ckpt["model"]["1.running_var"].fill_(1.0)
    elif part == "torch's random state (dropout)":
        mine["random"]["torch"] = torch.Generator().manual_seed(0).get_state()
    elif part == "the random state at the epoch's start (its order)":
        mine["epoch_random"] = mine["random"]
    elif part == "n_epochs (where the schedule is)":
        ckpt["position"]["n_epochs"] = float(ckpt["position"]["epoch"])
    elif part == "the Recorder's lists":
        mine["callbacks"]["recorder"]["losses"] = []
    elif part == "AvgStatsCallback's totals of the pass in progress":
        mine["callbacks"]["avg_stats"] = make_fresh_avg_stats_state()


def make_fresh_avg_stats_state() -> dict:
    return AvgStatsCallback([accuracy]).state_dict()


PARTS = [
    "the optimizer's momentum",
    "BatchNorm's running statistics",
    "torch's random state (dropout)",
    "the random state at the epoch's start (its order)",
    "n_epochs (where the schedule is)",
    "the Recorder's lists",
    "AvgStatsCallback's totals of the pass in progress",
]


class EpochLog(Callback):
    """Each epoch's AvgStatsCallback totals, as the epoch ends (no state_dict: it is not checkpointed)."""

    def begin_fit(self):
        self.totals = {}

    def after_epoch(self):
        s = self.run.avg_stats
        self.totals[self.epoch] = [s.train_stats.all_stats, s.valid_stats.all_stats]


@pytest.mark.parametrize("part", PARTS)
def test_every_part_of_the_state_is_needed_to_resume_exactly(tmp_path, part):
    """Resume the same interrupted fit (stopped after batch 7 of 15; the last save: batch 6) from its
    checkpoint with one part of the state taken out (put back as a fresh run would have it): the fit no
    longer ends as the uninterrupted one, or the epoch it was interrupted in no longer ends with the same
    numbers. Each of these is why the checkpoint holds more than the weights. (The unaltered checkpoint
    resumes exactly: the claims below.)"""
    learn, run = fit(extra=[EpochLog()])
    want = {"end": final_state(learn, run), "interrupted epoch": run.epoch_log.totals[1]}
    path = tmp_path / "ckpt.pt"
    ckpt = _interrupted_checkpoint(path)
    _strip(part, ckpt)
    torch.save(ckpt, path)
    learn, run = fit(path, extra=[EpochLog()])
    got = {"end": final_state(learn, run), "interrupted epoch": run.epoch_log.totals[1]}
    assert first_difference(got, want) is not None, f"without {part} the fit still ended exactly as before"


def test_a_fit_with_the_callback_ends_as_one_without_it(tmp_path):
    """Saving draws no random number and changes nothing the fit reads: a fit that saves after every
    batch ends bit for bit where the same fit without a CheckpointCallback ends."""
    assert_same_state(final_state(*fit(tmp_path / "ckpt.pt", every_batches=1)), final_state(*fit()))


# ---------------------------------------------------------------------------------------------------
# Killed and resumed: real SIGKILLs, in child processes (the worker above).


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_fit_killed_anywhere_and_resumed_ends_bit_for_bit_as_the_uninterrupted_one(kills, name):
    """Each try of the scenario died where it was meant to (SIGKILL, or SIGXFSZ for the kills in the
    middle of a write), the last try finished, and the fit it finished holds the uninterrupted fit's
    parameters, buffers, optimizer state, Recorder lists, AvgStatsCallback totals, ``n_iter``,
    ``n_epochs`` and even torch's random state, bit for bit."""
    tries = kills["results"][name]["tries"]
    expected = ["SIGXFSZ" if k[2].get("how") == "writing" else "SIGKILL" for k in SCENARIOS[name]["kills"]]
    assert [t["ended"] for t in tries] == [*expected, "exit 0"], f"{name}: {tries}"
    state = _final(kills, name)
    ran = state.pop("ran")
    reference = kills["references"][SCENARIOS[name].get("own_generator", False)]
    assert_same_state(state, torch.load(reference, weights_only=True))
    if name == "no kill":
        assert ran == {"train": EPOCHS * BATCHES_PER_EPOCH, "valid": EPOCHS * 2}, ran


def test_with_ddp_rank_0_writes_and_every_rank_resumes_to_the_state_of_the_same_rank_uninterrupted(kills):
    """Two ranks (gloo); rank 1 is SIGKILLed after the second batch of epoch 1, rank 0 then fails in the
    next collective; both start again and resume from the file rank 0 wrote. Each rank ends with the
    state of the same rank in an uninterrupted job, bit for bit: the parameters and buffers (the same on
    both ranks), and also the Recorder's losses and AvgStatsCallback's totals, which are each rank's own
    (each counts its share of the batches): the checkpoint keeps every rank's random and callback state."""
    if "ddp" not in kills["results"]:
        pytest.skip("this torch build has no gloo backend")
    tries = kills["results"]["ddp"]["tries"]
    assert [t["ended"] for t in tries] == [["exit 1", "SIGKILL"], ["exit 0", "exit 0"]], tries
    assert tries[0]["checkpoint"]["n_iter"] == DDP_KILL[1] - 1, tries[0]
    out = kills["out"]
    got = [torch.load(out / "ddp" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    want = [torch.load(out / "ddp-reference" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank in range(2):
        why = first_difference(got[rank], want[rank])
        assert why is None, f"rank {rank} does not end as in the uninterrupted job: {why}"
    assert got[0]["recorder"]["losses"] != got[1]["recorder"]["losses"]  # each rank's own


def test_a_resumed_fit_redoes_only_the_batches_after_the_last_save(kills):
    """Killed after batch 8 just after its save, the resumed fit runs batches 9 to 15; killed just
    before that save, it runs batches 7 to 15 (the last save was after batch 6)."""
    after = _final(kills, "right after a save")["ran"]["train"]
    before = _final(kills, "just before a save")["ran"]["train"]
    assert (after, before) == (EPOCHS * BATCHES_PER_EPOCH - 8, EPOCHS * BATCHES_PER_EPOCH - 6)


@pytest.mark.parametrize(
    "name", ["while pickling a save", "while writing a save", "twice while writing saves"]
)
def test_a_kill_during_a_save_leaves_the_previous_checkpoint_and_a_temporary_file_the_next_save_removes(
    kills, name
):
    """Killed while ``torch.save`` serialises (SIGKILL) or in the middle of writing the temporary file
    (SIGXFSZ at half its size), the process leaves ``path`` holding the PREVIOUS save, whole, and a
    ``.ckpt.pt.<random>.tmp`` beside it; the resumed fit's first save removes it."""
    tries = kills["results"][name]["tries"]
    for killed, kill in zip(tries[:-1], SCENARIOS[name]["kills"], strict=True):
        previous_save = kill[1] - 2  # saves come every EVERY = 2 batches
        assert killed["checkpoint"]["n_iter"] == previous_save, killed
        assert len(killed["temps"]) == 1, killed
        if kill[2]["how"] == "writing":
            (size,) = killed["temps"].values()
            assert size > 0, killed  # killed in the middle of the write, not before it
    assert tries[-1]["temps"] == {}, tries[-1]


def test_resuming_a_finished_fit_runs_no_batch_and_ends_with_the_saved_state(tmp_path):
    """The checkpoint of a finished fit says all its epochs are done: fitting again with the same
    ``epochs`` runs no batch, and ends with the state it saved."""
    path = tmp_path / "ckpt.pt"
    want = final_state(*fit(path))
    learn, run = fit(path)
    assert (run.count_batches.train, run.count_batches.valid) == (0, 0)
    assert_same_state(final_state(learn, run), want)


def test_resume_false_starts_over_and_overwrites_the_checkpoint(tmp_path):
    """With ``resume=False`` a checkpoint at ``path`` is ignored: the fit starts from its own initial
    state (it ends as a fresh fit does) and its first save replaces the old file."""
    path = tmp_path / "ckpt.pt"
    fit(path)  # a finished 3-epoch fit's checkpoint
    got = final_state(*fit(path, resume=False, epochs=1))
    assert_same_state(got, final_state(*fit(epochs=1)))
    assert read_checkpoint(path)["position"]["epoch"] == 1


# ---------------------------------------------------------------------------------------------------
# The file: atomic, its temporary files, and what is refused.


def test_a_save_removes_only_the_temporary_files_of_its_own_pattern(tmp_path):
    """``.<name>.<16 hex>.tmp`` beside ``path`` is a save to ``path`` that was killed; anything else is
    someone else's: another checkpoint's temporary files (``.ckpt.pt.x.<hex>.tmp`` belongs to
    ``ckpt.pt.x``), a backup, a file that merely looks alike, a folder named like a temporary file
    (left alone: the save neither removes it nor fails on it)."""
    path = tmp_path / "ckpt.pt"
    stale = tmp_path / ".ckpt.pt.0123456789abcdef.tmp"
    others = [
        ".ckpt.pt.x.0123456789abcdef.tmp",
        ".ckpt.pt.tmp",
        ".ckpt.pt.0123.tmp",
        "ckpt.pt.bak",
        ".other.pt.0123456789abcdef.tmp",
        ".ckpt.pt.0123456789ABCDEF.tmp",
    ]
    for name in [stale.name, *others]:
        (tmp_path / name).write_bytes(b"x")
    folder = tmp_path / ".ckpt.pt.fedcba9876543210.tmp"  # named like one, but a folder: not a file of ours
    folder.mkdir()
    atomic_save({"a": torch.ones(3)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, *others, folder.name])
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))


def test_a_save_that_fails_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path):
    """An exception while saving (here an object torch.save cannot pickle) removes the temporary file
    and leaves ``path`` as it was."""
    path = tmp_path / "ckpt.pt"
    atomic_save({"a": torch.ones(3)}, path)
    with pytest.raises(Exception):  # noqa: B017 (whatever pickle raises)
        atomic_save({"a": lambda: None}, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))


class _Marker:
    """A class whose unpickling would write a file: what a checkpoint with code in it could do."""

    def __init__(self, where: str):
        self.where = where

    def __reduce__(self):
        return (Path.write_text, (Path(self.where), "code ran"))


def _other_architecture(path: Path, ckpt: dict) -> None:
    learn = make_learner()
    learn.model[0] = nn.Linear(N_IN, NH + 1)  # a different hidden size: 17 x 6 where the run has 16 x 6
    ckpt["model"] = learn.model.state_dict()
    torch.save(ckpt, path)


def _other_optimizer(path: Path, ckpt: dict) -> None:
    learn = make_learner()
    ckpt["optimizer"] = optim.Adam(learn.model.parameters()).state_dict()  # the run's is SGD with momentum
    torch.save(ckpt, path)


def _missing_layer(path: Path, ckpt: dict) -> None:
    del ckpt["model"]["1.running_var"]
    torch.save(ckpt, path)


def _truncated(path: Path, ckpt: dict) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt(path: Path, ckpt: dict) -> None:
    data = bytearray(path.read_bytes())
    data[40:240] = bytes(200)
    path.write_bytes(bytes(data))


def _code(path: Path, ckpt: dict) -> None:
    ckpt["ranks"][0]["callbacks"]["recorder"]["losses"] = _Marker(str(path.parent / "pwned"))
    torch.save(ckpt, path)


def _not_a_checkpoint(path: Path, ckpt: dict) -> None:
    torch.save({"weights": ckpt["model"]}, path)


REFUSALS = [
    (
        "another architecture",
        _other_architecture,
        r"model key '0\.weight': shape 17x6 in the checkpoint, 16x6",
    ),
    ("a missing buffer", _missing_layer, r"model key '1\.running_var' is not in the checkpoint"),
    (
        "another optimizer",
        _other_optimizer,
        r"group 0: hyperparameter 'dampening' is the run's, not the checkpoint's",
    ),
    ("a truncated file", _truncated, r"ckpt\.pt is not a checkpoint that can be read safely"),
    ("a corrupt file", _corrupt, r"ckpt\.pt is not a checkpoint that can be read safely"),
    ("a file with code in it", _code, r"ckpt\.pt is not a checkpoint that can be read safely.*weights_only"),
    ("a file of another kind", _not_a_checkpoint, r"ckpt\.pt is not a minilib\.checkpoint/1 checkpoint"),
]


@pytest.mark.parametrize("spoil,message", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_a_checkpoint_that_does_not_fit_is_refused_and_changes_nothing(tmp_path, spoil, message):
    """Each refusal is a ValueError saying what does not fit (the first key or shape that differs, or the
    path of a file that cannot be read safely), raised before anything is loaded: the model and the
    optimizer are left exactly as they were. A file with code in it is refused by
    ``torch.load(weights_only=True)`` without running it."""
    path = tmp_path / "ckpt.pt"
    spoil(path, _interrupted_checkpoint(path))
    learn = make_learner()
    learn.opt.state["spoil"] = {}  # any optimizer state: it must survive the refusal
    before = {
        "model": {k: v.clone() for k, v in learn.model.state_dict().items()},
        "opt": learn.opt.state_dict(),
    }
    with pytest.raises(ValueError, match=message):
        fit(path, learn=learn)
    assert_same_state({"model": learn.model.state_dict(), "opt": learn.opt.state_dict()}, before)
    assert not (tmp_path / "pwned").exists(), "unpickling the checkpoint ran code"


def test_a_checkpoint_that_has_done_more_epochs_than_asked_is_refused_naming_both(tmp_path):
    """A finished 3-epoch fit's checkpoint resumed by a 2-epoch fit: ValueError naming 3 and 2, before
    anything is loaded. (Asking for MORE epochs is fine: the fit continues.)"""
    path = tmp_path / "ckpt.pt"
    fit(path)
    learn = make_learner()
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"completed 3 epochs, more than the 2 epochs"):
        fit(path, learn=learn, epochs=2)
    assert_same_state(learn.model.state_dict(), before)
    learn, run = fit(path, epochs=4)
    assert (run.count_batches.train, run.n_iter) == (BATCHES_PER_EPOCH, 4 * BATCHES_PER_EPOCH)


def test_a_checkpoint_of_another_number_of_processes_is_refused_naming_both(kills):
    """Every rank keeps its own random and callback state in the checkpoint, and a DistributedSampler's
    order depends on the number of ranks: a two-rank job's checkpoint resumed by one process is a
    ValueError naming both numbers, before anything is loaded."""
    if "ddp" not in kills["results"]:
        pytest.skip("this torch build has no gloo backend")
    learn = make_learner()
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"saved by 2 processes, this fit runs 1"):
        fit(kills["out"] / "ddp" / "ckpt.pt", learn=learn, every_batches=1)
    assert_same_state(learn.model.state_dict(), before)


# ---------------------------------------------------------------------------------------------------
# What is NOT exact.


def _wide_fit(path, threads: int, interrupt_at: int | None = None):
    """A model wide enough for the CPU's matmuls to split a sum over threads: a 784 -> 64 layer sums 784
    products for each of its 256 x 64 outputs."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        ds = Dataset(torch.randn(512, 784), torch.randint(0, 10, (512,)))
        data = DataBunch(
            TorchDataLoader(ds, batch_size=256, shuffle=True), TorchDataLoader(ds, batch_size=512), c=10
        )
        model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
        learn = Learner(model, optim.SGD(model.parameters(), lr=0.1, momentum=0.9), F.cross_entropy, data)
        extra = [InterruptAt(interrupt_at)] if interrupt_at else []
        Runner([CheckpointCallback(path, every_batches=1), *extra]).fit(2, learn)
        return learn.model.state_dict()
    finally:
        torch.set_num_threads(before)


def test_a_fit_resumed_with_another_thread_count_is_not_exact(tmp_path):
    """The claim holds for the same thread count. With two threads the CPU's matmul may split a sum
    (here the 784 products of the first layer's outputs) between them and add the parts in another
    order: the same step then differs in the last bits, and training carries the difference on.
    Interrupted after its first batch, the fit resumed with one thread ends exactly as uninterrupted;
    resumed with two, it does not (by float rounding only)."""
    x, w = torch.randn(256, 784), torch.randn(784, 64)
    if torch.equal(_threads(1, lambda: x @ w), _threads(2, lambda: x @ w)):
        pytest.skip("this CPU's matmul gives the same bits with 1 and 2 threads: nothing to show here")
    want = _wide_fit(tmp_path / "reference.pt", threads=1)
    for threads in (1, 2):
        path = tmp_path / f"resumed-{threads}.pt"
        with pytest.raises(_Interrupt):
            _wide_fit(path, threads=1, interrupt_at=2)
        got = _wide_fit(path, threads=threads)
        why = first_difference(got, want)
        if threads == 1:
            assert why is None, why
        else:
            assert why is not None, "two threads gave the very same bits"
            test_close(got["0.weight"], want["0.weight"], atol=1e-4, rtol=0)  # rounding, not a bug


def _threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
