"""Files whole or absent (every write through `atomic_write`: a killed run leaves the old file or
the new one, never half), read as one object or a one-line error, and `run_lock`, which holds
a run folder for one process as git holds index.lock."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path`: fsynced and renamed to `path` on success, else removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the bytes reach the disk before the name does
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # a full disk or a size limit says which file it was writing
        err.filename = err.filename or str(path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str, ensure_ascii=False))


def read_json(path, error=ValueError) -> dict:
    """A JSON object from a file, or `error` naming the file and what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise error(f"{path}: not valid JSON ({str(err)[:80]})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: must hold a JSON object, not {type(data).__name__}")
    return data


def read_toml(path) -> dict:
    """A TOML file as a dict; a missing or malformed file is one ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (tomllib.TOMLDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not a valid TOML file ({str(err)[:80]})") from None


def read_jsonl(path) -> list[dict]:
    """Every record (a JSON object) of a JSON-lines file; a last line torn by a kill is left out."""
    lines = Path(path).read_bytes().decode("utf-8", errors="replace").split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if n == len(lines):  # torn
                break
            record = None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: must be a JSON object on one line")
        records.append(record)
    return records


def check_writable(path) -> None:
    """Refuse a file we could not write, before the work that would fill it."""
    path, probe = Path(path), Path(path).with_name(f".{Path(path).name}.{os.getpid()}.probe")
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "a folder, not a file")
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{path}: cannot write here ({err.strerror})") from None


@contextlib.contextmanager
def run_lock(folder, command: str):
    """`<folder>.lock` (O_CREAT | O_EXCL: pid, host, time, command) held while the block runs.
    A live holder: one line naming it; a dead process's lock is taken over, saying so."""
    folder = Path(folder).resolve()
    lock = folder.with_name(folder.name + ".lock")
    me = f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%d %H:%M')} {command}"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"out={folder}: is a file, not a folder")
        if not _create(lock, me):
            holder = lock.read_text(errors="replace").strip()
            pid, host = (holder.split() + ["", ""])[:2]
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                print(f"minimoe: taking over {lock} from pid {pid}, no longer running",
                      file=sys.stderr)
                lock.unlink(missing_ok=True)  # two takers racing here: one O_EXCL wins
            if not _create(lock, me):
                raise ValueError(f"out={folder}: in use by pid {holder} (the lock {lock}); wait "
                                 "for it, or delete the lock if that process is gone")
    except OSError as err:
        raise ValueError(f"out={folder}: cannot write here ({err.strerror})") from None
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _create(path: Path, text: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt  # plotting commands only: matplotlib costs ~0.5 s to import

    path = Path(path)
    if fig.get_layout_engine() is None:  # a figure laid out by its own engine keeps it
        fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, except inside a notebook, whose inline
    backend stays (save_figure closes every figure it writes, so none shows twice)."""
    import matplotlib  # plotting commands only: matplotlib costs ~0.5 s to import

    if "matplotlib.pyplot" not in sys.modules or "inline" not in matplotlib.get_backend():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
