"""Atomic writes: write to a temporary sibling, flush, fsync, then rename over the target."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _target_mode(path: Path) -> int:
    """Keep an existing file's permissions; new files get the usual 0o666 minus the umask."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` so readers see the old or the new file, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _target_mode(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Text version of `atomic_write_bytes` (no newline translation)."""
    atomic_write_bytes(path, text.encode(encoding))


# A folder that cannot be renamed aside: a mount point (EBUSY), one on another filesystem than its parent
# (EXDEV), or one whose parent is read-only or immutable (EACCES, EPERM, EROFS).
_CANNOT_MOVE = {errno.EBUSY, errno.EXDEV, errno.EACCES, errno.EPERM, errno.EROFS}


def _fill(tmp: Path, path: Path) -> None:
    """Move the entries of `tmp` into the existing folder `path`, each replacing its namesake atomically (the
    folder itself stays: a mount point or a link target). Entries of `path` that `tmp` lacks are kept."""
    for entry in sorted(tmp.iterdir()):
        target = path / entry.name
        if entry.is_dir() and target.is_dir() and not target.is_symlink():
            _fill(entry, target)
            continue
        try:
            os.replace(entry, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            if entry.is_dir():
                shutil.copytree(entry, target, dirs_exist_ok=True)
            else:
                staged = path / f".{entry.name}.tmp"
                shutil.copy2(entry, staged)
                os.replace(staged, target)


def _cannot_move(path: Path) -> bool:
    """A mount point: its folder can be written into, never renamed or replaced."""
    return path.is_dir() and os.path.ismount(path)


@contextlib.contextmanager
def atomic_directory(path: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it is renamed to `path`.

    With `replace=False` an existing `path` raises FileExistsError before anything is written. A symlinked
    `path` is followed (the link stays; its target gets the new files). An existing folder that cannot be
    renamed aside (a mount point, a read-only parent) is kept and the new files replace their namesakes inside
    it, one atomic rename each.
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists")
    in_place = _cannot_move(path)
    tmp: Path | None = None
    if not in_place:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        except OSError as exc:
            if exc.errno not in _CANNOT_MOVE or not path.is_dir():
                raise
            in_place = True
    if tmp is None:
        tmp = Path(tempfile.mkdtemp(prefix=".loratui-", suffix=".tmp", dir=path))
    try:
        yield tmp
        if in_place:
            _fill(tmp, path)
        elif path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            try:
                os.replace(path, old)
            except OSError as exc:
                if exc.errno not in _CANNOT_MOVE:
                    raise
                _fill(tmp, path)
            else:
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def probe_writable(folder: str | Path) -> OSError | None:
    """Create and remove a probe file in `folder`; the error when that fails (read-only, full, no permission),
    else None. Unlike `os.access` this also sees read-only mounts, immutable folders and root's limits."""
    try:
        fd, name = tempfile.mkstemp(prefix=".loratui-probe-", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return exc
    return None
