"""Beyond the lessons: the same Runner on several processes (torch.distributed, DistributedDataParallel).

A sequel to lessons 03 and 04. The Runner of lesson 04 trains unchanged on W processes once a
``DDPCallback`` joins its callbacks: each process takes its share of every batch, DDP averages the
gradients in ``backward``, and every process takes the same step. Lesson 03 showed that averaging batch
means is wrong when batch sizes vary; across processes the same question comes back harder: PyTorch's
``DistributedSampler`` pads a set whose size is not a multiple of W with repeated samples (PyTorch issue
25162), so a validation number averaged over the ranks counts some samples twice. minilib splits the
validation set without padding and sums AvgStats' totals across the ranks: its numbers are the
single-process numbers of the whole set.

The claims run as one job of two gloo processes on 127.0.0.1, started by this file (it is also the
workers' script: ``python test_distributed.py RANK PORT OUT``). Each worker initialises the process group
once, runs every claim's fit, and saves what it saw; the tests compare that with one process doing the
same work, here. The job is bounded by a timeout (a hang fails the tests, it never stalls the suite) and
both processes are killed if it expires.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data.distributed import DistributedSampler

from minilib.callbacks import AvgStatsCallback, ProgressCallback
from minilib.data import DataBunch, Dataset
from minilib.distributed import DDPCallback
from minilib.learner import Callback, Learner, Runner, get_model
from minilib.loss import accuracy
from minilib.testing import test_close

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="this torch build has no gloo backend"
    ),
]

WORLD = 2  # processes
N_TRAIN, BS = 32, 4  # a multiple of WORLD * BS: no padding in training either
N_VALID, VALID_BS = 7, 2  # odd: a padding sampler would give one rank a duplicate
N_IN, NH, C, LR, EPOCHS = 5, 6, 3, 0.3, 2
STOP_AT = 2  # the claim about exceptions raises in the third training step's after_step
JOB_TIMEOUT_S = 150  # the whole job, both processes, from start to exit
GROUP_TIMEOUT_S = 60  # the default group: its rendezvous waits for the slower process's imports
FAIL_TIMEOUT_S = 3  # the group of the claim about a failing rank: how long a collective may wait


# ---------------------------------------------------------------------------------------------------
# The same data and models in the workers and in the single-process references.


def make_data(bs: int, shuffle: bool = False) -> DataBunch:
    g = torch.Generator().manual_seed(0)
    x_train, x_valid = torch.randn(N_TRAIN, N_IN, generator=g), torch.randn(N_VALID, N_IN, generator=g)
    y_train, y_valid = (
        torch.randint(0, C, (N_TRAIN,), generator=g),
        torch.randint(0, C, (N_VALID,), generator=g),
    )
    return DataBunch(
        TorchDataLoader(Dataset(x_train, y_train), batch_size=bs, shuffle=shuffle),
        TorchDataLoader(Dataset(x_valid, y_valid), batch_size=VALID_BS),
        c=C,
    )


def make_learner(data: DataBunch) -> Learner:
    torch.manual_seed(1)  # the same initial weights everywhere (DDP would broadcast rank 0's anyway)
    return Learner(*get_model(data, lr=LR, nh=NH), F.cross_entropy, data)


class StopAfter(Callback):
    """Raises an ordinary exception (not a Cancel one) in the after_step of training step ``STOP_AT``."""

    def __init__(self, only_rank: int | None = None):
        self.only_rank = only_rank

    def after_step(self):
        here = dist.get_rank() if dist.is_initialized() else 0
        if self.n_iter == STOP_AT and self.only_rank in (None, here):
            raise ValueError(f"stopped at step {STOP_AT}")


class RecordBatches(Callback):
    """Keeps every training batch's inputs, one list per epoch."""

    def begin_fit(self):
        self.seen = []

    def begin_epoch(self):
        self.seen.append([])

    def begin_batch(self):
        if self.in_train:
            self.seen[-1].append(self.xb.clone())


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def single_process(bs: int, *cbs: Callback) -> tuple[Learner, Runner]:
    """One process, no DDP: the reference for what W processes must do."""
    learn = make_learner(make_data(bs))
    run = Runner([AvgStatsCallback([accuracy], print_stats=False), *cbs])
    try:
        run.fit(EPOCHS, learn)
    except ValueError:  # StopAfter's
        pass
    return learn, run


N_ODD = 5  # a training set that is not a multiple of WORLD: the sampler pads it to 6


def odd_learner() -> Learner:
    """5 training samples in batches of 2, and lr 0: the weights never move, so every training batch is
    scored by the initial model and the training numbers must be that model's over the 5 samples."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(N_ODD, N_IN, generator=g), torch.randint(0, C, (N_ODD,), generator=g)
    data = DataBunch(TorchDataLoader(Dataset(x, y), batch_size=2), TorchDataLoader(Dataset(x, y)), c=C)
    torch.manual_seed(2)
    model, _ = get_model(data, nh=NH)
    return Learner(model, optim.SGD(model.parameters(), lr=0.0), F.cross_entropy, data)


class WithUnused(nn.Module):
    """A linear model with a second layer that forward never calls: its parameters get no gradient."""

    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(N_IN, C), nn.Linear(N_IN, C)

    def forward(self, x):
        return self.used(x)


def unused_learner() -> Learner:
    """One step (each rank takes half of the N_TRAIN samples) on a model with a layer it never uses."""
    data = make_data(N_TRAIN // WORLD)
    torch.manual_seed(3)
    model = WithUnused()
    return Learner(model, optim.SGD(model.parameters(), lr=LR), F.cross_entropy, data)


def bn_learner() -> Learner:
    """The lesson's MLP with a BatchNorm1d: its running statistics follow each rank's own batches."""
    data = make_data(BS)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(N_IN, NH), nn.BatchNorm1d(NH), nn.ReLU(), nn.Linear(NH, C))
    return Learner(model, optim.SGD(model.parameters(), lr=LR), F.cross_entropy, data)


# ---------------------------------------------------------------------------------------------------
# The worker: one process of the job. Nothing here prints except the callbacks under test.


def worker(rank: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=GROUP_TIMEOUT_S),
    )
    res: dict = {}

    # Unshuffled, W x BS per step, an odd validation set; AvgStatsCallback prints (on rank 0 only).
    data = make_data(BS)
    learn = make_learner(data)
    model = learn.model
    run = Runner([AvgStatsCallback([accuracy]), DDPCallback()])
    run.fit(EPOCHS, learn)
    res["steps"] = {
        "params": params(learn.model),
        "model_is_given": learn.model is model,
        "data_is_given": learn.data is data,
        "train": run.avg_stats.train_stats.avg_stats,
        "valid": run.avg_stats.valid_stats.avg_stats,
        "valid_count": run.avg_stats.valid_stats.count,
        "print_stats_after": run.avg_stats.print_stats,
    }

    # Shuffled, with a progress bar; every training batch recorded.
    learn = make_learner(make_data(BS, shuffle=True))
    run = Runner([AvgStatsCallback([accuracy]), ProgressCallback(), RecordBatches(), DDPCallback()])
    run.fit(EPOCHS, learn)
    res["order"] = {"seen": [torch.cat(e) for e in run.record_batches.seen], "file_after": run.progress.file}

    # An exception from a callback, on every rank.
    learn = make_learner(make_data(BS))
    model = learn.model
    try:
        Runner([StopAfter(), DDPCallback()]).fit(EPOCHS, learn)
        res["raised"] = {"error": None}
    except ValueError as e:
        res["raised"] = {
            "error": str(e),
            "model_is_given": learn.model is model,
            "params": params(learn.model),
        }

    # A training set of 5 on 2 ranks: the sampler's padding duplicate must not be counted.
    run = Runner([AvgStatsCallback([accuracy], print_stats=False), DDPCallback()])
    run.fit(1, odd_learner())
    res["odd"] = {"train": run.avg_stats.train_stats.avg_stats, "count": run.avg_stats.train_stats.count}

    # A parameter that gets no gradient: the fit raises, or (find_unused_parameters) the ranks agree.
    learn = unused_learner()
    try:
        Runner([DDPCallback()]).fit(1, learn)
        res["unused"] = {"error": None}
    except RuntimeError as e:
        res["unused"] = {"error": str(e)}
    res["unused"]["params"] = params(learn.model)
    learn = unused_learner()
    Runner([DDPCallback(find_unused_parameters=True)]).fit(1, learn)
    res["unused_found"] = params(learn.model)

    # BatchNorm: the running statistics of each rank's last batch.
    learn = bn_learner()
    run = Runner([AvgStatsCallback([accuracy], print_stats=False), DDPCallback()])
    run.fit(EPOCHS, learn)
    res["bn"] = {"state": params(learn.model), "valid": run.avg_stats.valid_stats.avg_stats}

    # Rank 1 alone fails at step STOP_AT and stays alive: only the group's timeout can free rank 0.
    group = dist.new_group(timeout=timedelta(seconds=FAIL_TIMEOUT_S))
    learn = make_learner(make_data(BS))
    model = learn.model
    start = time.monotonic()
    try:
        Runner([StopAfter(only_rank=1), DDPCallback(process_group=group)]).fit(EPOCHS, learn)
        res["fails"] = {"error": None}
    except Exception as e:  # noqa: BLE001 (the claim is about whatever torch raises)
        res["fails"] = {
            "error": f"{type(e).__name__}: {e}",
            "is_runtime_error": isinstance(e, RuntimeError),
            "seconds": time.monotonic() - start,
            "model_is_given": learn.model is model,
        }
    if rank == 1:  # stay in the group until rank 0 has given up on us
        deadline = time.monotonic() + GROUP_TIMEOUT_S
        while not (out / "rank0.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    torch.save(res, out / f".rank{rank}.pt")
    os.replace(out / f".rank{rank}.pt", out / f"rank{rank}.pt")  # whole, or not there


# ---------------------------------------------------------------------------------------------------
# The job, started once for the module's tests.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_job(out: Path) -> tuple[list[int | None], bool]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    for rank in range(WORLD):
        with open(out / f"rank{rank}.out", "w") as so, open(out / f"rank{rank}.err", "w") as se:
            cmd = [sys.executable, __file__, str(rank), str(port), str(out)]
            procs.append(subprocess.Popen(cmd, stdout=so, stderr=se, env=env))
    deadline, timed_out = time.monotonic() + JOB_TIMEOUT_S, False
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for p in procs:  # nothing is left running, whatever happened
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], timed_out


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """Both workers' results, their stdout, and their stderr."""
    for attempt in range(2):  # a second try only if another program took the free port meanwhile
        out = tmp_path_factory.mktemp("ddp")
        rcs, timed_out = _run_job(out)
        errs = [(out / f"rank{r}.err").read_text() for r in range(WORLD)]
        if attempt == 0 and any("address already in use" in e.lower() for e in errs):
            continue
        break
    if timed_out or any(rcs):
        why = f"timed out after {JOB_TIMEOUT_S} s" if timed_out else f"exit codes {rcs}"
        tails = "\n".join(f"--- rank {r} stderr:\n{e[-3000:]}" for r, e in enumerate(errs))
        pytest.fail(f"the two-process job failed ({why})\n{tails}")
    return {
        "res": [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)],
        "stdout": [(out / f"rank{r}.out").read_text() for r in range(WORLD)],
    }


# ---------------------------------------------------------------------------------------------------
# The claims, in the order a learner meets them.


def test_w_processes_at_batch_size_b_take_the_steps_of_one_process_at_w_times_b(job):
    """Unshuffled, rank r of W takes samples r, r+W, ... so the W batches of step k together are the
    single process's batch k at W x B. Each rank's loss is a mean over B samples and DDP averages the W
    gradients: the mean of W means of B equals the mean over W x B. So the steps, and the weights after
    them, are those of one process at W x B (float rounding aside), and clearly not those at B."""
    ref, _ = single_process(WORLD * BS)
    at_b, _ = single_process(BS)
    expected = params(ref.model)
    assert max_diff(params(at_b.model), expected) > 1e-3  # the claim has teeth: B alone goes elsewhere
    for rank, res in enumerate(job["res"]):
        diff = max_diff(res["steps"]["params"], expected)
        assert diff <= 1e-5, f"rank {rank}: weights differ from one process at W x B by {diff:.3g}"


def test_every_rank_reports_the_training_numbers_of_the_whole_set(job):
    """AvgStats' training totals (loss x bs, accuracy x bs, count) are summed across the ranks at the end
    of the pass, so each rank prints the single process's training loss and accuracy, not its own half."""
    _, ref = single_process(WORLD * BS)
    expected = torch.tensor(ref.avg_stats.train_stats.avg_stats)
    every_rank = torch.tensor([res["steps"]["train"] for res in job["res"]])  # row r: rank r's numbers
    test_close(every_rank, expected.expand_as(every_rank), rtol=0, atol=1e-6)


def test_pytorchs_padding_sampler_counts_a_duplicate_on_an_odd_validation_set():
    """DistributedSampler makes every rank's share equally long by repeating samples from the start:
    7 validation samples on 2 ranks become 8, sample 0 twice. Averaged over what the ranks saw, the loss
    is not the loss of the validation set (lesson 03's wrong average, across processes)."""
    learn, _ = single_process(WORLD * BS)
    shares = [
        list(DistributedSampler(range(N_VALID), num_replicas=WORLD, rank=r, shuffle=False)) for r in range(2)
    ]
    seen = torch.tensor(shares[0] + shares[1])
    assert len(seen) == N_VALID + 1 and torch.bincount(seen).max() == 2  # one sample counted twice
    xv, yv = learn.data.valid_ds[:]
    with torch.no_grad():
        losses = F.cross_entropy(learn.model(xv), yv, reduction="none")
    padded, whole = losses[seen].mean().item(), losses.mean().item()
    assert abs(padded - whole) > 1e-4, f"padded {padded} vs whole set {whole}"


def test_minilibs_validation_numbers_are_the_single_process_whole_set_numbers(job):
    """minilib gives rank r the validation samples r, r+W, ... without padding (4 and 3 of the 7) and
    validates with the plain module, so shards of different lengths need no lockstep; the summed totals
    count each sample once. Every rank reports the loss and accuracy of one process over the whole set."""
    learn, ref = single_process(WORLD * BS)
    xv, yv = learn.data.valid_ds[:]
    with torch.no_grad():
        pred = learn.model(xv)
    whole = torch.tensor([F.cross_entropy(pred, yv).item(), accuracy(pred, yv).item()])
    test_close(torch.tensor(ref.avg_stats.valid_stats.avg_stats), whole, rtol=0, atol=1e-6)
    counts = [res["steps"]["valid_count"] for res in job["res"]]
    assert counts == [N_VALID] * WORLD, f"samples counted by each rank: {counts}, the set has {N_VALID}"
    every_rank = torch.tensor([res["steps"]["valid"] for res in job["res"]])  # row r: rank r's numbers
    test_close(every_rank, whole.expand_as(every_rank), rtol=0, atol=1e-6)


def test_every_training_sample_is_seen_once_per_epoch_across_the_ranks_in_a_new_order_each_epoch(job):
    """A shuffled training loader becomes a DistributedSampler over the training set, shuffled with one
    seed on every rank (so the shares are disjoint) and ``set_epoch(epoch)`` each epoch (so the order
    changes: without it every epoch would repeat the first one's order)."""
    x_train = make_data(BS).train_ds.x

    def indices(xb: torch.Tensor) -> torch.Tensor:  # which training samples these rows are
        return (xb[:, None, :] == x_train[None, :, :]).all(-1).int().argmax(1)

    per_epoch = [[indices(res["order"]["seen"][e]) for res in job["res"]] for e in range(EPOCHS)]
    for e, shares in enumerate(per_epoch):
        assert all(len(s) == N_TRAIN // WORLD for s in shares), (
            f"epoch {e}: shares {[len(s) for s in shares]}"
        )
        assert torch.equal(torch.cat(shares).sort().values, torch.arange(N_TRAIN)), f"epoch {e}: {shares}"
    first, second = torch.cat(per_epoch[0]), torch.cat(per_epoch[1])
    assert not torch.equal(first, second), "the second epoch repeated the first epoch's order"
    assert not torch.equal(first.sort().values, first), "the training order was not shuffled"


def test_only_rank_0_prints(job):
    """AvgStatsCallback's lines and ProgressCallback's epoch lines appear once, from rank 0: the other
    ranks' print flags are switched off for the fit, and switched back after it."""
    out0, out1 = job["stdout"]
    assert out1 == "", f"rank 1 printed: {out1!r}"
    assert out0.count("train: [") == EPOCHS and out0.count("valid: [") == EPOCHS, out0
    assert f"epoch {EPOCHS}/{EPOCHS}" in out0, out0
    res1 = job["res"][1]
    assert res1["steps"]["print_stats_after"] is None and res1["order"]["file_after"] is None


def test_after_fit_learn_model_is_the_plain_module_holding_the_trained_weights(job):
    """DDP wraps the model only for the fit: afterwards ``learn.model`` is the very module that was given
    (not a DistributedDataParallel), with the weights DDP trained, and ``learn.data`` is the given data."""
    assert isinstance(Runner([DDPCallback()]).ddp, DDPCallback)  # reachable as run.ddp
    ref, _ = single_process(WORLD * BS)
    for rank, res in enumerate(job["res"]):
        assert res["steps"]["model_is_given"] and res["steps"]["data_is_given"], f"rank {rank}"
        assert max_diff(res["steps"]["params"], params(ref.model)) <= 1e-5


def test_a_callbacks_exception_still_gives_back_the_plain_module(job):
    """``after_fit`` runs even when a callback raises, and unwraps there: the exception reaches the
    caller unchanged, and ``learn.model`` is the plain module holding the weights of the steps taken."""
    ref, _ = single_process(WORLD * BS, StopAfter())
    for rank, res in enumerate(job["res"]):
        raised = res["raised"]
        assert raised["error"] == f"stopped at step {STOP_AT}", f"rank {rank}: {raised}"
        assert raised["model_is_given"], f"rank {rank}: learn.model is still wrapped"
        diff = max_diff(raised["params"], params(ref.model))
        assert diff <= 1e-5, f"rank {rank}: {diff:.3g} from one process stopped at the same step"


def test_a_rank_that_fails_does_not_leave_the_others_waiting_forever(job):
    """Rank 1 raises in a training step and stays alive without joining the next gradient all-reduce.
    Rank 0 waits in that all-reduce only until the process group's timeout, then raises a RuntimeError
    (gloo: "Timed out waiting ..."), and its ``after_fit`` still unwraps. (Under torchrun, a worker that
    exits with an error makes torchrun stop the others as well.)"""
    fails0, fails1 = job["res"][0]["fails"], job["res"][1]["fails"]
    assert fails1["error"] == f"ValueError: stopped at step {STOP_AT}", fails1
    assert fails0["error"] is not None and fails0["is_runtime_error"], fails0
    assert fails0["model_is_given"] and fails1["model_is_given"]


def test_training_numbers_count_each_sample_once_when_the_set_is_not_a_multiple_of_the_world_size(job):
    """5 training samples on 2 ranks: DistributedSampler pads them to 6 (sample 0 twice) so that both
    ranks take as many steps, and the duplicate does train. It must not be counted: every rank reports
    5 samples, and (the weights frozen at lr 0) the initial model's loss and accuracy over those 5."""
    learn = odd_learner()
    x, y = learn.data.train_ds[:]
    with torch.no_grad():
        pred = learn.model(x)
    whole = torch.tensor([F.cross_entropy(pred, y).item(), accuracy(pred, y).item()])
    for rank, res in enumerate(job["res"]):
        assert res["odd"]["count"] == N_ODD, f"rank {rank} counted {res['odd']['count']} of {N_ODD} samples"
        test_close(torch.tensor(res["odd"]["train"]), whole, rtol=0, atol=1e-6)


def test_a_parameter_without_a_gradient_never_leaves_the_ranks_with_different_models(job):
    """DDP reduces gradients in buckets and waits for every parameter's gradient before reducing one:
    a layer forward never calls leaves its bucket unreduced, each rank steps with its own gradient, and
    after one step the ranks hold different weights, silently. minilib sees the missing gradient after
    backward and raises, naming the parameter and the way out (``find_unused_parameters=True``), with
    which the ranks end equal."""
    for rank, res in enumerate(job["res"]):
        error = res["unused"]["error"]
        assert error and "unused.weight" in error and "find_unused_parameters" in error, (
            f"rank {rank}: {error}"
        )
    found = [res["unused_found"] for res in job["res"]]
    assert max_diff(found[0], found[1]) == 0, "with find_unused_parameters=True the ranks differ"
    assert max_diff(found[0], params(unused_learner().model)) > 1e-3, "nothing trained"


def test_with_batchnorm_the_ranks_end_equal_and_report_the_loss_of_the_model_they_hold(job):
    """BatchNorm's running statistics follow each rank's own batches; DDP copies rank 0's buffers to
    the others only before each training forward, so after the last training batch the ranks differ,
    and a validation split across them would mix two models. minilib broadcasts the buffers from rank
    0 before validating: every rank ends with the same parameters and buffers, and reports that
    model's loss and accuracy over the whole validation set."""
    (state0, valid0), (state1, _) = ((res["bn"]["state"], res["bn"]["valid"]) for res in job["res"])
    assert max_diff(state0, state1) == 0, "the ranks hold different models (buffers or weights)"
    learn = bn_learner()
    learn.model.load_state_dict(state0)
    learn.model.eval()
    xv, yv = learn.data.valid_ds[:]
    with torch.no_grad():
        pred = learn.model(xv)
    whole = torch.tensor([F.cross_entropy(pred, yv).item(), accuracy(pred, yv).item()])
    for res in job["res"]:
        test_close(torch.tensor(res["bn"]["valid"]), whole, rtol=0, atol=1e-6)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
