"""Lesson 02's data: MNIST, found on disk or downloaded, and never returned unless verified.

Files are looked for in ``path``, else ``$MINILIB_DATA``, else ``~/.cache/minilib``. Every file is
checked against its known md5 (and sha256 where published) before it is parsed; a download is
streamed to a temporary name in the same folder and renamed into place only once it is whole and
verified, so an interrupted download never leaves a file that looks usable. The course's
``mnist.pkl.gz`` is unpickled only after its checksum matches, and then only through an unpickler
that admits numpy arrays and nothing else.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["get_data", "data_dir", "MNIST_FILES", "ChecksumError", "RestrictedUnpickler", "read_idx"]

ENV_VAR = "MINILIB_DATA"
DEFAULT_DIR = Path("~/.cache/minilib")
DOWNLOAD_TIMEOUT_S = float(os.environ.get("MINILIB_DOWNLOAD_TIMEOUT", "20"))


@dataclass(frozen=True)
class RemoteFile:
    name: str
    md5: str
    sha256: str | None
    urls: tuple[str, ...]


_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)


def _idx(name: str, md5: str, sha256: str | None = None) -> RemoteFile:
    return RemoteFile(name, md5, sha256, tuple(m + name for m in _MIRRORS))


MNIST_FILES: dict[str, RemoteFile] = {
    f.name: f
    for f in (
        _idx("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        _idx("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        _idx(
            "t10k-images-idx3-ubyte.gz",
            "9fb629c4189551a2d022fa330f9573f3",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        _idx(
            "t10k-labels-idx1-ubyte.gz",
            "ec29112dd5afa0611ce80d1b7f02629c",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
        # The course's pickle (deeplearning.net's, as used in course-v3): read only if already on disk.
        RemoteFile("mnist.pkl.gz", "a02cd19f81d51c426d7ca14024243ce9", None, ()),
    )
}


class ChecksumError(ValueError):
    """A file's bytes are not the ones published: corrupt, truncated, or a different file."""


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder MNIST is read from: ``path``, else ``$MINILIB_DATA``, else ``~/.cache/minilib``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else DEFAULT_DIR.expanduser()


def _digests(file: Path) -> tuple[str, str]:
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def _verify(file: Path, spec: RemoteFile) -> None:
    md5, sha = _digests(file)
    if md5 != spec.md5 or (spec.sha256 is not None and sha != spec.sha256):
        raise ChecksumError(
            f"MNIST file {spec.name} in {file.parent} does not match its published checksum "
            f"(md5 {md5}, expected {spec.md5}): it is corrupt, truncated or a different file. "
            f"Delete it so it can be downloaded again, or point {ENV_VAR} at a folder with the right file."
        )


def _download(spec: RemoteFile, folder: Path) -> Path:
    """Stream ``spec`` from its mirrors into ``folder``; rename into place only once whole and verified."""
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / spec.name
    tmp = folder / f".{spec.name}.{os.getpid()}.part"
    errors = []
    for url in spec.urls:
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
            _verify(tmp, spec)
            os.replace(tmp, dest)  # atomic on one filesystem: readers see no file or the whole file
            return dest
        except (urllib.error.URLError, OSError, ChecksumError) as e:
            errors.append(f"{url}: {e}")
        finally:
            tmp.unlink(missing_ok=True)
    reasons = "; ".join(errors) if errors else "no download address is known for it"
    raise FileNotFoundError(
        f"MNIST file {spec.name} is not in {folder} and could not be downloaded ({reasons}). "
        f"Put the file there, or point {ENV_VAR} at a folder that has it."
    )


def _fetch(name: str, folder: Path) -> Path:
    """The verified local path of MNIST file ``name``, downloading it if it is missing."""
    spec = MNIST_FILES[name]
    file = folder / name
    if not file.exists():
        return _download(spec, folder)
    _verify(file, spec)
    return file


_IDX_DTYPES = {0x08: np.uint8}


def read_idx(file: Path) -> np.ndarray:
    """Parse an IDX gzip file (the MNIST format): magic, big-endian dims, then exactly that many bytes."""
    try:
        with gzip.open(file, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # not gzip, or truncated
        raise ValueError(f"MNIST file {file.name} in {file.parent} is not a whole gzip file: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"MNIST file {file.name} in {file.parent} does not start with an IDX magic number "
            f"(expected 00 00 08 <ndim>, got {raw[:4].hex(' ')})"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"MNIST file {file.name} in {file.parent} ends inside its header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise ValueError(
            f"MNIST file {file.name} in {file.parent}: header promises {expected} values of shape {dims}, "
            f"but {len(raw) - header} bytes follow"
        )
    return np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=header).reshape(dims)


def _load_idx_pair(folder: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(_fetch(f"{prefix}-images-idx3-ubyte.gz", folder))
    labels = read_idx(_fetch(f"{prefix}-labels-idx1-ubyte.gz", folder))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"MNIST {prefix} files in {folder} disagree: images {images.shape}, labels {labels.shape}"
        )
    x = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any other global (os.system, eval...) is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            if module.startswith("numpy.core"):  # numpy 2 moved numpy.core to numpy._core
                module = module.replace("numpy.core", "numpy._core", 1)
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")


def _load_pickle(file: Path) -> tuple[torch.Tensor, ...]:
    with gzip.open(file, "rb") as f:
        (x_train, y_train), (x_valid, y_valid), _ = RestrictedUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    as_x = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    as_y = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_valid), as_y(y_valid)


def get_data(path: str | os.PathLike | None = None, *, sample: bool = False):
    """MNIST as ``(x_train, y_train, x_valid, y_valid)``: float32 ``[N, 784]`` in [0, 1], int64 ``[N]``.

    Full (default): the 60,000 training images split in file order 50,000/10,000, as the course's
    ``mnist.pkl.gz``. ``sample=True``: the 10,000 test images split in file order 8,000/2,000.
    """
    folder = data_dir(path)
    if sample:
        x, y = _load_idx_pair(folder, "t10k")
        return x[:8000], y[:8000], x[8000:], y[8000:]
    have_idx = all((folder / f"train-{k}-idx{d}-ubyte.gz").exists() for k, d in (("images", 3), ("labels", 1)))
    pkl = folder / "mnist.pkl.gz"
    if not have_idx and pkl.exists():
        _verify(pkl, MNIST_FILES[pkl.name])  # checksum first: a pickle is never opened unverified
        return _load_pickle(pkl)
    x, y = _load_idx_pair(folder, "train")
    return x[:50000], y[:50000], x[50000:], y[50000:]
