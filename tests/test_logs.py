"""Log lines: JSON and text formats with pid and slot, faults once per interval with a count;
against a real server: JSON lines parse, carry slot and pid, and hold no user id or secret."""
from __future__ import annotations

import io
import json
import logging
import time
from urllib.parse import urlsplit

import pytest

from bidder import logs
from models import world
from tests.conftest import launch_server


@pytest.fixture
def capture():
    """A logger writing through the given format into a string."""
    made = []

    def make(log_format: str) -> tuple[logging.Logger, io.StringIO]:
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(logs.formatter(log_format))
        handler.addFilter(logs.SlotFilter())
        logger = logging.getLogger(f"test.logs.{log_format}.{len(made)}")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        made.append((logger, handler))
        return logger, out

    yield make
    for logger, handler in made:
        logger.removeHandler(handler)
    logs.set_worker_slot(None)


def test_json_line_carries_time_level_logger_pid_slot_and_fields(capture):
    logger, out = capture("json")
    logs.set_worker_slot(3)
    logger.warning("memcached %s failed", "a:1", extra={"shard": "a:1"})
    line = json.loads(out.getvalue())
    assert line["level"] == "warning" and line["logger"] == logger.name
    assert line["message"] == "memcached a:1 failed" and line["shard"] == "a:1"
    assert line["slot"] == 3 and isinstance(line["pid"], int)
    assert line["time"].endswith("Z") and "T" in line["time"]


def test_json_line_holds_the_traceback(capture):
    logger, out = capture("json")
    try:
        raise KeyError("boom")
    except KeyError:
        logger.exception("bid failed")
    line = json.loads(out.getvalue())
    assert "KeyError: 'boom'" in line["exception"] and line["slot"] is None


def test_text_line_names_slot_or_master_and_fields(capture):
    logger, out = capture("text")
    logger.info("ready", extra={"workers": 2})
    logs.set_worker_slot(1)
    logger.info("pinned")
    first, second = out.getvalue().splitlines()
    assert "[master] [INFO]" in first and first.endswith("ready workers=2")
    assert "[slot 1] [INFO]" in second


def test_a_repeated_fault_is_logged_once_per_interval_with_its_count(capture):
    logger, out = capture("json")
    faults = logs.FaultLog(logger, interval_s=0.2)
    written = [faults.warning("400 POST /openrtb2/bid", "bad request %d", n) for n in range(50)]
    assert written == [True] + [False] * 49
    assert faults.warning("413 POST /openrtb2/bid", "too large") is True  # another key
    time.sleep(0.25)
    assert faults.warning("400 POST /openrtb2/bid", "bad request %d", 50) is True
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["count"] for line in lines] == [1, 1, 50]
    assert lines[2]["message"] == "bad request 50 (50 times since the last such line)"
    assert lines[2]["event"] == "fault" and lines[2]["fault"] == "400 POST /openrtb2/bid"


def test_unknown_log_format_is_refused():
    with pytest.raises(ValueError, match="text, json"):
        logs.configure("xml", "info")


def test_a_real_server_logs_json_lines_with_slot_and_pid_and_no_user_id_or_secret(
        memcached, tmp_path):
    secret = "s3cret-notice-key-for-this-test"
    server = launch_server(tmp_path / "srv", "--workers", "2", "--log-format", "json",
                           "--access-log", "--notice-secret", secret,
                           memcached=memcached.address)
    users = [world.user_id(n) for n in range(30)]
    signatures = []
    try:
        for n, user in enumerate(users):
            request = {"id": f"log-{n}", "tmax": 200,
                       "imp": [{"id": "1", "banner": {"format": [{"w": 300, "h": 250}]},
                                "bidfloor": 0.01}],
                       "site": {"id": "s1", "domain": "news.example"},
                       "device": {"devicetype": 2, "geo": {"country": "JPN"}},
                       "user": {"id": user, "buyeruid": user}}
            status, _, body = server.bid(request)
            if status == 200:
                burl = json.loads(body)["seatbid"][0]["bid"][0]["burl"]
                url = urlsplit(burl.replace("${AUCTION_PRICE}", "0.01"))
                signatures.append(dict(p.split("=", 1) for p in url.query.split("&"))["s"])
                assert server.request("GET", f"{url.path}?{url.query}")[0] == 200
        assert signatures, "no bid made"
        for _ in range(20):  # a repeated fault: one line, then counted
            assert server.bid(b"{not json")[0] == 400
    finally:
        server.stop()
    lines = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert {"time", "level", "logger", "pid", "slot", "message"} <= set(line), line
    workers = [line for line in lines if line["slot"] is not None]
    assert {line["slot"] for line in workers} == {0, 1}
    assert len({line["pid"] for line in workers}) >= 2
    access = [line for line in lines if line.get("event") == "request"]
    assert any(line["path"].startswith("/notice/billing") and line["status"] == 200
               for line in access)
    faults = [line for line in lines if line.get("fault") == "400 POST /openrtb2/bid"]
    assert 1 <= len(faults) <= 4, faults  # once per interval and worker, not 20 times
    text = server.log()
    for private in [*users, *signatures, secret]:
        assert private not in text, f"{private!r} is in the log"
