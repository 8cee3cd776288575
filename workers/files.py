"""Which files a worker may read, and checking a checkpoint before it is uploaded.

An event names files by path; workers read only below ``TRAINBUS_FILE_ROOTS``, after
resolving symlinks and ``..``, whatever the event says.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from shared.checksum import sha256_of


class FileRefused(Exception):
    """The file cannot be used; the message says why (outside the roots, missing, changed)."""


class FileMissing(FileRefused):
    """The file is not there (yet): a debug image may still be written, a checkpoint not."""


def allowed_dir(directory: str | Path, roots: Iterable[Path]) -> Path:
    """``directory`` resolved, if it is below one of ``roots`` (to glob in it)."""
    resolved = Path(directory).resolve()
    _check_under(directory, resolved, tuple(roots))
    return resolved


def allowed_path(path: str | Path, roots: Iterable[Path]) -> Path:
    """``path`` resolved, if it is a regular file below one of ``roots``."""
    roots = tuple(roots)
    try:
        resolved = Path(path).resolve(strict=True)
    except FileNotFoundError:
        raise FileMissing(f"{path} does not exist") from None
    except (OSError, RuntimeError) as exc:
        raise FileRefused(f"{path} cannot be resolved: {exc}") from None
    _check_under(path, resolved, roots)
    if not resolved.is_file():
        raise FileRefused(f"{path} is not a regular file")
    return resolved


def _check_under(given: str | Path, resolved: Path, roots: tuple[Path, ...]) -> None:
    if not any(resolved.is_relative_to(root) for root in roots):
        shown = ", ".join(str(r) for r in roots)
        raise FileRefused(f"{given} is outside TRAINBUS_FILE_ROOTS ({shown}); add its directory there")


def verified_checkpoint(path: str | Path, sha256: str, roots: Iterable[Path]) -> Path:
    """The checkpoint's path if it is allowed and still has the sha256 its event recorded."""
    resolved = allowed_path(path, roots)
    actual = sha256_of(resolved)
    if actual != sha256:
        raise FileRefused(
            f"{path} has sha256 {actual[:12]}..., the event recorded {sha256[:12]}...: "
            "the file changed after its snapshot, so it is not uploaded"
        )
    return resolved
