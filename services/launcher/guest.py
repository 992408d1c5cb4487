"""``gorb run`` on a kernel without IPVS: the same supervised system inside a user-mode-linux guest.

The host side (this module, in the ``gorb run`` process):

1. binds the API's port on 127.0.0.1 and ``<runtime-dir>/supervisor.sock`` first, so a busy port
   fails before anything is booted;
2. writes ``<runtime-dir>/gorb.toml`` (the effective config) and a ``supervisord.conf`` that only
   points supervisorctl at that socket, so ``gorb ctl`` / ``supervisorctl -c`` work unchanged;
3. creates network namespace ``gorb-<pid>`` holding a tap, and boots the guest's kernel in it
   with ``vec0`` on the tap (``netns.py`` draws the link);
4. relays 127.0.0.1:<port> to the API and the socket to supervisord's inet_http_server in the
   guest (``relay.py``), prints the guest's output (supervisord's log) and, once the API accepts
   connections, its URL;
5. on SIGINT/SIGTERM/SIGHUP asks the guest's supervisord to shut down (XML-RPC
   ``supervisor.shutdown``: programs stop in reverse priority order, the writer exits 0), waits
   for the guest to power off (SIGKILL after STOP_TIMEOUT, or at a second signal), then removes
   the namespace, the tap with it, and the socket.

The guest side (``<runtime-dir>/uml/guest.sh``, run by ``guest_init.sh`` as PID 1's
payload) brings up its end of the link, mounts the host's state and log directories read-write
(the guest's root is the host's /, read-only) and runs ``gorb run --guest never`` with the
guest's own tmpfs ``/run/gorb`` as runtime dir (ipc sockets must be local to the guest's kernel).
State and logs therefore land on the host, at the same paths as in host mode.
"""

from __future__ import annotations

import http.client
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
import xmlrpc.client
from pathlib import Path
from typing import TextIO

import msgspec

from gorb.common import config, runtime
from gorb.services.launcher import conf, netns, uml
from gorb.services.launcher.relay import Relay, connect_in

GUEST_RUNTIME_DIR = "/run/gorb"  # the guest's own tmpfs
STOP_TIMEOUT = 45.0  # supervisord stops api (<= 10 s) then the writer (<= 10 s), then power-off
READY_WARN_AFTER = 90.0


class _Signals:
    """SIGINT/SIGTERM/SIGHUP only set flags here; the main loop acts on them."""

    def __init__(self) -> None:
        self.count = 0
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, _signum, _frame) -> None:
        self.count += 1


def guest_config(cfg: config.Config) -> config.Config:
    """What the guest's gorb runs with: its own runtime dir, the API on every address of the
    guest (its vec0 is reachable only from our namespace) on the same port, and vec0 as the
    default device unless another was chosen."""
    copy = msgspec.toml.decode(config.dump(cfg).encode(), type=config.Config)
    _, port = config.parse_listen(cfg.api.listen)
    copy.api.listen = f":{port}"
    copy.gorb.runtime_dir = GUEST_RUNTIME_DIR
    if copy.writer.device == config.WriterSection().device:
        # The guest has no eth0: its one device is vec0, so a service PUT without "host" gets
        # the guest's address (GORB's -i default) instead of "endpoint information is missing".
        copy.writer.device = "vec0"
    return copy


def guest_script(cfg: config.Config, layout: conf.Layout, workdir: Path) -> str:
    """The guest's payload (see the module docstring)."""
    dirs = [str(Path(cfg.writer.state_file).parent), layout.log_dir]
    launcher = [layout.python, "-P", "-m", "gorb.services.launcher", "run", "--guest", "never",
                "--config", str(workdir / "gorb.toml"), "--log-dir", layout.log_dir,
                "--ctl-inet", f"{netns.GUEST_ADDR}:{netns.CTL_PORT}"]
    return "\n".join([
        "# gorb run's user-mode-linux mode, inside the guest (services/launcher/guest.py).",
        "set -e",
        netns.guest_link_script(),
        *(f"mkdir -p {d} && mount -t hostfs hostfs {d} -o {d}" for d in map(shlex.quote, dirs)),
        "exec " + shlex.join(launcher),
        "",
    ])


def _tcp_listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


def _unix_listener(path: Path) -> socket.socket:
    """Listen on ``path``; a socket file nobody answers on is stale and replaced, one that
    answers belongs to a running gorb and is an error (FileExistsError)."""
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise FileExistsError(f"{path} is in use: another gorb runs with this runtime dir")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o660)
    sock.listen(16)
    return sock


def _write_files(cfg: config.Config, layout: conf.Layout, why: str, workdir: Path) -> None:
    """The host's gorb.toml and ctl-only supervisord.conf; the guest's config and payload."""
    layout.config_file.write_text(config.dump(cfg))
    layout.supervisord_conf.write_text(conf.render_ctl_only(
        layout, f"gorb runs inside a user-mode-linux guest ({why}); its supervisord is\n"
                f"there, reached through {layout.socket} (relayed by `gorb run`)."))
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    for d in (layout.log_dir, str(Path(cfg.writer.state_file).parent)):
        Path(d).mkdir(parents=True, exist_ok=True)
    (workdir / "gorb.toml").write_text(config.dump(guest_config(cfg)))
    (workdir / "guest.sh").write_text(guest_script(cfg, layout, workdir))


def _supervisor_shutdown(ns_fd: int) -> bool:
    """``supervisor.shutdown`` over XML-RPC to the guest's supervisord; True if it accepted."""
    try:
        sock = connect_in(ns_fd, (netns.GUEST_ADDR, netns.CTL_PORT), timeout=3)
        sock.settimeout(10)
        conn = http.client.HTTPConnection(netns.GUEST_ADDR, netns.CTL_PORT)
        conn.sock = sock
        conn.request("POST", "/RPC2", xmlrpc.client.dumps((), "supervisor.shutdown"),
                     {"Content-Type": "text/xml"})
        reply = conn.getresponse()
        ok = reply.status == 200 and xmlrpc.client.loads(reply.read())[0] == (True,)
        conn.close()
        return ok
    except (OSError, http.client.HTTPException, xmlrpc.client.Error):
        return False


def _announce_ready(ns_fd: int, port: int, guest: uml.Guest, started: float, out: TextIO,
                    signals: _Signals) -> None:
    """Print the API's URL once it accepts connections inside the guest."""
    warned = False
    while guest.running() and not signals.count:
        try:
            connect_in(ns_fd, (netns.GUEST_ADDR, port), timeout=1).close()
        except OSError:
            if not warned and time.monotonic() - started > READY_WARN_AFTER:
                warned = True
                print(f"gorb: the API is not answering after {READY_WARN_AFTER:.0f} s: see "
                      "`gorb ctl status` and the api log", file=out, flush=True)
            time.sleep(0.25)
            continue
        print(f"gorb: API ready at http://127.0.0.1:{port}/ ({time.monotonic() - started:.1f} s "
              "after start)", file=out, flush=True)
        return


def _banner(why: str, cfg: config.Config, layout: conf.Layout, ns: str, port: int) -> str:
    ctl = ("gorb ctl" if layout.runtime_dir == os.path.abspath(conf.DEFAULT_RUNTIME_DIR)
           else f"gorb ctl --runtime-dir {layout.runtime_dir}")
    return "\n".join([
        f"gorb: {why}.",
        "gorb: running gorb inside a user-mode-linux guest (a Linux kernel with IPVS, run as a "
        f"process) in network namespace {ns}.",
        f"gorb: API  http://127.0.0.1:{port}/  (relayed to {netns.GUEST_ADDR}:{port} in the guest)",
        f"gorb: ctl  {ctl} status   (= supervisorctl -c {layout.supervisord_conf} status)",
        f"gorb: logs {layout.log_dir}/   state {cfg.writer.state_file}",
        f"gorb: stop with Ctrl-C or SIGTERM to pid {os.getpid()}: the guest powers off and "
        "the namespace is removed",
    ])


class _Refused(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _listeners(cfg: config.Config, layout: conf.Layout, why: str, workdir: Path,
               port: int) -> tuple[socket.socket, socket.socket]:
    """The host's API and supervisorctl listeners, and the guest's files; _Refused if not."""
    try:
        api_listener = _tcp_listener(port)
    except OSError as exc:
        raise _Refused(1, f"cannot relay the API on 127.0.0.1:{port}: {exc.strerror}") from None
    try:
        runtime.ensure_runtime_dir(layout.runtime_dir)
        ctl_listener = _unix_listener(layout.socket)
    except (OSError, runtime.RuntimeDirError) as exc:
        api_listener.close()
        raise _Refused(2, str(exc)) from None
    try:
        _write_files(cfg, layout, why, workdir)
    except OSError as exc:
        api_listener.close()
        ctl_listener.close()
        layout.socket.unlink(missing_ok=True)
        raise _Refused(2, str(exc)) from None
    return api_listener, ctl_listener


def run(cfg: config.Config, layout: conf.Layout, why: str, mem: str = "1G",
        out: TextIO = sys.stdout) -> int:
    """Run gorb in a guest until a signal or the guest's end; the exit status."""
    missing = uml.available()
    if missing:
        print(f"gorb run: {why}, and the user-mode-linux fallback is not available: {missing}",
              file=sys.stderr)
        return 1
    started = time.monotonic()
    signals = _Signals()
    _, port = config.parse_listen(cfg.api.listen)
    ns = netns.name_for(os.getpid())
    workdir = Path(layout.runtime_dir) / "uml"
    relays: list[Relay] = []
    ns_fd = -1
    vm: uml.Guest | None = None
    created = owns_socket = False
    try:
        try:
            api_listener, ctl_listener = _listeners(cfg, layout, why, workdir, port)
        except _Refused as exc:
            print(f"gorb run: {exc}", file=sys.stderr)
            return exc.code
        owns_socket = True
        try:
            for name in netns.remove_stale():
                print(f"gorb: removed {name}, left by a gorb run that is gone", file=out)
            created = True
            netns.create(ns)
            ns_fd = netns.open_ns(ns)
        except (OSError, netns.NetnsError) as exc:
            print(f"gorb run: cannot set up the guest's link: {exc}", file=sys.stderr)
            return 1
        print(_banner(why, cfg, layout, ns, port), file=out, flush=True)
        vm = uml.Guest(["sh", str(workdir / "guest.sh")], workdir, mem=mem,
                       kernel_args=netns.kernel_args(), prefix=["ip", "netns", "exec", ns])
        vm.start()
        relays = [Relay("api", api_listener, ns_fd, (netns.GUEST_ADDR, port)),
                  Relay("ctl", ctl_listener, ns_fd, (netns.GUEST_ADDR, netns.CTL_PORT))]
        for r in relays:
            r.start()
        threading.Thread(target=_announce_ready, args=(ns_fd, port, vm, started, out, signals),
                         name="announce-ready", daemon=True).start()
        return _supervise(vm, ns_fd, signals, out)
    finally:
        for r in relays:
            r.close()
        if vm is not None:
            vm.kill()
        if ns_fd >= 0:
            os.close(ns_fd)
        if created:
            netns.delete(ns)
        if owns_socket:
            layout.socket.unlink(missing_ok=True)


def _supervise(vm: uml.Guest, ns_fd: int, signals: _Signals, out: TextIO) -> int:
    """Stream the guest's output until it ends or a signal asks us to stop it; the exit status."""
    while vm.running() and not signals.count:
        vm.pump(out)
        time.sleep(0.2)
    stopping = bool(signals.count)
    if stopping and vm.running():
        print("gorb: stopping: supervisord in the guest stops every program, then the guest "
              "powers off", file=out, flush=True)
        asked = signals.count
        if not _supervisor_shutdown(ns_fd):
            print("gorb: the guest's supervisord is not answering (still booting?): guest killed",
                  file=out, flush=True)
            vm.kill()
            return 1
        deadline = time.monotonic() + STOP_TIMEOUT
        while vm.running() and time.monotonic() < deadline and signals.count == asked:
            vm.pump(out)
            time.sleep(0.2)
    vm.pump(out)
    if vm.running():
        print("gorb: the guest did not power off in time (or a second signal came): killed",
              file=out, flush=True)
        vm.kill()
        return 1
    rc = vm.exit_status()
    if rc is None:
        print(f"gorb: the guest stopped without an exit status; its console:\n{vm.console_tail()}",
              file=sys.stderr)
        return 1
    if rc == 0 and stopping:
        shutil.rmtree(vm.workdir, ignore_errors=True)
    elif rc:
        print(f"gorb: gorb in the guest exited with {rc}; its files are in {vm.workdir}",
              file=sys.stderr)
    return rc
