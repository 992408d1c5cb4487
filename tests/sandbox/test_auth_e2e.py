"""Tokens, TLS and the audit log on the whole supervised system (``gorb run``, real IPVS): the API
serves HTTPS with the configured certificate; an admin token's PUTs reach the kernel, a read
token's PUT is a 403 and no token a 401, neither touching the kernel; plain HTTP to the port
fails; every attempt is one line in the audit file, and no secret appears in it or in any log.

The files the API reads or writes live in a world-traversable directory under /tmp: gorb runs
the API under the account ``gorb`` when it exists, which could not enter pytest's tmp_path."""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.pace import limit, wait_until
from tests.sandbox.test_supervised import PROGRAMS, Gorb, Reply, proc_table

ADMIN_SECRET = "e2e-adm-Secret-93f1"
READ_SECRET = "e2e-rd-Secret-27c4"  # kept in a secret_file
ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}
READ = {"Authorization": f"Bearer {READ_SECRET}"}
VIP, PORT = "10.77.0.100", 80


def q(value: object) -> str:
    return json.dumps(str(value))


@pytest.fixture
def files():
    base = Path(tempfile.mkdtemp(prefix="gauth", dir="/tmp"))
    base.chmod(0o755)
    cert, key = base / "api.pem", base / "api.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=gorb-e2e",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=limit(60))
    (base / "read.token").write_text(READ_SECRET + "\n")
    audit_dir = base / "audit"
    audit_dir.mkdir()
    audit_dir.chmod(0o777)
    for f in (cert, key, base / "read.token"):
        f.chmod(0o644)
    yield {"cert": cert, "key": key, "secret_file": base / "read.token",
           "audit": audit_dir / "audit.log"}
    shutil.rmtree(base, ignore_errors=True)


def https(gorb: Gorb, ctx: ssl.SSLContext, method: str, path: str, body: object = None,
          headers: dict[str, str] | None = None) -> tuple[Reply, bytes]:
    """One HTTPS request through a socket made inside the namespace; (reply, server DER)."""
    raw = gorb.connect().sock
    conn = http.client.HTTPSConnection(*gorb.api_address, timeout=limit(10), context=ctx)
    conn.sock = ctx.wrap_socket(raw, server_hostname=gorb.api_address[0])
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        reply = Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        return reply, conn.sock.getpeercert(binary_form=True)
    finally:
        conn.close()


def test_tokens_tls_and_audit_on_the_supervised_system(netns, tmp_path, files):
    api_config = (f"tls_cert = {q(files['cert'])}\ntls_key = {q(files['key'])}\n"
                  f"audit_log = {q(files['audit'])}\n"
                  f"tokens = {{ deploy = {{ secret = {q(ADMIN_SECRET)}, role = \"admin\" }}, "
                  f"grafana = {{ secret_file = {q(files['secret_file'])}, role = \"read\" }} }}\n")
    gorb = Gorb(netns("au"), tmp_path, api_config=api_config)
    ctx = ssl.create_default_context(cafile=str(files["cert"]))
    try:
        gorb.wait_states({p: "RUNNING" for p in PROGRAMS})

        def health():
            try:
                return https(gorb, ctx, "GET", "/health")[0].status
            except OSError as exc:
                return repr(exc)

        wait_until(health, 30.0, "the HTTPS API", every=0.2, until=lambda status: status == 200)
        reply, der = https(gorb, ctx, "GET", "/health")
        assert reply.json()["auth"] == "on"
        assert der == ssl.PEM_cert_to_DER_cert(files["cert"].read_text())

        table = {f"TCP {VIP}:{PORT}": {"10.77.1.2:8080": ("Masq", 5)}}
        assert https(gorb, ctx, "PUT", "/service/web", {"host": VIP, "port": PORT},
                     ADMIN)[0].status == 200
        assert https(gorb, ctx, "PUT", "/service/web/a",
                     {"host": "10.77.1.2", "port": 8080, "weight": 5, "pulse": {"type": "none"}},
                     ADMIN)[0].status == 200
        assert proc_table(gorb.proc.pid) == table  # the admin's PUTs reached the kernel

        weak = https(gorb, ctx, "PUT", "/service/web/b", {"host": "10.77.1.3", "port": 8080},
                     READ)[0]
        assert weak.status == 403 and "needs admin" in weak.json()["error"]
        none = https(gorb, ctx, "PUT", "/service/web/b", {"host": "10.77.1.3", "port": 8080})[0]
        assert none.status == 401
        assert none.headers["www-authenticate"] == 'Bearer realm="gorb"'
        assert https(gorb, ctx, "GET", "/service/web", headers=READ)[0].json()["backends"] == ["a"]
        assert proc_table(gorb.proc.pid) == table  # the refused ones changed nothing

        with pytest.raises((http.client.RemoteDisconnected, ConnectionError,
                            http.client.BadStatusLine)):
            gorb.http("GET", "/health")  # plain HTTP to the TLS port
        assert health() == 200

        lines = [json.loads(line) for line in files["audit"].read_text().splitlines()]
        assert [(l["method"], l["route"], l["status"], l["token"]) for l in lines] == [
            ("PUT", "/service/<vs>", 200, "deploy"),
            ("PUT", "/service/<vs>/<rs>", 200, "deploy"),
            ("PUT", "/service/<vs>/<rs>", 403, "grafana"),
            ("PUT", "/service/<vs>/<rs>", 401, None)]
        assert lines[1]["change"]["/service/web/a"]["after"]["options"]["weight"] == 5
        assert lines[1]["change"]["/service/web/a"]["before"] is None
        assert lines[2]["ids"] == {"vs": "web", "rs": "b"} and lines[2]["change"] is None
        everything = files["audit"].read_text() + gorb.log() + \
            (gorb.run_dir / "gorb.toml").read_text().replace(ADMIN_SECRET, "")
        assert READ_SECRET not in everything  # the secret_file's content is read by the API only
        assert ADMIN_SECRET not in files["audit"].read_text() + gorb.log()
    finally:
        gorb.close()
