"""Writing result files so that a file either holds a complete result or does not exist.

Every file a command produces goes through `atomic_path`: the content is written to a temporary
name in the same folder and renamed over the destination only once it is complete. A kill, a full
disk or a read-only folder therefore never leaves a truncated file under a name that looks finished,
and the error names the file that could not be written.

    with atomic_path("runs/trace.parquet") as tmp:
        table.write(tmp)                         # any writer that takes a path
    write_text_atomic("runs/eval.jsonl", text)
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "check_writable", "ensure_parent", "write_bytes_atomic", "write_text_atomic"]


def _describe(error: OSError, action: str, path: Path) -> OSError:
    """The same kind of error, with a message naming what could not be done to which file."""
    message = f"cannot {action} {path}: {error.strerror or error}"
    return OSError(error.errno, message) if error.errno else OSError(message)


def ensure_parent(path) -> Path:
    """Create the folders above `path`; an `OSError` names the folder that could not be made."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _describe(e, "create the folder", path.parent) from e
    return path


def check_writable(path) -> Path:
    """Fail now, with an `OSError` naming `path`, if it could not be written later: its folders are
    created and a probe file is written next to it and removed. Commands call this before their
    work, so a read-only or missing output folder costs nothing."""
    path = ensure_parent(path)
    probe = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.probe")
    try:
        probe.write_bytes(b"")
    except OSError as e:
        raise _describe(e, "write", path) from e
    _remove(probe)
    return path


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary path next to `path`, renamed over `path` when the block ends without error.

    On any error the temporary file is removed and the error re-raised; an `OSError` (full disk,
    read-only folder, missing permissions) is re-raised with `path` in its message. The folders
    above `path` are created first.
    """
    path = ensure_parent(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise _describe(e, "write", path) from e
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # nothing more can be done; the name marks it as partial


def write_bytes_atomic(path, data: bytes, *, fsync: bool = False) -> Path:
    """Write `data` to `path` atomically (`fsync`: flush to the disk before the rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return path


def write_text_atomic(path, text: str, *, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically."""
    return write_bytes_atomic(path, text.encode(encoding))
