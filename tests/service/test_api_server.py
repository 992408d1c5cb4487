"""The API process's HTTP server over real sockets (``gorb.services.api.server``): the idle timeout
closes connections that send nothing, or send a request too slowly (408 with a JSON error), the
handler pool bounds the connections served at once, and a request gevent cannot parse gets a
JSON 400 — never a hung greenlet, a traceback or gevent's empty answer."""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.pace import limit
from tests.service.test_api_support import ApiProcess, request, short_rundir

pytestmark = pytest.mark.timeout(60)

IDLE = 0.6  # seconds: the tests' api.idle_timeout


@pytest.fixture
def api(tmp_path):
    with short_rundir() as rundir:  # no writer: these routes and errors need none
        proc = ApiProcess(rundir, tmp_path, log_level="info", idle_timeout=IDLE,
                          max_connections=2)
        yield proc
        assert proc.stop() == 0, proc.output()
        assert "Traceback" not in proc.output(), proc.output()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=limit(10))
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def response(data: bytes) -> tuple[int, dict, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def test_a_connection_that_sends_nothing_is_closed_after_the_idle_timeout(api):
    s = connect(api.port)
    t0 = time.monotonic()
    assert read_all(s) == b""  # closed by the server, without an answer
    assert IDLE * 0.8 < time.monotonic() - t0 < limit(3, fixed=IDLE)
    s.close()


def test_an_idle_keep_alive_connection_is_closed_after_a_served_request(api):
    s = connect(api.port)
    s.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
    first = s.recv(65536)
    assert first.startswith(b"HTTP/1.1 200"), first[:100]
    time.sleep(IDLE * 2)
    rest = read_all(s)  # the rest of the document, then the close
    assert b"HTTP/1.1" not in rest
    s.close()


def test_headers_that_stop_coming_get_a_408_json_error(api):
    s = connect(api.port)
    s.sendall(b"PUT /service/web HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    status, headers, body = response(read_all(s))
    assert status == 408 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": "request not received within the idle timeout"}
    s.close()
    assert "request headers not received within the idle timeout" in api.output()


def test_a_body_that_stops_coming_gets_a_408_json_error(api):
    s = connect(api.port)
    s.sendall(b"PUT /service/web HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"host\"")
    status, headers, body = response(read_all(s))
    assert status == 408 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": "request body not received within the idle timeout"}
    s.close()


@pytest.mark.parametrize("raw", [b"NOT A REQUEST LINE AT ALL\r\n\r\n",
                                 b"PUT /service/x HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                                 b"PUT /service/x HTTP/1.1\r\nContent-Length: ten\r\n\r\n",
                                 b"GET / HTTP/7.0\r\n\r\n"])
def test_a_request_gevent_cannot_parse_gets_a_json_400(api, raw):
    s = connect(api.port)
    s.sendall(raw)
    status, headers, body = response(read_all(s))
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"].startswith("malformed HTTP request")
    s.close()


def test_connections_beyond_max_connections_wait_for_a_free_one(api):
    idle = [connect(api.port), connect(api.port)]  # max_connections = 2, both taken
    time.sleep(0.1)
    waiting = connect(api.port)  # accepted by the kernel, not yet by the server
    waiting.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    waiting.settimeout(IDLE / 3)
    with pytest.raises(socket.timeout):
        waiting.recv(1)
    idle[0].close()  # a handler is free again: the waiting request is served
    waiting.settimeout(limit(10))
    status, _, body = response(read_all(waiting))
    assert status == 200 and json.loads(body)["openapi"].startswith("3.1")
    idle[1].close()
    waiting.close()
    assert request("GET", api.port, "/openapi.json")[0] == 200
