"""MNIST for the lessons: `get_data`, the notebook's five lines, reading the published files.

Lesson 02 (02_fully_connected) downloads the course's ``mnist.pkl.gz`` and unpickles it. minilib reads
the canonical IDX files instead (and still accepts the course's pickle for the full split): the table
`MNIST_FILES` names each file with its published size and checksums, `get_data` returns the splits as
tensors, and `parse_idx` reads the IDX format (a magic number, the sizes, then the pixels).

Files are looked for in ``path``, else ``$MINILIB_DATA``, else ``~/.cache/minilib``; a missing IDX file
is downloaded there over HTTPS from `MIRRORS`. No byte from the disk or the network is trusted before
it is checked: `minilib._mnist_safety` reads regular files only, never past the published size, checks
the size, md5 and sha256 before anything is parsed, puts a download under its name only once whole and
verified, and unpickles through an unpickler that admits numpy arrays alone. Read it when curious; the
lessons need none of it.
"""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from minilib._mnist_safety import (
    ENV_VAR,
    ChecksumError,
    RemoteFile,
    RestrictedUnpickler,
    download,
    read_bounded,
    read_verified,
)

__all__ = [
    "get_data",
    "data_dir",
    "MNIST_FILES",
    "MIRRORS",
    "ChecksumError",
    "RestrictedUnpickler",
    "read_idx",
    "parse_idx",
    "ENV_VAR",
]

DEFAULT_DIR = Path("~/.cache/minilib")

# The mirrors of the canonical files (yann.lecun.com no longer serves them reliably), tried in order:
# torchvision's, then TensorFlow's. A file's address is the mirror followed by its name.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

# Sizes and sums as published with the MNIST database. The course's pickle (deeplearning.net/data/mnist/
# mnist.pkl.gz) comes with the md5 every loader of it checks and no reliable size or sha256; it is read
# when on disk and never downloaded.
# fmt: off
MNIST_FILES: dict[str, RemoteFile] = {f.name: f for f in (
    #          name                          bytes      md5
    #                                                   sha256
    RemoteFile("train-images-idx3-ubyte.gz", 9_912_422, "f68b3c2dcbeaaa9fbdd348bbdeb94873",
               "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    RemoteFile("train-labels-idx1-ubyte.gz", 28_881,    "d53e105ee54ea40749a09fcbcd1e9432",
               "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    RemoteFile("t10k-images-idx3-ubyte.gz",  1_648_877, "9fb629c4189551a2d022fa330f9573f3",
               "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    RemoteFile("t10k-labels-idx1-ubyte.gz",  4_542,     "ec29112dd5afa0611ce80d1b7f02629c",
               "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    RemoteFile("mnist.pkl.gz",               None,      "a02cd19f81d51c426d7ca14024243ce9",
               None, downloadable=False),
)}
# fmt: on


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder MNIST is read from: ``path``, else ``$MINILIB_DATA``, else ``~/.cache/minilib``."""
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"get_data: path must be a str or os.PathLike, got {type(path).__name__}")
        return Path(path).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else DEFAULT_DIR.expanduser()


def get_data(path: str | os.PathLike | None = None, *, sample: bool = False):
    """MNIST as ``(x_train, y_train, x_valid, y_valid)``: float32 ``[N, 784]`` in [0, 1], int64 ``[N]``.

    Full (default): the 60,000 training images split in file order 50,000/10,000, as the course's
    ``mnist.pkl.gz`` (read instead when the two training IDX files are absent and it is present).
    ``sample=True``: the 10,000 test images split in file order 8,000/2,000.

    Looked for in ``path``, else ``$MINILIB_DATA``, else ``~/.cache/minilib``; missing IDX files are
    downloaded there. FileNotFoundError (offline, unwritable folder), ChecksumError (a file on disk is
    not the published one) or ValueError (not a regular file under a data file's name), each naming the
    folder, the file and ``MINILIB_DATA``; TypeError for a ``path`` or ``sample`` of the wrong type.
    """
    if not isinstance(sample, bool):
        raise TypeError(f"get_data: sample must be a bool, got {type(sample).__name__}")
    folder = data_dir(path)
    if sample:
        x, y = _load_idx_pair(folder, "t10k")
        return x[:8000], y[:8000], x[8000:], y[8000:]
    training = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
    pkl = folder / "mnist.pkl.gz"
    if pkl.exists() and not all((folder / name).exists() for name in training):
        # The checksum first, on the very bytes that are then unpickled: a pickle is never opened unverified.
        return _load_pickle(read_verified(pkl, MNIST_FILES[pkl.name]), f"MNIST file {pkl.name} in {folder}")
    x, y = _load_idx_pair(folder, "train")
    return x[:50000], y[:50000], x[50000:], y[50000:]


def _fetch(name: str, folder: Path) -> bytes:
    """The verified bytes of MNIST file ``name`` in ``folder``, downloading it if it is missing."""
    file = folder / name
    if not file.exists():  # a FIFO or a directory exists, and is refused when read
        download(MNIST_FILES[name], folder, MIRRORS)
    return read_verified(file, MNIST_FILES[name])


# ------------------------------------------------------------------------------------------ parsing

_IDX_DTYPES = {0x08: np.uint8}


def parse_idx(data: bytes, where: str = "IDX data") -> np.ndarray:
    """Parse gzip-compressed IDX bytes (the MNIST format): magic 00 00 08 ndim, big-endian sizes, values.

    ValueError (naming ``where``) for anything else: not gzip or cut short, a wrong magic number, a
    header that promises more or fewer values than follow.
    """
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # not gzip (BadGzipFile), cut short (EOFError), bad deflate
        raise ValueError(f"{where} is not a whole gzip file: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{where} does not start with an IDX magic number "
            f"(expected 00 00 08 <ndim>, got {raw[:4].hex(' ')})"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{where} ends inside its header ({len(raw)} bytes, header needs {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise ValueError(
            f"{where}: the header promises {expected} values of shape {dims}, "
            f"but {len(raw) - header} bytes follow"
        )
    return np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=header).reshape(dims)


def read_idx(file: str | os.PathLike) -> np.ndarray:
    """Parse an IDX gzip file (no checksum: use `get_data` for MNIST, which verifies before parsing)."""
    file = Path(file)
    return parse_idx(read_bounded(file), f"MNIST file {file.name} in {file.parent}")


def _load_idx_pair(folder: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    names = (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
    images, labels = (parse_idx(_fetch(n, folder), f"MNIST file {n} in {folder}") for n in names)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"MNIST {prefix} files in {folder} disagree: images {images.shape}, labels {labels.shape}"
        )
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0))
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def _load_pickle(data: bytes, where: str) -> tuple[torch.Tensor, ...]:
    """The course's ((x_train, y_train), (x_valid, y_valid), test) from verified pickle.gz bytes."""
    try:
        (x_train, y_train), (x_valid, y_valid), _ = RestrictedUnpickler(
            io.BytesIO(gzip.decompress(data)), encoding="latin1"
        ).load()
    except (TypeError, ValueError) as e:  # a different structure than three (x, y) pairs
        raise ValueError(f"{where} does not hold three (x, y) pairs as the course's pickle does: {e}") from e
    x_train, x_valid = (_as_tensor(a, (784,), np.float32, where) for a in (x_train, x_valid))
    y_train, y_valid = (_as_tensor(a, (), np.int64, where) for a in (y_train, y_valid))
    return x_train, y_train, x_valid, y_valid


def _as_tensor(a, shape_tail: tuple[int, ...], dtype, where: str) -> torch.Tensor:
    """An array of the course's pickle as a tensor: images [N, 784] as float32, labels [N] as int64."""
    if not isinstance(a, np.ndarray) or a.dtype == object or a.shape[1:] != shape_tail:
        kind = "image" if shape_tail else "label"
        raise ValueError(
            f"{where} does not hold MNIST as the course's pickle does: expected a numeric {kind} array "
            f"of shape [{', '.join(['N', *map(str, shape_tail)])}], "
            f"got {getattr(a, 'shape', type(a).__name__)}"
        )
    return torch.from_numpy(np.asarray(a, dtype=dtype))
