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


@root_only
def test_prepare_for_a_dropped_account(tmp_path):
    nobody = pwd.getpwnam("nobody")
    account = accounts.Account("nobody", nobody.pw_uid, nobody.pw_gid)
    tmp_path.chmod(0o755)
    for parent in tmp_path.parents:  # pytest's base temp dirs are 0700: open the way
        if parent.stat().st_uid == 0 and str(parent).startswith("/tmp/"):
            parent.chmod(parent.stat().st_mode | 0o011)
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
