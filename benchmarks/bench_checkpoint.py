"""Beyond the lessons, timed: what one checkpoint save costs (minilib.checkpoint.CheckpointCallback).

A save is the callback's own path, as a fit runs it: gather the state (model and optimizer state dicts,
the random states, the callbacks' state dicts), ``torch.save`` it to a temporary file, flush, fsync, rename
over the checkpoint and fsync the folder. Its cost decides how often ``every_batches`` can save: a save
that takes as long as ten batches, every ten batches, halves the training rate.

Models: the lessons' MLP (784-50-10, SGD: no optimizer state), lesson 07's CNN (``get_cnn_model`` with
``nfs=[8, 16, 32, 32]`` and ``conv_layer``'s Conv2d-GeneralReLU-BatchNorm2d blocks, written out here in
torch.nn layers; SGD with momentum: one buffer per parameter) and a larger MLP (784-2048-2048-10, about
5.8 million parameters, Adam: two moments per parameter), so that bytes, not overheads, dominate.

Each case first trains one batch with the callback (so the optimizer has its state and the runner its
position), checks that the checkpoint reads back bit for bit, then times ``run.checkpoint.save``. The
recorded ``extra_info``: ``model``, ``parameters``, ``bytes`` (the checkpoint file's size),
``tensor_bytes`` (parameters, buffers and optimizer state: what the file cannot be smaller than),
``seconds_per_save`` (median of this case's timed saves, also under ``--benchmark-disable``) and
``mb_per_s``. The disk is this machine's (``tmp_path``): fsync's cost is the disk's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader as TorchDataLoader

from benchmarks import harness
from minilib.checkpoint import CheckpointCallback, read_checkpoint
from minilib.data import DataBunch, Dataset
from minilib.learner import Learner, Runner

N_IN, C, BS = 784, 10, 64


def lesson_mlp() -> tuple[nn.Module, optim.Optimizer]:
    model = nn.Sequential(nn.Linear(N_IN, 50), nn.ReLU(), nn.Linear(50, C))  # get_model's
    return model, optim.SGD(model.parameters(), lr=0.5)


def _conv_layer(ni: int, nf: int, ks: int = 3) -> nn.Sequential:
    # lesson 07's conv_layer: no bias before the norm, (General)ReLU, then BatchNorm2d
    return nn.Sequential(
        nn.Conv2d(ni, nf, ks, padding=ks // 2, stride=2, bias=False), nn.ReLU(), nn.BatchNorm2d(nf)
    )


def lesson07_cnn() -> tuple[nn.Module, optim.Optimizer]:
    nfs = [1, 8, 16, 32, 32]
    layers = [_conv_layer(nfs[0], nfs[1], 5)] + [
        _conv_layer(a, b) for a, b in zip(nfs[1:-1], nfs[2:], strict=True)
    ]
    model = nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)), *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(nfs[-1], C)
    )
    return model, optim.SGD(model.parameters(), lr=0.4, momentum=0.9)


def large_mlp() -> tuple[nn.Module, optim.Optimizer]:
    model = nn.Sequential(
        nn.Linear(N_IN, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, C)
    )
    return model, optim.Adam(model.parameters(), lr=1e-3)


MODELS: dict[str, Callable[[], tuple[nn.Module, optim.Optimizer]]] = {
    "lesson MLP 784-50-10 (SGD)": lesson_mlp,
    "lesson 07 CNN [8, 16, 32, 32] (SGD, momentum)": lesson07_cnn,
    "MLP 784-2048-2048-10 (Adam)": large_mlp,
}
# (models, timed saves) per set: the smoke run saves the two lesson models once each.
CASES = {"tiny": (list(MODELS)[:2], 1), "quick": (list(MODELS), 5), "full": (list(MODELS), 20)}


def _one_batch_fit(make, path) -> tuple[Learner, Runner]:
    torch.manual_seed(0)
    ds = Dataset(torch.randn(BS, N_IN), torch.randint(0, C, (BS,)))
    data = DataBunch(
        TorchDataLoader(ds, batch_size=BS, shuffle=True), TorchDataLoader(ds, batch_size=BS), c=C
    )
    learn = Learner(*make(), F.cross_entropy, data)
    run = Runner([CheckpointCallback(path, every_batches=1, resume=False)])
    run.fit(1, learn)
    return learn, run


def _tensor_bytes(learn: Learner) -> int:
    t = list(learn.model.state_dict().values())
    t += [v for s in learn.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(x.numel() * x.element_size() for x in t)


@pytest.mark.parametrize("model", list(MODELS))
def test_checkpoint_save(benchmark, pytestconfig, tmp_path, model):
    """One save of ``model``'s training state, checked to read back bit for bit before it is timed."""
    names, rounds = CASES[harness.bench_set(pytestconfig)]
    if model not in names:
        pytest.skip(f"{model} is not in the {harness.bench_set(pytestconfig)} set")
    path = tmp_path / "ckpt.pt"
    learn, run = _one_batch_fit(MODELS[model], path)
    saved = read_checkpoint(path)["model"]
    for k, v in learn.model.state_dict().items():
        assert torch.equal(saved[k], v), f"{model}: {k} does not read back as saved"

    def save() -> None:
        run.checkpoint.save(epoch=0, batch=1)

    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        save()
        times.append(time.perf_counter() - start)
    benchmark.group = "checkpoint"
    benchmark.pedantic(save, rounds=rounds, iterations=1)
    seconds, size = statistics.median(times), path.stat().st_size
    benchmark.extra_info.update(
        {
            "model": model,
            "parameters": sum(p.numel() for p in learn.model.parameters()),
            "bytes": size,
            "tensor_bytes": _tensor_bytes(learn),
            "seconds_per_save": seconds,
            "mb_per_s": size / seconds / 1e6,
        }
    )
    assert size >= _tensor_bytes(learn)
