"""``python -m loadtests.memory``: private memory each extra bidder worker costs, with a large model.

Starts a real ``bidder serve`` (memcached off) with 1 and then 3 workers on a
model of ``2**hash_bits`` weights, sends bid requests to every worker, then
hot-reloads a second artifact of the same size (each worker maps it after
fork), and reads USS/PSS of every worker (``psutil.memory_full_info``). The
cost of an extra worker is ``(PSS_3 - PSS_1) / 2`` with PSS summed over the
master and all workers (PSS adds up to the memory really used: a page shared
by n processes counts 1/n in each). The same runs with a tiny model give what
a worker costs without a model; the difference is the model's cost per extra
worker. (USS is misleading here: a mapped page that only one process happens
to map counts as "unique" even though it is page cache any process can share.) Prints one JSON line (and a table on stderr).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from loadtests.stack import Server
from models import artifact
from models.lr import FTRLLogisticRegression

REQUEST = json.dumps({
    "id": "m", "tmax": 1000, "imp": [{"id": "1", "banner": {"format": [{"w": 300, "h": 250}]}, "bidfloor": 0.01}],
    "site": {"id": "s", "domain": "news.example"},
    "device": {"devicetype": 2, "os": "Windows", "geo": {"country": "USA"}},
}).encode()


def make_model(path: Path, hash_bits: int, seed: int) -> int:
    """A random LR artifact of ``2**hash_bits`` weights; returns its file size."""
    model = FTRLLogisticRegression(hash_bits=hash_bits)
    model.w[:-1] = np.random.default_rng(seed).normal(0, 0.1, model.n_rows - 1)
    model.w[model.bias_index] = -4.5
    model.version = f"mem{seed}"
    artifact.save(model, path)
    return path.stat().st_size


def _get(port: int, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST" if body else "GET", path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _private_dirty(pid: int) -> int:
    """Bytes of pages only this process maps and has written (copy-on-write broken, heap)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Private_Dirty:"))


def measure(workers: int, model: Path, second: Path, workdir: Path) -> dict[str, float]:
    """USS/PSS (MiB) of the workers after load, and after a hot reload of ``second``."""
    live = workdir / "live.npz"
    shutil.copyfile(model, live)
    server = Server(["--workers", str(workers), "--model", str(live), "--model-watch-s", "0.2",
                     "--log-level", "warning"], "none", str(workdir),
                    env={"BIDDER_MODEL_SNAPSHOTS": str(workdir / "snapshots")})
    with server:
        master = psutil.Process(server.master_pid)

        def traffic(n: int = 300) -> None:
            for _ in range(n):
                _get(server.port, "/openrtb2/bid", REQUEST)

        def snapshot(tag: str) -> dict[str, float]:
            procs = [master, *master.children()]
            pss = sum(p.memory_full_info().pss for p in procs)
            dirty = sum(_private_dirty(p.pid) for p in procs[1:])
            return {f"{tag}_workers": len(procs) - 1,
                    f"{tag}_pss_total_mib": round(pss / (1 << 20), 2),
                    f"{tag}_worker_private_dirty_mib": round(dirty / (1 << 20), 2)}

        traffic()
        out = snapshot("preloaded")
        tmp = workdir / "next.npz"
        shutil.copyfile(second, tmp)
        os.replace(tmp, live)
        time.sleep(0.5)
        traffic()  # each worker's watcher (every 0.2 s) notices the new file and maps its snapshot
        time.sleep(0.3)
        traffic(50)
        out.update(snapshot("reloaded"))
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--hash-bits", type=int, default=24, help="large model: 2**bits float32 weights")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bidder-mem-") as tmp:
        d = Path(tmp)
        result: dict[str, object] = {"hash_bits": args.hash_bits}
        for label, bits in (("tiny", 10), ("large", args.hash_bits)):
            size = make_model(d / f"{label}-a.npz", bits, 1)
            make_model(d / f"{label}-b.npz", bits, 2)
            result[f"{label}_model_mib"] = round(size / (1 << 20), 2)
            for workers in (1, 3):
                print(f"measuring {label} model, {workers} worker(s)", file=sys.stderr)
                wd = d / f"{label}{workers}"
                wd.mkdir()
                for key, value in measure(workers, d / f"{label}-a.npz", d / f"{label}-b.npz", wd).items():
                    result[f"{label}_w{workers}_{key}"] = value
        size = result["large_model_mib"]
        for phase in ("preloaded", "reloaded"):
            extra = {label: (result[f"{label}_w3_{phase}_pss_total_mib"]
                             - result[f"{label}_w1_{phase}_pss_total_mib"]) / 2 for label in ("tiny", "large")}
            model_part = extra["large"] - extra["tiny"]
            result[f"{phase}_pss_per_extra_worker_mib"] = round(extra["large"], 2)
            result[f"{phase}_model_cost_per_extra_worker_mib"] = round(model_part, 2)
            result[f"{phase}_model_cost_fraction"] = round(model_part / size, 4)
            print(f"{phase}: each extra worker adds {extra['large']:.1f} MiB PSS in total "
                  f"({extra['tiny']:.1f} MiB with a tiny model): the model's share is {model_part:.2f} MiB "
                  f"of its {size} MiB ({100 * model_part / size:.1f} %)", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
