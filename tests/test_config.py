"""The configuration file: ``bidder config example | show``, precedence, refusals, a real server."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from bidder import config, settings
from loadtests.memcached_proc import free_port
from tests.conftest import launch_server


def bidder(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BIDDER_")}
    return subprocess.run([sys.executable, "-m", "bidder.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**clean, **(env or {})})


def uncommented(example: str) -> str:
    """The example with every setting that has a default uncommented."""
    lines = example.splitlines()
    keep = []
    for i, line in enumerate(lines):
        placeholder = i > 0 and lines[i - 1].startswith("# unset by default")
        if re.match(r"#\w+ = ", line) and not placeholder:
            line = line[1:]
        keep.append(line)
    return "\n".join(keep) + "\n"


def test_example_lists_every_setting_and_reads_back_as_the_defaults(tmp_path):
    done = bidder("config", "example")
    assert done.returncode == 0, done.stderr
    for s in settings.SETTINGS:
        assert re.search(rf"^#{s.name} = ", done.stdout, re.M), s.name
        assert s.env in done.stdout
    path = tmp_path / "all.toml"
    path.write_text(uncommented(done.stdout))
    values = config.load(str(path))
    assert values == {s.name: s.default for s in settings.SETTINGS if s.default is not None}


def test_show_names_the_source_of_each_precedence_level(tmp_path):
    path = tmp_path / "bidder.toml"
    path.write_text('workers = 3\nkeepalive = 7\ntimeout = 9\nmemcached = ["a:1", "b:2"]\n'
                    'notice_secret = "file-secret"\n')
    done = bidder("config", "show", "--json", "--config", str(path), "--timeout", "11",
                  env={"BIDDER_KEEPALIVE": "8"})
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["workers"] == {"value": 3, "source": f"file {path}"}
    assert shown["keepalive"] == {"value": 8, "source": "env"}  # env over file
    assert shown["timeout"] == {"value": 11, "source": "flag"}  # flag over file
    assert shown["threads"] == {"value": 1, "source": "default"}
    assert shown["memcached"] == {"value": "a:1,b:2", "source": f"file {path}"}
    assert shown["notice_secret"] == {"value": config.MASK, "source": f"file {path}"}
    assert set(shown) == set(settings.BY_NAME)
    table = bidder("config", "show", env={"BIDDER_CONFIG": str(path),
                                          "BIDDER_NOTICE_SECRET": "env-secret"})
    assert table.returncode == 0, table.stderr
    assert "file-secret" not in table.stdout and "env-secret" not in table.stdout
    assert re.search(r"^notice_secret\s+\*+\s+env$", table.stdout, re.M), table.stdout
    assert re.search(rf"^workers\s+3\s+file {re.escape(str(path))}$", table.stdout, re.M)


def test_urls_with_a_password_are_masked():
    assert config.shown("ledger", "postgresql://bid:hunter2@db:5432/money") == \
        f"postgresql://bid:{config.MASK}@db:5432/money"
    assert config.shown("notice_secret", "abc") == config.MASK


@pytest.mark.parametrize("text, message", [
    ("workerz = 2\n", "unknown key 'workerz' (did you mean 'workers'?)"),
    ("workers = -1\n", "workers = -1: must be at least 0"),
    ("workers = \"many\"\n", "workers = \"many\": expected an integer"),
    ("pin = \"yes\"\n", "pin = \"yes\": expected true or false"),
    ("keepalive = true\n", "keepalive = true: expected a value like 30, not a boolean"),
    ("[server]\nworkers = 2\n", "unknown key 'server'"),
    ("workers = \n", "is not valid TOML"),
])
def test_bad_files_stop_the_start_naming_file_key_and_reason(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    done = bidder("serve", "--config", str(path), "--bind", "127.0.0.1:1")
    assert done.returncode != 0
    assert str(path) in done.stderr and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_missing_file_is_refused_with_what_to_do(tmp_path):
    done = bidder("config", "show", "--config", str(tmp_path / "nope.toml"))
    assert done.returncode != 0
    assert "does not exist" in done.stderr and "bidder config example" in done.stderr


def test_a_real_server_takes_its_settings_from_the_file(tmp_path):
    path = tmp_path / "bidder.toml"
    path.write_text("workers = 1\nmax_body_bytes = 2000\nmodel_watch_s = 0.0\n"
                    "bind = \"127.0.0.1:1\"\n")  # the harness's --bind flag wins over this
    server = launch_server(tmp_path / "srv", "--config", str(path),
                           env={"BIDDER_MAX_BODY_BYTES": "3000"})
    try:
        assert len(server.worker_pids()) == 1
        body = b'{"id": "x", "imp": [{"id": "1"}], "pad": "' + b"x" * 2500 + b'"}'
        assert server.bid(body)[0] != 413  # env (3000) wins over the file (2000)
        assert server.bid(body + b" " * 1000)[0] == 413
    finally:
        server.stop()


def test_admin_listener_on_a_taken_or_the_bid_port_is_refused_naming_the_flag():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = bidder("serve", "--bind", f"127.0.0.1:{free_port()}", "--admin-bind",
                      f"127.0.0.1:{port}", "--memcached", "none")
        assert done.returncode != 0
        assert f"127.0.0.1:{port} is already in use" in done.stderr
        assert "--admin-bind HOST:PORT" in done.stderr
    done = bidder("serve", "--bind", "127.0.0.1:18999", "--admin-bind", "0.0.0.0:18999")
    assert done.returncode != 0 and "has the port of --bind" in done.stderr, done.stderr
    done = bidder("serve", "--admin-bind", "9100")
    assert done.returncode != 0 and "expected HOST:PORT" in done.stderr, done.stderr


def test_off_for_an_optional_setting_beats_the_levels_below_it(tmp_path):
    """"off" in a file, or as a flag, unsets what a lower level (default, file, environment)
    would have set."""
    path = tmp_path / "bidder.toml"
    path.write_text('slice_ms = "off"\nclosed_loop_share = 0.6\n')
    done = bidder("config", "show", "--json", "--config", str(path), "--closed-loop-share", "off",
                  env={"BIDDER_WAIT_SHARE": "0.2"})
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["slice_ms"]["source"] == f"file {path}" and shown["slice_ms"]["value"] is None
    assert shown["closed_loop_share"] == {"value": None, "source": "flag"}
    done = bidder("config", "show", "--json", "--config", str(path),
                  env={"BIDDER_SLICE_MS": "10"})
    shown = json.loads(done.stdout)
    assert shown["slice_ms"] == {"value": 10.0, "source": "env"}
    assert shown["closed_loop_share"] == {"value": 0.6, "source": f"file {path}"}
