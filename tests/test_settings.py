"""Settings: declared once, command line > environment > default, clear errors."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from bidder import settings


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    settings.add_arguments(parser, "serve")
    return parser.parse_args(argv)


def test_command_line_beats_environment_beats_default():
    env = {"BIDDER_WORKERS": "3", "BIDDER_PIN": "off", "BIDDER_SLICE_MS": "10"}
    s = settings.resolve(parse(["--workers", "5"]), environ=env)
    assert s.workers == 5 and s.pin is False and s.slice_ms == 10.0
    s = settings.resolve(parse(["--pin"]), environ=env)
    assert s.pin is True and s.workers == 3
    s = settings.resolve(parse([]), environ={})
    assert s.workers == 0 and s.pin is True and s.slice_ms is None
    assert s.bind == "127.0.0.1:8080" and s.max_body_bytes == 64 * 1024


def test_the_closed_loop_share_is_off_unless_set_and_a_share_when_set():
    assert settings.resolve(parse([]), environ={}).closed_loop_share is None
    assert settings.resolve(parse(["--closed-loop-share", "0.5"]), environ={}) \
        .closed_loop_share == 0.5
    env = {"BIDDER_CLOSED_LOOP_SHARE": "0.6", "BIDDER_SLICE_MS": "10"}
    assert settings.resolve(parse([]), environ=env).closed_loop_share == 0.6
    # "off" on the command line beats a value in the environment
    s = settings.resolve(parse(["--closed-loop-share", "off", "--slice-ms", "off"]), environ=env)
    assert s.closed_loop_share is None and s.slice_ms is None
    assert settings.resolve(parse([]), environ={"BIDDER_SLICE_MS": "off"}).slice_ms is None
    for bad in ("0", "1.5", "half"):
        with pytest.raises(SystemExit):
            parse(["--closed-loop-share", bad])


def test_every_setting_has_a_flag_an_environment_variable_and_a_doc():
    names = [s.name for s in settings.SETTINGS]
    assert len(names) == len(set(names))
    for s in settings.SETTINGS:
        assert s.flag == "--" + s.name.replace("_", "-") and s.env == "BIDDER_" + s.name.upper()
        assert s.doc.strip()


def test_a_bad_environment_value_names_the_variable_and_the_flag():
    with pytest.raises(SystemExit, match="BIDDER_WORKERS='many'.*--workers"):
        settings.resolve(parse([]), environ={"BIDDER_WORKERS": "many"})


@pytest.mark.parametrize("flag, value, why", [
    ("--threads", "0", "at least 1"), ("--workers", "-1", "at least 0"),
    ("--max-body-bytes", "-1", "at least 1"), ("--default-tmax-ms", "0", "at least 1"),
    ("--safety-margin-ms", "-3", "at least 0"), ("--memcached-timeout-ms", "0", "more than 0"),
    ("--memcached-timeout-ms", "inf", "finite"), ("--memcached-retry-ms", "-1", "at least 0"),
    ("--slice-ms", "0", "more than 0"), ("--notice-url", "ftp://bidder.example", "http://"),
    ("--workers", "two", "an integer"),
])
def test_values_that_would_fail_every_request_stop_the_start_naming_the_flag(flag, value, why):
    """Each of these used to start a server that refused or no-bid every request (a zero
    memcached timeout, a negative body limit) or crashed Gunicorn's boot (--threads 0)."""
    result = subprocess.run([sys.executable, "-m", "bidder.cli", "serve", flag, value],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and flag in result.stderr and why in result.stderr
    env = {f"BIDDER_{flag[2:].replace('-', '_').upper()}": value}
    with pytest.raises(SystemExit, match=why):
        settings.resolve(parse([]), environ=env)


def test_serve_help_lists_every_setting_with_its_environment_variable():
    out = subprocess.run([sys.executable, "-m", "bidder.cli", "serve", "--help"],
                         capture_output=True, text=True, timeout=60).stdout
    for s in settings.SETTINGS:
        assert s.flag in out and s.env in out
