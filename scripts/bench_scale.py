#!/usr/bin/env python3
"""The scale measurements behind `scripts/bench` (issue #15): cost independent of the ledger's size.

Two gatekeepers run side by side, the same policy but for the churn source's max_ips: one holds 10
live entries, the other 10,000 (both pre-filled through a state file written before start). wrk
sends new-client churn (every request a new X-Forwarded-For client, so every request grants one
and evicts one) to each, interleaved over the rounds because a shared machine is noisy; the ratio
is the median of the per-round ratios. Then new clients are timed from their request to the
renamed Traefik file at each size. Prints a table; exits 1 when a target is missed. Reuses
scripts/bench.py's helpers.
"""

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (CHURN_LUA, Server, busy_cpus, free_port, machine, percentile,  # noqa: E402
                   rename_latency, wait_quiet, wrk)

SMALL, LARGE = 10, 10_000

POLICY = """\
listen: 127.0.0.1:{port}
admin: {{ listen: 127.0.0.1:{admin_port} }}
state_file: ./data/state.json
traefik: {{ file: ./traefik/gatekeeper.yml }}
always_allow: [192.168.0.0/16]
services: {{ immich: {{}}, nextcloud: {{}}, jellyfin: {{}} }}
sources:
  # Churn against a full book: every request grants one and evicts one.
  churn: {{ kind: mirror, hosts: [churn.example.com], unlocks: "*", max_ips: {max_ips}, idle_ttl: 1h }}
  # New clients one at a time, for the request-to-file latency.
  fresh: {{ kind: mirror, hosts: [fresh.example.com], unlocks: "*", max_ips: 4, idle_ttl: 1h }}
"""


def prefilled_state(entries):
    """A state file holding `entries` churn clients in 100.64.0.0/10 (apart from the churn
    script's 198.18.0.0/15 and the latency clients' 198.51.100.0/24), seen a minute ago."""
    now = int(time.time() * 1000)
    return json.dumps({"format": 1, "entries": [
        {"source": "churn", "network": f"100.{64 + i // 65536}.{i // 256 % 256}.{i % 256}/32",
         "first_seen": now - 60_000, "last_seen": now - 60_000 + i % 1000, "hits": 1}
        for i in range(entries)]})


def start(binary, work, size):
    """A gatekeeper in `work/<size>` whose churn source holds `size` entries."""
    home = work / str(size)
    (home / "data").mkdir(parents=True)
    port, admin_port = free_port(), free_port()
    (home / "gatekeeper.yaml").write_text(POLICY.format(port=port, admin_port=admin_port, max_ips=size))
    (home / "data/state.json").write_text(prefilled_state(size))
    server = Server([binary, "serve", "--config", "gatekeeper.yaml"], port, home, home / "gatekeeper.log")
    server.admin_port, server.home = admin_port, home
    return server


def entries_in_file(path):
    return Path(path).read_text().count("/32\"") // 3  # every entry appears in the three services


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gatekeeper", required=True, help="the release binary")
    parser.add_argument("--workdir", default="target/bench-scale", help="emptied first; on disk, not tmpfs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=4, help="per wrk run")
    parser.add_argument("--samples", type=int, default=100, help="new clients timed to the file, per size")
    args = parser.parse_args()

    def say(text):
        print(text, file=sys.stderr, flush=True)

    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    lua = work / "churn.lua"
    lua.write_text(CHURN_LUA)
    binary = str(Path(args.gatekeeper).resolve())
    started = time.monotonic()
    background = busy_cpus()

    servers = {}
    churn = {SMALL: [], LARGE: []}
    latencies, in_file = {}, {}
    try:
        for size in (SMALL, LARGE):
            servers[size] = start(binary, work, size)
        say("warm-up ...")
        for size in (SMALL, LARGE):
            wrk(servers[size].port, lua, 1)
            wait_quiet(servers[size].admin_port)
        for r in range(args.rounds):
            say(f"round {r + 1}/{args.rounds}")
            # Alternate who goes first, so neither always runs on a freshly idle machine.
            for size in (SMALL, LARGE) if r % 2 == 0 else (LARGE, SMALL):
                run = wrk(servers[size].port, lua, args.seconds)
                churn[size].append(run)
                say(f"  {size:>6,} entries: {run['rps']:,.0f} grants/s, p99 {run['p99']:.2f} ms")
                wait_quiet(servers[size].admin_port)
        for size in (SMALL, LARGE):
            say(f"new client to Traefik file at {size:,} entries, {args.samples} samples ...")
            traefik = servers[size].home / "traefik/gatekeeper.yml"
            latencies[size] = rename_latency(servers[size].port, traefik, args.samples, 0.1)
            in_file[size] = entries_in_file(traefik)
    finally:
        for server in servers.values():
            server.stop()
    (work / "results.json").write_text(json.dumps(
        {"churn": {str(k): v for k, v in churn.items()},
         "rename_ms": {str(k): v for k, v in latencies.items()}}, indent=1))

    rows, missed = [], []
    def row(what, value, ratio="", target="", ok=None):
        rows.append((what, value, ratio, target, {True: "yes", False: "NO", None: ""}[ok]))
        if ok is False:
            missed.append(what)

    for size in (SMALL, LARGE):
        rps = statistics.median(run["rps"] for run in churn[size])
        p99 = statistics.median(run["p99"] for run in churn[size])
        row(f"churn at {size:,} entries: grants/s (p99 ms)", f"{rps:,.0f} ({p99:.2f})")
    ratio = statistics.median(large["rps"] / small["rps"] for small, large in zip(churn[SMALL], churn[LARGE]))
    row(f"churn: {LARGE:,} entries / {SMALL} entries", "", f"{ratio:.2f}", ">= 0.5", ratio >= 0.5)
    for size in (SMALL, LARGE):
        p50, p99 = percentile(latencies[size], 50), percentile(latencies[size], 99)
        label = f"new client -> Traefik file renamed, {in_file[size]:,} entries in it"
        row(f"{label}: p50 ms", f"{p50:.1f}")
        if size == LARGE:
            row(f"{label}: p99 ms", f"{p99:.1f}", "", "<= 200", p99 <= 200)
        else:
            row(f"{label}: p99 ms", f"{p99:.1f}")

    header = ("measure", "gatekeeper", "ratio", "target", "met")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    print(f"machine: {machine()}; {background:.1f} CPUs busy with other work before the run")
    print(f"wrk -t2 -c64 new-client churn; {args.rounds} rounds of {args.seconds} s runs, {SMALL} and "
          f"{LARGE:,} entries back to back, medians (ratio: median of the per-round ratios); "
          f"{args.samples} new clients 100 ms apart per size; {time.monotonic() - started:.0f} s")
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    if missed:
        print(f"\nmissed: {'; '.join(missed)}")
        return 1
    print("\nevery scale target met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
