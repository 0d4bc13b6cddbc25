"""The JSON and text files moescope writes (atomically: whole or not at all) and reads back."""

from __future__ import annotations

import json
import os
import tempfile
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


def read_json(path: str | Path, what: str) -> Any:
    """The JSON in `path`; MoescopeError naming `what` it should be (e.g. "bit plan") if it is missing
    or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MoescopeError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MoescopeError(f"{what} {path} is not valid JSON: {error}") from None
