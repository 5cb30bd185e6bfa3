"""Files that are whole or absent: every file minimoe writes goes through `atomic_write`.

A file is written under a temporary name beside its destination, flushed to disk, and renamed
into place (`os.replace` is atomic on POSIX and Windows), so a reader, or a run killed at any
instant, sees the old file or the new one and never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path`; on success it is fsynced and renamed to `path`,
    on failure removed. Works for anything that writes to a path (safetensors, savefig...)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the bytes reach the disk before the name does
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path, data: bytes) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str, ensure_ascii=False))


def read_json(path, error=ValueError) -> dict:
    """A JSON file, or `error` naming the file and what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err})") from None


def read_toml(path) -> dict:
    """A TOML file as a dict; a missing or malformed file is one ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not a valid TOML file ({err})") from None


def read_jsonl(path) -> list[dict]:
    """Every record of a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
    """matplotlib.pyplot on the file-only Agg backend (no display needed), except inside a
    notebook: there the inline backend stays, or the notebook's own figures after a call that
    plots to a file (a training run's loss.png) would never show. save_figure closes every
    figure it writes, so a file's figure never shows in the notebook either."""
    import matplotlib  # plotting commands only: matplotlib costs ~0.5 s to import

    if "matplotlib.pyplot" not in sys.modules or "inline" not in matplotlib.get_backend():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
