"""Files in the controller's state directory, written so that a crash leaves the old
content or the new, never half of one."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")


def write_atomic(path: Path, text: str, durable: bool = True) -> None:
    """Replace `path` with `text` atomically (a temporary file beside it, fsync, rename);
    the directory is made if missing. Not `durable`: no fsync (a cache that is checked
    when read: after a power loss it may be empty, never half of one content and half of
    another while the system runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


Mark = tuple[int, int, int]  # a file's (inode, mtime in ns, size)


def file_mark(path: Path) -> Mark | None:
    """A cheap mark of a file's content (None: it cannot be read): files written with
    write_atomic are replaced, so a new content is a new inode."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class Parsed(Generic[T]):
    """Files' parsed contents, parsed again only when a file's mark changed (a long-running
    controller reads its state files before every operation). `remember` records what the
    caller just wrote, so that its own write is not parsed back. At most `keep` files."""

    def __init__(self, keep: int = 16) -> None:
        self.keep = keep
        self._found: dict[str, tuple[Mark, T]] = {}
        self._lock = threading.Lock()

    def get(self, path: Path, parse: Callable[[str], T]) -> T:
        """`parse(text)` of `path`, or what it gave while the file is unchanged (OSError and
        UnicodeDecodeError when it cannot be read; `parse`'s own errors pass through)."""
        key, mark = str(path.resolve()), file_mark(path)
        with self._lock:
            found = self._found.get(key)
        if found is not None and mark is not None and found[0] == mark:
            return found[1]
        value = parse(path.read_text(encoding="utf-8"))
        if mark is not None:
            self._store(key, mark, value)
        return value

    def remember(self, path: Path, value: T) -> None:
        """`value` is what `path` holds now (the caller just wrote it)."""
        mark = file_mark(path)
        if mark is not None:
            self._store(str(path.resolve()), mark, value)

    def holds(self, path: Path, value: T) -> bool:
        """Whether `path` is unchanged since it was parsed or remembered as `value` (or an
        equal value): writing `value` again would change nothing."""
        mark = file_mark(path)
        with self._lock:
            found = self._found.get(str(path.resolve()))
        return (
            found is not None
            and mark is not None
            and found[0] == mark
            and (found[1] is value or found[1] == value)
        )

    def clear(self) -> None:
        with self._lock:
            self._found.clear()

    def _store(self, key: str, mark: Mark, value: T) -> None:
        with self._lock:
            if len(self._found) >= self.keep:
                self._found.clear()
            self._found[key] = (mark, value)
