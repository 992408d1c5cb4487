"""Bearer-token authentication and the role rules of the REST API.

Owns the ``[api.tokens]`` secrets once the API process has read them (``load_tokens``: the only
reader of ``secret_file``; no other gorb process sees a secret file) and the decision, per
request, between serving it, 401 and 403. With no token configured the API is open, as GORB's
was, and none of this runs.

The rules, with any token configured (``required``, ``decide``; ``rule`` is bottle's route
pattern, None for a path no route has):

    GET/HEAD /health                      open (load balancers and supervisors probe it)
    GET/HEAD other routes                 read or admin  (/metrics and /openapi.json too)
    PUT, PATCH, DELETE, GET /store/sync   admin          (``changes_state``: they change state)
    an unknown path or method             any valid token; then bottle's 404 / 405

    no token, or not a Bearer one         401 {"error"}, WWW-Authenticate: Bearer realm="gorb"
    a Bearer token that is no client's    401, ... realm="gorb", error="invalid_token"
    a valid token with too weak a role    403, ... error="insufficient_scope"

An unauthenticated client gets its 401 before the router answers, so it learns no routes.
Secrets: compared as SHA-256 digests with ``hmac.compare_digest`` against every configured token
(no early exit, equal lengths), so the time does not tell which one matched or how much of one;
``Authenticate`` removes the ``Authorization`` header from the environ, so nothing after it (the
routes, their logs, the audit log, a traceback) can see a secret. ``environ[TOKEN]`` carries the
client's token name (None: no or an unknown token) to the audit log.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bottle
import msgspec

from gorb.common.config import ApiToken, ConfigError
from gorb.services.api import views

READ, ADMIN = "read", "admin"
TOKEN = "gorb.token"  # environ key: the authenticated client's token name, or None
ROUTE = "gorb.route"  # environ key: (route pattern or None, url args), see ``route_of``
REALM = 'Bearer realm="gorb"'
OPEN = frozenset({"/health"})
STATE_CHANGING_GETS = frozenset({"/store/sync"})  # a GET that applies the store
MSG_NO_TOKEN = "authentication required: send Authorization: Bearer <token>"
MSG_BAD_TOKEN = "invalid token"


# --- pure core ------------------------------------------------------------------------------------

def changes_state(method: str, rule: str | None) -> bool:
    """Whether a request changes state: PUT, PATCH, DELETE (any method but GET and HEAD) and
    ``GET /store/sync`` (HEAD falls back to the GET route in bottle, so it counts too)."""
    return method not in ("GET", "HEAD") or rule in STATE_CHANGING_GETS


def required(method: str, rule: str | None) -> str | None:
    """The weakest role that may make the request; None when it is open to anyone."""
    if rule in OPEN and method in ("GET", "HEAD"):
        return None
    if rule is None:
        return READ  # authenticated clients get the router's own 404 / 405
    return ADMIN if changes_state(method, rule) else READ


def decide(method: str, rule: str | None, role: str | None) -> int:
    """200 (serve), 401 (no valid token: ``role`` None) or 403 (too weak a role)."""
    need = required(method, rule)
    if need is None:
        return 200
    if role is None:
        return 401
    if need == ADMIN and role != ADMIN:
        return 403
    return 200


def is_loopback(host: str) -> bool:
    """Whether a listen host reaches this machine only ("0.0.0.0", "::", a routable address or
    a name other than localhost do not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer(header: str | None) -> str | None:
    """The credential of an ``Authorization: Bearer <token>`` header ("" for a Bearer header
    without one); None when there is no header or it names another scheme (RFC 6750: that is
    "no token", not a wrong one)."""
    if header is None:
        return None
    scheme, _, credential = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credential.strip()


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


@dataclass(frozen=True)
class Client:
    name: str
    role: str


class Tokens:
    """The configured clients by secret; ``lookup`` in constant time over all of them."""

    def __init__(self, secrets: Mapping[str, tuple[str, str]]):
        """``secrets``: token name -> (secret, role)."""
        self._clients = [(Client(name, role), _digest(secret.encode()))
                         for name, (secret, role) in secrets.items()]

    def __bool__(self) -> bool:
        return bool(self._clients)

    def lookup(self, presented: str) -> Client | None:
        """The client whose secret ``presented`` is (a WSGI header value: latin-1 of the bytes
        sent), or None. Every configured digest is compared, matched or not."""
        digest = _digest(presented.encode("latin-1"))
        found = None
        for client, known in self._clients:
            if hmac.compare_digest(digest, known):
                found = client
        return found


def load_tokens(tokens: Mapping[str, ApiToken],
                read: Callable[[str], str] = lambda p: Path(p).read_text()) -> Tokens:
    """The clients of ``[api.tokens]``, secret files read (``read``); ConfigError naming the
    token for a file that cannot be read or is empty, or two tokens sharing a secret."""
    secrets: dict[str, tuple[str, str]] = {}
    for name, token in tokens.items():
        problem = token.problem()  # the file loader checked already; not env-set or built ones
        if problem:
            raise ConfigError(f"api.tokens.{name}: {problem}")
        if token.secret is not msgspec.UNSET:
            secret = token.secret
        else:
            try:
                secret = read(token.secret_file).rstrip("\r\n")
            except (OSError, UnicodeError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise ConfigError(f"api.tokens.{name}: cannot read secret_file "
                                  f"{token.secret_file}: {why}") from None
            if not secret:
                raise ConfigError(f"api.tokens.{name}: secret_file {token.secret_file} is empty")
        for other, (known, _) in secrets.items():
            if hmac.compare_digest(known.encode(), secret.encode()):
                raise ConfigError(f"api.tokens.{name} and api.tokens.{other} have the same "
                                  "secret: a request could not tell which client it is")
        secrets[name] = (secret, token.role)
    return Tokens(secrets)


# --- the WSGI shell -------------------------------------------------------------------------------

def route_of(router: bottle.Router, environ: dict) -> tuple[str | None, dict[str, str]]:
    """(route pattern, url args) of the request, None for a path or method no route has;
    matched once per request and kept in ``environ[ROUTE]`` (auth and audit both ask)."""
    known = environ.get(ROUTE)
    if known is None:
        try:
            route, args = router.match(environ)
            known = (route.rule, dict(args))
        except bottle.HTTPError:
            known = (None, {})
        environ[ROUTE] = known
    return known


def _refuse(start_response: Callable, status: str, text: str, challenge: str) -> list[bytes]:
    body = views.encode({"error": text})
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body))),
                            ("WWW-Authenticate", challenge)])
    return [body]


class Authenticate:
    """WSGI middleware in front of the bottle app: 401/403 per ``decide``, else the app."""

    def __init__(self, app: Callable, tokens: Tokens, router: bottle.Router):
        self.app = app
        self.tokens = tokens
        self.router = router

    def __call__(self, environ: dict, start_response: Callable) -> Any:
        presented = bearer(environ.pop("HTTP_AUTHORIZATION", None))
        client = self.tokens.lookup(presented) if presented is not None else None
        environ[TOKEN] = client.name if client is not None else None
        method = environ.get("REQUEST_METHOD", "")
        rule, _ = route_of(self.router, environ)
        verdict = decide(method, rule, client.role if client is not None else None)
        if verdict == 401:
            if presented is None:
                return _refuse(start_response, "401 Unauthorized", MSG_NO_TOKEN, REALM)
            return _refuse(start_response, "401 Unauthorized", MSG_BAD_TOKEN,
                           f'{REALM}, error="invalid_token"')
        if verdict == 403:
            return _refuse(start_response, "403 Forbidden",
                           f"token {client.name!r} has role {client.role}: {method} {rule} needs "
                           f"{ADMIN}", f'{REALM}, error="insufficient_scope"')
        return self.app(environ, start_response)
