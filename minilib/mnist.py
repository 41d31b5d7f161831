"""Lesson 02's data: MNIST, found on disk or downloaded, and never returned unless verified.

Files are looked for in ``path``, else ``$MINILIB_DATA``, else ``~/.cache/minilib``. Only a regular file is
read: a FIFO, a device or a directory under a data file's name is refused before it is opened (a FIFO
would block the read forever, ``/dev/zero`` would fill the memory). Never more than one byte past the
published size is read, and the bytes are checked against the published size, md5 and sha256 before they
are parsed, from those same bytes: nothing can change between the check and the use.

A missing IDX file is downloaded by pooch (the fetcher of scipy and scikit-image) from the mirrors below,
over HTTPS only, each network wait bounded by a timeout. pooch streams it into a temporary file and moves
it to its name only once its hash matches; it does so in a staging folder (``.download`` inside the data
folder) from which the verified file is renamed into place. So a data file's name never holds a partial
download: an error or Ctrl-C deletes the temporary file, and a process killed outright (SIGKILL, SIGTERM)
can only leave one inside ``.download``, which the next download deletes once nobody has written to it
for ten minutes.

The course's ``mnist.pkl.gz`` (deeplearning.net's, 50,000/10,000/10,000) is accepted for the full
split. A pickle can run any code while it loads, so it is unpickled only after its md5 matches, and
then through `RestrictedUnpickler`, which admits numpy arrays and nothing else.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import stat
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import torch

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

ENV_VAR = "MINILIB_DATA"
DEFAULT_DIR = Path("~/.cache/minilib")
TIMEOUT_ENV_VAR = "MINILIB_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT_S = 10.0  # per connect or read; an unreachable host costs at most this per mirror
STAGING = ".download"  # where pooch writes, inside the data folder
STALE_AFTER_S = 600.0  # a temporary file nobody has written to for this long belongs to no live download
UNPUBLISHED_SIZE_LIMIT = 64 * 2**20  # files without a published size (the 16 MB pickle) are read up to this


@dataclass(frozen=True)
class RemoteFile:
    """One published file: its name, size and checksums, and whether minilib downloads it."""

    name: str
    size: int | None  # None: not published reliably, so only the checksums decide
    md5: str
    sha256: str | None
    downloadable: bool = True


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


class ChecksumError(ValueError):
    """A file's bytes are not the ones published: corrupt, truncated, or a different file."""


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder MNIST is read from: ``path``, else ``$MINILIB_DATA``, else ``~/.cache/minilib``."""
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"get_data: path must be a str or os.PathLike, got {type(path).__name__}")
        return Path(path).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else DEFAULT_DIR.expanduser()


# ---------------------------------------------------------------------------------------- reading


def _mismatch(data: bytes, spec: RemoteFile) -> str | None:
    """Why ``data`` is not ``spec``'s published file, or None when size, md5 and sha256 all match."""
    if spec.size is not None and len(data) != spec.size:
        return f"{len(data)} bytes where {spec.size} were published"
    md5 = hashlib.md5(data).hexdigest()
    if md5 != spec.md5:
        return f"md5 {md5}, expected {spec.md5}"
    if spec.sha256 is not None:
        sha = hashlib.sha256(data).hexdigest()
        if sha != spec.sha256:
            return f"sha256 {sha}, expected {spec.sha256}"
    return None


# What a file is, by the first letter of stat.filemode (a socket and the rest: "not a regular file").
_KINDS = {"d": "a directory", "p": "a FIFO", "c": "a character device", "b": "a block device"}


def _refuse_unless_regular(mode: int, file: Path) -> None:
    if stat.S_ISREG(mode):
        return
    kind = _KINDS.get(stat.filemode(mode)[0], "not a regular file")
    raise ValueError(
        f"MNIST file {file.name} in {file.parent} is {kind}, not a regular file, so it was not read. "
        f"Put the file itself there, or point {ENV_VAR} at a folder that has it."
    )


def _read_bounded(file: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of ``file``, which must be a regular file (links to one are followed)."""
    _refuse_unless_regular(os.stat(file).st_mode, file)  # before opening: opening a FIFO blocks
    # O_NONBLOCK: were a FIFO swapped in after the stat, opening it still returns at once; fstat refuses it.
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as f:
        _refuse_unless_regular(os.fstat(fd).st_mode, file)
        return f.read(limit)


def _read_verified(file: Path, spec: RemoteFile) -> bytes:
    """The bytes of ``file``, once they match ``spec``; ChecksumError naming the folder and file if not."""
    # One byte past the published size is enough to know the file is wrong; never read more.
    data = _read_bounded(file, (spec.size if spec.size is not None else UNPUBLISHED_SIZE_LIMIT) + 1)
    why = _mismatch(data, spec)
    if why is not None:
        raise ChecksumError(
            f"MNIST file {spec.name} in {file.parent} does not match its published checksum ({why}): "
            f"it is corrupt, truncated or a different file, and was not used. Delete it so it can be "
            f"downloaded again, or point {ENV_VAR} at a folder with the right file."
        )
    return data


# ------------------------------------------------------------------------------------- downloading


def _timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV_VAR)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"get_data: {TIMEOUT_ENV_VAR} must be a positive number of seconds, got {raw!r}")
    return value


def _https_only(response, *args, **kwargs) -> None:
    """A requests hook, called for every response, redirects included: never go (or stay) off HTTPS."""
    import requests

    where = response.headers.get("location") if response.is_redirect else None
    url = urljoin(response.url, where) if where else response.url
    if not url.startswith("https://"):
        raise requests.exceptions.InvalidURL(f"refusing a non-HTTPS address: {url}")


class _Capped:
    """A file that takes at most ``limit`` bytes: a server that sends more (or never stops) is cut off."""

    def __init__(self, out, limit: int | None) -> None:
        self.out, self.limit, self.written = out, limit, 0

    def write(self, chunk: bytes) -> None:
        self.written += len(chunk)
        if self.limit is not None and self.written > self.limit:
            raise ValueError(f"the server sent more than the {self.limit} bytes published")
        self.out.write(chunk)

    def flush(self) -> None:
        self.out.flush()


def _downloader(spec: RemoteFile, timeout: float):
    """pooch's HTTPS downloader, with what pooch leaves to its caller: HTTPS only, at most the file's size."""
    import pooch

    http = pooch.HTTPDownloader(
        progressbar=sys.stderr.isatty(), chunk_size=1 << 16, timeout=timeout, hooks={"response": _https_only}
    )

    def download(url: str, output_file: str, pooch_instance) -> None:
        with open(output_file, "wb") as out:
            http(url, _Capped(out, spec.size), pooch_instance)

    return download


def _remove_stale(staging: Path) -> None:
    """Delete the temporary files of downloads that were killed (nobody has written to them for a while)."""
    for tmp in staging.iterdir():
        try:
            if time.time() - tmp.lstat().st_mtime > STALE_AFTER_S:
                tmp.unlink()
        except OSError:  # gone already (another process cleaned it), or not ours to delete (a folder)
            pass


def _download(spec: RemoteFile, folder: Path) -> None:
    """Fetch ``spec`` into ``folder``, verified; FileNotFoundError naming the folder, the file and why not.

    Mirrors are tried in order, each once. Whatever happens, the staging folder is removed if empty, and so
    is ``folder`` if this call created it and it is still empty.
    """
    if not spec.downloadable:
        raise FileNotFoundError(
            f"MNIST file {spec.name} is not in {folder}, and minilib does not download it. "
            f"Put the file there, or point {ENV_VAR} at a folder that has it."
        )
    import pooch  # imported here, not with minilib: it brings requests, a tenth of a second to import
    import requests

    timeout = _timeout()
    created = not folder.exists()
    staging = folder / STAGING
    errors: list[str] = []
    try:
        staging.mkdir(parents=True, exist_ok=True)
        _remove_stale(staging)
        for url in (mirror + spec.name for mirror in MIRRORS):
            try:
                staged = pooch.retrieve(
                    url,
                    known_hash=f"sha256:{spec.sha256}" if spec.sha256 else f"md5:{spec.md5}",
                    fname=spec.name,
                    path=staging,
                    downloader=_downloader(spec, timeout),
                )
            except (ValueError, requests.RequestException) as e:  # this mirror's fault: try the next
                errors.append(f"{url}: {e}")  # (ValueError: pooch's hash check, or too many bytes)
                continue
            try:
                os.replace(staged, folder / spec.name)  # atomic on one filesystem: all or nothing
            except FileNotFoundError:  # another process downloading at once moved its copy into place
                if not (folder / spec.name).exists():
                    raise
            return
    except OSError as e:  # not the network's: the folder cannot be written (permissions, a file in the way)
        errors = [f"the folder could not be written ({e})"]
    finally:
        for empty in (staging, folder) if created else (staging,):
            try:
                empty.rmdir()
            except OSError:  # not empty, or never made
                pass
    raise FileNotFoundError(
        f"MNIST file {spec.name} is not in {folder} and could not be downloaded: {'; '.join(errors)}. "
        f"Put the file there, or point {ENV_VAR} at a folder that has it."
    )


def _fetch(name: str, folder: Path) -> bytes:
    """The verified bytes of MNIST file ``name`` in ``folder``, downloading it if it is missing."""
    spec = MNIST_FILES[name]
    file = folder / name
    if not file.exists():  # a FIFO or a directory exists, and is refused when read
        _download(spec, folder)
    return _read_verified(file, spec)


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
    return parse_idx(_read_bounded(file, UNPUBLISHED_SIZE_LIMIT), f"MNIST file {file.name} in {file.parent}")


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


# ------------------------------------------------------------------------------- the course's pickle


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The few globals a pickled numpy array needs, under every module name numpy 1.x and 2.x write."""
    try:  # numpy >= 2 (and the forward-compatible shims of 1.26)
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer
    except ImportError:  # pragma: no cover - older numpy
        from numpy.core.multiarray import _reconstruct
        from numpy.core.numeric import _frombuffer
    import _codecs

    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = _reconstruct  # protocols 0-4
        allowed[(f"{core}.numeric", "_frombuffer")] = _frombuffer  # protocol 5
    allowed[("_codecs", "encode")] = _codecs.encode  # how Python 3 writes raw bytes in protocol 2
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays (in tuples, lists, dicts, numbers and strings) and nothing else.

    Loading a pickle runs whatever callables it names (``os.system``, ``eval``, ...): every global
    outside the few that rebuild an ndarray is refused with ``pickle.UnpicklingError`` before it is
    looked up, so it is never imported, let alone called.
    """

    ALLOWED = _numpy_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are allowed"
            ) from None


def _check_array(a, shape_tail: tuple[int, ...], kind: str, where: str) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype == object or a.shape[1:] != shape_tail:
        raise ValueError(
            f"{where} does not hold MNIST as the course's pickle does: expected a numeric {kind} array "
            f"of shape [{', '.join(['N', *map(str, shape_tail)])}], "
            f"got {getattr(a, 'shape', type(a).__name__)}"
        )
    return a


def _load_pickle(data: bytes, where: str) -> tuple[torch.Tensor, ...]:
    """The course's ((x_train, y_train), (x_valid, y_valid), test) from verified pickle.gz bytes."""
    try:
        (x_train, y_train), (x_valid, y_valid), _ = RestrictedUnpickler(
            io.BytesIO(gzip.decompress(data)), encoding="latin1"
        ).load()
    except (TypeError, ValueError) as e:  # a different structure than three (x, y) pairs
        raise ValueError(f"{where} does not hold three (x, y) pairs as the course's pickle does: {e}") from e
    as_x = lambda a: torch.from_numpy(np.asarray(_check_array(a, (784,), "image", where), dtype=np.float32))  # noqa: E731
    as_y = lambda a: torch.from_numpy(np.asarray(_check_array(a, (), "label", where), dtype=np.int64))  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_valid), as_y(y_valid)


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
    have_idx = all(
        (folder / f"train-{k}-idx{d}-ubyte.gz").exists() for k, d in (("images", 3), ("labels", 1))
    )
    pkl = folder / "mnist.pkl.gz"
    if not have_idx and pkl.exists():
        # The checksum first, on the very bytes that are then unpickled: a pickle is never opened unverified.
        return _load_pickle(_read_verified(pkl, MNIST_FILES[pkl.name]), f"MNIST file {pkl.name} in {folder}")
    x, y = _load_idx_pair(folder, "train")
    return x[:50000], y[:50000], x[50000:], y[50000:]
