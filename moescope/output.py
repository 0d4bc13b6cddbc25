"""Everything moescope writes goes through here: whole or not at all, and never over what it must not.

Every output, file or directory, follows the same rules:

- it is checked before the run starts (`check_output`): an existing output is replaced only with
  --overwrite, a directory only when it is empty or one that moescope wrote of the same kind; an
  output may never be, hold or sit inside one of the run's inputs (paths compared with symlinks
  resolved), nor sit inside a model checkpoint, which moescope never changes;
- while it is written, the process holds an exclusive lock on its final name (`locked`; a file
  `.NAME.lock` beside it, removed afterwards), so a second moescope writing the same output stops at
  once instead of racing the first;
- it is written under a temporary name beside the final one (`.NAME.xxxxxxxx.tmp` or `.partial`) and
  renamed when complete (`atomic_file`, `atomic_directory`), so a crash, a kill or a full disk never
  leaves something that looks finished; temporaries that a killed run left behind are removed, with
  a message, by the next run that writes the same output.

JSON that moescope did not write itself is read through `read_json` / `parse_json`: one
MoescopeError naming the file for anything that is not plain UTF-8 JSON.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moescope.errors import MoescopeError


@dataclass(frozen=True)
class OutputKind:
    """What an output argument names. A directory kind says which existing directories --overwrite may
    replace (`is_own`: one this kind of run wrote); a `reused` directory is a workspace that runs add to."""

    noun: str
    directory: bool = False
    is_own: Callable[[Path], bool] | None = None
    reused: bool = False


FILE = OutputKind("file")
HELD: dict[str, int] = {}  # output paths whose lock this process holds -> how many holders


def is_checkpoint(directory: Path) -> bool:
    """Whether `directory` holds a model checkpoint: a config.json beside weight files."""
    return (directory / "config.json").is_file() and any(
        next(directory.glob(pattern), None) is not None for pattern in ("*.safetensors", "*.safetensors.index.json",
                                                                        "*.bin"))


def _usual_mode(path: Path, directory: bool) -> None:
    """Give a temporary (created private, 0600 / 0700) the permissions a plain open or mkdir would have."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


def _real(path: Path) -> Path:
    """`path` with every symlink in its existing part resolved."""
    return Path(os.path.realpath(path))


def _check_apart(path: Path, source: Path) -> None:
    target, real = _real(path), _real(source)
    relation = ("is" if target == real else "is inside" if target.is_relative_to(real)
                else "holds" if real.is_relative_to(target) else None)
    if relation:
        raise MoescopeError(f"{path} {relation} the input {source}: moescope never writes over or into its inputs; "
                            "choose another output")


def check_output(path: str | Path, kind: OutputKind = FILE, *, overwrite: bool = False,
                 sources: Iterable[str | Path] = ()) -> None:
    """Refuse an output that breaks the rules of the module docstring, before anything is written."""
    text, path = str(path), Path(path)
    if not kind.directory and text.endswith(("/", os.sep)):
        raise MoescopeError(f"{text} names a directory: give a file name for this output")
    for source in sources:
        _check_apart(path, Path(source))
    ancestors = _real(path).parents
    holder = next((a for a in ancestors if is_checkpoint(a)), None)
    if holder is not None:
        raise MoescopeError(f"{path} is inside the checkpoint {holder}: moescope never adds to or changes a "
                            "checkpoint; choose a place outside it")
    existing = next(a for a in ancestors if a.exists())
    if not existing.is_dir():
        raise MoescopeError(f"{path} cannot be created: {existing} is a file, not a directory")
    if not os.path.lexists(path):
        return
    if kind.directory != path.is_dir():
        raise MoescopeError(f"{path} exists and is {'a directory' if path.is_dir() else 'a file'}, but this output "
                            f"is a {kind.noun}: choose another name")
    if kind.reused:
        return
    if not overwrite:
        raise MoescopeError(f"{path} already exists; pass --overwrite to replace it")
    if kind.directory and any(path.iterdir()) and not (kind.is_own and kind.is_own(path)):
        raise MoescopeError(f"{path} is not a {kind.noun} written by moescope, and --overwrite replaces only those "
                            "(or an empty directory): remove it yourself or choose another output")


def _make_parents(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents; the ones created, outermost first."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()][::-1]
    directory.mkdir(parents=True, exist_ok=True)
    return missing


def _acquire(lock: Path, out: Path) -> int:
    """An open descriptor holding the exclusive lock `lock` (created if needed)."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise MoescopeError(f"cannot write {out}: {error.strerror} in {lock.parent}; choose another place or "
                                "check its permissions and free space") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MoescopeError(f"another moescope is writing {out} (it holds {lock}): wait for it to finish or "
                                "choose another output") from None
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)  # its holder removed it between our open and our lock: lock the new one


def remove_stale(out: Path) -> None:
    """Delete the temporaries a killed run left beside `out` (only ever called under its lock)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}\.(partial|tmp)")
    for entry in out.parent.iterdir():
        if pattern.fullmatch(entry.name):
            remove(entry)
            print(f"moescope: removed {entry}, left by an interrupted run", file=sys.stderr)


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold the exclusive lock on the output `path` for the block (re-entrant within a process), after
    removing stale temporaries of it; parent directories created for it are removed again if the
    block leaves them empty."""
    path = _real(Path(path).parent) / Path(path).name
    key = str(path)
    if key in HELD:
        HELD[key] += 1
        try:
            yield
        finally:
            HELD[key] -= 1
        return
    created = _make_parents(path.parent)
    try:
        lock = path.with_name(f".{path.name}.lock")
        fd = _acquire(lock, path)
        HELD[key] = 1
        try:
            remove_stale(path)
            yield
        finally:
            del HELD[key]
            os.unlink(lock)  # before letting go, so the next holder's inode check sees a fresh file
            os.close(fd)
    finally:
        for directory in reversed(created):
            if not os.path.isdir(directory) or any(directory.iterdir()):
                break
            directory.rmdir()


@contextmanager
def guarded(outputs: dict[str, tuple[str | Path, OutputKind]], sources: Iterable[str | Path],
            overwrite: bool) -> Iterator[None]:
    """Check every output of a run ({option: (path, kind)}) before it starts, and hold their locks
    until it ends. Two outputs may not overlap either."""
    sources = [Path(s) for s in sources]
    named = list(outputs.items())
    for i, (option, (path, kind)) in enumerate(named):
        check_output(path, kind, overwrite=overwrite, sources=sources)
        for other_option, (other, _) in named[:i]:
            a, b = _real(Path(path)), _real(Path(other))
            if a == b or a.is_relative_to(b) or b.is_relative_to(a):
                raise MoescopeError(f"{option} {path} and {other_option} {other} overlap: give each output its own "
                                    "place")
    with ExitStack() as stack:
        for _, (path, kind) in named:
            stack.enter_context(locked(path))
            check_output(path, kind, overwrite=overwrite, sources=sources)  # again, now that nobody else writes it
        yield


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary name beside `path` to write the file under; renamed to `path` when the block ends
    without an exception, deleted when it fails."""
    path = Path(path)
    if path.is_dir():
        raise MoescopeError(f"{path} is a directory: give a file name for this output")
    with locked(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            _usual_mode(Path(tmp), directory=False)
            yield Path(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)


def write_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) whole or not at all (`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """`data` as indented JSON (non-ASCII kept as is), atomically."""
    write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def decode_text(data: bytes, where: str) -> str:
    """UTF-8 bytes as text (a leading byte-order mark dropped); MoescopeError naming `where` if not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        utf16 = data.startswith((b"\xff\xfe", b"\xfe\xff"))
        hint = "it looks like UTF-16" if utf16 else f"byte {data[error.start]:#04x} at offset {error.start}"
        raise MoescopeError(f"{where}: not UTF-8 text ({hint}); save it as UTF-8") from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str, where: str) -> Any:
    """JSON from text moescope did not write itself; one MoescopeError naming `where` for anything that
    is not plain JSON: bad syntax, NaN or Infinity, nesting deeper than Python's stack, integers of more
    than 4,300 digits, lone surrogates (`\\ud800`, which is not text)."""
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
        if "\\ud" in text.lower():  # only \u escapes can make a lone surrogate: check just then
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        return data
    except json.JSONDecodeError as error:
        at = f"line {error.lineno} column {error.colno}" if error.lineno > 1 else f"column {error.colno}"
        raise MoescopeError(f"{where}: invalid JSON ({error.msg} at {at})") from None
    except RecursionError:
        raise MoescopeError(f"{where}: invalid JSON (nested too deeply)") from None
    except UnicodeEncodeError:
        raise MoescopeError(f"{where}: a string holds a lone surrogate escape such as \\ud800, which is not text") \
            from None
    except ValueError as error:  # NaN / Infinity, integers too long to convert
        raise MoescopeError(f"{where}: invalid JSON ({str(error).split(';')[0]})") from None


def read_json(path: str | Path, what: str) -> Any:
    """The JSON in `path`; MoescopeError naming `what` it should be (e.g. "bit plan") if it is missing,
    not a file, or not JSON."""
    path = Path(path)
    if not path.exists():
        raise MoescopeError(f"{what} {path} does not exist")
    if path.is_dir():
        raise MoescopeError(f"{what} {path} is a directory, not a file")
    return parse_json(decode_text(path.read_bytes(), f"{what} {path}"), f"{what} {path}")


def remove(path: Path) -> None:
    """Delete a file or a directory tree."""
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


@contextmanager
def atomic_directory(out: str | Path, kind: OutputKind, overwrite: bool = False,
                     sources: Iterable[str | Path] = ()) -> Iterator[Path]:
    """A fresh temporary directory beside `out` to build it in; renamed to `out` when the block ends
    without an exception (replacing an existing `out` only as `check_output` allows), deleted when it
    fails."""
    out = Path(out)
    sources = list(sources)
    check_output(out, kind, overwrite=overwrite, sources=sources)
    with locked(out):
        check_output(out, kind, overwrite=overwrite, sources=sources)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        try:
            _usual_mode(work, directory=True)
            yield work
            if out.exists():
                remove(out)
            os.replace(work, out)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
