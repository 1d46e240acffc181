"""Checkpoints: atomic writes, safe loads.

A checkpoint is a dict of tensors, numbers, strings and containers of them, so that
``torch.load(..., weights_only=True)`` can read it (no pickled code runs on load).
Writes go to a temporary file in the same directory, then ``os.replace``: a crash never
leaves a truncated checkpoint behind, and a write that fails (a full disk, a read-only
folder, a file-size limit) leaves the previous checkpoint as it was and raises
:class:`CheckpointWriteError` naming the path and the cause.
"""

from __future__ import annotations

import errno
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Union

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointWriteError"]

PathLike = Union[str, os.PathLike]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one at :attr:`path` (if any) is
    intact. Keeps the cause's ``errno`` (``errno.ENOSPC`` for a full disk)."""

    def __init__(self, path: Path, cause: OSError):
        reason = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(cause.errno, reason)
        self.path = Path(path)
        self.cause = cause

    def __str__(self) -> str:
        code = f" [{errno.errorcode.get(self.errno, self.errno)}]" if self.errno else ""
        kept = ("the previous checkpoint there is intact" if self.path.is_file()
                else "no earlier checkpoint was there")
        return (f"could not write the checkpoint {self.path}: {self.strerror}{code}; {kept}. "
                "Free space or choose another folder, then resume from the last checkpoint")


def save_checkpoint(state: Dict[str, Any], path: PathLike) -> Path:
    """Write ``state`` to ``path`` atomically: a temp file in the same folder, fsynced, then
    ``os.replace`` and an fsync of the folder (so the rename itself survives a crash).
    Temp files that an interrupted earlier write left beside ``path`` are removed.

    The state is serialized in memory first, so that a failing write surfaces as the
    operating system's error rather than as torch's serializer's.

    :raises CheckpointWriteError: (an ``OSError``) when the folder cannot be made or the
        file cannot be written or renamed; the temp file is removed and an existing
        checkpoint at ``path`` is left untouched.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(err, OSError):
            raise CheckpointWriteError(path, err) from err
        raise
    _fsync_dir(path.parent)
    for orphan in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            orphan.unlink()
        except OSError:  # another writer's file in flight, or already gone
            pass
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: the entries :func:`pyro_bmaml.meta.training.fit` writes
REQUIRED_KEYS = ("learner", "iteration", "history")


def load_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Load a checkpoint with ``torch.load(..., weights_only=True)`` (no pickled code runs).

    :raises FileNotFoundError: if there is no such file.
    :raises ValueError: "not a valid pyro_bmaml checkpoint: PATH (reason)" for a truncated or
        foreign file, or one without the entries ``fit`` writes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, random bytes, pickled code, not a torch file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in reason or "Weights only" in reason:
            reason = "it holds objects other than tensors and plain data"
        raise ValueError(f"not a valid pyro_bmaml checkpoint: {path} ({reason[:200]})") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not a valid pyro_bmaml checkpoint: {path} (expected the entries "
                         f"{list(REQUIRED_KEYS)}, found {found})")
    return state
