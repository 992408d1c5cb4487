"""The check drivers: one health check of one target, run to completion within its timeout.

``run_check(spec)`` never raises (an ``Exception`` anywhere becomes ``Result(ok=False, error=...)``;
a greenlet kill or ``gevent.Timeout`` from the caller still propagates, after cleanup), closes
everything it opens, and holds the WHOLE check to ``spec.timeout``: every blocking step is given
only the time left. It blocks on stdlib sockets, ssl and subprocess, which the pulse worker's
``gevent.monkey.patch_all()`` makes cooperative; module attributes (``socket.socket``,
``ssl.SSLContext``, ``subprocess.Popen``) are looked up at call time so patching may come after
this import. No threads, no connection pools: every check opens a fresh connection, because what it
measures is that the backend accepts new connections.

Types and their ``args`` (validated by ``gorb.common.validation.validate_pulse``):

    none    always passes
    tcp     connect to address:port and close at once          port
    http    one request, redirects never followed              port host path method expect
    https   as http over TLS                                   body scheme tls_verify
    udp     send a datagram, wait for a reply                  port payload expect
    dns     one query over UDP, check rcode and answer         port query qtype rcode answer
    exec    run a program (no shell); exit 0 passes            argv

Ports: ``args.port`` (if non-zero) overrides the backend's port; a backend port of 0 (a fwmark
service) falls back to 80 (http), 443 (https) or 53 (dns). ``args.timeout`` (qk4l's integer
seconds) is folded into ``CheckSpec.timeout`` by ``CheckSpec.from_pulse``; ``run_check`` itself
reads only ``spec.timeout``.

Deliberate deviations from GORB's drivers (gorb-spec §4.2, §8 items 7 and 20), each an upstream
bug or gap:
- IPv6 targets work: ``[addr]:port`` in the Host header, sockets of the address's family;
- the timeout is the pulse's ``timeout`` (default 5 s) for the whole check, not a fixed 5 s;
- the HTTP response is always closed (GORB leaked every body); ``body`` checks its first 64 KiB;
- ``expect`` takes a status, a list or a range ("200-299", "200,204"); a 3xx passes only if
  expected (GORB refused every redirect);
- ``https`` exists (kobolog had none). ``tls_verify`` defaults to false, as in qk4l: backends
  commonly serve self-signed certificates, and the check is about liveness, not identity. With
  ``tls_verify: true`` the system CAs verify the chain and the name is checked against ``host``
  (else the backend's address, which then must be an IP SAN);
- ``host`` sets the Host header (and the TLS SNI), it is NOT resolved: the check always connects
  to the backend's address (qk4l dialled ``host``). As in qk4l the port is left out of the Host
  header when it is the scheme's default; a ``host`` that already has ":port" is sent verbatim.

udp: ``payload`` defaults to one newline (b"\\n"): an empty datagram is dropped or ignored by
nearly every UDP service, while a line is answered by echo and line-oriented protocols. A service
that needs a real request must be given ``payload`` (text, sent as UTF-8). A reply is required;
``expect`` is a substring it must contain. The socket is connected, so an ICMP port unreachable
fails the check at once ("connection refused") instead of waiting for the timeout.

exec: ``argv`` runs without a shell, in ``/``, with stdin from /dev/null and an environment of
only PATH, GORB_CHECK_ADDRESS and GORB_CHECK_PORT (the target's port after overrides). It runs in
a session of its own; its whole process group is killed (SIGKILL) when the timeout expires, and
also after it exits, so no background child outlives the check. When the worker can switch users
(root, or an unprivileged worker given CAP_SETUID/CAP_SETGID by ``gorb run``) the program runs as
user ``nobody`` (its uid and gid, no supplementary groups) with every capability set empty and
no_new_privs (``privileges.py``): a health check never needs privileges, and an operator's
script must not get the worker's by being named in a REST call.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import os
import pwd
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from gorb.common.check_spec import DEFAULT_PORTS, CheckSpec, scheme_of
from gorb.common.validation import expect_codes
from gorb.services.pulse_worker import privileges
from gorb.services.pulse_worker.tracker import Result

BODY_LIMIT = 64 * 1024        # bytes of an HTTP body searched for ``body``
ERROR_LIMIT = 300             # characters of an error text
STDERR_LINE_LIMIT = 200       # characters of an exec check's last stderr line in its error
EXEC_USER = "nobody"          # who runs exec checks when the worker is root
EXEC_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USER_AGENT = "gorb-pulse"
UDP_DEFAULT_PAYLOAD = "\n"


def run_check(spec: CheckSpec, now: Callable[[], float] = time.monotonic) -> Result:
    """Run one check; ``latency`` is its wall time (monotonic), ``at`` is ``now()`` at its end."""
    start = time.monotonic()
    error = ""
    try:
        driver = _DRIVERS.get(spec.type)
        if driver is None:
            raise _Fail(f"unknown check type {spec.type!r}")
        if not spec.timeout > 0:
            raise _Fail(f"timeout must be positive, not {spec.timeout!r}")
        driver(spec, _Deadline(float(spec.timeout)))
    except _Fail as exc:
        error = str(exc) or "failed"
    except Exception as exc:  # noqa: BLE001 - a check must never raise
        error = f"error: {type(exc).__name__}: {exc}"
    latency = time.monotonic() - start
    if len(error) > ERROR_LIMIT:
        error = error[:ERROR_LIMIT - 3] + "..."
    return Result(ok=not error, at=now(), latency=latency, error=error)


# --- plumbing ------------------------------------------------------------------------------------

class _Fail(Exception):
    """A check failed; the message is the error text shown to operators."""


class _Deadline:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.end = time.monotonic() + timeout

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    def expired(self, phase: str) -> _Fail:
        return _Fail(f"{phase}: timeout after {self.timeout}s")


def _os_fail(phase: str, exc: OSError, deadline: _Deadline) -> _Fail:
    if isinstance(exc, TimeoutError):
        return deadline.expired(phase)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _Fail(f"tls: certificate verify failed: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        return _Fail(f"tls: {exc.reason or exc}")
    if isinstance(exc, ConnectionRefusedError):
        return _Fail(f"{phase}: connection refused")
    return _Fail(f"{phase}: {exc.strerror or exc}")


def _family(address: str) -> int:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise _Fail(f"invalid address {address!r}: not an IP literal") from None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def _connect(address: str, port: int, deadline: _Deadline, kind: int) -> socket.socket:
    if not 0 < port <= 65535:
        raise _Fail(f"no port to check (port {port})")
    sock = socket.socket(_family(address), kind)
    try:
        sock.settimeout(deadline.remaining())
        sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def host_header(host: str, port: int, scheme: str) -> str:
    """The Host header: an IPv6 literal in brackets, ":port" unless it is the scheme's default
    (qk4l), and a host that already carries a port ("name:8080", "[::1]:8080") verbatim."""
    if _is_ipv6(host):
        host = host if host.startswith("[") else f"[{host}]"
    elif ":" in host:
        return host
    return host if port == DEFAULT_PORTS.get(scheme) else f"{host}:{port}"


# --- drivers -------------------------------------------------------------------------------------

def _none(spec: CheckSpec, deadline: _Deadline) -> None:
    return None


def _tcp(spec: CheckSpec, deadline: _Deadline) -> None:
    try:
        _connect(spec.address, spec.target_port, deadline, socket.SOCK_STREAM).close()
    except OSError as exc:
        raise _os_fail("connect", exc, deadline) from None


class _DeadlineReader(io.RawIOBase):
    """The response side of a socket, each read given only the check's time left."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        self._sock.settimeout(self._deadline.remaining())
        return self._sock.recv_into(buf)


class _DeadlineSocket:
    """What ``http.client`` needs of a socket (sendall, makefile, close), under the deadline.
    ``close`` is a no-op: the driver closes the real socket itself, exactly once."""

    def __init__(self, sock: socket.socket, deadline: _Deadline) -> None:
        self._sock, self._deadline = sock, deadline

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(self._deadline.remaining())
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline))

    def close(self) -> None:
        pass


_TLS_CONTEXTS: dict[tuple[type, bool], ssl.SSLContext] = {}


def _tls_context(verify: bool) -> ssl.SSLContext:
    # Keyed by the SSLContext class too: contexts made before gevent patched ssl must not be used
    # after (they would block the hub). No session reuse: each check does a full handshake.
    key = (ssl.SSLContext, verify)
    ctx = _TLS_CONTEXTS.get(key)
    if ctx is None:
        ctx = ssl.create_default_context()
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        _TLS_CONTEXTS[key] = ctx
    return ctx


def _http(spec: CheckSpec, deadline: _Deadline) -> None:
    args = spec.args
    scheme = scheme_of(spec)
    if scheme not in ("http", "https"):
        raise _Fail(f"unsupported scheme {scheme!r}")
    port = spec.target_port
    host = str(args.get("host") or spec.address)
    header = host_header(host, port, scheme)
    path = str(args.get("path") or "/")
    if not path.startswith("/"):
        path = "/" + path  # qk4l: the leading slash is optional
    method = str(args.get("method") or "GET")
    expect = args.get("expect", 200)
    codes = expect_codes(expect)

    sock = None
    try:
        try:
            sock = _connect(spec.address, port, deadline, socket.SOCK_STREAM)
        except OSError as exc:
            raise _os_fail("connect", exc, deadline) from None
        if scheme == "https":
            verify = bool(args.get("tls_verify", False))
            name = host.rsplit(":", 1)[0] if ":" in host and not _is_ipv6(host) else host
            try:
                sock.settimeout(deadline.remaining())
                sock = _tls_context(verify).wrap_socket(sock, server_hostname=name.strip("[]"))
            except OSError as exc:
                raise _os_fail("tls", exc, deadline) from None
        conn = http.client.HTTPConnection(header, port)
        conn.sock = _DeadlineSocket(sock, deadline)
        headers = {"Host": header, "User-Agent": USER_AGENT, "Accept": "*/*",
                   "Connection": "close"}
        try:
            conn.request(method, path, headers=headers)
        except ValueError as exc:  # http.client refuses bad paths, methods and header values
            raise _Fail(f"request: {exc}") from None
        except OSError as exc:
            raise _os_fail("request", exc, deadline) from None
        try:
            response = conn.getresponse()
        except OSError as exc:
            raise _os_fail("response", exc, deadline) from None
        except http.client.HTTPException as exc:
            raise _Fail(f"response: {type(exc).__name__}: {exc}") from None
        try:
            _judge(response, args, expect, codes, deadline)
        finally:
            response.close()
    finally:
        if sock is not None:
            sock.close()


def _judge(response: http.client.HTTPResponse, args: dict, expect, codes,
           deadline: _Deadline) -> None:
    """_Fail unless the response has an expected status and, if asked, the body's text."""
    if response.status not in codes:
        detail = ""
        location = response.getheader("Location")
        if 300 <= response.status < 400 and location:
            detail = f" (redirect to {location} not followed)"
        raise _Fail(f"status {response.status} not in {_expect_text(expect)}{detail}")
    if "body" in args:
        needle = str(args["body"]).encode()
        body = _read_body(response, deadline)
        if needle not in body:
            raise _Fail(f"body does not contain {_short(args['body'])}")


def _read_body(response: http.client.HTTPResponse, deadline: _Deadline) -> bytes:
    chunks, size = [], 0
    try:
        while size < BODY_LIMIT:
            chunk = response.read(BODY_LIMIT - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise _os_fail("body", exc, deadline) from None
    except http.client.HTTPException as exc:
        raise _Fail(f"body: {type(exc).__name__}: {exc}") from None
    return b"".join(chunks)


def _udp(spec: CheckSpec, deadline: _Deadline) -> None:
    payload = spec.args.get("payload", UDP_DEFAULT_PAYLOAD)
    expect = spec.args.get("expect")
    phase = "connect"
    sock = None
    try:
        sock = _connect(spec.address, spec.target_port, deadline, socket.SOCK_DGRAM)
        phase = "send"
        sock.settimeout(deadline.remaining())
        sock.send(str(payload).encode())
        phase = "reply"
        sock.settimeout(deadline.remaining())
        reply = sock.recv(65535)
    except ConnectionRefusedError:
        raise _Fail(f"{phase}: connection refused (ICMP port unreachable)") from None
    except OSError as exc:
        raise _os_fail(phase, exc, deadline) from None
    finally:
        if sock is not None:
            sock.close()
    if expect is not None and str(expect).encode() not in reply:
        raise _Fail(f"reply does not contain {_short(str(expect))}")


def _dns(spec: CheckSpec, deadline: _Deadline) -> None:
    args = spec.args
    qname = args.get("query")
    if not qname:
        raise _Fail("dns check needs a 'query' name")
    try:
        qtype = dns.rdatatype.from_text(str(args.get("qtype") or "A"))
        want = args.get("rcode", "NOERROR")
        want = (dns.rcode.Rcode.make(want) if isinstance(want, int)
                else dns.rcode.from_text(str(want).upper()))
        query = dns.message.make_query(qname, qtype)
    except (dns.exception.DNSException, ValueError) as exc:
        raise _Fail(f"dns: bad check arguments: {exc}") from None
    phase = "connect"
    sock = None
    try:
        sock = _connect(spec.address, spec.target_port, deadline, socket.SOCK_DGRAM)
        phase = "send"
        sock.settimeout(deadline.remaining())
        sock.send(query.to_wire())
        phase = "reply"
        while True:  # skip datagrams that are not the answer to this query
            sock.settimeout(deadline.remaining())
            wire = sock.recv(65535)
            try:
                reply = dns.message.from_wire(wire)
            except dns.exception.DNSException:
                continue
            if query.is_response(reply):
                break
    except ConnectionRefusedError:
        raise _Fail(f"{phase}: connection refused (ICMP port unreachable)") from None
    except OSError as exc:
        raise _os_fail(phase, exc, deadline) from None
    finally:
        if sock is not None:
            sock.close()
    got = reply.rcode()
    if got != want:
        raise _Fail(f"rcode {dns.rcode.to_text(got)} not {dns.rcode.to_text(want)}")
    if "answer" in args:
        needle = str(args["answer"]).lower()
        texts = [rd.to_text() for rrset in reply.answer for rd in rrset]
        if not any(needle in text.lower() for text in texts):
            truncated = " (reply truncated)" if reply.flags & dns.flags.TC else ""
            raise _Fail(f"no answer contains {_short(str(args['answer']))}"
                        f" (got {', '.join(texts) or 'none'}){truncated}")


def _exec(spec: CheckSpec, deadline: _Deadline) -> None:
    argv = spec.args.get("argv")
    if not argv or not isinstance(argv, list):
        raise _Fail("exec check needs an 'argv' list")
    env = {"PATH": EXEC_PATH, "GORB_CHECK_ADDRESS": spec.address,
           "GORB_CHECK_PORT": str(spec.target_port)}
    drop: dict[str, Any] = {}
    if privileges.switch_user_now():
        try:
            pw = pwd.getpwnam(EXEC_USER)
        except KeyError:
            raise _Fail(f"exec: no user {EXEC_USER!r} to run the check as") from None
        drop = {"preexec_fn": privileges.become(pw.pw_uid, pw.pw_gid)}
    try:
        proc = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/",
                                close_fds=True, start_new_session=True, **drop)
    except OSError as exc:
        raise _Fail(f"exec: {argv[0]}: {exc.strerror or exc}") from None
    timed_out = False
    try:
        try:
            _out, err = proc.communicate(timeout=deadline.remaining())
        except (subprocess.TimeoutExpired, TimeoutError):
            timed_out = True
            _killpg(proc.pid)
            try:  # reap; a child that left the group may still hold the pipes
                _out, err = proc.communicate(timeout=1.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                err = b""
    finally:
        _killpg(proc.pid)  # whatever the program left running in its group
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    if timed_out:
        raise deadline.expired("exec")
    code = proc.returncode
    if code == 0:
        return
    lines = (err or b"").decode("utf-8", "replace").strip().splitlines()
    last = lines[-1].strip() if lines else ""
    if len(last) > STDERR_LINE_LIMIT:
        last = last[:STDERR_LINE_LIMIT - 3] + "..."
    if code < 0:
        what = f"killed by {signal.Signals(-code).name}" if -code in _SIGNALS else f"exit {code}"
    else:
        what = f"exit {code}"
    raise _Fail(f"{what}: {last}" if last else what)


_SIGNALS = {s.value for s in signal.Signals}


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text.strip("[]")).version == 6
    except ValueError:
        return False


def _expect_text(expect: Any) -> str:
    if isinstance(expect, list):
        return ",".join(str(c) for c in expect)
    return str(expect).replace(" ", "")


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


_DRIVERS: dict[str, Callable[[CheckSpec, _Deadline], None]] = {
    "none": _none, "tcp": _tcp, "http": _http, "https": _http, "udp": _udp, "dns": _dns,
    "exec": _exec,
}

__all__ = ["CheckSpec", "run_check", "host_header", "DEFAULT_PORTS", "EXEC_USER",
           "UDP_DEFAULT_PAYLOAD"]
