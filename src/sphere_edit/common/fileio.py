"""Atomic writes (a temporary file in the same folder, fsync, then rename) and a lock file
for caches that several processes may fill at once; one reader of JSON/JSONL record files."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .faults import fault_point


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        # mkstemp creates the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        fault_point("atomic-rename")
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    with atomic_path(path) as tmp:
        writer(tmp)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block: a
    second process filling the same cache entry waits, then finds it filled. The lock
    goes with the process, so a killed holder never leaves it stuck."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (dtype and shape are checked separately)."""
    data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


RUN_LOCK = ".sphere-edit.lock"


class RunLockedError(ValueError):
    """Another live process holds a run directory's lock."""


@contextmanager
def run_lock(run_dir: str | Path, option: str = "--out") -> Iterator[None]:
    """Hold the lock of a run directory for the block, or refuse at once naming the
    holder's PID. ``fcntl.flock`` on :data:`RUN_LOCK` inside the folder: the OS drops it
    when its holder dies, so a killed writer never leaves the folder locked. A folder this
    call created and that holds nothing but the lock file when the block ends (a run
    refused before it wrote anything) is removed again."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"{option}: {run_dir} is a file; give a directory")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / RUN_LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunLockedError(
                    f"{option}: {run_dir} is in use by another sphere-edit process (PID "
                    f"{holder}); wait for it to finish or choose another directory"
                ) from None
            # A holder that finished may have removed the file we opened: lock the new one.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
    except PermissionError as error:
        raise PermissionError(f"{option}: cannot write in {run_dir} ({error.strerror})") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        if created and [p.name for p in run_dir.iterdir()] == [RUN_LOCK]:
            path.unlink()
            run_dir.rmdir()
        os.close(fd)


def run_dir_entries(run_dir: str | Path) -> list[str]:
    """The names in a run directory other than its lock file (none when it is absent)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name != RUN_LOCK)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path`` in one
    rename, so a failed write (a full disk) leaves no half-written folder. ``path`` must
    be absent or an empty folder. Files get the modes a plain ``open()`` would give."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        mask = _umask()
        # mkdtemp makes the folder private, and some writers make their files private too.
        os.chmod(tmp, 0o777 & ~mask)
        for item in tmp.rglob("*"):
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)
        fault_point("atomic-rename")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# -- record files ----------------------------------------------------------------------------

_FORMATS = "a JSON array, a JSON object or one JSON value per line (JSONL)"


class RecordsError(ValueError):
    """A record file that cannot be read, is not UTF-8 or is not JSON/JSONL.

    ``str(error)`` is the whole one-line message, naming the file and, for a JSON error,
    the line (counted from 1); ``reason`` is the same without the leading file name, for
    callers whose own errors add it. ``unreadable`` tells a file that could not be read at
    all (missing, a folder, no permission) from one whose content is wrong.
    """

    def __init__(
        self,
        reason: str,
        *,
        path: Path,
        what: str,
        line: int | None = None,
        unreadable: bool = False,
    ) -> None:
        lead = f"cannot read {what} {path}: " if unreadable else f"{what} {path}: "
        super().__init__(lead + reason)
        self.reason = reason
        self.path = path
        self.line = line
        self.unreadable = unreadable


def read_located_records(path: str | Path, *, what: str = "file") -> list[tuple[int, Any]]:
    """The records of ``path`` with the line each starts on (counted from 1).

    Accepted, as UTF-8 (a leading byte-order mark is ignored):

    * a JSON array: its elements, each given the line the array starts on;
    * a single JSON object (on one line or several): that object alone;
    * JSONL: one JSON value per line, blank lines skipped. Lines end at ``"\\n"`` only
      (a ``"\\r"`` before it is whitespace), so a raw U+2028 or U+2029 inside a string,
      valid JSON, does not split a record as :meth:`str.splitlines` would.

    An empty file (whitespace only) and invalid JSON raise :class:`RecordsError`, naming
    ``what`` (e.g. ``"request file"``), the file and the line.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise RecordsError(str(error.strerror), path=path, what=what, unreadable=True) from None
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is not content
    except UnicodeDecodeError as error:
        raise RecordsError(
            f"not UTF-8 (byte {error.start}); save it as UTF-8", path=path, what=what
        ) from None
    start = text.lstrip()
    if not start:
        raise RecordsError(f"the file is empty; it must hold {_FORMATS}", path=path, what=what)
    first_line = text[: len(text) - len(start)].count("\n") + 1
    if start.startswith(("[", "{")):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            # "Extra data" after a complete first value: JSONL whose lines hold objects.
            if not (start.startswith("{") and error.msg == "Extra data"):
                raise RecordsError(
                    f"not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}; "
                    "lines count from 1)",
                    path=path,
                    what=what,
                    line=error.lineno,
                ) from None
        else:
            if isinstance(document, list):
                return [(first_line, record) for record in document]
            return [(first_line, document)]
    records = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise RecordsError(
                f"line {number}: not valid JSON ({error.msg}; lines count from 1); expected "
                f"{_FORMATS}",
                path=path,
                what=what,
                line=number,
            ) from None
    return records


def read_records(path: str | Path, *, what: str = "file") -> list[Any]:
    """The records of ``path``: a JSON array's elements, a single JSON object, or the
    values of a JSONL file (see :func:`read_located_records` for the formats and errors)."""
    return [record for _, record in read_located_records(path, what=what)]
