"""Reading the files events name, without letting a path lead outside ``TRAINBUS_FILE_ROOTS``.

An event names files by path, and anything that can write below a root (a training
container sharing the volume) can swap a checked file for a symlink before it is read.
So a file is opened exactly once: from the root's directory downwards, one component at a
time, never following a symlink (``O_NOFOLLOW`` on each ``openat``); the open descriptor is
then checked (a regular file, inside the root, the expected size and sha256), and only
bytes read from that descriptor are sent: streamed (HUB), or copied into a directory only
this worker can write (ClearML, whose SDK reads ``local_path`` later in its own thread).
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from shared.errors import TrainbusError

CHUNK = 1 << 20
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO cannot hang us
SETTLE_S = 2.0  # an image unchanged this long is taken as written, whole-looking or not
IMAGE_ENDS = {".png": b"IEND\xaeB`\x82", ".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9"}


class FileRefused(TrainbusError):
    """The file cannot be used; the message says why (outside the roots, a symlink, changed, ...)."""


class FileMissing(FileRefused):
    """The file is not there (yet): a debug image may still be written, a checkpoint not."""


class OpenedFile:
    """One file opened below a root; everything read from it comes from this descriptor."""

    def __init__(self, named: str, fd: int) -> None:
        self.named = named
        self.fd = fd
        st = os.fstat(fd)
        self.size = st.st_size
        self._stamp = (st.st_size, st.st_mtime_ns)

    def __enter__(self) -> OpenedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def sha256(self) -> str:
        """The sha256 of the descriptor's bytes (read from the start)."""
        h = hashlib.sha256()
        for chunk in self._read_all():
            h.update(chunk)
        return h.hexdigest()

    def chunks(self, sha256: str | None = None) -> Iterator[bytes]:
        """The file's bytes; the last chunk is held back until size and sha256 are checked.

        A reader that sends what it gets (an upload) therefore never completes a body
        whose bytes are not the ones the event recorded: on a mismatch this raises
        :class:`FileRefused` before the last chunk.
        """
        h = hashlib.sha256()
        held: bytes | None = None
        total = 0
        for chunk in self._read_all():
            if held is not None:
                yield held
            h.update(chunk)
            total += len(chunk)
            held = chunk
        self._check(total, h.hexdigest(), sha256)
        if held is not None:
            yield held

    def copy_into(self, directory: Path, sha256: str | None = None, *, name: str | None = None) -> Path:
        """A private copy (in ``directory``, which only this worker writes) of the checked bytes,
        named ``<name's stem>-<random><suffix>`` (the SDK shows the name)."""
        shown = Path(name or self.named)
        fd, name = tempfile.mkstemp(dir=directory, prefix=f"{shown.stem}-", suffix=shown.suffix)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in self.chunks(sha256):
                    out.write(chunk)
        except BaseException:
            os.unlink(name)
            raise
        return Path(name)

    def still_being_written(self) -> bool:
        """True for an image that does not end the way a whole PNG/JPEG does and changed in the
        last SETTLE_S seconds: plots are drawn in threads and show up half written."""
        end = IMAGE_ENDS.get(Path(self.named).suffix.lower())
        if end is None:
            return False
        whole = self.size >= len(end) and os.pread(self.fd, len(end), self.size - len(end)) == end
        return not whole and time.time_ns() - self._stamp[1] < SETTLE_S * 1e9

    def _read_all(self) -> Iterator[bytes]:
        offset = 0
        while chunk := os.pread(self.fd, CHUNK, offset):
            offset += len(chunk)
            yield chunk

    def _check(self, total: int, digest: str, sha256: str | None) -> None:
        st = os.fstat(self.fd)
        if total != self.size or (st.st_size, st.st_mtime_ns) != self._stamp:
            raise FileRefused(f"{self.named} changed while it was read ({total} of {self.size} bytes)")
        if sha256 is not None and digest != sha256:
            raise FileRefused(
                f"{self.named} has sha256 {digest[:12]}..., the event recorded {sha256[:12]}...: "
                "the file changed after its snapshot, so it is not sent"
            )


def open_file(path: str | Path, roots: Iterable[Path]) -> OpenedFile:
    """Open a regular file named by an event, if it lies below one of ``roots``."""
    named = str(path)
    root, parts = _below_root(named, tuple(roots))
    if not parts:
        raise FileRefused(f"{named} is not a regular file")
    fd = _walk(root, parts, named, last_is_dir=False)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise FileRefused(f"{named} is not a regular file")
        _check_inside(fd, root, named)
        return OpenedFile(named, fd)
    except BaseException:
        os.close(fd)
        raise


def open_snapshot(checkpoint: Mapping[str, Any], roots: Iterable[Path]) -> OpenedFile:
    """Open the snapshot an event's ``checkpoint`` names and check it still has the sha256 the
    event recorded: what is uploaded is what the training saved, or nothing."""
    if "error" in checkpoint:
        raise FileRefused(f"the producer could not snapshot it: {checkpoint['error']}")
    path, sha256 = checkpoint.get("path"), checkpoint.get("sha256")
    if not isinstance(path, str) or not isinstance(sha256, str):
        raise FileRefused("the event names no snapshot path and sha256")
    file = open_file(path, roots)
    try:
        if file.sha256() != sha256:
            raise FileRefused(
                f"{path} does not have the sha256 its event recorded: the file changed after its snapshot"
            )
    except BaseException:
        file.close()
        raise
    return file


def list_dir(directory: str | Path, pattern: str, roots: Iterable[Path]) -> list[str]:
    """Paths of the entries of ``directory`` (below a root) whose names match the glob ``pattern``."""
    named = str(directory)
    root, parts = _below_root(named, tuple(roots))
    fd = _walk(root, parts, named, last_is_dir=True)
    try:
        _check_inside(fd, root, named)
        names = sorted(n for n in os.listdir(fd) if fnmatch.fnmatchcase(n, pattern))
    finally:
        os.close(fd)
    return [os.path.join(named, n) for n in names]


def private_dir(prefix: str) -> Path:
    """A new directory only this process's user can write: where checked copies wait for an SDK."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def _below_root(named: str, roots: tuple[Path, ...]) -> tuple[str, list[str]]:
    """The root ``named`` lies below (compared as written, ``..`` collapsed) and the parts under it."""
    if not os.path.isabs(named):
        raise FileRefused(f"{named} is not an absolute path")
    normal = os.path.normpath(named)
    for root in roots:
        base = str(root)
        if normal == base or normal.startswith(base.rstrip("/") + "/"):
            rest = normal[len(base) :].strip("/")
            return base, rest.split("/") if rest else []
    shown = ", ".join(str(r) for r in roots)
    raise FileRefused(f"{named} is outside TRAINBUS_FILE_ROOTS ({shown}); add its directory there")


def _walk(root: str, parts: list[str], named: str, *, last_is_dir: bool) -> int:
    """Descend from ``root`` through ``parts`` with openat, refusing any symlink on the way."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the root itself is the operator's choice
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = DIR_FLAGS if (not last or last_is_dir) else FILE_FLAGS
            try:
                child = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                raise _refusal(exc, fd, part, named) from None
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def _refusal(exc: OSError, parent: int, part: str, named: str) -> FileRefused:
    if exc.errno == errno.ENOENT:
        return FileMissing(f"{named} does not exist")
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        try:
            is_link = stat.S_ISLNK(os.lstat(part, dir_fd=parent).st_mode)
        except OSError:
            is_link = False
        if is_link:
            return FileRefused(f"{named}: {part!r} is a symbolic link; links below a root are not followed")
        return FileRefused(f"{named}: {part!r} is not a directory")
    return FileRefused(f"{named} cannot be opened: {exc.strerror}")


def _check_inside(fd: int, root: str, named: str) -> None:
    """The kernel's own name for the descriptor must lie below the root (Linux's /proc)."""
    try:
        actual = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return  # no /proc: the walk alone is the proof
    if actual != root and not actual.startswith(root.rstrip("/") + "/"):
        raise FileRefused(f"{named} opened as {actual}, outside its root {root}")
