"""The one door to Consul: a small adapter over py-consul's ``consul.Consul`` (the only importer).

What it fixes or pins down against GORB and the client's defaults (gorb-spec §5.1, §8.18;
ecosystem §1):
- the agent URL (GORB ``-c``) must carry its scheme: ``http://127.0.0.1:8500``; a bare
  ``127.0.0.1:8500`` is a configuration error saying so (Go's URL parser took it as a scheme);
  a path prefix (``https://proxy/consul``) is kept instead of dropped;
- every request has a 5 s timeout (``connections_timeout``; blocking queries add their wait);
- proxies from the environment are ignored (``trust_env = False``): the agent is local, and an
  ``HTTP_PROXY`` inherited by the process would send agent calls to the proxy;
- the ACL token is the configured one only: py-consul lets ``CONSUL_HTTP_TOKEN`` override an
  explicit token, and gorb reads no environment outside ``gorb.common.config``;
- every transport failure (refused, reset, timeout, a 5xx, a body that is not JSON) is one
  ``ConsulUnavailable``, which callers retry with backoff; a 4xx (ACL denied, bad request) is
  ``ConsulRefused``, an answer that retrying will not change.

Wire use: ``PUT /v1/agent/service/register`` (body with ``checks: [...]``), ``PUT
/v1/agent/service/deregister/<id>``, ``GET /v1/agent/services``, ``PUT
/v1/agent/check/{pass,warn,fail}/<id>?note=``, ``GET /v1/kv/<prefix>?recurse[&index=&wait=]``,
``GET /v1/kv/<key>``, ``PUT /v1/kv/<key>[?cas=]``, ``DELETE /v1/kv/<key>[?cas=]``.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Any

import consul
import consul.exceptions
import requests

from gorb.common.config import ConfigError

DEFAULT_TIMEOUT = 5.0  # GORB's Go client timeout (gorb-spec §5.1)

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"


class ConsulUnavailable(Exception):
    """The agent could not be reached or failed (transport error, timeout, 5xx): retry later."""


class ConsulRefused(Exception):
    """The agent answered with a 4xx (ACL denied, bad request): retrying will not help."""


@dataclass(frozen=True)
class ConsulURL:
    scheme: str
    host: str
    port: int
    path: str = ""

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse_url(url: str) -> ConsulURL:
    """GORB's ``-c`` value -> its parts; ConfigError with the fix for a URL without scheme."""
    if "://" not in url:
        raise ConfigError(f"discovery.consul {url!r} has no scheme: write it as a URL, e.g. "
                          f"http://{url or '127.0.0.1:8500'}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"discovery.consul {url!r}: the scheme must be http or https")
    if not parts.hostname:
        raise ConfigError(f"discovery.consul {url!r} has no host")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"discovery.consul {url!r} has a bad port") from None
    if parts.query or parts.fragment or parts.username:
        raise ConfigError(f"discovery.consul {url!r}: only scheme, host, port and path are used")
    return ConsulURL(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80),
                     parts.path.rstrip("/"))


_REFUSED = (consul.exceptions.BadRequest, consul.exceptions.ACLDisabled,
            consul.exceptions.ACLPermissionDenied, consul.exceptions.NotFound,
            consul.exceptions.ClientError)


class ConsulAdapter:
    """One ``consul.Consul`` client (one HTTP session). Use one adapter per concurrent loop: a
    blocking query holds its connection for up to its wait."""

    def __init__(self, url: str, token: str = "", verify: bool = True,
                 timeout: float = DEFAULT_TIMEOUT):
        self.url = parse_url(url)
        self._c = consul.Consul(host=self.url.host, port=self.url.port, scheme=self.url.scheme,
                                token=token or None, verify=verify, connections_timeout=timeout)
        self._c.token = token or None  # not CONSUL_HTTP_TOKEN: config is the one source
        http = self._c.http
        http.session.trust_env = False
        http.base_uri += self.url.path

    def close(self) -> None:
        self._c.http.session.close()

    def _call(self, fn, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except requests.RequestException as exc:
            raise ConsulUnavailable(f"Consul at {self.url}: {exc}") from exc
        except _REFUSED as exc:
            raise ConsulRefused(f"Consul at {self.url} refused: {exc}") from exc
        except consul.ConsulException as exc:  # a 5xx, or a body that is not JSON
            raise ConsulUnavailable(f"Consul at {self.url}: {exc}") from exc

    # agent ---------------------------------------------------------------------------------------

    def register(self, service_id: str, name: str, address: str, port: int, tags: list[str],
                 meta: dict[str, str], check: dict[str, Any] | None = None) -> None:
        """Register (or replace) a service in the local agent, with ``check`` as its only check
        (``ttl_check``); its check id is Consul's default, ``service:<service_id>``."""
        ok = self._call(self._c.agent.service.register, name, service_id=service_id,
                        address=address or None, port=port or None, tags=list(tags),
                        meta=dict(meta), check=check, replace_existing_checks=True)
        if not ok:
            raise ConsulUnavailable(f"Consul at {self.url} did not register {service_id}")

    def deregister(self, service_id: str) -> None:
        """Remove a service (and its checks) from the local agent; unknown ids are fine."""
        self._call(self._c.agent.service.deregister, service_id)

    def agent_services(self) -> dict[str, dict[str, Any]]:
        """``{service id: {"ID", "Service", "Address", "Port", "Tags", "Meta", ...}}``."""
        return self._call(self._c.agent.services) or {}

    def check_status(self, check_id: str, status: str, output: str = "") -> bool:
        """Set a TTL check's status (and reset its TTL); False if the agent has no such check."""
        fn = {PASSING: self._c.agent.check.ttl_pass, WARNING: self._c.agent.check.ttl_warn,
              CRITICAL: self._c.agent.check.ttl_fail}[status]
        try:
            return bool(self._call(fn, check_id, notes=output or None))
        except ConsulRefused:
            return False  # recent agents answer an unknown check with a 4xx, not a 404

    @staticmethod
    def ttl_check(ttl: str, status: str, name: str, notes: str = "") -> dict[str, Any]:
        """A TTL check definition for ``register``: critical unless refreshed within ``ttl``,
        starting at ``status`` rather than Consul's default critical."""
        check = consul.Check.ttl(ttl)
        check.update({"Name": name, "Status": status})
        if notes:
            check["Notes"] = notes
        return check

    # kv ------------------------------------------------------------------------------------------

    def kv_tree(self, prefix: str, index: int | None = None,
                wait: str | None = None) -> tuple[int, dict[str, bytes]]:
        """Every key under ``prefix`` with a value -> ``(X-Consul-Index, {key: bytes})``.

        With ``index`` (> 0) this is a blocking query: the agent answers when the tree changes
        after ``index`` or after ``wait`` (e.g. ``"30s"``). Keys without a value (folders) are
        left out; a missing prefix is an empty tree.
        """
        raw_index, items = self._call(self._c.kv.get, prefix.lstrip("/"), index=index or None,
                                      wait=wait, recurse=True)
        tree = {item["Key"]: item["Value"] for item in items or ()
                if item.get("Value") is not None}
        return _index(raw_index), tree

    def kv_get(self, key: str) -> tuple[int, bytes | None]:
        """``(ModifyIndex, value)`` of one key; ``(0, None)`` if it does not exist."""
        _, item = self._call(self._c.kv.get, key.lstrip("/"))
        if item is None:
            return 0, None
        return int(item.get("ModifyIndex") or 0), item.get("Value") or b""

    def kv_put(self, key: str, value: bytes, cas: int | None = None) -> bool:
        """Write ``key``; with ``cas`` only if its ModifyIndex is still ``cas`` (0: only if it
        does not exist). False when the compare-and-set lost."""
        return bool(self._call(self._c.kv.put, key.lstrip("/"), value, cas=cas))

    def kv_delete(self, key: str, cas: int | None = None) -> bool:
        """Delete ``key``; with ``cas`` only if its ModifyIndex is still ``cas``. False when the
        compare-and-set lost (a missing key is deleted already: True)."""
        return bool(self._call(self._c.kv.delete, key.lstrip("/"), cas=cas))


def _index(raw: Any) -> int:
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ConsulUnavailable(f"bad X-Consul-Index {raw!r}") from None
