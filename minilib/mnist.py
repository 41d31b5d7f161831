"""Lesson 02's data: MNIST, found on disk or downloaded, and never returned unless verified.

Files are looked for in ``path``, else ``$MINILIB_DATA``, else ``~/.cache/minilib``. A file's bytes are
read once, checked against the published md5 (and sha256 where known) and only then parsed, from those
same bytes: nothing can change between the check and the use. A missing file is downloaded over HTTPS
into a temporary file in the same folder and renamed into place (``os.replace``, atomic on one
filesystem) only once it is whole and verified; a failed or interrupted download leaves nothing behind.

The course's ``mnist.pkl.gz`` (deeplearning.net's, 50,000/10,000/10,000) is accepted for the full
split. A pickle can run any code while it loads, so it is unpickled only after its md5 matches, and
then through `RestrictedUnpickler`, which admits numpy arrays and nothing else.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import pickle
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen  # looked up at call time, so tests can stand in a fake network

import numpy as np
import torch

__all__ = [
    "get_data",
    "data_dir",
    "MNIST_FILES",
    "ChecksumError",
    "RestrictedUnpickler",
    "read_idx",
    "parse_idx",
    "ENV_VAR",
]

ENV_VAR = "MINILIB_DATA"
DEFAULT_DIR = Path("~/.cache/minilib")
TIMEOUT_ENV_VAR = "MINILIB_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT_S = 10.0  # per socket operation; an unreachable host costs at most this per mirror


@dataclass(frozen=True)
class RemoteFile:
    """One published file: its name, size and checksums, and the HTTPS addresses it can be fetched from."""

    name: str
    size: int | None  # None: not published reliably, so only the checksums decide
    md5: str
    sha256: str | None
    urls: tuple[str, ...]


# Mirrors of the canonical files (yann.lecun.com no longer serves them reliably): the first is the one
# torchvision uses, the second TensorFlow's. Sizes and sums as published with the MNIST database.
_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)


def _idx(name: str, size: int, md5: str, sha256: str) -> RemoteFile:
    return RemoteFile(name, size, md5, sha256, tuple(m + name for m in _MIRRORS))


MNIST_FILES: dict[str, RemoteFile] = {
    f.name: f
    for f in (
        _idx(
            "train-images-idx3-ubyte.gz",
            9912422,
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        _idx(
            "train-labels-idx1-ubyte.gz",
            28881,
            "d53e105ee54ea40749a09fcbcd1e9432",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
        _idx(
            "t10k-images-idx3-ubyte.gz",
            1648877,
            "9fb629c4189551a2d022fa330f9573f3",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        _idx(
            "t10k-labels-idx1-ubyte.gz",
            4542,
            "ec29112dd5afa0611ce80d1b7f02629c",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
        # The course's pickle (deeplearning.net/data/mnist/mnist.pkl.gz). Its md5 is the one every
        # loader of that file checks; no sha256 or size was published with it (one loader expects
        # 16,168,813 bytes; not relied on). Read when on disk, never downloaded.
        RemoteFile("mnist.pkl.gz", None, "a02cd19f81d51c426d7ca14024243ce9", None, ()),
    )
}


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


def _read_verified(file: Path, spec: RemoteFile) -> bytes:
    """The bytes of ``file``, once they match ``spec``; ChecksumError naming the folder and file if not."""
    data = file.read_bytes()
    why = _mismatch(data, spec)
    if why is not None:
        raise ChecksumError(
            f"MNIST file {spec.name} in {file.parent} does not match its published checksum ({why}): "
            f"it is corrupt, truncated or a different file, and was not used. Delete it so it can be "
            f"downloaded again, or point {ENV_VAR} at a folder with the right file."
        )
    return data


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


def _fetch_bytes(url: str, spec: RemoteFile, out, timeout: float) -> None:
    """Stream ``url`` into ``out``; refuse anything but HTTPS, and never read past the published size."""
    if not url.startswith("https://"):
        raise OSError(f"refusing a non-HTTPS address: {url}")
    with urlopen(url, timeout=timeout) as response:
        final = response.geturl() if hasattr(response, "geturl") else url
        if final and not final.startswith("https://"):
            raise OSError(f"redirected to a non-HTTPS address: {final}")
        # One byte past the published size is enough to know the file is wrong; never read more.
        limit = spec.size + 1 if spec.size is not None else None
        written = 0
        while chunk := response.read(1 << 20 if limit is None else min(1 << 20, limit - written)):
            out.write(chunk)
            written += len(chunk)
            if limit is not None and written >= limit:
                break


class _Unwritable(Exception):
    """No temporary file can be made in the folder (kept apart from the download errors it would join)."""


def _download(spec: RemoteFile, folder: Path) -> bytes:
    """Fetch ``spec`` into ``folder`` and return its verified bytes.

    Each mirror streams into a fresh temporary file next to the destination; only bytes that match the
    published checksums are renamed into place. Whatever happens (no network, a bad mirror, Ctrl-C),
    the temporary file is removed, and so is the folder if this call created it and it is still empty.
    """
    dest = folder / spec.name
    if not spec.urls:
        raise FileNotFoundError(
            f"MNIST file {spec.name} is not in {folder}, and minilib does not download it. "
            f"Put the file there, or point {ENV_VAR} at a folder that has it."
        )
    timeout = _timeout()
    created = not folder.exists()
    errors: list[str] = []
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _Unwritable(e) from e
        for url in spec.urls:
            try:
                fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{spec.name}.", suffix=".part")
            except OSError as e:  # permissions, a read-only filesystem, a full disk: no use downloading
                raise _Unwritable(e) from e
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out:
                    _fetch_bytes(url, spec, out, timeout)
                data = tmp.read_bytes()
                why = _mismatch(data, spec)
                if why is not None:
                    errors.append(f"{url}: the downloaded bytes do not match the published checksum ({why})")
                    continue
                os.replace(tmp, dest)  # readers see no file or the whole verified file, never a part
                return data
            except (OSError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
                errors.append(f"{url}: {e}")
            finally:
                tmp.unlink(missing_ok=True)
    except _Unwritable as e:
        errors = [f"the folder is not writable ({e})"]
    finally:
        if created and folder.exists() and not any(folder.iterdir()):
            folder.rmdir()
    raise FileNotFoundError(
        f"MNIST file {spec.name} is not in {folder} and could not be downloaded: {'; '.join(errors)}. "
        f"Put the file there, or point {ENV_VAR} at a folder that has it."
    )


def _fetch(name: str, folder: Path) -> bytes:
    """The verified bytes of MNIST file ``name`` in ``folder``, downloading it if it is missing."""
    spec = MNIST_FILES[name]
    file = folder / name
    if not file.exists():
        return _download(spec, folder)
    return _read_verified(file, spec)


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
    return parse_idx(file.read_bytes(), f"MNIST file {file.name} in {file.parent}")


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
    downloaded there. FileNotFoundError (offline, unwritable folder) or ChecksumError (a file on disk
    is not the published one), each naming the folder, the file and ``MINILIB_DATA``.
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
