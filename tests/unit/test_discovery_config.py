"""The ``[discovery]`` keys: defaults, TOML and environment overrides, and the checks that make
a bad value a configuration error with a clear message (a Consul URL without scheme: GORB bug)."""

from __future__ import annotations

import pytest

from gorb.common import config
from gorb.common.config import ConfigError, DiscoverySection
from gorb.services.discovery.consul_adapter import ConsulAdapter, parse_url
from gorb.services.discovery.service import check

pytestmark = pytest.mark.timeout(5)


def test_defaults():
    d = config.load("/dev/null", env={}).discovery
    assert (d.consul, d.token, d.kv_prefix, d.store_dir) == ("", "", "", "")
    assert (d.max_delete_share, d.check_interval, d.hostname) == (0.5, 10.0, "")
    assert (d.retry_max, d.store_poll, d.id_format) == (5.0, 5.0, "{service}")


def test_toml_and_environment(tmp_path):
    f = tmp_path / "gorb.toml"
    f.write_text('[discovery]\nconsul = "http://127.0.0.1:8500"\nkv_prefix = "gorb"\n'
                 "check_interval = 2\n")
    d = config.load(str(f), env={"GORB_DISCOVERY_MAX_DELETE_SHARE": "0.25",
                                 "GORB_DISCOVERY_TOKEN": "secret",
                                 "GORB_DISCOVERY_HOSTNAME": "lb1"}).discovery
    assert (d.consul, d.kv_prefix, d.check_interval) == ("http://127.0.0.1:8500", "gorb", 2.0)
    assert (d.max_delete_share, d.token, d.hostname) == (0.25, "secret", "lb1")
    assert config.load(str(f), env={}, flags={"consul": "https://c:8501"}).discovery.consul \
        == "https://c:8501"


URLS = [
    ("http://127.0.0.1:8500", ("http", "127.0.0.1", 8500, "")),
    ("https://consul.example", ("https", "consul.example", 443, "")),
    ("http://consul", ("http", "consul", 80, "")),
    ("http://[::1]:8500/", ("http", "::1", 8500, "")),
    ("http://proxy:8080/consul/", ("http", "proxy", 8080, "/consul")),  # GORB dropped the path
]


@pytest.mark.parametrize("url,parts", URLS)
def test_parse_url(url, parts):
    u = parse_url(url)
    assert (u.scheme, u.host, u.port, u.path) == parts


BAD_URLS = [
    ("127.0.0.1:8500", "has no scheme: write it as a URL, e.g. http://127.0.0.1:8500"),
    ("localhost", "has no scheme"),
    ("consul://c:8500", "the scheme must be http or https"),
    ("http://:8500", "has no host"),
    ("http://c:99999", "bad port"),
    ("http://c:8500/?dc=x", "only scheme, host, port and path"),
]


@pytest.mark.parametrize("url,text", BAD_URLS)
def test_bad_urls(url, text):
    with pytest.raises(ConfigError, match=text.replace("?", r"\?").replace(".", r"\.")):
        parse_url(url)


CHECKS = [
    ({"consul": "127.0.0.1:8500"}, "no scheme"),
    ({"kv_prefix": "gorb"}, "needs discovery.consul"),
    ({"consul": "http://c:8500", "kv_prefix": "/"}, "kv_prefix"),
    ({"consul": "http://c:8500", "kv_prefix": "a b"}, "kv_prefix"),
    ({"consul": "http://c:8500", "kv_prefix": "gorb", "store_dir": "/etc/gorb"}, "one store"),
    ({"max_delete_share": 1.5}, "max_delete_share"),
    ({"check_interval": 0}, "check_interval"),
    ({"retry_max": -1}, "retry_max"),
    ({"id_format": "gorb"}, "must contain {service}"),
    ({"id_format": "{service}-{node}"}, "use {service} and {host}"),
    ({"id_format": "{service"}, "id_format"),
]


@pytest.mark.parametrize("fields,text", CHECKS)
def test_check(fields, text):
    with pytest.raises(ConfigError, match=text):
        check(DiscoverySection(**fields))


def test_check_accepts_good_sections():
    check(DiscoverySection())
    check(DiscoverySection(consul="http://c:8500", kv_prefix="dc1/gorb"))
    check(DiscoverySection(store_dir="/etc/gorb/services", max_delete_share=1.0))


def test_adapter_ignores_proxies_and_token_environment(monkeypatch):
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    a = ConsulAdapter("http://127.0.0.1:8500/prefix", token="")
    assert a._c.token is None
    assert a._c.http.session.trust_env is False
    assert a._c.http.base_uri == "http://127.0.0.1:8500/prefix"
    assert ConsulAdapter("http://127.0.0.1:8500", token="mine")._c.token == "mine"
