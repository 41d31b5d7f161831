"""Lesson 02's data, made safe: where MNIST is found, how a download is checked, what is refused.

The notebook downloads ``mnist.pkl.gz`` and unpickles it. minilib reads the canonical IDX files (and
accepts the course's pickle), but never trusts bytes it has not checked: every file must match its
published size, md5 and sha256 before it is parsed; a download goes to a temporary file and is
renamed into place only once verified; a pickle is unpickled only after its checksum matches, and
then by an unpickler that admits numpy arrays alone, because loading a pickle can run any code.
Each test below builds its own broken input (a truncated gzip, a wrong magic number, a header that
lies, a corrupted download, a pickle that would run a command) and shows it is refused and that
nothing ran. No test touches the network: `urlopen` is replaced by a fake that serves (or spoils)
the real bytes from ``$MINILIB_DATA``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import pickle
import shlex
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

import minilib.mnist as mnist
from minilib.mnist import (
    MNIST_FILES,
    ChecksumError,
    RemoteFile,
    RestrictedUnpickler,
    data_dir,
    get_data,
    parse_idx,
    read_idx,
)
from minilib.testing import test_eq

pytestmark = pytest.mark.data

SAMPLE_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """No test reaches the internet: unless a test stands in its own fake, every download fails."""

    def offline(url, timeout=None):
        raise urllib.error.URLError("network disabled in minilib's tests")

    monkeypatch.setattr(mnist, "urlopen", offline)


@pytest.fixture(scope="module")
def published() -> dict[str, bytes]:
    """The two published sample files, byte for byte, from ``$MINILIB_DATA`` (skipped locally without)."""
    folder = data_dir()
    try:
        return {name: (folder / name).read_bytes() for name in SAMPLE_FILES}
    except FileNotFoundError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"MNIST sample not available: {e}")


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _idx_bytes(values: np.ndarray, magic_type: int = 0x08) -> bytes:
    """Gzip-compressed IDX: 00 00 <type> <ndim>, the sizes big-endian, then the uint8 values."""
    header = bytes([0, 0, magic_type, values.ndim]) + struct.pack(f">{values.ndim}I", *values.shape)
    return gzip.compress(header + values.astype(np.uint8).tobytes())


class FakeResponse(io.BytesIO):
    """What `urlopen` returns: a readable body, usable as a context manager, with its final address."""

    def __init__(
        self, body: bytes, url: str, fail_after: int | None = None, error: BaseException | None = None
    ):
        super().__init__(body)
        self.url, self.fail_after, self.error = url, fail_after, error

    def geturl(self) -> str:
        return self.url

    def read(self, n: int = -1) -> bytes:
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise self.error
        if self.fail_after is not None and n > 0:
            n = min(n, self.fail_after - self.tell())
        return super().read(n)


class FakeNetwork:
    """Serves ``bodies[file name]`` for any mirror's address, and records every request."""

    def __init__(self, bodies, **response_kwargs):
        self.bodies, self.response_kwargs, self.requests = bodies, response_kwargs, []

    def __call__(self, url, timeout=None):
        self.requests.append((url, timeout))
        body = self.bodies(url) if callable(self.bodies) else self.bodies[url.rsplit("/", 1)[-1]]
        return FakeResponse(body, url, **self.response_kwargs)


# ------------------------------------------------------------------------------------- the sample


def test_sample_is_8000_train_and_2000_valid_images_of_784_pixels_in_0_1(mnist_sample):
    """The 10,000 MNIST test images split in file order: float32 pixels scaled to [0, 1], int64 labels."""
    x_train, y_train, x_valid, y_valid = mnist_sample
    test_eq([tuple(t.shape) for t in mnist_sample], [(8000, 784), (8000,), (2000, 784), (2000,)])
    test_eq([t.dtype for t in mnist_sample], [torch.float32, torch.int64, torch.float32, torch.int64])
    for x in (x_train, x_valid):
        assert x.min() == 0.0 and x.max() == 1.0
    for y in (y_train, y_valid):
        test_eq(torch.unique(y), torch.arange(10))


def test_first_ten_sample_labels_are_7_2_1_0_4_1_4_9_5_9(mnist_sample):
    """The published test set's first labels, as every MNIST reader shows them: the file order is kept."""
    test_eq(mnist_sample[1][:10], torch.tensor([7, 2, 1, 0, 4, 1, 4, 9, 5, 9]))


def test_valid_split_is_the_last_2000_images_of_the_file(mnist_sample, published, tmp_path):
    """No shuffling: x_valid[0] is image 8,000 of the file, parsed independently here."""
    (tmp_path / "img.gz").write_bytes(published["t10k-images-idx3-ubyte.gz"])
    images = read_idx(tmp_path / "img.gz")
    test_eq(mnist_sample[2][0], torch.from_numpy(images[8000].reshape(-1).astype(np.float32) / 255))


# ------------------------------------------------------------------------------- where files are found


def test_folder_is_path_then_minilib_data_then_the_home_cache(monkeypatch, tmp_path):
    """``path`` wins; without it ``$MINILIB_DATA``; without that ``~/.cache/minilib``."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MINILIB_DATA", raising=False)
    assert data_dir() == tmp_path / "home" / ".cache" / "minilib"
    monkeypatch.setenv("MINILIB_DATA", str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env"
    assert data_dir(tmp_path / "arg") == tmp_path / "arg"


def test_get_data_path_takes_precedence_over_minilib_data(monkeypatch, published, tmp_path):
    """With MINILIB_DATA pointing at the real files, ``path=`` an empty folder still reads that folder
    (and fails, naming it); the other way round, ``path=`` the real files works whatever the variable says."""
    good = tmp_path / "good"
    good.mkdir()
    for name, body in published.items():
        (good / name).write_bytes(body)
    monkeypatch.setenv("MINILIB_DATA", str(good))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        get_data(tmp_path / "empty", sample=True)
    monkeypatch.setenv("MINILIB_DATA", str(tmp_path / "empty"))
    test_eq(get_data(good, sample=True)[1][:10], torch.tensor([7, 2, 1, 0, 4, 1, 4, 9, 5, 9]))


def test_a_wrong_argument_type_is_a_type_error():
    """A number for the folder, or a string for ``sample``, is a caller's mistake: say so by name at once
    rather than look for a folder called "3" or treat "yes" as true."""
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        get_data(3)
    with pytest.raises(TypeError, match="sample must be a bool"):
        get_data(sample="yes")


# ------------------------------------------------------------------------- broken files are refused


def test_truncated_gzip_is_refused_by_the_checksum_and_by_the_parser(published, tmp_path):
    """A download cut short is the commonest corruption. On disk it fails the checksum (its size is
    wrong) before anything parses it; the parser alone refuses it too, rather than returning fewer images."""
    body = published["t10k-labels-idx1-ubyte.gz"]
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(body[: len(body) // 2])
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(published["t10k-images-idx3-ubyte.gz"])
    with pytest.raises(ChecksumError, match=r"t10k-labels-idx1-ubyte.gz .*2271 bytes where 4542"):
        get_data(tmp_path, sample=True)
    with pytest.raises(ValueError, match="is not a whole gzip file"):
        parse_idx(body[: len(body) // 2])


def test_wrong_magic_number_is_refused():
    """An IDX file starts 00 00 08 <ndim> (08: unsigned bytes). Anything else is not MNIST."""
    with pytest.raises(ValueError, match="does not start with an IDX magic number .*got 00 00 0c 01"):
        parse_idx(_idx_bytes(np.zeros(10), magic_type=0x0C))
    with pytest.raises(ValueError, match="IDX magic number"):
        parse_idx(gzip.compress(b"PK\x03\x04 a zip, not an IDX file"))


@pytest.mark.parametrize("extra", [-1, +1])
def test_a_header_that_promises_another_size_is_refused(extra):
    """The header says how many values follow; one fewer or one more means the file is not what it says."""
    good = _idx_bytes(np.arange(12).reshape(3, 4))
    raw = gzip.decompress(good)
    raw = raw[:extra] if extra < 0 else raw + b"\x00"
    with pytest.raises(ValueError, match=r"header promises 12 values of shape \(3, 4\)"):
        parse_idx(gzip.compress(raw))
    test_eq(torch.from_numpy(parse_idx(good).astype(np.int64)), torch.arange(12).reshape(3, 4))


def test_a_changed_file_on_disk_fails_its_checksum_naming_folder_file_and_minilib_data(published, tmp_path):
    """One flipped byte: the file is refused (never parsed, never returned) and the error says where
    it is, which file, and how to point minilib elsewhere."""
    for name, body in published.items():
        (tmp_path / name).write_bytes(body)
    spoiled = bytearray(published["t10k-images-idx3-ubyte.gz"])
    spoiled[1000] ^= 0xFF
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(spoiled))
    with pytest.raises(ChecksumError) as e:
        get_data(tmp_path, sample=True)
    msg = str(e.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and str(tmp_path) in msg and "MINILIB_DATA" in msg
    assert "md5" in msg
    assert _files(tmp_path) == sorted(SAMPLE_FILES)  # the user's file is reported, not deleted


def test_a_well_formed_file_that_is_not_the_published_one_is_refused(published, tmp_path):
    """The parser would accept 10,000 zero labels; the checksum knows they are not MNIST's."""
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(published["t10k-images-idx3-ubyte.gz"])
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(_idx_bytes(np.zeros(10000)))
    assert parse_idx((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes()).shape == (10000,)
    with pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte.gz"):
        get_data(tmp_path, sample=True)


# ---------------------------------------------------------------------------- pickles that run code


class _RunsACommand:
    """A pickle's __reduce__ names any callable and its arguments; unpickling calls it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class _EvalsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _course_shaped(payload) -> tuple:
    x, y = np.zeros((2, 784), np.float32), np.zeros(2, np.int64)
    return ((x, y), (x, y), (payload, y))


def test_the_malicious_pickle_really_runs_code_when_loaded_naively(tmp_path):
    """Shows the payloads below are live: plain ``pickle.loads`` runs the command and creates the
    marker file. (Harmless here: it only touches a file in the test's own temporary folder.)"""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_RunsACommand(marker)))
    assert marker.exists()


@pytest.mark.parametrize("payload", [_RunsACommand, _EvalsCode])
def test_restricted_unpickler_refuses_any_callable_but_numpys_and_runs_nothing(payload, tmp_path):
    """``os.system`` and ``eval`` are globals a pickle must look up before calling; the unpickler
    refuses the lookup itself, so the command never runs."""
    marker = tmp_path / "ran"
    data = pickle.dumps(_course_shaped(payload(marker)), protocol=2)
    with pytest.raises(
        pickle.UnpicklingError, match=r"refusing to unpickle (posix\.system|__builtin__\.eval)"
    ):
        RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_loads_a_genuine_tuple_of_numpy_arrays(protocol):
    """What it admits is exactly what the course's file holds: tuples of float32 images and int64 labels,
    whatever pickle protocol wrote them."""
    x, y = np.random.default_rng(0).random((5, 784), dtype=np.float32), np.arange(5, dtype=np.int64)
    data = pickle.dumps(((x, y), (x[:2], y[:2]), (x[:1], y[:1])), protocol=protocol)
    (x1, y1), (x2, y2), (x3, y3) = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    assert x1.dtype == np.float32 and y1.dtype == np.int64
    np.testing.assert_array_equal(x1, x)
    np.testing.assert_array_equal(y2, y[:2])


def test_a_pickle_that_fails_its_checksum_is_never_unpickled(monkeypatch, tmp_path):
    """An unknown ``mnist.pkl.gz`` is refused on its checksum alone: the unpickler is not even
    created (a spy stands in for it), and the command inside never runs."""
    marker = tmp_path / "ran"
    (tmp_path / "mnist.pkl.gz").write_bytes(
        gzip.compress(pickle.dumps(_course_shaped(_RunsACommand(marker))))
    )
    created = []

    class Spy(RestrictedUnpickler):
        def __init__(self, *args, **kwargs):
            created.append(True)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(mnist, "RestrictedUnpickler", Spy)
    with pytest.raises(ChecksumError, match=r"mnist.pkl.gz .* does not match its published checksum"):
        get_data(tmp_path)
    assert created == [] and not marker.exists()


def _publish(monkeypatch, name: str, body: bytes) -> None:
    """Pretend ``body`` is the published ``name`` (its size and md5), as if the source were compromised."""
    spec = RemoteFile(name, len(body), hashlib.md5(body).hexdigest(), None, ())
    monkeypatch.setitem(MNIST_FILES, name, spec)


def test_even_a_pickle_with_a_matching_checksum_cannot_run_code(monkeypatch, tmp_path):
    """Defence in depth: were the published file itself malicious, its checksum would match, and the
    restricted unpickler would still refuse the command."""
    marker = tmp_path / "ran"
    body = gzip.compress(pickle.dumps(_course_shaped(_RunsACommand(marker))))
    (tmp_path / "mnist.pkl.gz").write_bytes(body)
    _publish(monkeypatch, "mnist.pkl.gz", body)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        get_data(tmp_path)
    assert not marker.exists()


def test_the_courses_pickle_is_read_for_the_full_split_once_verified(monkeypatch, tmp_path):
    """With no IDX training files, the course's ``((x_train, y_train), (x_valid, y_valid), test)``
    pickle is used (a small stand-in here, given a matching published checksum)."""
    x = np.random.default_rng(1).random((6, 784), dtype=np.float32)
    y = np.arange(6, dtype=np.int64)
    body = gzip.compress(pickle.dumps(((x[:4], y[:4]), (x[4:], y[4:]), (x[:1], y[:1])), protocol=2))
    (tmp_path / "mnist.pkl.gz").write_bytes(body)
    _publish(monkeypatch, "mnist.pkl.gz", body)
    x_train, y_train, x_valid, y_valid = get_data(tmp_path)
    test_eq(x_train, torch.from_numpy(x[:4]))
    test_eq(y_valid, torch.tensor([4, 5]))
    assert (x_train.dtype, y_train.dtype) == (torch.float32, torch.int64)


def test_a_verified_pickle_of_another_shape_is_refused(monkeypatch, tmp_path):
    """Admitting only numpy arrays is not enough: they must be [N, 784] images and [N] labels."""
    a = np.zeros((3, 5), np.float32)
    body = gzip.compress(pickle.dumps(((a, a), (a, a), (a, a))))
    (tmp_path / "mnist.pkl.gz").write_bytes(body)
    _publish(monkeypatch, "mnist.pkl.gz", body)
    with pytest.raises(ValueError, match=r"expected a numeric image array of shape \[N, 784\], got \(3, 5\)"):
        get_data(tmp_path)


# ------------------------------------------------------------------------------------------ downloads


def test_offline_fails_at_once_naming_folder_file_and_minilib_data(monkeypatch, tmp_path):
    """No network: one attempt per mirror, each bounded by the timeout (no retries, no waiting), then
    an error a user can act on. Nothing is left behind, not even the folder the attempt created."""
    calls = []

    def no_route(url, timeout=None):
        calls.append((url, timeout))
        raise urllib.error.URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(mnist, "urlopen", no_route)
    folder = tmp_path / "cache" / "minilib"
    with pytest.raises(FileNotFoundError) as e:
        get_data(folder, sample=True)
    msg = str(e.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and str(folder) in msg and "MINILIB_DATA" in msg
    assert "Name or service not known" in msg
    test_eq([url for url, _ in calls], list(MNIST_FILES["t10k-images-idx3-ubyte.gz"].urls))
    assert all(url.startswith("https://") for url, _ in calls)
    assert all(0 < timeout <= mnist.DEFAULT_TIMEOUT_S for _, timeout in calls)
    assert not folder.exists()


def test_download_timeout_comes_from_minilib_download_timeout(monkeypatch, tmp_path):
    """On a network that drops packets, each attempt waits at most this many seconds per operation."""
    net = FakeNetwork(lambda url: b"")
    monkeypatch.setattr(mnist, "urlopen", net)
    monkeypatch.setenv("MINILIB_DOWNLOAD_TIMEOUT", "2.5")
    with pytest.raises(FileNotFoundError):
        get_data(tmp_path, sample=True)
    assert {t for _, t in net.requests} == {2.5}
    monkeypatch.setenv("MINILIB_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="MINILIB_DOWNLOAD_TIMEOUT must be a positive number"):
        get_data(tmp_path, sample=True)


def test_a_good_download_is_verified_and_renamed_into_place(monkeypatch, published, mnist_sample, tmp_path):
    """The fake network serves the real bytes: both files land under their own names, match their
    published md5, no temporary file remains, and the data equal the sample read from MINILIB_DATA."""
    net = FakeNetwork(published)
    monkeypatch.setattr(mnist, "urlopen", net)
    data = get_data(tmp_path / "new", sample=True)
    assert _files(tmp_path / "new") == sorted(SAMPLE_FILES)
    for name in SAMPLE_FILES:
        assert hashlib.md5((tmp_path / "new" / name).read_bytes()).hexdigest() == MNIST_FILES[name].md5
    for got, want in zip(data, mnist_sample, strict=True):
        test_eq(got, want)
    assert len(net.requests) == 2  # one per file: the first mirror answered
    get_data(tmp_path / "new", sample=True)
    assert len(net.requests) == 2  # and once on disk, never fetched again


def test_a_corrupted_download_leaves_no_file_not_even_the_partial_one(monkeypatch, published, tmp_path):
    """Every mirror serves a spoiled copy: the bytes fail the checksum, the temporary file is deleted,
    nothing is renamed into place, and the error says why."""

    def spoiled(url):
        body = bytearray(published[url.rsplit("/", 1)[-1]])
        body[-100] ^= 0x01
        return bytes(body)

    monkeypatch.setattr(mnist, "urlopen", FakeNetwork(spoiled))
    (tmp_path / "keep.txt").write_text("the user's own file")
    with pytest.raises(FileNotFoundError, match="do not match the published checksum") as e:
        get_data(tmp_path, sample=True)
    assert "t10k-images-idx3-ubyte.gz" in str(e.value) and "MINILIB_DATA" in str(e.value)
    assert _files(tmp_path) == ["keep.txt"]


@pytest.mark.parametrize(
    "error", [ConnectionResetError("connection reset by peer"), http.client.IncompleteRead(b"", 1000)]
)
def test_a_download_cut_off_midway_leaves_no_file(monkeypatch, published, tmp_path, error):
    """The connection drops after 100 kB: the half-written temporary file is removed."""
    monkeypatch.setattr(mnist, "urlopen", FakeNetwork(published, fail_after=100_000, error=error))
    with pytest.raises(FileNotFoundError, match="could not be downloaded"):
        get_data(tmp_path, sample=True)
    assert _files(tmp_path) == []


def test_an_interrupted_download_leaves_no_file(monkeypatch, published, tmp_path):
    """Ctrl-C in the middle of a download: the interrupt goes through, and the partial file does not stay."""
    monkeypatch.setattr(
        mnist, "urlopen", FakeNetwork(published, fail_after=100_000, error=KeyboardInterrupt())
    )
    with pytest.raises(KeyboardInterrupt):
        get_data(tmp_path, sample=True)
    assert _files(tmp_path) == []


def test_a_bad_first_mirror_falls_back_to_the_next(monkeypatch, published, tmp_path):
    """Mirrors are tried in order; a wrong answer from the first is discarded, the second's is kept."""

    def first_mirror_lies(url):
        name = url.rsplit("/", 1)[-1]
        return b"<html>moved</html>" if url == MNIST_FILES[name].urls[0] else published[name]

    net = FakeNetwork(first_mirror_lies)
    monkeypatch.setattr(mnist, "urlopen", net)
    test_eq(get_data(tmp_path, sample=True)[1][:3], torch.tensor([7, 2, 1]))
    assert len(net.requests) == 4 and _files(tmp_path) == sorted(SAMPLE_FILES)


def test_a_download_is_never_read_past_its_published_size(monkeypatch, published, tmp_path):
    """A server that sends too much (or never stops) is cut off one byte past the published size."""
    endless = published["t10k-labels-idx1-ubyte.gz"] + b"\x00" * 10_000_000
    served = []

    class Counting(FakeResponse):
        def read(self, n=-1):
            chunk = super().read(n)
            served.append(len(chunk))
            return chunk

    monkeypatch.setattr(mnist, "urlopen", lambda url, timeout=None: Counting(endless, url))
    with pytest.raises(FileNotFoundError, match="4543 bytes where 4542 were published"):
        mnist._download(MNIST_FILES["t10k-labels-idx1-ubyte.gz"], tmp_path)
    assert sum(served) == 2 * 4543  # two mirrors, each read one byte past the size and no further
    assert _files(tmp_path) == []


def test_a_redirect_away_from_https_is_refused(monkeypatch, published, tmp_path):
    """Downloads are HTTPS only, including where a redirect ends."""

    def downgrade(url, timeout=None):
        return FakeResponse(published[url.rsplit("/", 1)[-1]], url.replace("https://", "http://"))

    monkeypatch.setattr(mnist, "urlopen", downgrade)
    with pytest.raises(FileNotFoundError, match="redirected to a non-HTTPS address"):
        get_data(tmp_path, sample=True)
    assert _files(tmp_path) == []


def test_an_unwritable_folder_is_reported_without_touching_the_network(monkeypatch, tmp_path):
    """Nowhere to put the file: say so, and do not download what could not be kept. (The folder is
    made unwritable by refusing the temporary file, since root, as in CI containers, ignores modes.)"""
    net = FakeNetwork(lambda url: b"")
    monkeypatch.setattr(mnist, "urlopen", net)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(mnist.tempfile, "mkstemp", denied)
    with pytest.raises(
        FileNotFoundError, match=r"t10k-images-idx3-ubyte.gz .*the folder is not writable"
    ) as e:
        get_data(tmp_path, sample=True)
    assert "MINILIB_DATA" in str(e.value)
    assert net.requests == []
