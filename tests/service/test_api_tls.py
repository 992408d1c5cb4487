"""The API process (``python -m gorb.services.api``) with TLS, tokens and the audit log over real
sockets, against a real WriterLoop on a fake kernel: HTTPS with the configured certificate
(compared as DER), TLS 1.2 as the floor, plain HTTP to the TLS port refused cleanly, a handshake
that never completes closed by the idle timeout (it does not hold one of ``max_connections``),
the 408/400 JSON answers inside TLS, tokens from a ``secret_file``, and the configuration errors
that make the API exit 2 with one line (never a traceback)."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.pace import limit
from tests.service.test_api_server import read_all, response
from tests.service.test_api_support import (
    ROOT,
    ApiProcess,
    WriterThread,
    free_port,
    request,
    short_rundir,
)

pytestmark = pytest.mark.timeout(90)

IDLE = 0.8
ADMIN_SECRET = "tls-adm-Secret-4711"
READ_SECRET = "tls-rd-Secret-0815"  # kept in a secret_file
ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}
READ = {"Authorization": f"Bearer {READ_SECRET}"}


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=limit(60))


def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed EC certificate for 127.0.0.1 and its key."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1")
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    return make_cert(d, "gorb-test"), make_cert(d, "other")


def client_context(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))  # verifies the chain and 127.0.0.1


def q(value: object) -> str:
    return json.dumps(str(value))  # a TOML basic string


@pytest.fixture
def api(tmp_path, certs):
    (cert, key), _ = certs
    (tmp_path / "read.token").write_text(READ_SECRET + "\n")
    tokens = (f"{{ deploy = {{ secret = {q(ADMIN_SECRET)}, role = \"admin\" }}, "
              f"ro = {{ secret_file = {q(tmp_path / 'read.token')}, role = \"read\" }} }}")
    with short_rundir() as rundir:
        writer = WriterThread(rundir)
        proc = ApiProcess(rundir, tmp_path, log_level="info", tls=client_context(cert),
                          headers=ADMIN, idle_timeout=IDLE, max_connections=2,
                          tls_cert=q(cert), tls_key=q(key), tokens=tokens,
                          audit_log=q(tmp_path / "audit.log"))
        proc.audit = tmp_path / "audit.log"
        try:
            yield proc
        finally:
            code = proc.stop()
            writer.stop()
        log = proc.output()
        assert code == 0, log
        assert "Traceback" not in log, log
        assert ADMIN_SECRET not in log and READ_SECRET not in log


def https(api, method, path, body=None, headers=None):
    return request(method, api.port, path, body, tls=api.tls, headers=headers)


def test_https_serves_with_the_configured_certificate_and_tokens(api, certs):
    (cert, _), _ = certs
    conn = http.client.HTTPSConnection("127.0.0.1", api.port, timeout=limit(10), context=api.tls)
    status, _, body = request("GET", api.port, "/health", conn=conn)
    assert status == 200 and json.loads(body)["auth"] == "on"
    assert conn.sock.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert conn.sock.version() in ("TLSv1.2", "TLSv1.3")
    conn.close()
    assert https(api, "PUT", "/service/web", {"host": "10.0.0.1", "port": 80},
                 headers=ADMIN)[0] == 200
    assert https(api, "GET", "/service/web", headers=READ)[0] == 200  # the secret_file token
    assert https(api, "DELETE", "/service/web", headers=READ)[0] == 403
    status, headers, _ = https(api, "DELETE", "/service/web")
    assert (status, headers["www-authenticate"]) == (401, 'Bearer realm="gorb"')
    lines = [json.loads(line) for line in api.audit.read_text().splitlines()]
    assert [(l["method"], l["status"], l["token"]) for l in lines] == \
        [("PUT", 200, "deploy"), ("DELETE", 403, "ro"), ("DELETE", 401, None)]
    text = api.audit.read_text()
    assert ADMIN_SECRET not in text and READ_SECRET not in text


def test_a_client_below_tls_1_2_is_refused(api, certs):
    (cert, _), _ = certs
    old = client_context(cert)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError):
        request("GET", api.port, "/health", tls=old)
    assert https(api, "GET", "/health")[0] == 200


def test_a_client_that_does_not_trust_the_certificate_fails_and_the_api_goes_on(api, certs):
    _, (other, _) = certs
    with pytest.raises(ssl.SSLCertVerificationError):
        request("GET", api.port, "/health", tls=client_context(other))
    assert https(api, "GET", "/health")[0] == 200


def test_plain_http_to_the_tls_port_fails_cleanly(api):
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError,
                        http.client.BadStatusLine)):
        request("GET", api.port, "/health", headers=ADMIN)
    assert https(api, "GET", "/health")[0] == 200
    assert "TLS handshake failed" in api.output()


def test_a_handshake_that_never_completes_is_closed_and_frees_its_slot(api):
    stalled = [socket.create_connection(("127.0.0.1", api.port), timeout=limit(10))
               for _ in range(2)]
    time.sleep(0.1)  # both slots of max_connections = 2 are taken by them
    answer: list = []
    started = time.monotonic()
    t = threading.Thread(target=lambda: answer.append(https(api, "GET", "/health")))
    t.start()
    for s in stalled:
        assert read_all(s) == b""  # closed by the server, without an answer
        s.close()
    t.join(limit(10, fixed=IDLE))
    assert answer and answer[0][0] == 200
    assert time.monotonic() - started < limit(5, fixed=IDLE)
    assert "not completed within the idle timeout" in api.output()


def tls_socket(api) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", api.port), timeout=limit(10))
    return api.tls.wrap_socket(raw, server_hostname="127.0.0.1")


def test_headers_that_stop_coming_get_a_408_inside_tls(api):
    s = tls_socket(api)
    s.sendall(b"PUT /service/web HTTP/1.1\r\nHost: x\r\n")
    status, headers, body = response(read_all(s))
    assert status == 408 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": "request not received within the idle timeout"}
    s.close()


def test_a_malformed_request_gets_a_json_400_inside_tls(api):
    s = tls_socket(api)
    s.sendall(b"NOT A REQUEST LINE AT ALL\r\n\r\n")
    status, _, body = response(read_all(s))
    assert status == 400 and json.loads(body)["error"].startswith("malformed HTTP request")
    s.close()


# --- what makes the API exit 2 --------------------------------------------------------------------

def run_api(tmp_path: Path, api_lines: str) -> subprocess.CompletedProcess:
    config = tmp_path / "bad.toml"
    config.write_text(f'[gorb]\nruntime_dir = {q(tmp_path)}\n\n[api]\nlisten = "127.0.0.1:{free_port()}"\n'
                      + api_lines)
    return subprocess.run([sys.executable, "-m", "gorb.services.api", "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True, timeout=limit(30))


def bad_configs(tmp_path: Path, certs) -> list[tuple[str, str]]:
    (cert, key), (_, other_key) = certs
    return [
        (f"tls_cert = {q(cert)}\n", "api.tls_cert and api.tls_key must be set together"),
        (f"tls_cert = {q(cert)}\ntls_key = {q(other_key)}\n",
         f"api.tls_cert {cert} and api.tls_key {other_key}: not a PEM certificate and its "
         "private key (KEY_VALUES_MISMATCH)"),
        (f"tls_cert = {q(tmp_path / 'nope.pem')}\ntls_key = {q(key)}\n",
         f"api.tls_cert: cannot read {tmp_path / 'nope.pem'}: No such file or directory"),
        (f"tls_cert = {q(key)}\ntls_key = {q(key)}\n", "not a PEM certificate"),
        ('tokens = { ops = { secret = "", role = "admin" } }\n',
         "api.tokens.ops: the secret is empty"),
        ('tokens = { ops = { secret = "x", role = "root" } }\n',
         "api.tokens.ops: role must be read or admin, not 'root'"),
        (f'tokens = {{ ops = {{ secret_file = {q(tmp_path / "none")}, role = "read" }} }}\n',
         f"api.tokens.ops: cannot read secret_file {tmp_path / 'none'}: No such file"),
        (f"audit_log = {q(tmp_path / 'no' / 'audit.log')}\n",
         f"api.audit_log: cannot open {tmp_path / 'no' / 'audit.log'}: No such file"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_an_unusable_security_setting_exits_2_with_one_clear_line(tmp_path, certs, case):
    api_lines, message = bad_configs(tmp_path, certs)[case]
    proc = run_api(tmp_path, api_lines)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert message in out and "Traceback" not in out, out
