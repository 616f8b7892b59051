"""Files that are never half-written: each is written to a temporary name in its folder, flushed to
disk, then renamed over its path (a crash or a full disk leaves the old file, or none, never part of
one). Every file the package writes goes through here; run folders add the same at folder level
(engine.folders)."""

from __future__ import annotations

import os
import tempfile


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to a temporary file in the same folder, then rename it over `path`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to a temporary file in the same folder, then rename it over `path`."""
    atomic_write_files({path: data})


def atomic_write_files(contents: dict[str | os.PathLike, bytes]) -> None:
    """Write several files as one step as far as a filesystem allows: every file goes to a temporary
    name first (a failure there, such as a full disk, changes nothing), then each is renamed over its
    path, in the given order."""
    staged: list[tuple[str, str]] = []
    try:
        for path, data in contents.items():
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
            staged.append((tmp, str(path)))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual permissions
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
