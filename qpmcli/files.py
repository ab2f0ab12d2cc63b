"""Files on disk, safely: regular-file reads (a named pipe never hangs a reader), qpm's temporary names and the
cleanup of those a killed process left, a folder lock that names its holder, free space and block reservation (a
full disk is an error, never a SIGBUS in a memory map).

Core layer: the standard library only; :mod:`qpmcli.artifact` (run folders), :mod:`qpmcli.cache` and the pipeline
modules use it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qpmcli.errors import ArtifactError, QpmError


# ------------------------------------------------------------------------------------------------ reading files
def read_regular_bytes(path: str | os.PathLike[str], *, limit: int | None = None) -> bytes | None:
    """The bytes of ``path`` when it is a regular file, ``None`` when it does not exist. A named pipe, device or
    folder there is an :class:`ArtifactError` (opened without blocking, so a FIFO can never hang a reader)."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ArtifactError(f"{p} is a folder, not a file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{p} is not a regular file (a pipe, socket or device); qpm reads only files")
        if limit is not None and st.st_size > limit:
            raise ArtifactError(f"{p} is {st.st_size} bytes, more than the {limit} a qpm file of its kind holds")
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            return fh.read()
    finally:
        if fd >= 0:
            os.close(fd)


# ------------------------------------------------------------------------------- leftovers of killed processes
# qpm's own temporary names, each carrying the pid of the process that writes it: atomic_path's
# ``.<name>.<pid>.<random>.tmp`` (and an exporter's ``.tmp.data`` beside it), staged_files' ``.<name>.<pid>.staged``,
# and the folders ``qpm-<what>-<pid>-<random>`` that quantize makes in the system's temporary folder.
TEMP_FILE_RE = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.(?:[A-Za-z0-9_]{8}\.tmp(?:\.data)?|staged)")
TEMP_DIR_RE = re.compile(r"qpm-[a-z0-9]+-(?P<pid>\d+)-[A-Za-z0-9_]+")


def temp_dir_prefix(what: str) -> str:
    """The prefix of a temporary folder of this process (``tempfile.TemporaryDirectory(prefix=...)``) that
    :func:`clean_stale_temps` recognises once the process is gone: ``qpm-<what>-<pid>-``."""
    return f"qpm-{what}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process, or not a pid at all
        return pid > 0
    return True


def clean_stale_temps(folders: Iterable[str | os.PathLike[str]], *, dirs: bool = False) -> list[Path]:
    """Remove what killed qpm processes left in ``folders``: files with one of qpm's own temporary names (and, with
    ``dirs``, qpm's temporary folders) whose process no longer runs on this machine. Nothing else is touched: a
    name that does not match, or whose process is alive, stays. Returns what was removed."""
    removed: list[Path] = []
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:  # missing or unreadable: nothing of ours to clean
            continue
        for entry in entries:
            m = TEMP_DIR_RE.fullmatch(entry.name) if dirs else None
            if m is None:
                m = TEMP_FILE_RE.fullmatch(entry.name)
                if m is None or not entry.is_file(follow_symlinks=False):
                    continue
            elif not entry.is_dir(follow_symlinks=False):
                continue
            if _alive(int(m.group("pid"))):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                continue
    return removed


# ---------------------------------------------------------------------------------------------------- folder lock
class FolderLock:
    """An exclusive lock on a folder (``<folder>/<name>``, ``fcntl.flock``): one writer at a time. The holder
    records its pid, command, host and start time in the file; a second process gets an :class:`ArtifactError`
    naming the holder, at once (no waiting). The kernel releases the lock when the holder exits, even after kill -9.
    The lock file is removed on release, and so is a folder created for the lock that is still empty then."""

    def __init__(self, folder: str | os.PathLike[str], command: str, name: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.command = command
        self._fh: Any = None
        self._created = False

    def __enter__(self) -> FolderLock:
        import fcntl

        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fh = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                fh.close()
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise ArtifactError(f"{self.folder} is in use by {self._holder()}; wait for it to finish (or stop "
                                    f"it) and rerun, or use another folder") from None
            try:  # the file may have been removed and re-created by the previous holder: lock the current one
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "command": self.command, "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        fh.flush()
        self._fh = fh
        return self

    def _holder(self) -> str:
        try:
            doc = json.loads(read_regular_bytes(self.path, limit=1 << 16) or b"{}")
        except (OSError, ValueError, ArtifactError):
            doc = {}
        if not isinstance(doc, dict) or not doc.get("pid"):
            return "another qpm process"
        return (f"another qpm process (pid {doc.get('pid')}, `{doc.get('command', '?')}` on host "
                f"{doc.get('host', '?')}, since {doc.get('since', '?')})")

    def __exit__(self, *exc: Any) -> None:
        import fcntl

        if self._fh is None:
            return
        try:  # no trace: the lock file goes (a process that opened it meanwhile sees that and retries)
            self.path.unlink()
            if self._created and not any(self.folder.iterdir()):
                self.folder.rmdir()  # nothing was written: leave no empty folder behind
        except OSError:
            pass
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None


# ------------------------------------------------------------------------------------------- disk space
SPACE_MARGIN = 16 << 20  # bytes kept free beyond the data itself (manifests, markers, the file system's own)


def check_free_space(folder: Path, need: int, what: str, *, error: type[QpmError] = QpmError,
                     fix: str = "free space or choose a folder on a larger disk") -> None:
    """``error`` unless ``folder`` (or the nearest existing parent) has ``need`` bytes (plus a margin) free: found
    before any file is created, instead of a process killed by SIGBUS when a mapped page finds no space. ``fix``
    ends the message."""
    probe = Path(folder)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # no statistics for this file system: reserve() still catches a full disk
    if free < need + SPACE_MARGIN:
        raise error(f"not enough free space for {what} in {folder}: it needs {_size(need + SPACE_MARGIN)}, "
                    f"{_size(free)} are free; {fix}")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def reserve(path: Path) -> None:
    """Allocate every block of ``path`` now (``posix_fallocate``), so that writing through a memory map can never
    hit a full disk (which kills the process with SIGBUS, no message); a full disk is an ``OSError`` (ENOSPC) here.
    Already allocated ranges cost nothing; where the call is missing (macOS) the free-space check has to do."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it: writes will tell
                    raise
    finally:
        os.close(fd)
