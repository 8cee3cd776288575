"""Small helpers shared by the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05) -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:  # the field after the state
                found.append(int(stat.parent.name))
    return found


def yolo_dataset(root: Path, images: int = 8) -> Path:
    """A tiny detection dataset (64x64 images, one box each, train = val) and its data.yaml."""
    from PIL import Image

    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(images):
            img = Image.new("RGB", (64, 64), (20 * i % 256, 100, 150))
            img.paste((255, 255, 255), (16, 16, 48, 48))
            img.save(root / "images" / split / f"{i}.jpg")
            (root / "labels" / split / f"{i}.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: square\n")
    return data


def yolo_config_dir(root: Path) -> Path:
    """An Ultralytics config dir (YOLO_CONFIG_DIR) holding its font, so that nothing is downloaded."""
    import shutil

    import matplotlib

    config = root / "yolo-config"
    config.mkdir(exist_ok=True)
    shutil.copy(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", config / "Arial.ttf")
    return config


def delivery_processes(below: Path) -> list[int]:
    """Pids of the delivery processes and drainers whose spool directory lies below ``below``."""
    base = str(below).encode()
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError, ValueError):
            args = cmdline.read_bytes().split(b"\0")
            ours = any(b"producers.drain" in a or b"producers.delivery" in a for a in args)
            if ours and any(a.startswith(base) for a in args) and _running(cmdline.parent / "stat"):
                found.append(int(cmdline.parent.name))
    return found


def _running(stat: Path) -> bool:
    """Not a zombie (one the test's own Popen has not reaped yet is dead all the same)."""
    return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def kill_drainers(below: Path) -> None:
    """SIGKILL every delivery process and drainer whose spool directory lies below ``below``."""
    for pid in delivery_processes(below):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def producer_env(redis_url: str, namespace: str, spool_dir: Path) -> dict[str, str]:
    """The environment of a training process started by a test (the repo importable)."""
    return dict(
        os.environ,
        TRAINBUS_REDIS_URL=redis_url,
        TRAINBUS_NAMESPACE=namespace,
        TRAINBUS_SPOOL_DIR=str(spool_dir),
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )


def run_training(command: list[str], env: dict[str, str], workdir: Path, timeout: float = 300) -> None:
    """A training script as its own process(es), in ``workdir``; fails the test with its output's tail."""
    out = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
