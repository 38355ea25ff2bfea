"""Crash-safe file and directory writes: the one place where timm_qconv (and its plugins and
recipes) replace files on disk.

Guarantees, for a process killed at any instant (``SIGKILL``, Ctrl-C, power loss once the data
reached the disk):

* :func:`atomic_write` -- ``path`` holds either its previous content or the complete new content,
  never a mix or a truncated file. The data is written to a hidden temporary file in the same
  folder, flushed with ``fsync``, renamed over ``path`` with ``os.replace`` (one atomic rename on
  POSIX and Windows), and the folder is flushed so that the rename itself survives a power loss.
* :func:`atomic_directory` -- a whole folder (an export: weights plus config) is replaced at once.
  The caller writes the new folder's files into a hidden temporary sibling; on success the sibling
  is flushed and swapped with ``path``:

  - on Linux (``renameat2(RENAME_EXCHANGE)``) and macOS (``renamex_np(RENAME_SWAP)``) the swap is
    one atomic system call: at every instant ``path`` is the complete old folder or the complete
    new one;
  - elsewhere (or on a file system without the exchange call), the old folder is first renamed to
    a hidden sibling ``.NAME.old-PID-TOKEN``, then the new one into place. Between those two
    renames ``path`` does not exist; :func:`resolve_directory` (used by every reader in timm_qconv)
    then returns the old folder, and the next write of ``path`` puts it back first.

  Entries of the old folder that the new one does not have (a report next to an export, say) are
  carried over as hard links (copies where links are not possible). A folder that did not exist is
  created by one rename, so an interrupted first save leaves no half-written ``path``.

Leftovers: a killed write can leave its hidden temporary sibling (``.NAME.tmp-PID-TOKEN``) or the
old folder (``.NAME.old-PID-TOKEN``). The next write of the same path removes those whose process
is gone (checked on this machine by PID); loaders ignore them.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_write", "atomic_directory", "resolve_directory", "fsync_tree"]

_TMP, _OLD = "tmp", "old"


# ----------------------------------------------------------------------------------- small pieces
def _fsync_dir(directory: Path) -> None:
    """Flush a folder's entries (its renames) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows, or no permission: the rename is still atomic, only not yet durable
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(directory: str | os.PathLike) -> None:
    """Flush every file and folder under ``directory`` (and ``directory`` itself) to disk."""
    root = Path(directory)
    for folder, _, files in os.walk(root):
        for name in files:
            file = Path(folder) / name
            if file.is_symlink():
                continue
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def _sibling(path: Path, kind: str) -> Path:
    """A hidden sibling of ``path`` named after this process, so stale ones can be recognised."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}")


def _owner_alive(sibling: Path) -> bool:
    """Whether the process that made ``sibling`` (its name holds the PID) still runs on this machine."""
    try:
        pid = int(sibling.name.rsplit("-", 2)[1])
    except (IndexError, ValueError):
        return True  # not one of ours; leave it alone
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def _siblings(path: Path, kind: str) -> list[Path]:
    prefix = f".{path.name}.{kind}-"
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    return sorted((p for p in entries if p.name.startswith(prefix)), key=lambda p: p.name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


# ------------------------------------------------------------------------------------ atomic_write
def atomic_write(path: str | os.PathLike, data: bytes | str, *, encoding: str = "utf-8") -> Path:
    """Replace the file ``path`` by ``data`` atomically (see the module docstring).

    Args:
        path: the file to write; its folder must exist. A symlink is replaced by a file.
        data: the whole new content; ``str`` is encoded with ``encoding``.
        encoding: the text encoding when ``data`` is a ``str``.
    Returns:
        ``path`` as a ``Path``.
    """
    if isinstance(data, str):
        data = data.encode(encoding)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data={type(data).__name__} is not allowed; expected bytes or str")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"path={str(path)!r} is a directory; expected a file path")
    for stale in _siblings(path, _TMP):
        if not _owner_alive(stale):
            _remove(stale)
    tmp = _sibling(path, _TMP)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


# ------------------------------------------------------------------------------- directory swaps
def _load_exchange():
    """The platform's atomic 'swap two paths' call as ``f(a, b) -> None`` raising ``OSError``, or ``None``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]

        def call(a: bytes, b: bytes) -> int:
            return fn(at_fdcwd, a, at_fdcwd, b, rename_exchange)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rename_swap = 2
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]

        def call(a: bytes, b: bytes) -> int:
            return fn(a, b, rename_swap)
    else:
        return None

    def exchange(a: Path, b: Path) -> None:
        if call(os.fsencode(a), os.fsencode(b)) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(a), None, str(b))

    return exchange


_EXCHANGE = _load_exchange()
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EPERM}


def _swap_in(new: Path, path: Path) -> Path | None:
    """Put the complete folder ``new`` at ``path``; returns where the old folder now is (to delete)."""
    if not path.exists():
        os.rename(new, path)  # a missing target: one atomic rename
        return None
    if _EXCHANGE is not None:
        try:
            _EXCHANGE(new, path)
            return new  # ``new`` now names the old folder
        except OSError as exc:
            if exc.errno not in _NO_EXCHANGE:
                raise
    old = _sibling(path, _OLD)
    os.rename(path, old)  # from here until the next rename, resolve_directory() returns ``old``
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)
        raise
    return old


def _carry_over(old: Path, new: Path) -> None:
    """Link (or copy) into ``new`` the entries of ``old`` that ``new`` does not have."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or target.is_symlink():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=link)
        else:
            link(str(entry), str(target))


def _clean_stale(path: Path) -> None:
    """Remove the leftovers of dead writers of ``path``; put back an old folder a crash left aside."""
    for old in _siblings(path, _OLD):
        if _owner_alive(old):
            continue
        if not path.exists():
            try:
                os.rename(old, path)  # the crash came between the two renames: the old folder is the export
                continue
            except OSError:
                pass
        if path.exists():
            _remove(old)
    for tmp in _siblings(path, _TMP):
        if not _owner_alive(tmp):
            _remove(tmp)


def resolve_directory(path: str | os.PathLike) -> Path:
    """The folder to read for ``path``: ``path`` itself, or, if a swap was interrupted between its
    two renames (platforms without an atomic exchange), the old folder it left aside.

    Args:
        path: a folder written by :func:`atomic_directory`.
    Returns:
        ``path`` when it exists (or nothing better exists), else the newest ``.NAME.old-*`` sibling.
    """
    path = Path(path)
    if path.exists():
        return path
    olds = [p for p in _siblings(path, _OLD) if p.is_dir()]
    return olds[-1] if olds else path


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, keep_other_files: bool = True) -> Iterator[Path]:
    """Write a folder's new content into a temporary sibling, then swap it in (module docstring).

    Usage::

        with atomic_directory("out/model") as tmp:
            (tmp / "config.json").write_bytes(...)
            (tmp / "model.safetensors").write_bytes(...)
        # now out/model is the new folder; had anything raised, out/model is untouched

    Args:
        path: the folder to create or replace; its parent folders are created if missing (and
            removed again if the write fails and they are still empty).
        keep_other_files: carry over entries of the existing folder that the new one lacks.
    Yields:
        the temporary folder to fill.
    """
    path = Path(path)
    if path.is_symlink() and path.is_dir():
        path = Path(os.path.realpath(path))  # replace the folder the link points to, keep the link
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"path={str(path)!r} is an existing file; expected a directory (or a new path)")
    created = [p for p in path.parents if not p.exists()]  # deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(path)
    tmp = _sibling(path, _TMP)
    tmp.mkdir()
    old: Path | None = None
    try:
        yield tmp
        if keep_other_files and path.is_dir():
            _carry_over(path, tmp)
        fsync_tree(tmp)
        old = _swap_in(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if old is None:
            _remove(tmp)
            for d in created:  # only folders this call made, and only if still empty
                try:
                    d.rmdir()
                except OSError:
                    break
        raise
    if old is not None:
        _remove(old)
