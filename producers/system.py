"""The machine's load, sampled in the delivery process, in the shape the Platform expects.

The keys, units and rounding of Ultralytics' ``SystemLogger(all_drives=True)
.get_metrics(rates=True)`` (what its Platform callbacks send with each epoch): cpu and ram in
percent, each local drive's use in GB, disk and network rates in MB/s, NVIDIA GPUs through
NVML. Written here with psutil because importing Ultralytics would import torch, which makes
the delivery process 20 times bigger. No psutil: no samples.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any


class SystemSampler:
    """Rates are since the previous sample (the first one's since the sampler was made)."""

    def __init__(self) -> None:
        try:
            import psutil  # optional: Ultralytics depends on it
        except ImportError:
            self._psutil = None
            return
        self._psutil = psutil
        self._mounts = sorted(
            p.mountpoint
            for p in psutil.disk_partitions(all=False)
            if p.mountpoint and Path(p.mountpoint).is_dir() and "dontbrowse" not in p.opts.split(",")
        ) or ["/"]
        self._nvml, self._versions = _nvml()
        self._net, self._disk, self._time = psutil.net_io_counters(), psutil.disk_io_counters(), time.time()
        psutil.cpu_percent()  # starts its interval

    def sample(self) -> dict[str, Any] | None:
        psutil = self._psutil
        if psutil is None:
            return None
        net, disk_io, memory, now = (
            psutil.net_io_counters(),
            psutil.disk_io_counters(),
            psutil.virtual_memory(),
            time.time(),
        )
        elapsed = max(0.1, now - self._time)

        def rate(new: int, old: int) -> float:
            return round(max(0, (new - old) / 1e6 / elapsed), 3)

        disks = []
        for mount in self._mounts:
            with contextlib.suppress(OSError):
                usage = shutil.disk_usage(mount)
                disks.append(
                    {"mount": mount, "used_gb": round(usage.used / 1e9, 3), "total_gb": round(usage.total / 1e9, 3)}
                )
        metrics = {
            **self._versions,
            "cpu": round(psutil.cpu_percent(), 3),
            "ram": round(memory.percent, 3),
            "disk": disks,
            "disk_io": {}
            if disk_io is None or self._disk is None
            else {
                "read_mbs": rate(disk_io.read_bytes, self._disk.read_bytes),
                "write_mbs": rate(disk_io.write_bytes, self._disk.write_bytes),
            },
            "gpus": _gpus(self._nvml),
            "network": {
                "recv_mbs": rate(net.bytes_recv, self._net.bytes_recv),
                "sent_mbs": rate(net.bytes_sent, self._net.bytes_sent),
            },
        }
        self._net, self._disk, self._time = net, disk_io, now
        return metrics


def _nvml() -> tuple[Any, dict[str, str]]:
    """pynvml, initialised, and the driver's versions; (None, {}) without NVIDIA GPUs."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None, {}
    versions = {}
    with contextlib.suppress(Exception):
        versions["driver_version"] = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        versions["cuda_version"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
    return pynvml, versions


def _gpus(nvml: Any) -> dict[str, dict[str, Any]]:
    gpus: dict[str, dict[str, Any]] = {}
    if nvml is None:
        return gpus
    with contextlib.suppress(Exception):
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus[str(i)] = {
                "usage": round(nvml.nvmlDeviceGetUtilizationRates(handle).gpu, 3),
                "memory": round(memory.used / memory.total * 100, 3),
                "temp": nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
                "power": nvml.nvmlDeviceGetPowerUsage(handle) // 1000,
            }
    return gpus
