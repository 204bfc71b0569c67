"""What every benchmark shares: the machine it ran on, timers, percentiles, resident memory, child processes.

Machines here are shared and noisy, so each benchmark measures its ratio side by side in one run and
reports absolute figures together with :func:`machine_info` (CPU model, cores, load average, torch
threads, GPU) taken at the start and the end of the run.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def cpu_model() -> str:
    """``lscpu``'s model name (e.g. "AMD EPYC"), else /proc/cpuinfo's, else the platform's."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def total_memory_gb() -> float | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine_info() -> dict[str, Any]:
    """Where the figures come from; the load average says how busy the shared machine was."""
    hypervisor = "VM" if "hypervisor" in Path("/proc/cpuinfo").read_text(errors="ignore") else "host"
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "kind": hypervisor, "memory_gb": total_memory_gb(),
        "load_avg_1_5_15": load_average(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "gpu": gpu_name(), "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def describe_machine(info: dict[str, Any]) -> str:
    """One line: "2 vCPU AMD EPYC VM, 23.4 GiB, no GPU"."""
    gpu = info.get("gpu") or "no GPU"
    unit = "vCPU" if info.get("kind") == "VM" else "cores"
    return f"{info.get('cores')} {unit} {info.get('cpu')} {info.get('kind')}, {info.get('memory_gb')} GiB, {gpu}"


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(seconds, np.float64), q)) * 1e3, 3) if seconds else float("nan")


def time_one(fn: Callable[[np.ndarray], object], arg: np.ndarray) -> float:
    """Wall-clock seconds of ``fn(arg)``."""
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


def _status_kb(field: str) -> float | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return None


def rss_mb() -> float | None:
    """Resident memory of this process now (memory-mapped pages that were touched count)."""
    kb = _status_kb("VmRSS")
    return round(kb / 1024, 1) if kb is not None else None


def peak_rss_mb() -> float | None:
    kb = _status_kb("VmHWM")
    return round(kb / 1024, 1) if kb is not None else None


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """(n, dim) float32 random unit vectors (synthetic memories and queries)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    return torch.nn.functional.normalize(x, dim=1).numpy()


def run_child(task: str, args: dict[str, Any], *, timeout_s: float = 900) -> dict[str, Any]:
    """Run ``python -m programs.bench.child TASK ARGS_JSON`` in a fresh process; its last stdout line is JSON.

    A fresh process per measurement keeps resident-memory figures clean (nothing left from the
    previous size) and gives every measurement the same start.
    """
    cmd = [sys.executable, "-m", "programs.bench.child", task, json.dumps(args)]
    # stderr passes through: a long child (a 1M-pair HNSW build) says where it is
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.get("timeout_s", timeout_s),
                          check=False, cwd=Path(__file__).resolve().parents[2])
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child {task} failed ({done.returncode}); its error is above")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))
