"""Durable filesystem primitives: fsynced writes, directory fsyncs, atomic renames and a cross-process lock.

A registration is acknowledged only after its bytes and the directory entries that name them are on disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def write_durably(path: Path, data: bytes) -> None:
    """Create `path` (never overwrite) and fsync its bytes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename is durable only once its parent is fsynced)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_staging_dir(tmp_root: Path) -> Path:
    path = tmp_root / uuid.uuid4().hex
    path.mkdir()
    return path


def write_dir_durably(tmp_root: Path, files: dict[str, bytes]) -> Path:
    """Write `files` into a fresh directory under `tmp_root`, every file and the directory itself fsynced."""
    staging = make_staging_dir(tmp_root)
    try:
        for name, data in files.items():
            write_durably(staging / name, data)
        fsync_dir(staging)
    except BaseException:
        remove_tree(staging)  # e.g. a full disk: leave nothing half-written behind
        raise
    return staging


def rename_dir_if_absent(source: Path, target: Path) -> bool:
    """Atomically move a directory; False if `target` already exists (another writer took that name)."""
    if target.exists():
        return False
    try:
        os.rename(source, target)
    except OSError as exc:
        # Linux refuses to rename onto a non-empty directory with ENOTEMPTY or EEXIST.
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


def create_file_if_absent(path: Path, data: bytes, tmp_root: Path) -> bool:
    """Create a small file whole and durably; False if `path` already exists (another writer took the name).

    Written under another name first, then hard-linked: a link never replaces a name, and a reader never sees
    the file half-written (an exclusive open of `path` itself would show it so)."""
    staging = tmp_root / f"{uuid.uuid4().hex}.part"
    write_durably(staging, data)
    try:
        os.link(staging, path)
    except FileExistsError:
        return False
    finally:
        staging.unlink()
    fsync_dir(path.parent)
    return True


def replace_file_durably(path: Path, data: bytes, tmp_root: Path) -> None:
    """Write a small file atomically: readers see the old or the new bytes, never a torn write."""
    staging = tmp_root / f"{uuid.uuid4().hex}.part"
    write_durably(staging, data)
    os.replace(staging, path)
    fsync_dir(path.parent)


def move_to_trash(path: Path, trash_root: Path) -> Path | None:
    """Atomically take a directory out of sight; None if it was already gone."""
    target = trash_root / uuid.uuid4().hex
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    return target


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def clear_dir(path: Path) -> int:
    """Remove every entry under `path`; return how many there were."""
    entries = list(path.iterdir())
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            remove_tree(entry)
        else:
            entry.unlink(missing_ok=True)
    return len(entries)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock shared by every process (and thread: each call opens its own descriptor) on this store.

    The kernel drops it when its holder dies, so a SIGKILLed writer never wedges the store.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
