#!/usr/bin/env python3
"""The measurements behind `scripts/bench` (issue #6); run that script, not this one.

gatekeeper is measured against a bare hyper server (examples/bare_hyper.rs) on the same machine
in the same run, interleaved (bare, gatekeeper, bare, gatekeeper, ...) because a shared machine is
noisy; each figure is the median over the rounds. Load comes from wrk with 2 threads and 64
connections. A second gatekeeper runs in legacy mode (no policy file, the old image's variables),
whose every request is a mirrored one. Prints a table with the ratios to the bare server and exits
1 when a target is missed.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

KNOWN_CLIENT = "203.0.113.50"  # the mirror source's client, granted once, then known
BODY_BYTES = 512

POLICY = """\
listen: 127.0.0.1:{port}
admin: {{ listen: 127.0.0.1:{admin_port} }}
state_file: ./data/state.json
traefik: {{ file: ./traefik/gatekeeper.yml }}
always_allow: [192.168.0.0/16]
services: {{ immich: {{}}, nextcloud: {{}}, jellyfin: {{}} }}
sources:
  # The mirror hot path: one known client.
  ha: {{ kind: mirror, hosts: [ha.example.com], unlocks: "*", max_ips: 4, idle_ttl: 1h }}
  # Churn: every request a new client, so every request grants one and evicts one.
  churn: {{ kind: mirror, hosts: [churn.example.com], unlocks: "*", max_ips: 4, idle_ttl: 1h }}
  # New clients one at a time, for the request-to-file latency.
  fresh: {{ kind: mirror, hosts: [fresh.example.com], unlocks: "*", max_ips: 4, idle_ttl: 1h }}
"""

# wrk's `done` hook: one machine-readable line per run.
DONE_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"socket_errors":%d,"bad_status":%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""

# A mirrored request of the known client: POST with a 512-byte body, Host of the mirror source.
MIRROR_LUA = f"""
wrk.method = "POST"
wrk.body = string.rep("x", {BODY_BYTES})
wrk.headers["Host"] = "ha.example.com"
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["X-Forwarded-For"] = "{KNOWN_CLIENT}"
""" + DONE_LUA

# Legacy mode: no policy file, the variables tests/legacy.rs uses; ports are set too.
LEGACY_ENV = {"MAX_IP_LEN": "2", "DEFAULT_SOURCE_RANGE": ""}

# A request of the known client as the old app's users mirror them: every request of their
# trusted service, with its own Host and paths (legacy mode claims every request no endpoint
# takes); the same body as MIRROR_LUA.
LEGACY_LUA = f"""
wrk.method = "POST"
wrk.path = "/api/states"
wrk.body = string.rep("x", {BODY_BYTES})
wrk.headers["Host"] = "homeassistant.example.net"
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["X-Forwarded-For"] = "{KNOWN_CLIENT}"
""" + DONE_LUA

# A forward-auth decision for the known client (allowed: 200).
ALLOW_LUA = f"""
wrk.method = "GET"
wrk.path = "/allow/immich"
wrk.headers["X-Forwarded-For"] = "{KNOWN_CLIENT}"
""" + DONE_LUA

# Every request from a new client: thread 0 counts through 198.18.0.0/16, thread 1 through
# 198.19.0.0/16 (RFC 2544 benchmarking space; nothing there is trusted or always allowed). A
# wrap-around after 65536 requests still gives a new client, since max_ips is 4.
CHURN_LUA = f"""
local threads = 0
setup = function(thread)
  thread:set("id", threads)
  threads = threads + 1
end
local n = 0
local body = string.rep("x", {BODY_BYTES})
request = function()
  n = n + 1
  local client = string.format("198.%d.%d.%d", 18 + id % 2, math.floor(n / 256) % 256, n % 256)
  return wrk.format("POST", "/", {{["Host"] = "churn.example.com",
    ["Content-Type"] = "application/octet-stream", ["X-Forwarded-For"] = client}}, body)
end
""" + DONE_LUA


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    """Connect until the port accepts; returns when it does."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.perf_counter() > deadline:
                raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
            time.sleep(0.0002)


class Server:
    """A child process (gatekeeper or the bare server) listening on a known port."""

    def __init__(self, argv, port, cwd, log, env=None):
        """`env`: variables set for the child on top of this process's environment."""
        self.port = port
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL,
                                     env=None if env is None else {**os.environ, **env})
        wait_port(port)

    def vm_hwm_kib(self):
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def tcp_passive_opens():
    """Connections the kernel accepted so far (all listeners): counts reconnects under load. A
    wrk run whose connections all stay open opens 65: its 64 and one it tries first."""
    lines = [l.split() for l in Path("/proc/net/snmp").read_text().splitlines() if l.startswith("Tcp:")]
    return int(lines[1][lines[0].index("PassiveOpens")])


def wrk(port, lua, seconds):
    """One wrk run: requests/s, p50 and p99 in ms, and the connections it opened."""
    opened = tcp_passive_opens()
    out = subprocess.run(
        ["wrk", "-t2", "-c64", f"-d{seconds}s", "--timeout", "5s", "-s", str(lua),
         f"http://127.0.0.1:{port}/"],
        check=True, capture_output=True, text=True).stdout
    result = json.loads(re.search(r"^RESULT (.*)$", out, re.M).group(1))
    if result["socket_errors"] or result["bad_status"]:
        raise SystemExit(f"wrk saw errors ({lua.name} on port {port}):\n{out}")
    return {
        "seconds": result["duration_us"] / 1e6,
        "rps": result["requests"] / (result["duration_us"] / 1e6),
        "p50": result["p50_us"] / 1000,
        "p99": result["p99_us"] / 1000,
        "connections": tcp_passive_opens() - opened,
    }


def counter(admin_port, name, labels):
    """One counter from gatekeeper's /metrics (0 until it exists)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read().decode()
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in text.splitlines():
        if line.startswith(want + " "):
            return int(line.split()[-1])
    return 0


def traefik_writes(admin_port):
    return counter(admin_port, "gatekeeper_output_writes_total", {"output": "traefik", "result": "ok"})


def wait_quiet(admin_port, gap=0.3, timeout=10.0):
    """Wait until the Traefik file stops being written (the flusher caught up)."""
    deadline = time.monotonic() + timeout
    last = traefik_writes(admin_port)
    while time.monotonic() < deadline:
        time.sleep(gap)
        now = traefik_writes(admin_port)
        if now == last:
            return
        last = now
    raise SystemExit("the Traefik file is still being written after the load stopped")


def parse_traefik_file(text):
    """The middlewares of gatekeeper's Traefik file, read strictly: the exact shape the writer
    emits (YAML without PyYAML, which a fresh machine may lack), every range a valid network."""
    import ipaddress

    lines = [l for l in text.splitlines() if not l.startswith("#")]
    if lines[:2] != ["http:", "  middlewares:"]:
        raise ValueError(f"unexpected start: {lines[:2]}")
    middlewares, name, i = {}, None, 2
    while i < len(lines):
        line = lines[i]
        if m := re.fullmatch(r'    (".*"):', line):
            name = json.loads(m.group(1))
            if lines[i + 1] != "      ipAllowList:" or lines[i + 2] != "        sourceRange:":
                raise ValueError(f"middleware {name}: unexpected body {lines[i + 1:i + 3]}")
            middlewares[name] = []
            i += 3
        elif (m := re.fullmatch(r'          - (".*")', line)) and name is not None:
            network = json.loads(m.group(1))
            ipaddress.ip_network(network)  # raises on anything that is not a network
            middlewares[name].append(network)
            i += 1
        else:
            raise ValueError(f"unexpected line: {line!r}")
    if not middlewares or not all(middlewares.values()):
        raise ValueError("a middleware without sourceRange")
    return middlewares


def check_traefik_file(path, port):
    """The file parses and says what gatekeeper serves as the HTTP provider's JSON."""
    written = parse_traefik_file(Path(path).read_text())
    served = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/traefik/dynamic.json", timeout=5))
    served = {name: m["ipAllowList"]["sourceRange"] for name, m in served["http"]["middlewares"].items()}
    if written != served:
        raise ValueError(f"file {written} differs from /traefik/dynamic.json {served}")
    return written


def rename_latency(port, traefik_file, samples, spacing):
    """Milliseconds from a new client's mirrored request to the Traefik file holding it. The
    requests are `spacing` apart, more than the flusher's 50 ms gap, so none is coalesced."""
    latencies = []
    with socket.create_connection(("127.0.0.1", port)) as conn:
        reader = conn.makefile("rb")
        for i in range(samples):
            client = f"198.51.100.{i + 1}"
            wanted = f'"{client}/32"'
            request = (f"GET / HTTP/1.1\r\nHost: fresh.example.com\r\nX-Forwarded-For: {client}\r\n"
                       "Content-Length: 0\r\n\r\n").encode()
            start = time.perf_counter()
            conn.sendall(request)
            status = reader.readline()
            while reader.readline() not in (b"\r\n", b""):
                pass  # headers; the answer has no body
            if b" 200 " not in status:
                raise SystemExit(f"new client {client}: {status!r}")
            while wanted not in Path(traefik_file).read_text():
                if time.perf_counter() - start > 5:
                    raise SystemExit(f"{client} is not in {traefik_file} after 5 s")
                time.sleep(0.0002)
            latencies.append((time.perf_counter() - start) * 1000)
            time.sleep(spacing)
    return latencies


def startup_ms(binary, workdir, port, starts):
    """Median time from spawning gatekeeper to its port accepting, over `starts` starts."""
    times = []
    for _ in range(starts):
        start = time.perf_counter()
        proc = subprocess.Popen([binary, "serve", "--config", "gatekeeper.yaml"], cwd=workdir,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        times.append((time.perf_counter() - start) * 1000)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    return statistics.median(times)


def stripped_size(binary, workdir):
    copy = Path(workdir) / (Path(binary).name + ".stripped")
    shutil.copyfile(binary, copy)
    subprocess.run(["strip", str(copy)], check=True)
    return copy.stat().st_size


def machine():
    """nproc, CPU model, memory and kernel, for the table's heading."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    mem_kib = int(re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M).group(1))
    return (f"{os.cpu_count()} CPUs ({model.group(1) if model else 'unknown CPU'}), "
            f"{mem_kib / 2**20:.0f} GiB, Linux {os.uname().release}")


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def busy_cpus(seconds=1.0):
    """CPUs busy with other work, averaged over `seconds` (nothing of ours runs meanwhile)."""
    def snapshot():
        ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait
    total, idle = snapshot()
    time.sleep(seconds)
    total2, idle2 = snapshot()
    return (1 - (idle2 - idle) / max(1, total2 - total)) * os.cpu_count()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gatekeeper", required=True, help="the release binary")
    parser.add_argument("--bare", required=True, help="the bare hyper server")
    parser.add_argument("--workdir", default="target/bench", help="emptied first; on disk, not tmpfs")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=3, help="per wrk run")
    parser.add_argument("--samples", type=int, default=200, help="new clients timed to the file")
    args = parser.parse_args()

    def say(text):
        print(text, file=sys.stderr, flush=True)

    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    (work / "lua").mkdir(parents=True)
    port, admin_port, bare_port = free_port(), free_port(), free_port()
    legacy_port, legacy_admin_port = free_port(), free_port()
    (work / "gatekeeper.yaml").write_text(POLICY.format(port=port, admin_port=admin_port))
    # Its own directory: no gatekeeper.yaml there, and its dynamic-whitelist.yml and state apart.
    (work / "legacy").mkdir()
    legacy_env = {**LEGACY_ENV, "GATEKEEPER_LISTEN": f"127.0.0.1:{legacy_port}",
                  "GATEKEEPER_ADMIN__LISTEN": f"127.0.0.1:{legacy_admin_port}"}
    lua = {}
    for name, text in [("mirror", MIRROR_LUA), ("allow", ALLOW_LUA), ("legacy", LEGACY_LUA),
                       ("churn", CHURN_LUA)]:
        lua[name] = work / "lua" / f"{name}.lua"
        lua[name].write_text(text)
    gk_bin, bare_bin = str(Path(args.gatekeeper).resolve()), str(Path(args.bare).resolve())
    started = time.monotonic()
    background = busy_cpus()

    say("start to listening ...")
    start_ms = startup_ms(gk_bin, work, port, 9)

    gk = Server([gk_bin, "serve", "--config", "gatekeeper.yaml"], port, work, work / "gatekeeper.log")
    legacy = Server([gk_bin, "serve"], legacy_port, work / "legacy", work / "legacy.log", env=legacy_env)
    bare = Server([bare_bin, f"127.0.0.1:{bare_port}"], bare_port, work, work / "bare.log")
    # The gatekeeper each phase measures; the bare server answers every phase's requests alike.
    ports = {"mirror": port, "allow": port, "legacy": legacy_port}
    runs = {"mirror": [], "allow": [], "legacy": []}  # per round: {"bare": run, "gatekeeper": run}
    churn = []
    try:
        say("warm-up ...")
        for p, phase in [(port, "mirror"), (legacy_port, "legacy"), (bare_port, "mirror")]:
            wrk(p, lua[phase], 2)
        for r in range(args.rounds):
            say(f"round {r + 1}/{args.rounds}")
            # Alternate who goes first, so neither always runs on a freshly idle machine.
            order = ["bare", "gatekeeper"] if r % 2 == 0 else ["gatekeeper", "bare"]
            for phase in ("mirror", "allow", "legacy"):
                at = {"gatekeeper": ports[phase], "bare": bare_port}
                pair = {who: wrk(at[who], lua[phase], args.seconds) for who in order}
                runs[phase].append(pair)
                say(f"  {phase:6} " + ", ".join(
                    f"{who} {pair[who]['rps']:,.0f} req/s p99 {pair[who]['p99']:.2f} ms" for who in order))
            before = traefik_writes(admin_port)
            run = wrk(port, lua["churn"], args.seconds)
            run["writes_per_s"] = (traefik_writes(admin_port) - before) / run["seconds"]
            churn.append(run)
            say(f"  churn  {run['rps']:,.0f} req/s, {run['writes_per_s']:.1f} Traefik writes/s")
            wait_quiet(admin_port)
        try:
            check_traefik_file(work / "traefik/gatekeeper.yml", port)
            file_ok = True
        except ValueError as e:
            say(f"the Traefik file is not valid after churn: {e}")
            file_ok = False
        say(f"new client to Traefik file, {args.samples} samples ...")
        latencies = rename_latency(port, work / "traefik/gatekeeper.yml", args.samples, 0.1)
        gk_rss, bare_rss = gk.vm_hwm_kib() / 1024, bare.vm_hwm_kib() / 1024
    finally:
        gk.stop()
        legacy.stop()
        bare.stop()
    gk_size, bare_size = stripped_size(gk_bin, work) / 2**20, stripped_size(bare_bin, work) / 2**20
    (work / "results.json").write_text(json.dumps(
        {"runs": runs, "churn": churn, "rename_ms": latencies, "start_ms": start_ms,
         "rss_mib": {"gatekeeper": gk_rss, "bare": bare_rss},
         "stripped_mib": {"gatekeeper": gk_size, "bare": bare_size}}, indent=1))

    rows, missed = [], []
    def row(what, gatekeeper, bare="", ratio="", target="", ok=None):
        rows.append((what, gatekeeper, bare, ratio, target, {True: "yes", False: "NO", None: ""}[ok]))
        if ok is False:
            missed.append(what)

    def median(phase, who, key):
        return statistics.median(pair[who][key] for pair in runs[phase])

    def paired(phase, key):
        """Median over the rounds of gatekeeper / bare, each pair run back to back."""
        return statistics.median(pair["gatekeeper"][key] / pair["bare"][key] for pair in runs[phase])

    for phase, label in [("mirror", "mirror, known client, 512 B POST"), ("allow", "/allow/{service}"),
                         ("legacy", "legacy mode, known client, 512 B POST")]:
        ratio = paired(phase, "rps")
        row(f"{label}: req/s", f"{median(phase, 'gatekeeper', 'rps'):,.0f}",
            f"{median(phase, 'bare', 'rps'):,.0f}", f"{ratio:.2f}", ">= 0.95", ratio >= 0.95)
        ratio = paired(phase, "p99")
        row(f"{label}: p99 ms", f"{median(phase, 'gatekeeper', 'p99'):.2f}",
            f"{median(phase, 'bare', 'p99'):.2f}", f"{ratio:.2f}", "<= 1.2", ratio <= 1.2)
        row(f"{label}: connections opened per run", f"{median(phase, 'gatekeeper', 'connections'):.0f}",
            f"{median(phase, 'bare', 'connections'):.0f}", "", "(65: all kept open)")
    ratio = statistics.median(c["rps"] / pair["gatekeeper"]["rps"] for c, pair in zip(churn, runs["mirror"]))
    row("churn, new client every request, max_ips 4: req/s", f"{statistics.median(c['rps'] for c in churn):,.0f}",
        "", f"{ratio:.2f} of mirror", ">= 0.5 of mirror", ratio >= 0.5)
    writes = max(c["writes_per_s"] for c in churn)
    row("churn: Traefik file writes/s (worst round)", f"{writes:.1f}", "", "", "<= 20", writes <= 20)
    row("churn: Traefik file valid afterwards", "yes" if file_ok else "NO", "", "", "valid", file_ok)
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    row("new client -> Traefik file renamed: p50 ms", f"{p50:.1f}")
    row("new client -> Traefik file renamed: p99 ms", f"{p99:.1f}", "", "", "<= 50", p99 <= 50)
    row("peak RSS MiB (VmHWM after the load)", f"{gk_rss:.1f}", f"{bare_rss:.1f}", "", "<= 20", gk_rss <= 20)
    row("start to listening ms (median of 9)", f"{start_ms:.1f}", "", "", "<= 50", start_ms <= 50)
    row("stripped release binary MiB", f"{gk_size:.2f}", f"{bare_size:.2f}", "", "<= 8", gk_size <= 8)

    header = ("measure", "gatekeeper", "bare hyper", "ratio", "target", "met")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    print(f"machine: {machine()}; {background:.1f} CPUs busy with other work before the run")
    print(f"wrk -t2 -c64; {args.rounds} rounds of {args.seconds} s runs, bare and gatekeeper back to back, "
          f"medians (ratios: median of the per-round ratios); {len(latencies)} new clients 100 ms apart; "
          f"{time.monotonic() - started:.0f} s")
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    if missed:
        print(f"\nmissed: {'; '.join(missed)}")
        return 1
    print("\nevery target met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
