"""Whether the running kernel has IPVS: it decides where ``gorb run`` starts the supervised system.

Only ``ipvs-writer`` imports pyroute2, so the launcher asks the kernel the plain way: the ip_vs
module creates ``/proc/net/ip_vs`` in every network namespace. If it is missing, ``modprobe ip_vs``
is tried once (the writer would need it loaded anyway) and the file looked at again.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

PROC_FILE = "/proc/net/ip_vs"
MODPROBE = ("modprobe", "-q", "ip_vs")


def has_ipvs(proc_file: str = PROC_FILE, modprobe: Sequence[str] = MODPROBE) -> bool:
    if Path(proc_file).exists():
        return True
    try:
        subprocess.run(list(modprobe), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return Path(proc_file).exists()
