"""Beyond the lessons: the checkpoint FILE, for ``minilib.checkpoint``: atomic writes, their temporary files,
and safe reads (``torch.load(weights_only=True)``, a format check). The training state that goes in it, and
when it is saved and resumed, is ``minilib.checkpoint``'s story; this is the disk's.
"""

from __future__ import annotations

import os
import re
import secrets
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "read_checkpoint", "temp_files", "FORMAT"]

#: What a minilib checkpoint says it is: a file saved by another format version is refused, not misread.
FORMAT = "minilib.checkpoint/1"
_TEMP_RANDOM = re.compile(r"[0-9a-f]{16}")


def temp_files(path: str | os.PathLike) -> list[Path]:
    """The temporary files of saves to ``path`` that are lying beside it: ``.<name>.<16 hex>.tmp``.

    Exactly that pattern: ``.ckpt.pt.x.<hex>.tmp`` belongs to a checkpoint named ``ckpt.pt.x``, not ours.
    """
    path = Path(path)
    prefix, found = f".{path.name}.", []
    with os.scandir(path.parent) as entries:
        for e in entries:
            middle = e.name[len(prefix) : -len(".tmp")]
            ours = e.name.startswith(prefix) and e.name.endswith(".tmp") and _TEMP_RANDOM.fullmatch(middle)
            if ours and not e.is_dir(follow_symlinks=False):  # a save writes files; a folder is someone's
                found.append(Path(e.path))
    return sorted(found)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); Windows cannot open a folder, and needs no such step."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` so that ``path`` is never seen partly written, whenever the process dies.

    Removes the temporary files earlier saves to ``path`` left behind (a process killed while writing),
    writes a new one beside ``path``, flushes and fsyncs it, renames it over ``path`` and fsyncs the folder.
    One writer per path: a second process saving to the same path at the same time could lose its
    temporary file to this cleaning.
    """
    path = Path(path)
    for stale in temp_files(path):
        with suppress(FileNotFoundError):
            stale.unlink()
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_folder(path.parent)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path``, read with ``torch.load(weights_only=True)`` onto the CPU.

    A file that is truncated, corrupt, holds something ``weights_only`` refuses (code), or is not a
    minilib checkpoint of this format: ValueError naming the path.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and weights_only errors have no common type
        raise ValueError(
            f"CheckpointCallback: {os.fspath(path)} is not a checkpoint that can be read safely "
            f"(torch.load(weights_only=True) failed: {type(e).__name__}: {e})"
        ) from e
    keys = {"format", "position", "model", "optimizer", "world_size", "ranks"}
    if not (isinstance(ckpt, dict) and ckpt.get("format") == FORMAT and keys <= ckpt.keys()):
        got = f"format {ckpt.get('format')!r}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"CheckpointCallback: {os.fspath(path)} is not a {FORMAT} checkpoint (it holds {got})"
        )
    return ckpt
