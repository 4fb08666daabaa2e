"""The operator files in deploy/: alert rules, dashboard, Containerfile and systemd unit.

Each is checked by the tool operators run where it is installed (promtool, hadolint,
systemd-analyze) and by parsing where it is not; every metric name the rules and the dashboard
query must be on a live server's /metrics after traffic.
"""
from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from models import world
from tests.conftest import launch_server

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "bidder-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "bidder-dashboard.json"
CONTAINERFILE = DEPLOY / "Containerfile"
UNIT = DEPLOY / "systemd" / "bidder.service"
SYNTHESIZED = {"up"}  # series Prometheus makes itself, not the server


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def rule_exprs() -> list[str]:
    return [rule["expr"] for group in rule_groups() for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"]
            for target in panel.get("targets", ())]


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects: recorded names (with colons), functions,
    label names and strings left out."""
    expr = re.sub(r'"[^"]*"', "", expr)  # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b\w+:[\w:]+", "", expr)  # recording rule names
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set(re.findall(r"\b[a-zA-Z_][a-zA-Z0-9_]*\b(?!\s*\()", expr))
    return {n for n in names if n.startswith("bidder_") or n in SYNTHESIZED}


def test_rules_parse_and_every_alert_has_a_runbook_section():
    groups = rule_groups()
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    recorded = {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}
    assert {a["alert"] for a in alerts} >= {
        "BidderLatencyNearTmax", "BidderNoBidShareJump", "BidderMemcachedErrors",
        "BidderWorkerRestarting", "BidderModelReloadFailing", "BidderSpendAheadOfPace"}
    runbook = (DEPLOY.parent / "docs" / "operations.md").read_text()
    headings = {re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                for line in runbook.splitlines() if line.startswith("#")}
    for alert in alerts:
        assert alert["labels"]["severity"] in ("page", "warn"), alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
        link = alert["annotations"]["runbook"]
        assert link == f"docs/operations.md#{alert['alert'].lower()}", link
        assert alert["alert"].lower() in headings, f"docs/operations.md has no {alert['alert']}"
        used = set(re.findall(r"\b\w+:[\w:]+", alert["expr"]))
        assert used <= recorded, used - recorded


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed "
                    "(apt-get install prometheus)")
def test_promtool_checks_the_rules_the_config_and_the_rule_unit_tests():
    prometheus = DEPLOY / "prometheus"
    for args in (["check", "rules", "bidder-rules.yml"], ["check", "config", "prometheus.yml"],
                 ["test", "rules", "bidder-rules.test.yml"]):
        done = subprocess.run(["promtool", *args], cwd=prometheus, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_is_valid_grafana_json():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("requests", "no-bids by reason", "latency", "feature store", "cpu per worker",
                  "model", "spend per campaign", "pacing line", "budget state"):
        assert topic in titles, topic
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", ()):
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    latency = next(p for p in panels if p["title"] == "Bid latency percentiles")
    assert all("histogram_quantile" in t["expr"] and "_bucket" in t["expr"]
               for t in latency["targets"])


def bid_request(n: int) -> dict:
    return {"id": f"ops-{n}", "tmax": 200,
            "imp": [{"id": "1", "banner": {"format": [{"w": 300, "h": 250}]}, "bidfloor": 0.01}],
            "site": {"id": "s1", "domain": "news.example", "page": "https://news.example/a"},
            "device": {"devicetype": 2, "os": "Windows", "geo": {"country": "JPN"}},
            "user": {"id": world.user_id(n)}}


def test_every_metric_the_rules_and_dashboard_use_is_on_a_live_metrics(memcached, tmp_path):
    server = launch_server(tmp_path / "srv", "--workers", "2", memcached=memcached.address)
    try:
        billed = 0
        for n in range(40):
            status, _, body = server.bid(bid_request(n))
            assert status in (200, 204), body
            if status == 200 and billed < 3:
                burl = json.loads(body)["seatbid"][0]["bid"][0]["burl"]
                url = urlsplit(burl.replace("${AUCTION_PRICE}", "0.01"))
                assert server.request("GET", f"{url.path}?{url.query}")[0] == 200
                billed += 1
        assert billed, "no bid to bill"
        server.bid(b"{not json")  # a 400
        assert server.bid({**bid_request(0), "imp": [{**bid_request(0)["imp"][0],
                                                       "bidfloor": 1000.0}]})[0] == 204
        exposed = {sample.name for family in text_string_to_metric_families(server.metrics())
                   for sample in family.samples}
    finally:
        server.stop()
    used = set().union(*map(metric_names, rule_exprs() + dashboard_exprs())) - SYNTHESIZED
    assert used, "no metric names found in the rules and dashboard"
    assert not used - exposed, f"used but not on /metrics: {sorted(used - exposed)}"


def test_containerfile_lint():
    text = CONTAINERFILE.read_text()
    hadolint = shutil.which("hadolint") or shutil.which("hadolint",
                                                        path=str(Path(sys.executable).parent))
    if hadolint:
        done = subprocess.run([hadolint, str(CONTAINERFILE)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    instructions = [line.split(None, 1) for line in re.sub(r"\\\n", " ", text).splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    by_name: dict[str, list[str]] = {}
    for name, *rest in instructions:
        by_name.setdefault(name.upper(), []).append(rest[0] if rest else "")
    assert re.fullmatch(r"python:3\.\d+-slim", by_name["FROM"][0]), by_name["FROM"]
    user = by_name["USER"][-1]
    assert user.split(":")[0] not in ("root", "0"), user
    assert "/healthz" in by_name["HEALTHCHECK"][0]
    env = " ".join(by_name["ENV"])
    assert "BIDDER_BIND=127.0.0.1:" in env and "0.0.0.0" not in env  # only when told
    assert json.loads(by_name["ENTRYPOINT"][0]) == ["bidder"]


def test_systemd_unit(tmp_path):
    text = UNIT.read_text()
    unit = configparser.ConfigParser(strict=True, interpolation=None, delimiters=("=",))
    unit.optionxform = str
    unit.read_string(text)
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["User"] != "root"
    assert "bidder tune apply" in service["ExecStartPre"]
    assert "CPUAffinity=" in text and "AllowedCPUs=" in text
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed: parsed only")
    # verify checks that the commands exist: point them at this checkout's bidder
    local = tmp_path / "bidder.service"
    local.write_text(text.replace("/opt/bidder/venv/bin/bidder",
                                  str(Path(sys.executable).parent / "bidder")))
    done = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True,
                          text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if "bidder" in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr


def test_the_runbook_from_a_config_file_to_a_model_reload(tmp_path):
    """docs/operations.md, as a newcomer follows it: example config, edited; config show; the
    server from the file; health on the bid port, readiness and metrics on the admin port; a
    new model trained over the one in service and SIGHUP (systemctl reload); a dead worker."""
    model = tmp_path / "models" / "ctr.npz"

    def train() -> str:
        done = subprocess.run([sys.executable, "-m", "bidder", "train", "--synthetic", "20000",
                               "--hash-bits", "14", "--no-plot", "--out", str(model)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])["version"]

    first = train()
    example = subprocess.run([sys.executable, "-m", "bidder", "config", "example"],
                             capture_output=True, text=True, timeout=60).stdout
    edits = {"#workers = 0": "workers = 2", "#model_watch_s = 2.0": "model_watch_s = 0.0",
             "#log_format = \"text\"": "log_format = \"json\"",
             "#model = \"PATH\"": f"model = \"{model}\""}
    for old, new in edits.items():
        assert old in example, old
        example = example.replace(old, new)
    config = tmp_path / "bidder.toml"
    config.write_text(example)
    env = {"BIDDER_CONFIG": str(config), "BIDDER_NOTICE_SECRET": "from-the-env-file"}
    shown = subprocess.run([sys.executable, "-m", "bidder", "config", "show"], capture_output=True,
                           text=True, timeout=60, env={**os.environ, **env})
    assert re.search(rf"^model\s+{re.escape(str(model))}\s+file ", shown.stdout, re.M), shown.stdout
    assert re.search(r"^notice_secret\s+\*+\s+env$", shown.stdout, re.M)

    server = launch_server(tmp_path / "srv", env=env)
    try:
        assert server.request("GET", "/healthz")[0] == 200
        assert server.request("GET", "/metrics")[0] == 404
        ready = json.loads(server.admin("GET", "/readyz")[2])
        assert ready["components"]["model"]["version"] == first

        second = train()
        assert second != first
        os.kill(server.master_pid, signal.SIGHUP)  # systemctl reload bidder
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, _, body = server.admin("GET", "/readyz")
            if status == 200 and json.loads(body)["components"]["model"]["version"] == second:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"model not reloaded:\n{server.log()[-3000:]}")
        pids = wait_for_workers(server, 2)
        os.kill(pids[0], signal.SIGKILL)
        wait_for_workers(server, 2, gone=pids[0])
        text = server.metrics()
    finally:
        server.stop()
    assert f'version="{second}"' in re.search(r"^bidder_model_info\{.*$", text, re.M).group(0)
    assert re.search(r'^bidder_model_reloads_total\{outcome="loaded"\} [1-9]', text, re.M)
    exits = dict(re.findall(r'^bidder_worker_exits_total\{cause="(\w+)"\} (\S+)', text, re.M))
    assert float(exits["retired"]) >= 2 and float(exits["died"]) == 1, exits
    assert all(json.loads(line) for line in server.log().splitlines() if line.strip())


def wait_for_workers(server, count: int, gone: int | None = None, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = server.worker_pids()
        if len(pids) == count and gone not in pids:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"workers not {count}:\n{server.log()[-3000:]}")


def test_type_notify_the_master_says_ready_once_it_listens(tmp_path):
    """The unit's Type=notify: systemd learns of the start from READY=1 on $NOTIFY_SOCKET."""
    import socket

    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.settimeout(60)
        server = launch_server(tmp_path / "srv", "--workers", "1", ready=False,
                               env={"NOTIFY_SOCKET": path})
        try:
            message = notify.recv(4096).decode()
            assert "READY=1" in message, message
            assert server.request("GET", "/healthz")[0] == 200  # listening when it said so
        finally:
            server.stop()


def test_the_containerfile_copies_all_a_build_needs(tmp_path):
    """The image's build context: the files its COPY lines take build the wheel it installs
    (no registry here to build the image itself)."""
    root = DEPLOY.parent
    tracked = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True,
                             check=True).stdout.decode().split("\0")
    copies = [line.split()[1:-1] for line in CONTAINERFILE.read_text().splitlines()
              if line.startswith("COPY ")]
    sources = [src for srcs in copies for src in srcs]
    assert "pyproject.toml" in sources and "bidder" in sources
    context = tmp_path / "src"
    for name in filter(None, tracked):
        if any(name == src or name.startswith(src + "/") for src in sources):
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            (context / name).write_bytes((root / name).read_bytes())
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir",
                            str(tmp_path / "dist"), str(context)], capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheel, = (tmp_path / "dist").glob("bidder-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packed = set(archive.namelist())
    for needed in ("bidder/serve.py", "bidder/data/model.npz", "server_hooks/worker.py",
                   "server_hooks/host/sysctl.d/99-bidder.conf", "models/artifact.py",
                   "loadtests/stack.py"):
        assert needed in packed, f"{needed} is not in the image's wheel: a COPY is missing"
