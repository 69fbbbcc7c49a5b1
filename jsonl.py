"""Append-only JSON Lines: one object per line, written whole and flushed, read back tolerating a torn last line.

    append_jsonl(path, {"step": 3, "loss": 0.69})
    rows = read_jsonl(path)
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _clean(value):
    """NaN and inf are not JSON: write them as null so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def append_jsonl(path: str | Path, record: dict | list[dict]) -> None:
    """One record, or a list of them in one write."""
    records = record if isinstance(record, list) else [record]
    text = "".join(json.dumps({k: _clean(v) for k, v in r.items()}, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()


def read_jsonl(path: str | Path) -> list[dict]:
    """Every complete line; a final line cut off by a kill (no newline, not valid JSON) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):
                    raise ValueError(f"{path}: line {len(rows) + 1} is not valid JSON") from None
    return rows


def repair_tail(path: str | Path) -> int:
    """Cut a final line torn by a kill (no newline) before appending, so the next row does not fuse with it into an
    unreadable line. Returns the number of bytes removed."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        fh.truncate(keep)
    return len(data) - keep


def rewrite_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Replace the file atomically (write a temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps({k: _clean(v) for k, v in row.items()}, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new file in `folder` survive a machine crash (the directory entry itself is data)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory: the rename is still atomic
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """Replace a small file whole, so that neither a kill nor a machine crash leaves half of it: write a temporary
    file beside it, fsync it, rename it over the old one, fsync the folder. Markers, run.json, summaries and the
    sweep record are written this way."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    data = text.encode("utf-8") if isinstance(text, str) else text
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def summary_path(verdicts: str | Path) -> Path:
    """Where judge.py writes the summary of a verdict file: `<name>.jsonl` -> `<name>.summary.json`."""
    verdicts = Path(verdicts)
    stem = verdicts.name[:-len(".jsonl")] if verdicts.name.endswith(".jsonl") else verdicts.name
    return verdicts.with_name(stem + ".summary.json")
