#!/usr/bin/env python3
"""What a durable decision record adds to a decision, over HTTP.

Runs the release `vigie serve` on the example set (127.0.0.1, a free port, a
fresh data directory, cache off) once per durability mode, sends the same
bounded sequence of requests on one keep-alive connection, and prints the
p50 and p99 latency seen by the client for each mode. `power` pays one
fdatasync of this disk per group of records; `process` only a write().

    cargo build --release && python3 benches/log_latency.py [--requests 3000]
"""

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/vigie-target"))


def start(binary, durability, data):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIE_")}
    env["VIGIE_CACHE_ENABLED"] = "false"
    env["VIGIE_PLUGINS_ENABLED"] = "false"
    proc = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0", "--policies", os.path.join(ROOT, "policies"),
         "--data-dir", data, "--durability", durability, "--sidecar-id", "bench"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        m = re.search(r"listening \(HTTP\) addr=127\.0\.0\.1:(\d+)", proc.stderr.readline())
        if m:
            return proc, int(m.group(1))
    proc.kill()
    sys.exit("vigie did not start")


def pct(sorted_values, p):
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--bin", default=os.path.join(TARGET, "release", "vigie"))
    args = ap.parse_args()
    body = json.dumps({
        "principal": 'Agency::User::"alice"', "action": 'Agency::Action::"read"',
        "resource": 'Agency::Record::"social-001"', "context": {"ip": "10.1.2.3"},
    })
    results = {}
    for mode in ["process", "power"]:
        data = tempfile.mkdtemp(prefix=f"vigie-lat-{mode}-")
        proc, port = start(args.bin, mode, data)
        conn = http.client.HTTPConnection("127.0.0.1", port)
        lat = []
        for i in range(args.requests + 200):
            t0 = time.perf_counter()
            conn.request("POST", "/v1/is_authorized", body, {"content-type": "application/json"})
            r = json.loads(conn.getresponse().read())
            dt = time.perf_counter() - t0
            assert r["decision"] == "Allow", r
            if i >= 200:  # warm-up
                lat.append(dt * 1e6)
        proc.terminate()
        proc.wait(timeout=20)
        lat.sort()
        results[mode] = (pct(lat, 0.5), pct(lat, 0.99))
        print(f"{mode:8s} p50 {results[mode][0]:7.0f} us   p99 {results[mode][1]:7.0f} us   ({args.requests} requests, one connection)")
    print(f"power - process: p50 +{results['power'][0] - results['process'][0]:.0f} us, "
          f"p99 +{results['power'][1] - results['process'][1]:.0f} us (the fdatasync)")


if __name__ == "__main__":
    main()
