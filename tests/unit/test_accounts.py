"""Least privilege as ``gorb run`` plans it (``gorb.services.launcher.accounts``): who drops,
the setpriv words of each program in the rendered supervisord.conf, and the files ``prepare``
makes for the dropped programs. What the kernel then gives each process (uid and capability sets
read from /proc) is shown by ``tests/sandbox/test_least_privilege.py``."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest

from gorb.common import config, runtime
from gorb.services.launcher import accounts, conf, kernel, main
from tests.unit.test_launcher import programs as launcher_programs
from tests.unit.test_launcher import server_options

ACCOUNT = accounts.Account("gorb", 990, 991, (991,))


def pw(name: str, uid: int, gid: int) -> pwd.struct_passwd:
    return pwd.struct_passwd((name, "x", uid, gid, "", "/", "/usr/sbin/nologin"))


def lookup_of(table: dict[str, pwd.struct_passwd]):
    def lookup(name: str) -> pwd.struct_passwd:
        return table[name]
    return lookup


GROUPS = lambda _user, gid: [gid]  # noqa: E731


@pytest.mark.parametrize("user, euid, table, want, warns", [
    ("gorb", 1000, {}, None, False),                                  # not root: nothing to drop
    ("gorb", 0, {}, None, True),                                      # no such account: warn
    ("", 0, {}, None, False),                                         # asked not to drop
    ("root", 0, {"root": pw("root", 0, 0)}, None, False),
    ("gorb", 0, {"gorb": pw("gorb", 990, 991)}, ACCOUNT, False),
])
def test_who_drops(user, euid, table, want, warns):
    account, warning = accounts.plan(user, euid, lookup_of(table), GROUPS)
    assert account == want
    assert (warning is not None) is warns
    if warns:
        assert "'gorb'" in warning and "runs as root" in warning and "\n" not in warning


def test_setpriv_words_per_program():
    sp = "/usr/bin/setpriv"
    writer = accounts.setpriv_prefix(sp, ACCOUNT, "ipvs-writer")
    assert writer == [sp, "--regid=991", "--clear-groups", "--inh-caps=-all",
                      "--bounding-set=-all,+net_admin", "--no-new-privs", "--"]
    assert not any(w.startswith("--reuid") for w in writer)  # root's uid, net_admin only
    for program in ("api", "discovery"):
        assert accounts.setpriv_prefix(sp, ACCOUNT, program) == [
            sp, "--reuid=990", "--regid=991", "--init-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs", "--"]
    assert accounts.setpriv_prefix(sp, ACCOUNT, "pulse-worker") == [
        sp, "--reuid=990", "--regid=991", "--init-groups", "--inh-caps=-all,+setuid,+setgid",
        "--bounding-set=-all,+setuid,+setgid", "--ambient-caps=-all,+setuid,+setgid",
        "--no-new-privs", "--"]


def fake_stat(table: dict[str, tuple[int, int, int]]):
    def st(path: str):
        uid, gid, mode = table[path]
        return SimpleNamespace(st_uid=uid, st_gid=gid, st_mode=stat.S_IFDIR | mode)
    return st


@pytest.mark.parametrize("tree, blocked", [
    ({"/": (0, 0, 0o755), "/run": (0, 0, 0o755), "/run/gorb": (0, 991, 0o750)}, None),
    ({"/": (0, 0, 0o755), "/run": (0, 0, 0o711), "/run/gorb": (0, 991, 0o750)}, None),
    ({"/": (0, 0, 0o755), "/run": (0, 0, 0o700), "/run/gorb": (0, 991, 0o750)}, "/run"),
    ({"/": (0, 0, 0o755), "/run": (0, 0, 0o755), "/run/gorb": (0, 0, 0o750)}, "/run/gorb"),
    ({"/": (0, 0, 0o755), "/run": (990, 5, 0o700), "/run/gorb": (0, 991, 0o710)}, None),
    ({"/": (0, 0, 0o755), "/run": (7, 991, 0o770), "/run/gorb": (0, 991, 0o750)}, None),
])
def test_the_account_must_reach_the_runtime_dir(tree, blocked):
    assert accounts.unreachable("/run/gorb", ACCOUNT, fake_stat(tree)) == blocked


def programs(text: str, tmp_path: Path) -> dict:
    return {name: p for name, (_prio, p) in
            launcher_programs(server_options(text, tmp_path)).items()}


def test_rendered_commands_carry_the_drop(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "log").mkdir()
    lay = conf.Layout(runtime_dir=str(tmp_path / "run"), log_dir=str(tmp_path / "log"),
                      python="/opt/venv/bin/python", account=ACCOUNT, setpriv="/usr/bin/setpriv")
    progs = programs(conf.render(config.Config(), lay), tmp_path)
    for name, p in progs.items():
        program = name.split("_")[0]
        want = " ".join(accounts.setpriv_prefix("/usr/bin/setpriv", ACCOUNT, program))
        assert p.command.startswith(want + " /opt/venv/bin/python -P -m gorb.services."), name
        assert p.uid is None  # setpriv, not supervisord's user=
    plain = conf.Layout(runtime_dir=str(tmp_path / "run"), log_dir=str(tmp_path / "log"),
                        python="/opt/venv/bin/python")
    assert all(p.command.startswith("/opt/venv/bin/python -P -m ")
               for p in programs(conf.render(config.Config(), plain), tmp_path).values())


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


def open_the_way(tmp_path: Path) -> None:
    """pytest's base temp dirs are 0700: let another account reach ``tmp_path``."""
    tmp_path.chmod(0o755)
    for parent in tmp_path.parents:
        if parent.stat().st_uid == 0 and str(parent).startswith("/tmp/"):
            parent.chmod(parent.stat().st_mode | 0o011)


@root_only
def test_prepare_for_a_dropped_account(tmp_path):
    nobody = pwd.getpwnam("nobody")
    account = accounts.Account("nobody", nobody.pw_uid, nobody.pw_gid)
    open_the_way(tmp_path)
    cfg = config.Config()
    cfg.writer.state_file = str(tmp_path / "st" / "state.json")
    lay = conf.Layout(runtime_dir=str(tmp_path / "run"), log_dir=str(tmp_path / "log"),
                      account=account, setpriv="/usr/bin/setpriv")
    main.prepare(cfg, lay)
    rt = os.stat(tmp_path / "run")
    assert (rt.st_uid, rt.st_gid, stat.S_IMODE(rt.st_mode)) == (0, nobody.pw_gid, 0o750)
    sub = os.stat(tmp_path / "run" / runtime.DISCOVERY_DIR)
    assert (sub.st_uid, sub.st_gid, stat.S_IMODE(sub.st_mode)) == \
        (nobody.pw_uid, nobody.pw_gid, 0o700)
    toml = os.stat(lay.config_file)
    assert (toml.st_uid, toml.st_gid, stat.S_IMODE(toml.st_mode)) == (0, nobody.pw_gid, 0o640)
    assert stat.S_IMODE(os.stat(lay.supervisord_conf).st_mode) == 0o600
    assert config.load(str(lay.config_file), env={}) == cfg


@root_only
def test_prepare_refuses_a_runtime_dir_the_account_cannot_reach(tmp_path):
    nobody = pwd.getpwnam("nobody")
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    lay = conf.Layout(runtime_dir=str(closed / "run"), log_dir=str(tmp_path / "log"),
                      account=accounts.Account("nobody", nobody.pw_uid, nobody.pw_gid))
    cfg = config.Config()
    cfg.writer.state_file = str(tmp_path / "st" / "state.json")
    with pytest.raises(ValueError, match="is closed to user 'nobody'"):
        main.prepare(cfg, lay)


def test_run_as_root_without_the_account_warns_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kernel, "has_ipvs", lambda: True)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(os, "execve", lambda *a: None)
    monkeypatch.setenv("GORB_GORB_USER", "gorb-no-such-user")
    main.main(["run", "--config", "/dev/null", "--runtime-dir", str(tmp_path / "rt"),
               "--state-dir", str(tmp_path / "st"), "--log-dir", str(tmp_path / "log")])
    lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(lines) == 1 and "'gorb-no-such-user'" in lines[0]
    text = (tmp_path / "rt" / "supervisord.conf").read_text()
    assert [line for line in text.splitlines() if line.startswith("command=")
            and "setpriv" in line] == []


@pytest.mark.parametrize("setting, want", [
    (None, "{log}/audit.log"),              # unset: in the log dir
    ("api.log.json", "{log}/api.log.json"),  # relative: in the log dir too
    ("/srv/audit/x.log", "/srv/audit/x.log"),
    ("", ""),                                # off
])
def test_the_audit_log_defaults_to_the_log_dir(tmp_path, monkeypatch, setting, want):
    monkeypatch.delenv("GORB_API_AUDIT_LOG", raising=False)
    toml = tmp_path / "gorb.toml"
    toml.write_text("" if setting is None else f"[api]\naudit_log = {setting!r}\n")
    cfg, lay = main.effective(main.build_parser().parse_args(
        ["run", "--config", str(toml), "--log-dir", str(tmp_path / "log")]), euid=1000)
    assert cfg.api.audit_log == want.format(log=tmp_path / "log")
    # what the programs read back from gorb.toml
    assert msgspec.toml.decode(config.dump(cfg), type=config.Config).api.audit_log == \
        cfg.api.audit_log


@root_only
def test_prepare_gives_the_audit_log_to_the_account(tmp_path):
    nobody = pwd.getpwnam("nobody")
    account = accounts.Account("nobody", nobody.pw_uid, nobody.pw_gid)
    open_the_way(tmp_path)
    log = tmp_path / "log"
    lay = conf.Layout(runtime_dir=str(tmp_path / "run"), log_dir=str(log), account=account)
    elsewhere = tmp_path / "elsewhere.log"
    elsewhere.write_text("")
    for path, owner in ((log / "audit.log", nobody.pw_uid), (elsewhere, 0)):
        main.prepare_audit_log(path, lay)
        st = os.stat(path)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (owner, 0o640 if owner else 0o644)
    # a root-owned one left in the log dir by a run without the account: repaired, kept
    os.chown(log / "audit.log", 0, 0)
    (log / "audit.log").write_text('{"kept": 1}\n')
    main.prepare_audit_log(log / "audit.log", lay)
    assert os.stat(log / "audit.log").st_uid == nobody.pw_uid
    assert (log / "audit.log").read_text() == '{"kept": 1}\n'
    # a symlink there is not followed
    (log / "audit.log").unlink()
    (log / "audit.log").symlink_to(elsewhere)
    main.prepare_audit_log(log / "audit.log", lay)
    assert os.stat(elsewhere).st_uid == 0
    # without an account: created 0640, the caller's
    plain = conf.Layout(runtime_dir=str(tmp_path / "run"), log_dir=str(log))
    main.prepare_audit_log(log / "other.log", plain)
    assert stat.S_IMODE(os.stat(log / "other.log").st_mode) == 0o640


@root_only
def test_prepare_refuses_an_audit_log_the_account_cannot_reach(tmp_path):
    nobody = pwd.getpwnam("nobody")
    open_the_way(tmp_path)
    closed = tmp_path / "log"
    closed.mkdir(mode=0o750)
    lay = conf.Layout(runtime_dir=str(tmp_path / "run"), log_dir=str(closed),
                      account=accounts.Account("nobody", nobody.pw_uid, nobody.pw_gid))
    with pytest.raises(ValueError, match=f"{closed} is closed to user 'nobody'.*audit log"):
        main.prepare_audit_log(closed / "audit.log", lay)
