"""The API's tokens and role rules, pure: ``[api.tokens]`` parsing and its errors
(``gorb.common.config``), secret files read through an injected reader, the role decision as a
table (method x route x role -> 200/401/403), the Authorization header, the constant-time lookup;
and the audit line's pure parts."""

from __future__ import annotations

import msgspec
import pytest

from gorb.common import config
from gorb.common.config import ApiToken, ConfigError
from gorb.services.api import audit, auth
from gorb.services.api.auth import ADMIN, READ, Tokens, bearer, decide, load_tokens


def load(tmp_path, text: str) -> config.Config:
    path = tmp_path / "gorb.toml"
    path.write_text(text)
    return config.load(str(path), env={})


# --- [api.tokens] ---------------------------------------------------------------------------------

def test_tokens_inline_and_from_a_file_parse_and_survive_the_dump(tmp_path):
    cfg = load(tmp_path, '[api.tokens]\ndeploy = { secret = "s3cret", role = "admin" }\n'
                         'grafana = { secret_file = "/etc/gorb/grafana.token", role = "read" }\n')
    assert cfg.api.tokens == {
        "deploy": ApiToken(role="admin", secret="s3cret"),
        "grafana": ApiToken(role="read", secret_file="/etc/gorb/grafana.token")}
    dumped = config.dump(cfg)
    assert "secret_file = \"/etc/gorb/grafana.token\"" in dumped
    (tmp_path / "again.toml").write_text(dumped)
    assert config.load(str(tmp_path / "again.toml"), env={}).api == cfg.api


def test_no_tokens_is_the_default_and_survives_the_dump(tmp_path):
    cfg = load(tmp_path, "[api]\nlisten = \":4672\"\n")
    # audit_log unset: gorb run puts it in its log dir (tests/unit/test_accounts.py)
    assert cfg.api.tokens == {} and (cfg.api.tls_cert, cfg.api.tls_key, cfg.api.audit_log) == \
        ("", "", msgspec.UNSET)
    (tmp_path / "again.toml").write_text(config.dump(cfg))
    assert config.load(str(tmp_path / "again.toml"), env={}).api == cfg.api


@pytest.mark.parametrize("table, why", [
    ('ops = { secret = "", role = "admin" }', "api.tokens.ops: the secret is empty"),
    ('ops = { secret = "x", role = "root" }', "api.tokens.ops: role must be read or admin, "
                                              "not 'root'"),
    ('ops = { secret = "x" }', "Object missing required field `role`"),
    ('ops = { role = "read" }', "api.tokens.ops: needs exactly one of secret and secret_file"),
    ('ops = { secret = "x", secret_file = "/f", role = "read" }',
     "api.tokens.ops: needs exactly one of secret and secret_file"),
    ('ops = { secret_file = "", role = "read" }', "api.tokens.ops: secret_file is empty"),
    ('ops = { secret = "x", role = "read", scope = "all" }', "unknown field `scope`"),
    ('ops = "x"', "Expected `object`, got `str`"),
])
def test_a_bad_token_table_is_a_config_error_naming_it(tmp_path, table, why):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, f"[api.tokens]\n{table}\n")
    assert why in str(exc.value) and str(tmp_path / "gorb.toml") in str(exc.value)


@pytest.mark.parametrize("keys", ['tls_cert = "/c.pem"', 'tls_key = "/k.pem"'])
def test_half_a_tls_pair_is_a_config_error(tmp_path, keys):
    with pytest.raises(ConfigError, match="api.tls_cert and api.tls_key must be set together"):
        load(tmp_path, f"[api]\n{keys}\n")


def test_secret_files_are_read_by_load_tokens_with_the_newline_stripped():
    files = {"/run/a": "from-file\n", "/run/b": "crlf\r\n"}
    tokens = load_tokens({"a": ApiToken("read", secret_file="/run/a"),
                          "b": ApiToken("admin", secret_file="/run/b"),
                          "c": ApiToken("admin", secret="inline")}, read=files.__getitem__)
    assert tokens.lookup("from-file") == auth.Client("a", READ)
    assert tokens.lookup("crlf") == auth.Client("b", ADMIN)
    assert tokens.lookup("inline") == auth.Client("c", ADMIN)
    assert tokens.lookup("from-file\n") is None and tokens.lookup("") is None


def _unreadable(path: str) -> str:
    raise PermissionError(13, "Permission denied", path)


@pytest.mark.parametrize("read, why", [
    (_unreadable, "api.tokens.ro: cannot read secret_file /s: Permission denied"),
    (lambda p: "\n", "api.tokens.ro: secret_file /s is empty"),
    (lambda p: (b"\xff").decode(), "api.tokens.ro: cannot read secret_file /s: "),
])
def test_a_secret_file_that_cannot_be_used_is_a_config_error(read, why):
    with pytest.raises(ConfigError) as exc:
        load_tokens({"ro": ApiToken("read", secret_file="/s")}, read=read)
    assert str(exc.value).startswith(why)


def test_two_tokens_with_one_secret_are_refused():
    with pytest.raises(ConfigError, match="api.tokens.b and api.tokens.a have the same secret"):
        load_tokens({"a": ApiToken("read", secret="same"), "b": ApiToken("admin", secret="same")})


def test_a_token_table_built_in_code_is_checked_too():
    with pytest.raises(ConfigError, match="api.tokens.x: the secret is empty"):
        load_tokens({"x": ApiToken("read", secret="")})


# --- the rules ------------------------------------------------------------------------------------

GETS = ["/service", "/service/<vs>", "/service/<vs>/<rs>", "/metrics", "/openapi.json",
        "/store/sync/status"]
MUTATIONS = [("PUT", "/service/<vs>"), ("PATCH", "/service/<vs>"), ("DELETE", "/service/<vs>"),
             ("PUT", "/service/<vs>/<rs>"), ("PATCH", "/service/<vs>/<rs>"),
             ("DELETE", "/service/<vs>/<rs>"), ("GET", "/store/sync"), ("HEAD", "/store/sync")]
TABLE = (
    # (method, route, role) -> status
    [(("GET", "/health", role), 200) for role in (None, READ, ADMIN)]
    + [(("HEAD", "/health", role), 200) for role in (None, READ, ADMIN)]
    + [((m, r, role), want) for r in GETS for m in ("GET", "HEAD")
       for role, want in ((None, 401), (READ, 200), (ADMIN, 200))]
    + [((m, r, role), want) for m, r in MUTATIONS
       for role, want in ((None, 401), (READ, 403), (ADMIN, 200))]
    # no such route (None) or method: 401 first, then the router's answer to any client
    + [((m, None, role), want) for m in ("GET", "PUT", "POST", "DELETE")
       for role, want in ((None, 401), (READ, 200), (ADMIN, 200))]
    + [(("PUT", "/health", None), 401)]
)


@pytest.mark.parametrize("request_, want", TABLE, ids=[f"{m} {r} {role}" for (m, r, role), _ in
                                                       TABLE])
def test_the_role_decision(request_, want):
    assert decide(*request_) == want


def test_what_changes_state():
    assert [auth.changes_state(m, r) for m, r in MUTATIONS] == [True] * len(MUTATIONS)
    assert not any(auth.changes_state(m, r) for r in GETS + ["/health"] for m in ("GET", "HEAD"))
    assert auth.changes_state("POST", None) and not auth.changes_state("GET", None)


@pytest.mark.parametrize("header, want", [
    (None, None), ("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("BEARER abc", "abc"),
    ("Bearer", ""), ("Bearer ", ""), ("Basic dXNlcjpwdw==", None), ("abc", None), ("", None),
])
def test_the_authorization_header(header, want):
    assert bearer(header) == want


def test_the_lookup_compares_every_token_whichever_matches(monkeypatch):
    tokens = Tokens({"a": ("one", READ), "b": ("two", ADMIN), "c": ("three", READ)})
    seen = []
    real = auth.hmac.compare_digest

    def compare(x, y):
        seen.append(y)
        return real(x, y)

    monkeypatch.setattr(auth.hmac, "compare_digest", compare)
    for secret, want in (("one", "a"), ("three", "c"), ("nope", None)):
        seen.clear()
        client = tokens.lookup(secret)
        assert (client.name if client else None) == want
        assert len(seen) == 3 and len(set(seen)) == 3  # all three, each once
        assert all(len(d) == 32 for d in seen)  # digests: equal lengths whatever was sent


def test_a_non_ascii_secret_matches_the_bytes_a_client_sends():
    tokens = Tokens({"u": ("pässwörd", READ)})
    as_wsgi_header = "pässwörd".encode().decode("latin-1")  # how a WSGI server hands it over
    assert tokens.lookup(as_wsgi_header) == auth.Client("u", READ)


# --- the audit line -------------------------------------------------------------------------------

def test_an_audit_entry_from_what_the_request_left():
    environ = {"REQUEST_METHOD": "PUT", "REMOTE_ADDR": "10.0.0.5", auth.TOKEN: "deploy",
               audit.AUDIT: {"body": {"weight": 5}, "raw": {"bytes": 13, "head": "x"},
                             "change": {"/service/web/a": {"before": None, "after": {}}}}}
    line = audit.entry(1796198400.5, environ, "/service/<vs>/<rs>", {"vs": "web", "rs": "a"},
                       200, None)
    assert line == {"time": "2026-12-02T08:00:00.500Z", "token": "deploy", "peer": "10.0.0.5",
                    "method": "PUT", "route": "/service/<vs>/<rs>",
                    "ids": {"vs": "web", "rs": "a"}, "body": {"weight": 5}, "raw": None,
                    "status": 200, "error": None,
                    "change": {"/service/web/a": {"before": None, "after": {}}}}
    refused = audit.entry(0.0, {"REQUEST_METHOD": "DELETE"}, None, {}, 401, "invalid token")
    assert refused["time"] == "1970-01-01T00:00:00.000Z"
    assert (refused["token"], refused["route"], refused["ids"], refused["body"],
            refused["change"]) == (None, None, {}, None, None)


def test_a_body_that_did_not_validate_is_kept_as_its_size_and_head_only():
    raw = audit.raw_of(b'{"port": "' + b"x" * 1000 + b'"}')
    assert raw == {"bytes": 1012, "head": '{"port": "' + "x" * 54}
    assert audit.raw_of(b"") is None
    assert audit.raw_of(b"\xff\xfe" * 100)["head"] == "\ufffd" * 64


@pytest.mark.parametrize("status, body, want", [
    (200, b"", None), (404, b'{"error": "404 page not found"}', "404 page not found"),
    (500, b"not json", None), (400, b"[1]", None),
])
def test_the_error_of_a_refusal_comes_from_its_body(status, body, want):
    assert audit.error_text(status, body) == want
