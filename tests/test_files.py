"""Workers read only below TRAINBUS_FILE_ROOTS, whatever path an event names."""

from __future__ import annotations

import hashlib

import pytest

from workers.files import FileRefused, allowed_dir, allowed_path, verified_checkpoint


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    (root / "run" / "best.pt").write_bytes(b"weights")
    (tmp_path / "secret.txt").write_text("not yours")
    return root


def test_a_file_below_the_roots_is_allowed(roots):
    assert allowed_path(roots / "run" / "best.pt", [roots.resolve()]) == (roots / "run" / "best.pt").resolve()


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../secret.txt", "outside TRAINBUS_FILE_ROOTS"),
        ("run/../../secret.txt", "outside TRAINBUS_FILE_ROOTS"),
        ("escape", "outside TRAINBUS_FILE_ROOTS"),  # a symlink pointing out of the roots
        ("run/missing.pt", "does not exist"),
        ("run", "not a regular file"),
        ("/etc/passwd", "outside TRAINBUS_FILE_ROOTS"),
    ],
)
def test_paths_that_escape_or_do_not_exist_are_refused(roots, name, reason):
    (roots / "escape").symlink_to(roots.parent / "secret.txt")
    with pytest.raises(FileRefused, match=reason):
        allowed_path(roots / name if not name.startswith("/") else name, [roots.resolve()])


def test_globbing_only_in_allowed_directories(roots):
    assert allowed_dir(roots / "run", [roots.resolve()]) == (roots / "run").resolve()
    with pytest.raises(FileRefused, match="outside"):
        allowed_dir(roots / "..", [roots.resolve()])


def test_a_checkpoint_must_still_match_its_recorded_sha256(roots):
    path = roots / "run" / "best.pt"
    good = hashlib.sha256(b"weights").hexdigest()
    assert verified_checkpoint(path, good, [roots.resolve()]) == path.resolve()
    path.write_bytes(b"rewritten")
    with pytest.raises(FileRefused, match="changed after its snapshot"):
        verified_checkpoint(path, good, [roots.resolve()])
