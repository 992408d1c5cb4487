"""A program's own flags (``--reconcile-interval``, ``--writer-timeout`` ...) are part of the
configuration: applied before it is checked, so a bad value is refused like one in the file."""

from __future__ import annotations

import pytest

from gorb.common import config
from gorb.services.api import main as api_main
from gorb.services.ipvs_writer import main as writer_main


@pytest.mark.parametrize("flags, message", [
    (["--reconcile-interval", "0"], "writer.reconcile_interval must be positive"),
    (["--reconcile-interval", "nan"], "writer.reconcile_interval must be positive"),
    (["--kernel-timeout", "0"], "writer.kernel_timeout must be positive"),
    (["--max-batch", "0"], "writer.max_batch must be at least 1"),
])
def test_a_bad_writer_flag_exits_2_like_a_bad_file(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        writer_main.parse_args(["--config", "/dev/null", *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_writer_flags_set_their_keys(tmp_path):
    cfg, restore = writer_main.parse_args(
        ["--config", "/dev/null", "--runtime-dir", str(tmp_path), "--state-file", "/x/s.json",
         "--reconcile-interval", "2.5", "--max-batch", "7", "--kernel-timeout", "0.5",
         "--log-level", "debug", "--restore-previous"])
    assert (cfg.gorb.runtime_dir, cfg.writer.state_file, cfg.writer.reconcile_interval,
            cfg.writer.max_batch, cfg.writer.kernel_timeout, cfg.gorb.log_level, restore) == \
        (str(tmp_path), "/x/s.json", 2.5, 7, 0.5, "debug", True)


def test_the_api_writer_timeout_flag_is_checked_the_same_way(capsys):
    with pytest.raises(SystemExit) as exc:
        api_main.parse_args(["--config", "/dev/null", "--writer-timeout", "0"])
    assert exc.value.code == 2 and "api.writer_timeout must be positive" in \
        capsys.readouterr().err


def test_overrides_skip_unset_flags():
    cfg = config.load("/dev/null", env={}, overrides={("writer", "max_batch"): None,
                                                      ("writer", "device"): "eth9"})
    assert cfg.writer.max_batch == config.WriterSection().max_batch
    assert cfg.writer.device == "eth9"
