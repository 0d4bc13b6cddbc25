"""Everything moescope writes goes through here: whole or not at all, and never over what it must not.

Files are written to a temporary name in the same directory and renamed (`write_atomic`);
directories are built under a temporary name beside their final one and renamed when complete
(`atomic_directory`), so a crash, a kill or a full disk never leaves something that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moescope.errors import MoescopeError


def write_atomic(path: str | Path, text: str) -> None:
    """Write through a temporary file in the same directory, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """`data` as indented JSON (non-ASCII kept as is), atomically."""
    write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def read_json(path: str | Path, what: str) -> Any:
    """The JSON in `path`; MoescopeError naming `what` it should be (e.g. "bit plan") if it is missing
    or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoescopeError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise MoescopeError(f"{what} {path} is a directory, not a file") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise MoescopeError(f"{what} {path} is not valid JSON: {error}") from None


def remove(path: Path) -> None:
    """Delete a file or a directory tree."""
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A fresh temporary directory beside `out` to build it in; renamed to `out` when the block ends
    without an exception (replacing an existing `out` only with `overwrite`), deleted when it fails."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise MoescopeError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield work
        if out.exists():
            remove(out)
        os.replace(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
