"""Run a command as root inside a user-mode-linux guest that has real IPVS.

    python -m tests.sandbox.uml [--timeout S] [--mem 1G] -- COMMAND [ARG...]

The guest is Debian's ``linux.uml`` (a real 6.1 kernel run as an ordinary process) with the host's
``/`` as its read-only root and this working tree mounted read-write at the same path, so the
project's venv runs unchanged inside. ``init.sh`` (PID 1) loads ``ip_vs`` and every scheduler,
runs the command from the tree's root and powers off. The command's output is streamed to our
stdout while it runs and its exit status becomes ours. No network device is given to the guest:
every address a test uses lives in namespaces inside it.

Exit status: the command's, or 124 on timeout, or 125 when the guest died without one.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INIT = Path(__file__).resolve().parent / "init.sh"
KERNEL = "/usr/bin/linux.uml"


def available() -> str | None:
    """None if the sandbox can run here, else why not."""
    if not Path(KERNEL).exists():
        return f"{KERNEL} is missing: apt-get install user-mode-linux"
    if not shutil.which("modprobe"):
        return "modprobe is missing: apt-get install kmod"
    return None


def run(argv: list[str], timeout: float = 1800, mem: str = "1G", env: dict[str, str] | None = None,
        out=None) -> int:
    """Boot, run ``argv`` inside, stream its output to ``out``; return its exit status."""
    out = out or sys.stdout
    why = available()
    if why:
        print(f"sandbox: {why}", file=sys.stderr)
        return 125
    work = Path(tempfile.mkdtemp(prefix="gorb-uml-", dir="/tmp"))
    try:
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (env or {}).items())
        (work / "cmd.sh").write_text(exports + "exec " + shlex.join(argv) + "\n")
        (work / "output").touch()
        cmd = [KERNEL, f"mem={mem}", "rootfstype=hostfs", "rootflags=/", "ro", f"init={INIT}",
               "con=null", "con0=null,fd:1", "quiet", "loglevel=1", f"uml_dir={work}",
               f"GORB_SBX_DIR={work}", f"GORB_SBX_REPO={REPO}"]
        with open(work / "console", "wb") as console:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        timed_out = False
        with open(work / "output", "rb") as output:
            while True:
                chunk = output.read()
                if chunk:
                    out.write(chunk.decode(errors="replace"))
                    out.flush()
                if proc.poll() is not None:
                    chunk = output.read()
                    if chunk:
                        out.write(chunk.decode(errors="replace"))
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.2)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if timed_out:
            print(f"sandbox: timed out after {timeout:.0f} s", file=sys.stderr)
            return 124
        rc_file = work / "rc"
        if not rc_file.exists():
            console_tail = (work / "console").read_bytes()[-3000:].decode(errors="replace")
            print(f"sandbox: the guest stopped without an exit status; console:\n{console_tail}",
                  file=sys.stderr)
            return 125
        return int(rc_file.read_text().strip() or 125)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--mem", default="1G")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("a command to run is required")
    return run(command, timeout=args.timeout, mem=args.mem)


if __name__ == "__main__":
    sys.exit(main())
