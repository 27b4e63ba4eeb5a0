#!/usr/bin/env python3
"""Sidecar memory under a steady load with the decision cache full.

Starts the release `vigie serve` on the example set (127.0.0.1, a free port,
a fresh data directory), sends a bounded stream of distinct requests over
keep-alive connections until the in-memory tier is at its bound and the
persistent tier holds several times more, then a second pass of the same
requests (hits), sampling the server's RSS from /proc every 0.2 s.

    cargo build --release && python3 benches/cache_rss.py [--requests 40000]

Prints the cache figures from /v1/status and the peak and final RSS.
"""

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/vigie-target"))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        text = f.read()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)), int(re.search(r"VmHWM:\s+(\d+)", text).group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=40000)
    ap.add_argument("--bin", default=os.path.join(TARGET, "release", "vigie"))
    args = ap.parse_args()

    data = tempfile.mkdtemp(prefix="vigie-rss-")
    proc = subprocess.Popen(
        [args.bin, "serve", "--listen", "127.0.0.1:0", "--policies", os.path.join(ROOT, "policies"), "--data-dir", data],
        stderr=subprocess.PIPE, text=True,
        # Plugins off: the bodies carry the context attributes plugins compute.
        env={**{k: v for k, v in os.environ.items() if not k.startswith("VIGIE_")}, "VIGIE_PLUGINS_ENABLED": "false"},
    )
    port = None
    deadline = time.time() + 30
    while time.time() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"listening \(HTTP\) addr=127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    if port is None:
        proc.kill()
        sys.exit("vigie did not start")
    threading.Thread(target=lambda: proc.stderr.read(), daemon=True).start()

    samples = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(rss_kib(proc.pid))
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    start_rss = rss_kib(proc.pid)[0]

    def body(i):
        # Distinct requests: the risk score and the MFA age vary.
        return json.dumps({
            "principal": 'Agency::User::"alice"',
            "action": 'Agency::Action::"read"',
            "resource": f'Agency::Record::"social-00{1 + i % 3}"',
            "context": {"risk": f"0.{i % 10000:04d}",
                        "mfa": {"present": True, "methods": ["otp"], "age_seconds": i // 10000, "hardware": False}},
        })

    def run(n, label):
        conn = http.client.HTTPConnection("127.0.0.1", port)
        t0 = time.time()
        cached = 0
        for i in range(n):
            conn.request("POST", "/v1/is_authorized", body(i), {"content-type": "application/json"})
            r = json.loads(conn.getresponse().read())
            cached += r["cached"]
        dt = time.time() - t0
        print(f"{label}: {n} requests in {dt:.1f} s ({n / dt:.0f} req/s, one connection), {cached} from the cache")

    run(args.requests, "pass 1 (misses)")
    run(args.requests, "pass 2 (same requests)")
    stop.set()
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", "/v1/status")
    status = json.loads(conn.getresponse().read())
    final, peak = rss_kib(proc.pid)
    proc.terminate()
    proc.wait(timeout=20)
    c = status["cache"]
    print(f"cache: L1 {c['l1']['entries']} entries ({c['l1']['bytes']} B, {c['l1']['evictions']} evicted), "
          f"L2 {c['l2']['entries']} entries ({c['l2']['bytes']} B on disk); "
          f"hits L1 {c['l1']['hits']}, L2 {c['l2']['hits']}, misses {c['misses']}")
    print(f"RSS: {start_rss / 1024:.1f} MiB at start, {max(s[0] for s in samples) / 1024:.1f} MiB peak sampled, "
          f"{peak / 1024:.1f} MiB high-water mark, {final / 1024:.1f} MiB at the end")


if __name__ == "__main__":
    main()
