"""Booting a user-mode-linux guest: a real Linux kernel with IPVS, run as an ordinary host process.

Used by ``gorb run`` when the host's kernel has no IPVS, and by the sandbox test runner
(``tests/sandbox/uml.py``). The guest is Debian's ``linux.uml`` with the host's ``/`` as its
read-only root (hostfs), so the Python that runs gorb (any venv) runs unchanged inside. PID 1 is
``guest_init.sh`` (package data beside this module): it mounts tmpfs where the guest must write
(``/run``, ``/tmp``, ``/var/tmp``, ``/dev/shm``), then the host directories of ``mounts``
read-write at the same paths (so a venv under ``/tmp`` stays visible), loads ``ip_vs`` and every
scheduler, runs ``<workdir>/cmd.sh`` in ``cwd`` with its output in ``<workdir>/output``, writes
the exit status to ``<workdir>/rc`` and powers off.

The work directory is shared with the guest (hostfs) and holds those files, the kernel console
(``console``) and UML's own ``uml_dir``. UML runs one host process per guest address space, all
in the session started here, so stopping it means killing that process group.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TextIO

INIT = resources.files("gorb.services.launcher") / "guest_init.sh"
KERNEL = "/usr/bin/linux.uml"
# Directories the guest's init mounts a tmpfs over: a host path below one of them is invisible in
# the guest unless it is mounted again (``mounts``).
SHADOWED = ("/run", "/tmp", "/var/tmp", "/dev/shm")
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM the guest's kernel if whoever started it dies (even by
    SIGKILL), so a killed ``gorb run`` or test runner leaves no guest running. SIGTERM, not
    SIGKILL: UML's handler for it kills its helper processes too before exiting."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def shadowed(path: str) -> bool:
    """True if the guest's init hides ``path`` under one of its tmpfs mounts."""
    path = os.path.abspath(path)
    return any(path == d or path.startswith(d + "/") for d in SHADOWED)


def python_mounts() -> list[str]:
    """The host directories this Python needs that the guest would hide: the venv's prefix (and
    its base interpreter's) when they lie under ``SHADOWED``."""
    return sorted({p for p in (sys.prefix, sys.base_prefix) if shadowed(p)})


def available() -> str | None:
    """None if a guest can be booted here, else why not (and what to install)."""
    if not Path(KERNEL).exists():
        return f"{KERNEL} is missing: apt-get install user-mode-linux (or run ops/bootstrap)"
    if not shutil.which("modprobe"):
        return "modprobe is missing: apt-get install kmod"
    return None


@dataclass
class Guest:
    """One boot of the guest running ``argv`` (as root, in ``cwd``)."""

    argv: list[str]
    workdir: Path
    mounts: list[str] = field(default_factory=python_mounts)  # host dirs, read-write, same path
    cwd: str = "/"
    env: dict[str, str] = field(default_factory=dict)  # exported before argv runs
    mem: str = "1G"
    kernel_args: list[str] = field(default_factory=list)  # e.g. vec0:transport=tap,ifname=gt0
    prefix: list[str] = field(default_factory=list)  # runs the kernel, e.g. ip netns exec NS
    proc: subprocess.Popen | None = None
    _offset: int = 0  # how much of ``output`` pump() has copied

    def command(self) -> list[str]:
        return [*self.prefix, KERNEL, f"mem={self.mem}", "rootfstype=hostfs", "rootflags=/", "ro",
                f"init={INIT}", "con=null", "con0=null,fd:1", "quiet", "loglevel=1",
                f"uml_dir={self.workdir}", *self.kernel_args,
                f"GORB_SBX_DIR={self.workdir}", f"GORB_SBX_CWD={self.cwd}",
                f"GORB_SBX_MOUNTS={':'.join(self.mounts)}"]

    def start(self) -> None:
        for path in (str(self.workdir), self.cwd, *self.mounts):
            if any(c.isspace() or c == ":" for c in path):
                # the kernel's command line splits on whitespace, GORB_SBX_MOUNTS on ":"
                raise ValueError(f"{path!r}: a guest path cannot hold whitespace or ':'")
        self.workdir.mkdir(parents=True, exist_ok=True)
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env.items())
        (self.workdir / "cmd.sh").write_text(exports + "exec " + shlex.join(self.argv) + "\n")
        for name in ("output", "rc"):
            (self.workdir / name).unlink(missing_ok=True)
        (self.workdir / "output").touch()
        with open(self.workdir / "console", "wb") as console:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=console,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)

    def pump(self, out: TextIO) -> None:
        """Copy what the guest's command printed since the last call to ``out``."""
        with open(self.workdir / "output", "rb") as output:
            output.seek(self._offset)
            chunk = output.read()
        if chunk:
            self._offset += len(chunk)
            out.write(chunk.decode(errors="replace"))
            out.flush()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float) -> bool:
        """True if the guest is down within ``timeout`` seconds."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self) -> None:
        """SIGKILL every process of the guest (harmless if it is already down)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def exit_status(self) -> int | None:
        """The command's exit status, or None if the guest stopped without writing one."""
        try:
            text = (self.workdir / "rc").read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def console_tail(self, size: int = 3000) -> str:
        try:
            return (self.workdir / "console").read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""
