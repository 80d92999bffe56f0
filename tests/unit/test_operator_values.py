"""Operator edges (issue 20): options where an operator writes them, and bad values refused with one line (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from magne.amqp.url import URLError, parse_url
from magne.cli import build_parser

# An unreachable broker: a command that got past its checks would fail with exit 1 ("cannot reach"), not 2.
UNREACHABLE = "amqp://guest:guest@127.0.0.1:1/%2F"


def magne(*args: str, url: str = UNREACHABLE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "magne", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MAGNE_URL": url})


# -- --log-level / --log-format after the subcommand ------------------------------------------------------------
@pytest.mark.parametrize("command", [["worker", "tasks"], ["send", "add"], ["dead", "list", "Q"], ["status", "tasks"],
                                     ["demo"]])
def test_log_options_work_after_the_subcommand_too(command):
    p = build_parser()
    after = p.parse_args([*command, "--log-format", "json", "--log-level", "debug"])
    assert (after.log_format, after.log_level) == ("json", "debug")
    before = p.parse_args(["--log-format", "json", "--log-level", "warning", *command])
    assert (before.log_format, before.log_level) == ("json", "warning")
    default = p.parse_args(command)
    assert (default.log_format, default.log_level) == ("text", "info")
    both = p.parse_args(["--log-level", "error", *command, "--log-level", "debug"])
    assert both.log_level == "debug"  # the later one, as a shell user expects


def test_worker_log_format_json_after_the_subcommand_logs_json():
    out = magne("worker", "magne.demo", "--log-format", "json")
    assert out.returncode == 1, out.stderr  # got as far as connecting (unreachable): the option was accepted
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("{") for ln in lines), out.stderr


# -- URL values --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("query", "why"), [
    ("heartbeat=-5", "heartbeat"),
    ("heartbeat=0.5", "heartbeat"),
    ("heartbeat=abc", "heartbeat"),
    ("heartbeat=70000", "heartbeat"),
    ("connection_timeout=0", "connection_timeout"),
    ("connection_timeout=-1", "connection_timeout"),
    ("frame_max=-1", "frame_max"),
    ("channel_max=-3", "channel_max"),
])
def test_bad_url_numbers_are_refused_with_the_parameter_named(query, why):
    with pytest.raises(URLError, match=why):
        parse_url(f"amqp://guest:guest@h:5672/%2F?{query}")


def test_good_url_numbers_are_kept():
    p = parse_url("amqp://h/?heartbeat=0&connection_timeout=2500&frame_max=0&channel_max=16")
    assert (p.heartbeat, p.connect_timeout, p.frame_max, p.channel_max) == (0, 2.5, 0, 16)


def test_misspelt_url_parameters_are_named_with_the_closest_known_one():
    from magne.amqp.url import query_warnings

    [warning] = query_warnings("amqp://h/?hearbeat=5&heartbeat=10")
    assert "hearbeat" in warning and "heartbeat" in warning
    [warning] = query_warnings("amqp://h/?connection_timout=5")
    assert "connection_timeout" in warning
    [warning] = query_warnings("amqp://h/?zzz=1")
    assert "zzz" in warning and "ignored" in warning
    assert query_warnings("amqp://h/?heartbeat=5&verify=verify_none") == []


@pytest.mark.parametrize("query", ["heartbeat=-5", "heartbeat=0.5", "connection_timeout=0", "connection_timeout=-1"])
def test_a_worker_with_a_bad_url_value_exits_2_with_one_line(query):
    out = magne("worker", "magne.demo", url=f"{UNREACHABLE}?{query}")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert query.split("=")[0] in out.stderr


def test_a_misspelt_url_parameter_is_warned_about():
    out = magne("send", "x", "--queue", "x", url=f"{UNREACHABLE}?hearbeat=5")
    assert "hearbeat" in out.stderr and "did you mean 'heartbeat'" in out.stderr, out.stderr


# -- command-line values -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["--time-limit", "nan"], ["--time-limit", "inf"], ["--lost-after", "inf"],
                                  ["--lost-after", "nan"], ["--min-backoff", "inf"], ["--shutdown-timeout", "nan"]])
def test_non_finite_seconds_are_refused(args, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["worker", "tasks", *args])
    assert exc.value.code == 2
    assert "finite" in capsys.readouterr().err


def test_a_pid_file_in_a_missing_directory_exits_2_with_one_line(tmp_path):
    out = magne("worker", "magne.demo", "--pid-file", str(tmp_path / "no" / "such" / "dir" / "w.pid"))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "pid file" in out.stderr and "no/such/dir" in out.stderr
