"""Lesson 02's data, made safe: where MNIST is found, how a download is checked, what is refused.

The notebook downloads ``mnist.pkl.gz`` and unpickles it. minilib reads the canonical IDX files (and
accepts the course's pickle), but never trusts bytes it has not checked: every file must be a regular
file and match its published size, md5 and sha256 before it is parsed; a download (by pooch) goes to a
temporary file and is renamed into place only once verified; a pickle is unpickled only after its
checksum matches, and then by an unpickler that admits numpy arrays alone, because loading a pickle can
run any code. Each test below builds its own broken input (a truncated gzip, a wrong magic number, a
header that lies, a FIFO under a data file's name, a corrupted or endless download, a pickle that would
run a command) and shows it is refused and that nothing ran. No test touches the internet: the mirrors
are HTTPS servers on 127.0.0.1 with a certificate authority of the tests' own (trustme), serving (or
spoiling) the real bytes from ``$MINILIB_DATA``; everything that waits is bounded.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shlex
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import trustme

import minilib._mnist_safety as safety
import minilib.mnist as mnist
from minilib._mnist_safety import RemoteFile
from minilib.mnist import (
    MNIST_FILES,
    ChecksumError,
    RestrictedUnpickler,
    data_dir,
    get_data,
    parse_idx,
    read_idx,
)
from minilib.testing import test_eq

pytestmark = pytest.mark.data

SAMPLE_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
BOUND_S = 20.0  # the longest any test here waits for anything; a hang fails instead of stalling the suite


def _closed_port() -> int:
    """A local port nothing listens on: connecting to it is refused at once, as when offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """No test reaches the internet: unless a test stands in its own mirror, every download is refused."""
    monkeypatch.setattr(mnist, "MIRRORS", (f"https://127.0.0.1:{_closed_port()}/mnist/",))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy configured on the machine must not see these


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


def _within(seconds: float, fn: Callable[[], object]) -> object:
    """``fn()``'s result (or its exception), or a test failure if it has not returned after ``seconds``."""
    outcome: dict[str, object] = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as e:  # handed to the test below
            outcome["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        pytest.fail(f"still running after {seconds} s: it hangs")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


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
    spec = RemoteFile(name, len(body), hashlib.md5(body).hexdigest(), None, downloadable=False)
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


# ----------------------------------------------------------------- what is not a file is never read


def test_a_fifo_under_a_data_files_name_is_refused_without_blocking(published, tmp_path):
    """Opening a FIFO for reading waits for a writer that never comes, so reading it would hang forever.
    It is refused on its kind (a stat, before any open), naming the file and MINILIB_DATA."""
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(published["t10k-images-idx3-ubyte.gz"])
    fifo = tmp_path / "t10k-labels-idx1-ubyte.gz"
    os.mkfifo(fifo)
    try:
        with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte.gz in .* is a FIFO.*MINILIB_DATA"):
            _within(BOUND_S, lambda: get_data(tmp_path, sample=True))
    finally:  # were a reader stuck in open(), this lets it go, so that no thread outlives the test
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader: nothing is stuck
            pass


def test_a_link_to_dev_zero_is_refused_before_a_byte_is_read(published, tmp_path):
    """/dev/zero never ends: read whole, it fills the memory. The link is followed to a character device,
    which is not a regular file, so nothing is read."""
    (tmp_path / "t10k-images-idx3-ubyte.gz").symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz in .* is a character device"):
        _within(BOUND_S, lambda: get_data(tmp_path, sample=True))


def test_a_directory_under_a_data_files_name_is_refused_by_name(tmp_path):
    """A folder where the file should be: an error naming it and MINILIB_DATA, not a bare
    IsADirectoryError."""
    (tmp_path / "t10k-images-idx3-ubyte.gz").mkdir()
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz in .* is a directory.*MINILIB_DATA"):
        get_data(tmp_path, sample=True)


def test_a_huge_file_is_read_only_one_byte_past_its_published_size(published, tmp_path):
    """A 1 GiB file (sparse: it costs no disk) under a 4,542-byte name: 4,543 bytes are read, which is
    enough to know it is not the published file."""
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(published["t10k-images-idx3-ubyte.gz"])
    with open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.truncate(2**30)
    with pytest.raises(ChecksumError, match="4543 bytes where 4542 were published"):
        get_data(tmp_path, sample=True)


# ------------------------------------------------------------------------------------------ downloads


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> tuple[Path, ssl.SSLContext]:
    """A certificate authority of the tests' own: its PEM bundle (for requests) and a server context for
    127.0.0.1 signed by it, so the fake mirrors speak real HTTPS."""
    ca = trustme.CA()
    bundle = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return bundle, context


Respond = Callable[[BaseHTTPRequestHandler, str], None]


class Mirror:
    """A web server on 127.0.0.1 (HTTPS given a context): ``respond(handler, path)`` answers each GET,
    and ``requests`` records every path asked for."""

    def __init__(self, respond: Respond, context: ssl.SSLContext | None = None):
        self.requests: list[str] = []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                mirror.requests.append(self.path)
                try:
                    respond(self, self.path)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass  # the client hung up, as it should when a download goes wrong

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if context is not None:
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if context is not None else "http"
        self.base = f"{scheme}://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve(tls, monkeypatch):
    """``serve(respond, mirrors=("a",))`` starts an HTTPS mirror and makes minilib use it: each name in
    ``mirrors`` becomes one mirror address, ``https://127.0.0.1:port/<name>/``, tried in that order."""
    bundle, context = tls
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    started: list[Mirror] = []

    def start(respond: Respond, mirrors=("a",)) -> Mirror:
        mirror = Mirror(respond, context)
        started.append(mirror)
        monkeypatch.setattr(mnist, "MIRRORS", tuple(f"{mirror.base}/{m}/" for m in mirrors))
        return mirror

    yield start
    for mirror in started:
        mirror.close()


def _send(h: BaseHTTPRequestHandler, body: bytes, status: int = 200, length: int | None = None) -> None:
    h.send_response(status)
    h.send_header("Content-Length", str(len(body) if length is None else length))
    h.end_headers()
    h.wfile.write(body)


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def test_offline_fails_at_once_naming_folder_file_and_minilib_data(tmp_path):
    """No network (every mirror refuses the connection): one attempt per mirror, no retries, no waiting,
    then an error a user can act on. Nothing is left behind, not even the folder the attempt created."""
    folder = tmp_path / "cache" / "minilib"
    with pytest.raises(FileNotFoundError) as e:
        _within(BOUND_S, lambda: get_data(folder, sample=True))
    msg = str(e.value)
    assert "t10k-images-idx3-ubyte.gz" in msg and str(folder) in msg and "MINILIB_DATA" in msg
    assert "Connection refused" in msg and mnist.MIRRORS[0] in msg
    assert not folder.exists()


def test_each_network_wait_is_bounded_by_minilib_download_timeout(serve, tmp_path, monkeypatch):
    """A mirror that accepts the connection and then says nothing: the download gives up after
    MINILIB_DOWNLOAD_TIMEOUT seconds instead of waiting for ever. A timeout that is not a positive
    number is refused by name."""
    release = threading.Event()
    mirror = serve(lambda h, path: release.wait(BOUND_S))
    monkeypatch.setenv("MINILIB_DOWNLOAD_TIMEOUT", "0.5")
    try:
        with pytest.raises(FileNotFoundError, match="timed out"):
            _within(BOUND_S / 2, lambda: get_data(tmp_path, sample=True))
    finally:
        release.set()
    assert len(mirror.requests) == 1 and _files(tmp_path) == []
    monkeypatch.setenv("MINILIB_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="MINILIB_DOWNLOAD_TIMEOUT must be a positive number"):
        get_data(tmp_path, sample=True)


def test_a_good_download_is_verified_and_renamed_into_place(serve, published, mnist_sample, tmp_path):
    """The mirror serves the real bytes: both files land under their own names, match their published
    md5, no temporary file or staging folder remains, and the data equal the sample read from MINILIB_DATA."""
    mirror = serve(lambda h, path: _send(h, published[_name(path)]))
    data = get_data(tmp_path / "new", sample=True)
    assert _files(tmp_path / "new") == sorted(SAMPLE_FILES)
    for name in SAMPLE_FILES:
        assert hashlib.md5((tmp_path / "new" / name).read_bytes()).hexdigest() == MNIST_FILES[name].md5
    for got, want in zip(data, mnist_sample, strict=True):
        test_eq(got, want)
    assert len(mirror.requests) == 2  # one per file: the first mirror answered
    get_data(tmp_path / "new", sample=True)
    assert len(mirror.requests) == 2  # and once on disk, never fetched again


def test_a_corrupted_download_leaves_no_file_not_even_the_partial_one(serve, published, tmp_path):
    """Every mirror serves a spoiled copy: the bytes fail the hash check, the temporary file is deleted,
    nothing is renamed into place, and the error says why."""

    def spoiled(h, path):
        body = bytearray(published[_name(path)])
        body[-100] ^= 0x01
        _send(h, bytes(body))

    serve(spoiled, mirrors=("a", "b"))
    (tmp_path / "keep.txt").write_text("the user's own file")
    with pytest.raises(FileNotFoundError, match="does not match the known hash") as e:
        get_data(tmp_path, sample=True)
    assert "t10k-images-idx3-ubyte.gz" in str(e.value) and "MINILIB_DATA" in str(e.value)
    assert _files(tmp_path) == ["keep.txt"]


def test_a_download_cut_off_midway_leaves_no_file(serve, published, tmp_path):
    """The server promises the whole file and hangs up after 100 kB: the half-written temporary file is
    removed, and nothing takes the file's name."""
    serve(lambda h, path: _send(h, published[_name(path)][:100_000], length=len(published[_name(path)])))
    with pytest.raises(FileNotFoundError, match="could not be downloaded"):
        get_data(tmp_path, sample=True)
    assert _files(tmp_path) == []


def test_an_interrupted_download_leaves_no_file(serve, published, tmp_path, monkeypatch):
    """Ctrl-C in the middle of a download: the interrupt goes through, and the partial file does not stay."""

    class InterruptedAfter100kB(safety._Capped):
        def write(self, chunk):
            if self.written >= 100_000:
                raise KeyboardInterrupt
            super().write(chunk)

    monkeypatch.setattr(safety, "_Capped", InterruptedAfter100kB)
    serve(lambda h, path: _send(h, published[_name(path)]))
    with pytest.raises(KeyboardInterrupt):
        get_data(tmp_path, sample=True)
    assert _files(tmp_path) == []


_KILLED_DOWNLOAD = """
import sys
import minilib._mnist_safety as safety
import minilib.mnist as mnist
mnist.MIRRORS = (sys.argv[1],)
mnist.get_data(sys.argv[2], sample=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_download_leaves_nothing_that_is_taken_for_data(serve, tls, published, tmp_path, sig):
    """A download killed outright runs no clean-up. What it leaves is a temporary file in the staging
    folder, never a file under a data file's name: the next call downloads the file again, and the next
    download deletes the leftover once nobody has written to it for ten minutes."""
    killed = threading.Event()

    def half_then_stall(h, path):
        body = published[_name(path)]
        if killed.is_set():  # from then on, the mirror serves whole files
            return _send(h, body)
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body[:200_000])
        h.wfile.flush()
        killed.wait(BOUND_S)  # until the client is killed (or the test gives up)

    serve(half_then_stall)
    env = dict(os.environ, REQUESTS_CA_BUNDLE=str(tls[0]), NO_PROXY="127.0.0.1")
    cmd = [sys.executable, "-c", _KILLED_DOWNLOAD, mnist.MIRRORS[0], str(tmp_path)]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = tmp_path / safety.STAGING
    try:
        deadline = time.monotonic() + 2 * BOUND_S  # the child imports torch first
        while not (staging.exists() and any(p.stat().st_size >= 100_000 for p in staging.iterdir())):
            assert child.poll() is None and time.monotonic() < deadline, "the download never started"
            time.sleep(0.05)
        child.send_signal(sig)
        child.wait(BOUND_S)
    finally:
        child.kill()
        killed.set()
    leftover = _files(staging)
    assert _files(tmp_path) == [safety.STAGING] and len(leftover) == 1
    assert leftover[0] not in MNIST_FILES

    test_eq(get_data(tmp_path, sample=True)[1][:3], torch.tensor([7, 2, 1]))
    assert _files(staging) == leftover  # a fresh leftover is left alone: it may be a live download's

    an_hour_ago = time.time() - 3600
    os.utime(staging / leftover[0], (an_hour_ago, an_hour_ago))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()  # so that the next call downloads
    get_data(tmp_path, sample=True)
    assert _files(tmp_path) == sorted(SAMPLE_FILES)  # the stale leftover and the staging folder are gone


def test_a_download_another_process_finished_first_is_not_an_error(serve, published, tmp_path, monkeypatch):
    """Two processes fetching into one folder at once (say, test workers sharing ~/.cache/minilib): when
    the other one has already moved the verified file into place, this one finds nothing left to move,
    and reads the file that is there."""
    real_replace = os.replace

    def the_other_was_faster(src, dst):
        real_replace(src, dst)  # the other process's copy lands...
        raise FileNotFoundError(2, "No such file or directory", str(src))  # ...and ours is gone

    monkeypatch.setattr(safety.os, "replace", the_other_was_faster)
    serve(lambda h, path: _send(h, published[_name(path)]))
    test_eq(get_data(tmp_path, sample=True)[1][:3], torch.tensor([7, 2, 1]))
    assert _files(tmp_path) == sorted(SAMPLE_FILES)


def test_a_bad_first_mirror_falls_back_to_the_next(serve, published, tmp_path):
    """Mirrors are tried in order; a wrong answer from the first is discarded, the second's is kept."""

    def first_mirror_lies(h, path):
        _send(h, b"<html>moved</html>" if path.startswith("/a/") else published[_name(path)])

    mirror = serve(first_mirror_lies, mirrors=("a", "b"))
    test_eq(get_data(tmp_path, sample=True)[1][:3], torch.tensor([7, 2, 1]))
    assert len(mirror.requests) == 4 and _files(tmp_path) == sorted(SAMPLE_FILES)


def test_a_download_is_never_read_past_its_published_size(serve, published, tmp_path):
    """A server that never stops sending is cut off just past the published size: the client hangs up
    (the server sees its connection closed long before the 100 MB it was ready to send)."""
    hung_up = []

    def endless(h, path):
        body = published[_name(path)]
        h.send_response(200)
        h.end_headers()  # no Content-Length: the body ends when the server closes, here never
        h.wfile.write(body)
        try:
            for _ in range(100 * 16):
                h.wfile.write(b"\0" * 2**16)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            hung_up.append(path)

    serve(endless, mirrors=("a", "b"))
    with pytest.raises(FileNotFoundError, match="the server sent more than the 4542 bytes published"):
        _within(
            BOUND_S,
            lambda: safety.download(MNIST_FILES["t10k-labels-idx1-ubyte.gz"], tmp_path, mnist.MIRRORS),
        )
    deadline = time.monotonic() + BOUND_S
    while len(hung_up) < 2 and time.monotonic() < deadline:  # the server threads notice the hang-up
        time.sleep(0.01)
    assert len(hung_up) == 2  # both mirrors, each cut off
    assert _files(tmp_path) == []


def test_a_redirect_away_from_https_is_refused(serve, published, tmp_path):
    """Downloads are HTTPS only, including where a redirect leads: the plain-HTTP copy is never asked for."""
    plain = Mirror(lambda h, path: _send(h, published[_name(path)]))  # no TLS context: plain HTTP
    try:

        def downgrade(h, path):
            h.send_response(302)
            h.send_header("Location", f"{plain.base}{path}")
            h.end_headers()

        serve(downgrade)
        with pytest.raises(FileNotFoundError, match="refusing a non-HTTPS address: http://"):
            get_data(tmp_path, sample=True)
    finally:
        plain.close()
    assert plain.requests == [] and _files(tmp_path) == []


def test_an_unwritable_folder_is_reported_without_touching_the_network(serve, tmp_path):
    """Nowhere to put the file (here the folder would have to be made inside a regular file; modes are no
    use since root, as in CI containers, ignores them): say so, and do not download what could not be kept."""
    mirror = serve(lambda h, path: _send(h, b""))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte.gz .*could not be written") as e:
        get_data(tmp_path / "a-file" / "mnist", sample=True)
    assert "MINILIB_DATA" in str(e.value)
    assert mirror.requests == []
