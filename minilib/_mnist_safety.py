"""What `minilib.mnist` does so that the MNIST bytes it parses can be trusted (the lessons need none of it).

Reading: only a regular file is read. A FIFO, a device or a directory under a data file's name is refused
before it is opened (a FIFO would block the read forever, ``/dev/zero`` would fill the memory). Never more
than one byte past the published size is read, and the bytes are checked against the published size, md5
and sha256 before they are parsed, from those same bytes: nothing can change between the check and the use.

Downloading: pooch (the fetcher of scipy and scikit-image) already streams a download into a temporary
file, checks its hash and only then renames it to its name; minilib does not repeat that. What pooch
leaves to its caller is added here: HTTPS only (redirects included), each network wait bounded by a
timeout, never more bytes than the published size, and a staging folder (``.download`` inside the data
folder) for pooch's temporary files, so that a download killed outright (SIGKILL, SIGTERM: no clean-up
runs) leaves its partial file there, never among the user's files or under a data file's name. The next
download deletes such a leftover once nobody has written to it for ten minutes, and the verified file is
renamed from the staging folder into place. A file already on disk is never handed to pooch (which would
overwrite one whose hash differs): it is read and verified here, and reported if wrong, not deleted.

Unpickling: a pickle can run any code while it loads, so the course's ``mnist.pkl.gz`` is unpickled only
after its checksum matches, and then through `RestrictedUnpickler`, which admits numpy arrays alone.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import numpy as np

ENV_VAR = "MINILIB_DATA"  # named in every error, so the user knows how to point minilib elsewhere
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


class ChecksumError(ValueError):
    """A file's bytes are not the ones published: corrupt, truncated, or a different file."""


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


def read_bounded(file: Path, limit: int = UNPUBLISHED_SIZE_LIMIT) -> bytes:
    """At most ``limit`` bytes of ``file``, which must be a regular file (links to one are followed)."""
    _refuse_unless_regular(os.stat(file).st_mode, file)  # before opening: opening a FIFO blocks
    # O_NONBLOCK: were a FIFO swapped in after the stat, opening it still returns at once; fstat refuses it.
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as f:
        _refuse_unless_regular(os.fstat(fd).st_mode, file)
        return f.read(limit)


def read_verified(file: Path, spec: RemoteFile) -> bytes:
    """The bytes of ``file``, once they match ``spec``; ChecksumError naming the folder and file if not."""
    # One byte past the published size is enough to know the file is wrong; never read more.
    data = read_bounded(file, (spec.size if spec.size is not None else UNPUBLISHED_SIZE_LIMIT) + 1)
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


def download(spec: RemoteFile, folder: Path, mirrors: tuple[str, ...]) -> None:
    """Fetch ``spec`` into ``folder``, verified; FileNotFoundError naming the folder, the file and why not.

    ``mirrors`` are tried in order, each once. Whatever happens, the staging folder is removed if empty,
    and so is ``folder`` if this call created it and it is still empty.
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
        for url in (mirror + spec.name for mirror in mirrors):
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


# ------------------------------------------------------------------------------------- unpickling


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
