"""Helpers the spec files share: small data for the callback lessons' tests, where every batch boundary
must be known in advance, and a second process that holds a tensor (the kernels' never-written-again
claims)."""

from __future__ import annotations

from contextlib import contextmanager

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


def _hold(inbox, outbox):
    """The child of ``another_process_holding``: receive a tensor, say so, and when asked send back what
    it holds then (as a list)."""
    held = inbox.get(timeout=BOUND_S)
    outbox.put("received")
    inbox.get(timeout=BOUND_S)
    outbox.put(held.tolist())


#: How long a test waits on another process before it fails (and kills it).
BOUND_S = 60


class _Holder:
    def __init__(self, inbox, outbox):
        self.inbox, self.outbox = inbox, outbox

    def send(self, tensor) -> None:
        """Hand ``tensor`` over (torch.multiprocessing moves it into shared memory); wait until it is held."""
        self.inbox.put(tensor)
        assert self.outbox.get(timeout=BOUND_S) == "received"

    def held(self) -> list:
        """What the other process holds now."""
        self.inbox.put("your turn")
        return self.outbox.get(timeout=BOUND_S)


@contextmanager
def another_process_holding():
    """A forked process that holds a tensor sent to it (``holder.send(t)``) and later says what it holds
    (``holder.held()``): to show a kernel never writes into memory another process was given. Forked
    (spawning would import the test module again); every wait is bounded and the child is killed if it
    has not finished by the end of the ``with`` block."""
    mp = torch.multiprocessing.get_context("fork")
    inbox, outbox = mp.Queue(), mp.Queue()
    child = mp.Process(target=_hold, args=(inbox, outbox), daemon=True)
    child.start()
    try:
        yield _Holder(inbox, outbox)
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
            child.join()
