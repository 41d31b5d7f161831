"""Lessons 02-04: MNIST (`get_data`, `normalize`) and the data pipeline of 03_minibatch_training.

Dataset -> Sampler (index batches) -> collate -> DataLoader, then PyTorch's own loaders (`get_dls`)
and the `DataBunch` that lesson 04's Learner holds. `get_data` itself lives in `minilib.mnist`
(files, downloads, checksums).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader as TorchDataLoader

from minilib import contract
from minilib.mnist import get_data

__all__ = ["get_data", "normalize", "Dataset", "Sampler", "collate", "DataLoader", "get_dls", "DataBunch"]


def normalize(x: torch.Tensor, m, s) -> torch.Tensor:
    """(x - m) / s. Use the TRAINING set's mean and std for every split, so all see the same transform.

    ``m`` and ``s`` are numbers or tensors (per-feature statistics broadcast); a NaN or infinite statistic,
    or a zero std, would turn every pixel into NaN or inf, so they are refused.
    """
    contract.tensor("normalize", x=x)
    contract.finite("normalize", m=m)
    contract.finite("normalize", nonzero=True, s=s)
    return (x - m) / s


class Dataset:
    """Pairs inputs with targets: ``ds[i]`` and ``ds[i:j]`` give ``(x, y)``."""

    def __init__(self, x, y):
        contract.same_length("Dataset", x=x, y=y)
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __repr__(self) -> str:
        return f"Dataset(len={len(self)})"


class Sampler:
    """Yields batches of indices: every index exactly once per epoch, shuffled afresh each epoch if asked.

    The last batch may be short: 10 items with bs 3 give [0,1,2], [3,4,5], [6,7,8], [9].
    """

    def __init__(self, ds: Sequence, bs: int, shuffle: bool = False):
        contract.positive_int("Sampler", bs=bs)
        self.n, self.bs, self.shuffle = len(ds), bs, shuffle

    def __iter__(self) -> Iterator[torch.Tensor]:
        idxs = torch.randperm(self.n) if self.shuffle else torch.arange(self.n)
        for i in range(0, self.n, self.bs):
            yield idxs[i : i + self.bs]

    def __len__(self) -> int:
        return math.ceil(self.n / self.bs)


def collate(batch):
    """Stack a list of ``(x, y)`` pairs into one ``(xb, yb)`` pair of batched tensors."""
    contract.nonempty("collate", batch=batch)
    for i, item in enumerate(batch):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            contract.fail("collate", f"batch[{i}]", "an (x, y) pair", item)
    xs, ys = zip(*batch, strict=True)
    return torch.stack(xs), torch.stack(ys)


class DataLoader:
    """The lesson's loader: for each index batch of the sampler, collate the items it names."""

    def __init__(self, ds, sampler: Sampler, collate_fn: Callable = collate):
        self.ds, self.sampler, self.collate_fn = ds, sampler, collate_fn

    @property
    def dataset(self):
        """The dataset, under PyTorch's name, so a DataBunch can hold either kind of loader."""
        return self.ds

    def __iter__(self):
        for idxs in self.sampler:
            yield self.collate_fn([self.ds[int(i)] for i in idxs])

    def __len__(self) -> int:
        return len(self.sampler)


def get_dls(train_ds, valid_ds, bs: int, **kwargs) -> tuple[TorchDataLoader, TorchDataLoader]:
    """PyTorch loaders: training shuffled with ``bs``; validation in order with ``2 * bs``.

    Validation keeps no activations for a backward pass, so twice the batch fits in the same memory.
    """
    contract.positive_int("get_dls", bs=bs)
    contract.nonempty("get_dls", train_ds=train_ds, valid_ds=valid_ds)  # else torch says "num_samples=0"
    return (
        TorchDataLoader(train_ds, batch_size=bs, shuffle=True, **kwargs),
        TorchDataLoader(valid_ds, batch_size=bs * 2, **kwargs),
    )


class DataBunch:
    """The training and validation loaders, plus ``c``, the number of classes (outputs)."""

    def __init__(self, train_dl, valid_dl, c: int | None = None):
        if c is not None:
            contract.positive_int("DataBunch", c=c)
        self.train_dl, self.valid_dl, self.c = train_dl, valid_dl, c

    @property
    def train_ds(self):
        return self.train_dl.dataset

    @property
    def valid_ds(self):
        return self.valid_dl.dataset

    def __repr__(self) -> str:
        return (
            f"DataBunch(train={len(self.train_dl)} batches, valid={len(self.valid_dl)} batches, c={self.c})"
        )
