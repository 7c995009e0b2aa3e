"""Atomic writes, checksums, and reading an artefact's JSON: one copy for the whole package (torch-free at import).

Every file thoughtscope writes goes to a temporary name beside its destination and is renamed into place, so an
interrupted job leaves either the old file or the new one, never half of one. Folders (an SAE, a converted model)
are built in a temporary folder and swapped in the same way. A write the operating system refuses (a full disk, a
file-size limit, a read-only folder) raises a ThoughtscopeError naming the destination, and leaves no temporary
file behind. `exclusive_lock` is the one advisory lock that keeps two processes from writing one output folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from .errors import ThoughtscopeError

try:  # advisory locks (POSIX); elsewhere two writers are not kept apart
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - non-POSIX
    _fcntl = None

#: errno values that mean "the disk (or the process's file-size limit) has no room for this write"
NO_SPACE = frozenset(e for e in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", None)) if e is not None)
# a native writer (safetensors' Rust core, torch's zip writer) reports the OS error in its message, not as an OSError
_NATIVE_OS_ERROR = re.compile(r"\(os error (\d+)\)|\bOs \{ code: (\d+)|\[Errno (\d+)\]")


def os_error_of(exc: BaseException) -> OSError | None:
    """The operating-system error behind `exc` (itself, the error it was raised from, or one a native library named
    in its message), or None when it was not the OS that refused."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        m = _NATIVE_OS_ERROR.search(str(e)) if not isinstance(e, OSError) else None
        if m:
            code = int(next(g for g in m.groups() if g))
            return OSError(code, os.strerror(code))
        e = e.__cause__
        seen += 1
    return None


def write_error(path: str | os.PathLike, exc: BaseException, *, kept: str = "") -> ThoughtscopeError:
    """The one error for a write the OS refused: names the file, says why and what to do. `kept` says what was left
    as it was (default: nothing at `path` was changed)."""
    os_err = os_error_of(exc) or exc
    code = getattr(os_err, "errno", None)
    why = os.strerror(code) if isinstance(code, int) else str(exc)
    if code in NO_SPACE:
        what = "the disk is full or the file-size limit was reached"
        todo = "free some space and run the same command again"
    else:
        what = why
        todo = "check the folder's permissions and free space, then run the same command again"
    kept = kept or f"{path} was left as it was"
    return ThoughtscopeError(f"could not write {path}: {what} ({why}); {kept}; {todo}")


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike, write: Callable[[IO[bytes]], None], *, durable: bool = False, tmp_prefix: str = ".tmp-"
) -> Path:
    """Call write(file) on a temporary file beside `path`, then rename it into place.

    durable=True also fsyncs the file and its folder (the activation store needs that to resume after a crash).
    Files get ordinary 0644 permissions (mkstemp would leave 0600).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{tmp_prefix}{path.name}.", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, ThoughtscopeError) and isinstance(e, Exception) and os_error_of(e) is not None:
            raise write_error(path, e) from e
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(data), durable=durable)


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(
    path: str | os.PathLike, obj: Any, *, indent: int | None = 2, durable: bool = False, **dumps_kwargs
) -> Path:
    """JSON with a trailing newline, written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n", durable=durable)


def atomic_save_tensors(
    tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """A safetensors file of contiguous CPU copies of `tensors`, written atomically."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    return atomic_write_bytes(path, data)


class _WriteErrors:
    """A file that remembers the OSError its write raised: torch's zip writer turns it into a RuntimeError that no
    longer says why ("unexpected pos"), so the error is raised again from the one the OS gave."""

    def __init__(self, f: IO[bytes]):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str):
        return getattr(self.f, name)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save (optimiser state, RNG state), written atomically."""

    def write(f: IO[bytes]) -> None:
        out = _WriteErrors(f)
        try:
            import torch

            torch.save(obj, out)
        except RuntimeError as e:
            if out.error is not None:
                raise out.error from e
            raise

    return atomic_write(path, write)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` (an old one is removed).

    On an error the temporary folder is removed and an existing `path` is left exactly as it was; an error of the
    OS (a full disk) becomes a ThoughtscopeError naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        tmp.chmod(0o755)  # an ordinary folder once in place (mkdtemp makes it private)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, ThoughtscopeError) and isinstance(e, Exception) and os_error_of(e) is not None:
            raise write_error(path, e) from e
        raise


def read_json(path: str | os.PathLike, error: type[Exception], *, expect: type | None = dict) -> Any:
    """The value of a JSON file, or `error` naming the file and what was wrong: unreadable, not UTF-8, not valid
    JSON (including a number too long to convert and nesting too deep for the parser), or not an `expect`. The one
    way every artefact reader opens its JSON, so a damaged file always ends in the reader's own error."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: not valid JSON (not UTF-8 text at byte offset {e.start})") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # bad JSON, or a number too long to convert
        raise error(f"{path}: not valid JSON ({e})") from None
    if expect is not None and not isinstance(value, expect):
        want = "a JSON object" if expect is dict else f"a JSON {expect.__name__}"
        raise error(f"{path}: expected {want}, got {type(value).__name__}")
    return value


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class exclusive_lock:  # noqa: N801 - used like a function: `with exclusive_lock(...)`
    """Hold an advisory lock on the file `path` (created if missing, left in place) so that a second writer of the
    same output stops at once: it raises `error` with a message naming `what` and the lock file. Released on
    `release()`, on leaving a `with` block, or when the process ends (a killed writer holds nothing)."""

    def __init__(self, path: str | os.PathLike, what: str, error: type[Exception] = ThoughtscopeError):
        self.path = Path(path)
        self.fd: int | None = None
        self.made: list[Path] = []  # the folders made to hold the lock file, deepest first
        parent = self.path.parent
        while not parent.exists():
            self.made.append(parent)
            parent = parent.parent
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if _fcntl is None:  # pragma: no cover
                return
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(self.path, e) from e
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise error(
                f"another process is writing {what} (the lock {self.path} is held); wait for it to finish or "
                "stop it, or write somewhere else"
            ) from e
        self.fd = fd

    def release(self, *, remove: bool = False) -> None:
        """Drop the lock. `remove` (a job that failed before writing anything) also deletes the lock file, first,
        while still held, so no one can take the old one in between, and then the folders made for it that are
        left empty."""
        if self.fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        if remove:
            for d in self.made:
                try:
                    d.rmdir()  # only if empty
                except OSError:
                    break

    def holds_only_itself(self) -> bool:
        """Whether the lock file is all there is in its folder (the job wrote nothing beside it)."""
        try:
            return all(p.name == self.path.name for p in self.path.parent.iterdir())
        except OSError:
            return False

    def __enter__(self) -> exclusive_lock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # pragma: no cover - best effort
        with suppress(Exception):
            self.release()
