"""Writing files atomically: a reader (or an interrupted run) never sees a half-written file.

Every writer goes to a temporary file in the destination's directory and renames it into place
(`os.replace` is atomic on POSIX and Windows within one file system).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from geokd.errors import GeokdError


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space on the file system holding `path` (or its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# safetensors (Rust) and torch's zip writer report a full disk inside their own exception text.
_DISK_FULL_TEXT = ("no space left", "storagefull", "code: 28", "disk quota exceeded", "errno 28")


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also when wrapped by safetensors or torch as a non-OSError."""
    for error in (exc, exc.__cause__, exc.__context__):
        if error is None:
            continue
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(error).lower() for text in _DISK_FULL_TEXT):
            return True
    return False


def disk_full_error(path: str | os.PathLike, what: str) -> GeokdError:
    """The one line for a full disk: what was being written, where, and the free space."""
    free = free_bytes(path)
    shown = "unknown" if free is None else human_bytes(free)
    return GeokdError(
        f"no space left on the device while writing {what} to {str(path)!r} ({shown} free there); "
        "nothing complete was lost and the partial files were removed; free some space (or choose another "
        "location) and run the same command again"
    )


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn a full-disk failure inside the block into `disk_full_error` (callers clean up their
    temporaries in their own `except`/`finally` first); every other error propagates unchanged."""
    try:
        yield
    except GeokdError:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise disk_full_error(path, what) from None
        raise


def follow_umask(path: str | os.PathLike) -> None:
    """Give `path` (a file, or every file and folder under a directory) the permissions the user's
    umask asks for (0644/0755 with the usual 022). Some writers (safetensors, mkstemp) create 0600
    files, which a deployment group could not read."""
    umask = os.umask(0)
    os.umask(umask)
    root = Path(path)
    entries = [root, *root.rglob("*")] if root.is_dir() else [root]
    for entry in entries:
        mode = 0o777 if entry.is_dir() else 0o666
        os.chmod(entry, mode & ~umask)


def check_output_path(path: str | os.PathLike, option: str) -> Path:
    """Fail early (before any long work) if `path` cannot be written: missing parent directory,
    or an existing directory in its place."""
    target = Path(path)
    if target.exists() and target.is_dir():
        raise GeokdError(
            f"{option}: {str(target)!r} is a directory; give a file path such as {target / 'out'}"
        )
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise GeokdError(
            f"{option}: directory {str(parent)!r} does not exist; create it first or choose another path"
        )
    if not os.access(parent, os.W_OK):
        raise GeokdError(f"{option}: directory {str(parent)!r} is not writable; choose another path")
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path`, on error delete it."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent or "."
    )
    os.close(fd)
    umask = os.umask(0)  # mkstemp makes 0600 files; give the result the user's usual permissions
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # after writing: some writers (safetensors) recreate the file
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, what: str) -> Iterator[Path]:
    """Build a folder at `.NAME.tmp` next to `target` (a stale one from a kill is removed first);
    on success give it the umask's permissions and rename it onto `target`, replacing it; on any
    failure remove the temporary, and turn a full disk into one GeokdError naming the place and
    the free space. A reader never sees a half-written folder."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        follow_umask(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and not isinstance(exc, GeokdError) and is_disk_full(exc):
            raise disk_full_error(target.parent, what) from None
        raise


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n", encoding="utf-8")


def update_markdown_section(path: str | os.PathLike, name: str, body: str, title: str = "# Results") -> None:
    """Put `body` between `<!-- geokd:NAME:start -->` and `<!-- geokd:NAME:end -->` in the markdown
    file at `path`, atomically: the marked section is replaced if present, appended otherwise, and
    everything outside the markers (hand-written analysis, other scripts' sections) is kept. A new
    file starts with `title`."""
    target = Path(path)
    start, end = f"<!-- geokd:{name}:start -->", f"<!-- geokd:{name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = target.read_text(encoding="utf-8") if target.exists() else f"{title}\n"
    if start in text and end in text and text.index(start) < text.index(end):
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


LOCK_NAME = ".geokd.lock"


class DirectoryLock:
    """An exclusive, advisory lock on a directory that one geokd process writes (a run, a cache):
    `DIR/.geokd.lock` held with `fcntl.flock` for the life of the process's work, holding the
    holder's PID, deleted when the work is done. The kernel drops the lock when the process dies
    (even by SIGKILL), so a file left behind by a killed process never blocks anyone. A second process fails at once with one line naming the holder.
    On platforms without `fcntl` (Windows) no lock is taken."""

    def __init__(self, directory: str | os.PathLike, what: str):
        self.path = Path(directory) / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> DirectoryLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        while True:
            try:  # never through a symlink: a planted .geokd.lock -> ~/file must not be truncated
                fd = os.open(self.path, flags, 0o644)
            except OSError as exc:
                raise GeokdError(
                    f"{self.what}: cannot open the lock file {str(self.path)!r} ({exc.strerror}); it must be a "
                    "plain file (a symlink is refused): remove it"
                ) from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise GeokdError(f"{self.what}: {str(self.path)!r} is not a plain file; remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise GeokdError(
                    f"{self.what}: {str(self.path.parent)!r} is in use by another geokd process (PID {holder}); "
                    "wait for it to finish, stop it, or choose another directory"
                ) from None
            # The holder before us deletes the file when it is done: if it did so between our open
            # and our flock, we locked a file nobody else will see; open the new one instead.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()  # before releasing, so a waiting opener sees the file is gone
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
