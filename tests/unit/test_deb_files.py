"""The Debian package's files (``ops/debian/``) against the code they describe: the shipped
gorb.toml shows every key with its default, the unit's command line is one ``gorb run`` accepts,
the maintainer scripts parse. The package built and installed is tested in tests/host/test_deb.py
and tests/sandbox/test_deb_install.py."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import msgspec
import pytest

from gorb.common import config
from gorb.services.launcher import conf, main

DEB = Path(__file__).resolve().parents[2] / "ops" / "debian"
TOML = DEB / "gorb.toml"
# "#[section]" and "#key = value   # comment" lines: what uncommenting them gives
_SETTING = re.compile(r"^#(\[[a-z.]+\]|[a-z_]+ = .*)$")


def uncommented() -> str:
    lines = []
    for line in TOML.read_text().splitlines():
        m = _SETTING.match(line.split("  #")[0].rstrip())
        if m:
            lines.append(m.group(1))
    return "\n".join(lines) + "\n"


def test_the_shipped_config_as_is_is_every_default(tmp_path):
    cfg = config.load(str(TOML), env={})
    assert cfg == config.Config()


def test_every_key_is_there_with_its_default(tmp_path):
    text = uncommented()
    shown = msgspec.toml.decode(text.encode())
    defaults = msgspec.to_builtins(config.Config())
    for section, fields in defaults.items():
        assert section in shown, f"[{section}] is missing from {TOML}"
        for key, value in fields.items():
            if key == "tokens":
                continue  # examples, below
            assert key in shown[section], f"{section}.{key} is missing from {TOML}"
            assert shown[section][key] == value, f"{section}.{key}: the default is {value!r}"
    # api.audit_log is unset by default: shown with what gorb run gives it
    assert "audit_log" not in defaults["api"]
    assert shown["api"]["audit_log"] == f"{conf.DEFAULT_LOG_DIR}/{main.AUDIT_FILE_NAME}"
    known = {s: set(getattr(config.Config(), s).__struct_fields__) for s in defaults}
    extra = {f"{s}.{k}" for s, keys in shown.items() for k in keys if k not in known.get(s, ())}
    assert not extra and set(shown) == set(known), f"keys gorb does not know: {extra}"
    # the examples of [api.tokens] are tables gorb accepts
    assert set(shown["api"]["tokens"]) == {"deploy", "grafana"}
    (tmp_path / "all.toml").write_text(text)
    cfg = config.load(str(tmp_path / "all.toml"), env={})
    assert {t.role for t in cfg.api.tokens.values()} == {"admin", "read"}


def unit_settings(path: Path) -> dict[str, list[str]]:
    """A systemd unit's ``Key=value`` lines: {key: its values in order}."""
    keys: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            keys.setdefault(key, []).append(value)
    return keys


def unit() -> dict[str, list[str]]:
    return unit_settings(DEB / "gorb.service")


def test_the_units_command_is_one_gorb_run_accepts():
    (start,) = unit()["ExecStart"]
    argv = shlex.split(start)
    assert argv[0] == "/opt/gorb/bin/gorb"
    args = main.build_parser().parse_args(argv[1:])
    assert (args.command, args.guest, args.config, args.log_dir) == \
        ("run", "never", config.DEFAULT_PATH, conf.DEFAULT_LOG_DIR)


def test_the_units_directories_are_gorbs_defaults():
    keys = unit()
    defaults = config.Config()
    assert "/run/" + keys["RuntimeDirectory"][0] == defaults.gorb.runtime_dir
    assert f"/var/lib/{keys['StateDirectory'][0]}" == str(Path(defaults.writer.state_file).parent)
    assert f"/var/log/{keys['LogsDirectory'][0]}" == conf.DEFAULT_LOG_DIR
    assert keys["KillMode"] == ["mixed"] and keys["Restart"] == ["on-failure"]


@pytest.mark.parametrize("script", ["postinst", "prerm", "postrm", "../build-deb"])
def test_the_scripts_parse(script):
    shell = "bash" if script.endswith("build-deb") else "sh"
    proc = subprocess.run([shell, "-n", str(DEB / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_conffiles_are_shipped_files():
    build = (DEB.parent / "build-deb").read_text()
    for path in (DEB / "conffiles").read_text().split():
        assert f'"$root{path}"' in build, f"{path} is a conffile that build-deb does not install"
