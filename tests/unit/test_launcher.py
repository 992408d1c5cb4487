"""The ``gorb`` command: supervisord.conf rendering, flags to config, errors, the guest plan.

The rendered config is read back with supervisor's own parsers, so what is asserted is what
supervisord and supervisorctl will do. Nothing here starts a process (exec and the guest are
replaced by recording fakes).
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest
from supervisor.options import ClientOptions, ServerOptions

from gorb.common import config
from gorb.services.launcher import conf, guest, kernel, main, netns, uml


def layout(tmp_path: Path, **kw) -> conf.Layout:
    (tmp_path / "run").mkdir(parents=True, exist_ok=True)
    (tmp_path / "log").mkdir(exist_ok=True)
    return conf.Layout(runtime_dir=str(tmp_path / "run"), log_dir=str(tmp_path / "log"),
                       python="/opt/venv/bin/python", **kw)


def server_options(text: str, tmp_path: Path) -> ServerOptions:
    path = tmp_path / "supervisord.conf"
    path.write_text(text)
    opts = ServerOptions()
    opts.configfile = str(path)
    opts.process_config(do_usage=False)
    return opts


def programs(opts: ServerOptions) -> dict:
    return {p.name: (g.priority, p) for g in opts.process_group_configs for p in g.process_configs}


# --- rendering ----------------------------------------------------------------------------------

def test_rendered_config_is_what_supervisord_runs(tmp_path):
    lay = layout(tmp_path)
    opts = server_options(conf.render(config.Config(), lay), tmp_path)
    sv = opts.configroot.supervisord
    assert sv.nodaemon is True
    assert sv.logfile == f"{lay.log_dir}/supervisord.log"
    assert sv.pidfile == f"{lay.runtime_dir}/supervisord.pid"
    assert sv.childlogdir == lay.log_dir
    assert [(s["family"] == 1, s["file"], s["chmod"]) for s in sv.server_configs] == \
        [(True, f"{lay.runtime_dir}/supervisor.sock", 0o700)]  # AF_UNIX only: no TCP
    progs = programs(opts)
    assert list(conf.PROGRAMS) == ["ipvs-writer", "api", "pulse-worker", "discovery"]
    workers = [f"pulse-worker_{i:02d}" for i in range(config.Config().pulse.workers)]
    assert list(progs) == ["ipvs-writer", "api", *workers, "discovery"]
    expected = [("ipvs-writer", "ipvs_writer", 10, ""), ("api", "api", 20, "")]
    expected += [(w, "pulse_worker", 30, f" --index {i} --workers {len(workers)}")
                 for i, w in enumerate(workers)]
    expected += [("discovery", "discovery", 40, "")]
    for name, module, priority, extra in expected:
        prio, p = progs[name]
        assert prio == priority
        assert p.command == f"/opt/venv/bin/python -P -m gorb.services.{module} --config " \
                            f"{lay.runtime_dir}/gorb.toml{extra}"
        assert p.directory == lay.runtime_dir
        assert (p.stopsignal, p.stopwaitsecs, p.startsecs) == (signal.SIGTERM, 10, 2)
        assert p.stopasgroup and p.killasgroup and p.redirect_stderr
        assert p.autorestart.__name__ == "RestartUnconditionally"
        assert p.stdout_logfile == f"{lay.log_dir}/{name}.log"
        assert (p.stdout_logfile_maxbytes, p.stdout_logfile_backups) == (10 * 1024 * 1024, 5)
        assert p.environment["NO_PROXY"] == "127.0.0.1,localhost"
        assert p.uid is None  # a checkout runs as supervisord's user; production: setpriv


def test_supervisorctl_finds_the_socket(tmp_path):
    lay = layout(tmp_path)
    path = tmp_path / "supervisord.conf"
    path.write_text(conf.render(config.Config(), lay))
    opts = ClientOptions()
    opts.configfile = str(path)
    opts.process_config(do_usage=False)
    assert opts.serverurl == f"unix://{lay.runtime_dir}/supervisor.sock"


@pytest.mark.parametrize("workers", [1, 2, 7])
def test_pulse_workers_from_config_and_discovery_after_them(tmp_path, workers):
    cfg = config.Config()
    cfg.pulse.workers = workers
    text = conf.render(cfg, layout(tmp_path))
    names = [f"pulse-worker_{i:02d}" for i in range(workers)]
    progs = programs(server_options(text, tmp_path))
    assert list(progs) == ["ipvs-writer", "api", *names, "discovery"]
    assert [progs[n][1].command.split("--index ")[1] for n in names] == \
        [f"{i} --workers {workers}" for i in range(workers)]
    assert "\n[program:discovery]\n" in text and "\n[program:pulse-worker]\n" in text
    assert progs["discovery"][0] > max(progs[n][0] for n in names)  # started last


def test_ctl_inet_adds_a_tcp_server(tmp_path):
    opts = server_options(conf.render(config.Config(), layout(tmp_path, ctl_inet="10.0.0.2:9001")),
                          tmp_path)
    tcp = [s for s in opts.configroot.supervisord.server_configs if s["family"] != 1]
    assert [(s["host"], s["port"]) for s in tcp] == [("10.0.0.2", 9001)]


@pytest.mark.parametrize("bad", ["a b", "a;b", "a%b", "a\tb"])
def test_paths_supervisord_cannot_carry_are_refused(bad):
    with pytest.raises(ValueError, match="whitespace, ';' or '%'"):
        conf.render(config.Config(), conf.Layout(runtime_dir=f"/tmp/{bad}"))
    with pytest.raises(ValueError, match="log dir"):
        conf.render(config.Config(), conf.Layout(runtime_dir="/run/gorb", log_dir=f"/tmp/{bad}"))


def test_every_key_in_the_template_is_commented():
    for line in conf.TEMPLATE.read_text().splitlines():
        if re.match(r"^;?[A-Za-z_.${}]+ ?=", line):
            assert re.search(r"\s;", line.split("=", 1)[1]), f"no comment: {line}"


def test_ctl_only_config_points_supervisorctl_at_the_socket(tmp_path):
    lay = layout(tmp_path)
    path = tmp_path / "ctl.conf"
    path.write_text(conf.render_ctl_only(lay, "first line\nsecond"))
    opts = ClientOptions()
    opts.configfile = str(path)
    opts.process_config(do_usage=False)
    assert opts.serverurl == f"unix://{lay.runtime_dir}/supervisor.sock"
    assert path.read_text().startswith("; first line\n; second\n")
    assert "[program:" not in path.read_text()


# --- command line -------------------------------------------------------------------------------

def run_args(*argv: str):
    return main.effective(main.build_parser().parse_args(["run", *argv]))


def test_gorb_flags_are_config_aliases(tmp_path, monkeypatch):
    monkeypatch.setenv("GORB_API_LISTEN", ":9999")  # a flag beats the environment
    cfg, lay = run_args("-l", "127.0.0.1:8080", "-i", "eth1", "-f", "-c", "http://consul:8500",
                        "--runtime-dir", str(tmp_path / "rt"), "--state-dir", "st",
                        "--log-dir", "logs")
    assert (cfg.api.listen, cfg.writer.device, cfg.writer.flush, cfg.discovery.consul) == \
        ("127.0.0.1:8080", "eth1", True, "http://consul:8500")
    assert cfg.gorb.runtime_dir == lay.runtime_dir == str(tmp_path / "rt")
    assert cfg.writer.state_file == os.path.abspath("st/state.json")
    assert lay.log_dir == os.path.abspath("logs")
    assert lay.python == sys.executable


def test_defaults_and_the_config_file(tmp_path, monkeypatch):
    for var in [v for v in os.environ if v.startswith("GORB_")]:
        monkeypatch.delenv(var)
    toml = tmp_path / "gorb.toml"
    toml.write_text('[gorb]\nruntime_dir = "/srv/run"\n[pulse]\nworkers = 4\n')
    cfg, lay = run_args("--config", str(toml))
    assert (cfg.gorb.runtime_dir, cfg.pulse.workers, cfg.api.listen) == ("/srv/run", 4, ":4672")
    assert cfg.writer.state_file == "/var/lib/gorb/state.json"
    assert lay.log_dir == "/var/log/gorb" and lay.ctl_inet == ""
    cfg, lay = run_args("--config", str(toml), "--runtime-dir", "/other")
    assert lay.runtime_dir == cfg.gorb.runtime_dir == "/other"


@pytest.mark.parametrize("content, message", [
    ("[api]\nlisten = 'nope'\n", "api.listen 'nope' is not host:port"),
    ("[writer]\nstate_fil = 'x'\n", "state_fil"),
    ("[pulse]\nworkers = 0\n", "pulse.workers must be at least 1"),
    ("not toml [", "gorb.toml"),
    (None, "cannot read"),
])
def test_bad_config_exits_2_with_a_message(tmp_path, capsys, content, message):
    toml = tmp_path / "gorb.toml"
    if content is not None:
        toml.write_text(content)
    assert main.main(["run", "--config", str(toml), "--guest", "never"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gorb run: ") and message in err


def test_bad_flag_or_path_exits_2(tmp_path, capsys):
    assert main.main(["run", "--config", "/dev/null", "-l", "x"]) == 2
    assert "not host:port" in capsys.readouterr().err
    assert main.main(["run", "--config", "/dev/null", "--runtime-dir", "/tmp/a b"]) == 2
    assert "whitespace" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main.main(["run", "--guest", "maybe"])
    assert exc.value.code == 2


def test_ctl_without_a_running_instance_says_so(tmp_path, capsys):
    assert main.main(["ctl", "--runtime-dir", str(tmp_path), "status"]) == 2
    assert "is `gorb run --runtime-dir" in capsys.readouterr().err


class Recorder:
    def __init__(self, result=0):
        self.calls, self.result = [], result

    def __call__(self, *args, **kw):
        self.calls.append((args, kw))
        return self.result


def test_ctl_runs_supervisorctl_on_the_instance_config(tmp_path, monkeypatch):
    (tmp_path / "supervisord.conf").write_text("")
    execv = Recorder()
    monkeypatch.setattr(os, "execv", execv)
    main.main(["ctl", "--runtime-dir", str(tmp_path), "restart", "api"])
    (path, argv), _ = execv.calls[0]
    assert argv == [sys.executable, "-m", "supervisor.supervisorctl", "-c",
                    str(tmp_path / "supervisord.conf"), "restart", "api"]


def test_run_with_ipvs_writes_both_files_and_becomes_supervisord(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel, "has_ipvs", lambda: True)
    monkeypatch.setenv("GORB_API_LISTEN", ":7000")
    monkeypatch.setenv("GORB_GORB_USER", "")  # no privilege drop here: tests/unit/test_accounts.py
    execve = Recorder()
    monkeypatch.setattr(os, "execve", execve)
    rt = tmp_path / "rt"
    main.main(["run", "--config", "/dev/null", "-l", ":8080", "--runtime-dir", str(rt),
               "--state-dir", str(tmp_path / "st"), "--log-dir", str(tmp_path / "log")])
    (path, argv, env), _ = execve.calls[0]
    assert argv == [sys.executable, "-m", "supervisor.supervisord", "-c",
                    str(rt / "supervisord.conf")]
    assert not [k for k in env if k.startswith("GORB_")]  # already merged into gorb.toml
    written = config.load(str(rt / "gorb.toml"), env={})
    assert written.api.listen == ":8080" and written.gorb.runtime_dir == str(rt)
    assert written.writer.state_file == str(tmp_path / "st" / "state.json")
    assert (rt / "supervisord.conf").read_text() == conf.render(
        written, conf.Layout(runtime_dir=str(rt), log_dir=str(tmp_path / "log")))
    assert oct((rt.stat().st_mode) & 0o777) == "0o770"
    assert (tmp_path / "log").is_dir() and (tmp_path / "st").is_dir()


@pytest.mark.parametrize("has_ipvs, flag, in_guest", [
    (False, "auto", True), (True, "auto", False), (True, "always", True), (False, "never", False),
])
def test_where_run_goes(tmp_path, monkeypatch, has_ipvs, flag, in_guest):
    monkeypatch.setattr(kernel, "has_ipvs", lambda: has_ipvs)
    guest_run, execve = Recorder(0), Recorder()
    monkeypatch.setattr(guest, "run", guest_run)
    monkeypatch.setattr(os, "execve", execve)
    main.main(["run", "--config", "/dev/null", "--runtime-dir", str(tmp_path / "rt"),
               "--state-dir", str(tmp_path), "--log-dir", str(tmp_path), "--guest", flag])
    assert (bool(guest_run.calls), bool(execve.calls)) == (in_guest, not in_guest)
    if in_guest:
        why = guest_run.calls[0][0][2]
        assert ("no IPVS" in why) == (flag == "auto")


# --- the kernel check ---------------------------------------------------------------------------

def test_has_ipvs(tmp_path):
    proc = tmp_path / "ip_vs"
    assert kernel.has_ipvs(str(proc), ["false"]) is False
    assert kernel.has_ipvs(str(proc), ["/nonexistent/modprobe"]) is False
    assert kernel.has_ipvs(str(proc), ["touch", str(proc)]) is True  # modprobe made it appear
    assert kernel.has_ipvs(str(proc), ["false"]) is True  # present: modprobe not needed


# --- the guest mode's plan (pure parts) ----------------------------------------------------------

def test_host_side_link_commands():
    cmds = netns.setup_commands("gorb-42")
    assert cmds[0] == ["ip", "netns", "add", "gorb-42"]
    assert ["ip", "-n", "gorb-42", "tuntap", "add", "dev", "gt0", "mode", "tap"] in cmds
    assert ["ip", "-n", "gorb-42", "addr", "add", "10.77.255.253/30", "dev", "gt0"] in cmds
    assert ["ip", "-n", "gorb-42", "route", "add", "unreachable", "10.77.0.0/16"] in cmds
    assert all("gorb-42" in c for c in cmds)  # nothing touches the root namespace
    assert netns.kernel_args() == ["vec0:transport=tap,ifname=gt0"]
    assert "ip addr add 10.77.255.254/30 dev vec0" in netns.guest_link_script()
    assert "ip route add unreachable 10.77.0.0/16" in netns.guest_link_script()


@pytest.mark.parametrize("names, alive, stale", [
    ([], set(), []),
    (["gorb-10", "gorb-11"], {10}, ["gorb-11"]),
    (["other", "gorb-x", "gorb-", "gorbish-5"], set(), []),
])
def test_stale_namespaces(names, alive, stale):
    assert netns.stale(names, lambda pid: pid in alive) == stale


def test_guest_config_and_script(tmp_path):
    cfg = config.Config()
    cfg.api.listen = "127.0.0.1:5000"
    cfg.writer.state_file = "/var/lib/gorb/state.json"
    lay = conf.Layout(runtime_dir="/run/gorb", log_dir="/var/log/gorb", python="/v/bin/python")
    inside = guest.guest_config(cfg)
    assert (inside.api.listen, inside.gorb.runtime_dir) == (":5000", "/run/gorb")
    assert cfg.api.listen == "127.0.0.1:5000"  # a copy
    assert inside.writer.device == "vec0"  # the guest's only device, unless chosen otherwise
    cfg.writer.device = "dummy0"
    assert guest.guest_config(cfg).writer.device == "dummy0"
    script = guest.guest_script(cfg, lay, Path("/run/gorb/uml"))
    assert "mkdir -p /var/lib/gorb && mount -t hostfs hostfs /var/lib/gorb -o /var/lib/gorb" \
        in script
    assert "mount -t hostfs hostfs /var/log/gorb -o /var/log/gorb" in script
    assert script.splitlines()[-1] == (
        "exec /v/bin/python -P -m gorb.services.launcher run --guest never --config "
        "/run/gorb/uml/gorb.toml --log-dir /var/log/gorb --ctl-inet 10.77.255.254:9001")


def test_guest_kernel_command(tmp_path):
    vm = uml.Guest(["sh", "x"], tmp_path, kernel_args=["vec0:transport=tap,ifname=gt0"],
                   prefix=["ip", "netns", "exec", "gorb-1"])
    cmd = vm.command()
    assert cmd[:5] == ["ip", "netns", "exec", "gorb-1", uml.KERNEL]
    assert f"uml_dir={tmp_path}" in cmd and "vec0:transport=tap,ifname=gt0" in cmd
    assert f"init={uml.INIT}" in cmd and f"GORB_SBX_DIR={tmp_path}" in cmd
    assert "GORB_SBX_CWD=/" in cmd


def test_guest_mounts_what_its_tmpfs_would_hide(tmp_path, monkeypatch):
    """A venv under /tmp (the guest mounts its own /tmp) is mounted again inside the guest."""
    assert uml.shadowed("/tmp/venv") and uml.shadowed("/run") and uml.shadowed("/var/tmp/x")
    assert not uml.shadowed("/opt/gorb") and not uml.shadowed("/tmpfoo") and not uml.shadowed("/")
    monkeypatch.setattr(sys, "prefix", "/tmp/v1")
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    assert uml.python_mounts() == ["/tmp/v1"]
    vm = uml.Guest(["true"], tmp_path)
    assert "GORB_SBX_MOUNTS=/tmp/v1" in vm.command()
    with pytest.raises(ValueError, match="whitespace or ':'"):
        uml.Guest(["true"], tmp_path, mounts=["/tmp/a:b"]).start()
