"""Resident memory of this process from ``/proc/self`` (Linux): the benchmarks' one way to read it."""
from __future__ import annotations


def vm_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``...) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def reset_peak() -> int:
    """Reset the high-water mark (``VmHWM``) to the resident memory now, and return that (KiB)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return vm_kib("VmRSS")
