"""Run a command as root inside a user-mode-linux guest that has real IPVS.

    python -m tests.sandbox.uml [--timeout S] [--mem 1G] -- COMMAND [ARG...]

The guest is Debian's ``linux.uml`` (a real 6.1 kernel run as an ordinary process) with the host's
``/`` as its read-only root and this working tree mounted read-write at the same path, so the
project's venv runs unchanged inside. ``guest_init.sh`` (PID 1, package data of
``gorb.services.launcher``) loads ``ip_vs`` and every scheduler, runs the command from the tree's
root and powers off. The command's output is streamed to our
stdout while it runs and its exit status becomes ours. No network device is given to the guest:
every address a test uses lives in namespaces inside it. The boot itself is
``services/launcher/uml.py`` (shared with ``gorb run``'s guest mode).

Variables ``GORB_TEST_*`` of our environment (``GORB_TEST_VENV``: the install the tests run, see
``tests/installed.py``) are set inside too, and a path one of them names (a file's directory) is mounted
(read-write, same path) when the guest's own tmpfs would hide it.

``--timeout`` is a limit: scaled by this host's pace (``tests/pace.py``), since the guest runs as
fast as the host lets it.

Exit status: the command's, or 124 on timeout, or 125 when the guest died without one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from gorb.services.launcher import uml
from gorb.services.launcher.uml import available
from tests import pace

REPO = Path(__file__).resolve().parents[2]


def run(argv: list[str], timeout: float = 1800, mem: str = "1G", env: dict[str, str] | None = None,
        out=None, mounts: tuple[str, ...] = ()) -> int:
    """Boot, run ``argv`` inside, stream its output to ``out``; return its exit status."""
    out = out or sys.stdout
    why = available()
    if why:
        print(f"sandbox: {why}", file=sys.stderr)
        return 125
    work = Path(tempfile.mkdtemp(prefix="gorb-uml-", dir="/tmp"))
    forwarded = {k: v for k, v in os.environ.items() if k.startswith("GORB_TEST_")}
    named = {(p if os.path.isdir(p) else os.path.dirname(p))  # a file: its directory
             for p in map(os.path.abspath, forwarded.values())
             if os.path.isabs(p) and os.path.exists(p) and uml.shadowed(p)}
    guest = uml.Guest(argv, work, env={**forwarded, **(env or {})}, mem=mem, cwd=str(REPO),
                      mounts=sorted({str(REPO), *uml.python_mounts(), *named, *mounts}))
    try:
        guest.start()
        deadline = time.monotonic() + timeout
        while guest.running() and time.monotonic() < deadline:
            guest.pump(out)
            time.sleep(0.2)
        timed_out = guest.running()
        guest.kill()
        guest.pump(out)
        if timed_out:
            print(f"sandbox: timed out after {timeout:.0f} s", file=sys.stderr)
            return 124
        rc = guest.exit_status()
        if rc is None:
            print(f"sandbox: the guest stopped without an exit status; console:\n"
                  f"{guest.console_tail()}", file=sys.stderr)
            return 125
        return rc
    finally:
        guest.kill()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--mem", default="1G")
    parser.add_argument("--mount", action="append", default=[],
                        help="another host directory to mount read-write at the same path")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("a command to run is required")
    print(f"sandbox: {pace.speed()}", file=sys.stderr)
    return run(command, timeout=pace.limit(args.timeout), mem=args.mem, mounts=tuple(args.mount))


if __name__ == "__main__":
    sys.exit(main())
