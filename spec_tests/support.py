"""Small data for the callback lessons' spec tests, where every batch boundary must be known in advance."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader as TorchDataLoader

from minilib.data import DataBunch, Dataset


def tiny_data(
    n_train: int = 4,
    n_valid: int = 2,
    bs: int = 2,
    valid_bs: int | None = None,
    n_in: int = 3,
    c: int = 2,
    dtype=torch.float32,
) -> DataBunch:
    """Random samples in unshuffled loaders: training batches of ``bs``, validation batches of
    ``valid_bs`` (default ``2 * bs``, as `get_dls` does)."""
    x_train, x_valid = torch.randn(n_train, n_in, dtype=dtype), torch.randn(n_valid, n_in, dtype=dtype)
    y_train, y_valid = torch.randint(0, c, (n_train,)), torch.randint(0, c, (n_valid,))
    return DataBunch(
        TorchDataLoader(Dataset(x_train, y_train), batch_size=bs),
        TorchDataLoader(Dataset(x_valid, y_valid), batch_size=valid_bs or 2 * bs),
        c=c,
    )
