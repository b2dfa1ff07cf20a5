"""Writing files atomically: a reader (or an interrupted run) never sees a half-written file.

Every writer goes to a temporary file in the destination's directory and renames it into place
(`os.replace` is atomic on POSIX and Windows within one file system).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from geokd.errors import GeokdError


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
