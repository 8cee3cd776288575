"""Workers read only below TRAINBUS_FILE_ROOTS, once, whatever path an event names."""

from __future__ import annotations

import hashlib
import os

import pytest

from workers.sinks.files import FileMissing, FileRefused, list_dir, open_file


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    (root / "run" / "best.pt").write_bytes(b"weights")
    (tmp_path / "secret.txt").write_text("not yours")
    return root.resolve()


def test_a_file_below_the_roots_is_opened(roots):
    with open_file(roots / "run" / "best.pt", [roots]) as f:
        assert f.size == 7 and f.sha256() == hashlib.sha256(b"weights").hexdigest()


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../secret.txt", "outside TRAINBUS_FILE_ROOTS"),
        ("run/../../secret.txt", "outside TRAINBUS_FILE_ROOTS"),
        ("escape", "'escape' is a symbolic link"),  # a symlink pointing out of the roots
        ("inside-link", "'inside-link' is a symbolic link"),  # even one pointing inside: links are not followed
        ("linkdir/best.pt", "'linkdir' is a symbolic link"),  # a link anywhere in the path below the root
        ("run/missing.pt", "does not exist"),
        ("run", "not a regular file"),
        ("fifo", "not a regular file"),  # opening it must not hang the worker
        ("/etc/passwd", "outside TRAINBUS_FILE_ROOTS"),
        ("relative/x.pt", "not an absolute path"),
    ],
)
def test_paths_that_escape_or_do_not_exist_are_refused(roots, name, reason):
    (roots / "escape").symlink_to(roots.parent / "secret.txt")
    (roots / "inside-link").symlink_to(roots / "run" / "best.pt")
    (roots / "linkdir").symlink_to(roots / "run")
    os.mkfifo(roots / "fifo")
    path = name if name.startswith("/") or name.startswith("relative") else roots / name
    with pytest.raises(FileRefused, match=reason):
        open_file(path, [roots])


def test_a_missing_file_is_told_apart_from_a_refused_one(roots):
    with pytest.raises(FileMissing):
        open_file(roots / "run" / "later.jpg", [roots])


def test_globbing_only_in_directories_below_the_roots(roots):
    (roots / "run" / "val_batch0_pred.jpg").write_bytes(b"x")
    assert list_dir(roots / "run", "val*.jpg", [roots]) == [str(roots / "run" / "val_batch0_pred.jpg")]
    with pytest.raises(FileRefused, match="outside"):
        list_dir(roots / "..", "*", [roots])
    (roots / "dirlink").symlink_to("/etc")
    with pytest.raises(FileRefused, match="symbolic link"):
        list_dir(roots / "dirlink", "passwd", [roots])


def test_bytes_that_are_not_the_recorded_sha256_never_complete(roots):
    path = roots / "run" / "best.pt"
    good = hashlib.sha256(b"weights").hexdigest()
    with open_file(path, [roots]) as f:
        assert b"".join(f.chunks(good)) == b"weights"
    path.write_bytes(b"rewritten")
    with open_file(path, [roots]) as f, pytest.raises(FileRefused, match="changed after its snapshot"):
        list(f.chunks(good))


def test_the_descriptor_is_what_is_read_after_the_path_is_swapped(roots, tmp_path):
    """Between the open and the read, the path becomes a link to a secret: the bytes stay the checked ones."""
    path = roots / "run" / "best.pt"
    good = hashlib.sha256(b"weights").hexdigest()
    with open_file(path, [roots]) as f:
        path.unlink()
        path.symlink_to(tmp_path / "secret.txt")
        assert b"".join(f.chunks(good)) == b"weights"
        copy = f.copy_into(tmp_path, good)
    assert copy.read_bytes() == b"weights"


def test_an_image_still_being_drawn_is_waited_for(roots):
    from PIL import Image

    path = roots / "run" / "train_batch0.jpg"
    Image.new("RGB", (8, 8)).save(path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with open_file(path, [roots]) as f:
        assert f.still_being_written()
    path.write_bytes(whole)
    with open_file(path, [roots]) as f:
        assert not f.still_being_written()
