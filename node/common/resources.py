"""What this process uses: CPU, memory and network, for the status object's ``resources``."""

from __future__ import annotations

import functools

import psutil


@functools.cache
def _process() -> psutil.Process:
    proc = psutil.Process()
    proc.cpu_percent(None)  # the first reading is always 0.0; later ones measure since
    return proc


def resources() -> dict[str, float | int]:
    """The contract's ``resources`` object for this process, for the node's status."""
    proc = _process()
    with proc.oneshot():
        cpu = proc.cpu_percent(None)
        rss = proc.memory_info().rss
        memory_percent = proc.memory_percent()
    net = psutil.net_io_counters()
    return {
        "cpu_percent": cpu,
        "memory_rss": rss,
        "memory_percent": round(memory_percent, 3),
        "net_bytes_sent": net.bytes_sent if net else 0,
        "net_bytes_recv": net.bytes_recv if net else 0,
    }
