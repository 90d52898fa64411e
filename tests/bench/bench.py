#!/usr/bin/env python3
"""xcflushd benchmark: flush cycle (cold and steady state) and the priority path.

Starts its own redis-server and backend simulator (a separate process, with a
set latency) on loopback, seeds N applications in the gateway's exact format,
and runs ``xcflushd flush`` as a child process to measure per-phase wall time
(from its log line), backend calls by endpoint, CPU seconds and peak RSS
(wait4). The priority path is measured against ``xcflushd run``: added latency
(publish -> answer, minus the simulated latency) at a steady rate of distinct
requests, and backend calls for a burst of identical requests.

Results: a JSON file, a table on stdout and, for several N, a PNG plot of
cycle time against N. Every parameter is a flag; defaults are the targets'
setup (2 cores, 5 ms backend latency, N=5000).
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
import tempfile
import threading
import time
import urllib.request

import redis

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from xcflushd import defaults  # noqa: E402
from xcflushd.keys import Credentials, auth_request_message, report_key  # noqa: E402
from xcflushd.sim.config import demo_config  # noqa: E402
from xcflushd.sim.devrun import gateway_credentials  # noqa: E402

PHASES = re.compile(r"(handover|report|wait|authorize)=(\d+)ms")
METRICS = ("hits", "search", "update", "bytes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """redis-server + simulator process, torn down on exit."""

    def __init__(self, n_apps: int, latency_ms: float, workdir: str):
        self.workdir = workdir
        self.redis_port = free_port()
        self.redis_proc = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", workdir,
             "--save", "", "--appendonly", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.r = redis.Redis(port=self.redis_port, decode_responses=True)
        _wait(lambda: self.r.ping())
        self.config = demo_config(n_apps)
        config_path = os.path.join(workdir, "sim.json")
        with open(config_path, "w") as fh:
            json.dump(self.config, fh)
        self.sim_port = free_port()
        self.sim_proc = subprocess.Popen(
            [sys.executable, "-m", "xcflushd.sim.cli", "--listen", f"127.0.0.1:{self.sim_port}",
             "--config", config_path, "--latency-ms", str(latency_ms)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.sim_url = f"http://127.0.0.1:{self.sim_port}"
        _wait(lambda: urllib.request.urlopen(self.sim_url + "/_sim/state", timeout=1).read())
        self.key_file = os.path.join(workdir, "pk")
        with open(self.key_file, "w") as fh:
            fh.write(self.config["provider_key"])
        self.apps = gateway_credentials(self.config)

    def sim_state(self):
        return json.loads(urllib.request.urlopen(self.sim_url + "/_sim/state", timeout=10).read())

    def sim_reset(self):
        urllib.request.urlopen(urllib.request.Request(self.sim_url + "/_sim/reset", data=b"{}", method="POST"),
                               timeout=10).read()

    def seed(self, metrics_per_app: int):
        """HINCRBY + SADD per application and metric, as the gateway writes."""
        pipe = self.r.pipeline(transaction=False)
        for i, (service_id, creds) in enumerate(self.apps):
            key = report_key(service_id, creds)
            for m in METRICS[:metrics_per_app]:
                pipe.hincrby(key, m, 1 + i % 7)
            pipe.sadd("report_keys", key)
            if len(pipe) > 5000:
                pipe.execute()
        pipe.execute()

    def daemon_args(self, threads: int):
        return ["--redis", f"127.0.0.1:{self.redis_port}", "--backend", self.sim_url,
                "--provider-key-file", self.key_file, "-c", os.devnull, "--threads", str(threads),
                "--auth-ttl", "3600", "--frequency", "3600"]

    def close(self):
        for proc in (self.sim_proc, self.redis_proc):
            proc.terminate()
            proc.wait(10)


def _wait(probe, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            probe()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# Linux carries a process's peak RSS (ru_maxrss) across fork and exec: a daemon
# started by this process, which holds N applications' worth of data, would
# report this process's peak as its own. A small launcher, started before
# anything is loaded, starts the daemons instead and returns their wait4 usage.
_LAUNCHER = r"""
import json, os, subprocess, sys
for line in sys.stdin:
    argv, env = json.loads(line)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    print(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime,
                      usage.ru_maxrss, output]), flush=True)
"""
_launcher = None


def launch(argv, env):
    """Run a command through the launcher: (exit status, CPU seconds, peak RSS KiB, output)."""
    global _launcher
    if _launcher is None:
        _launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
    _launcher.stdin.write(json.dumps([argv, env]) + "\n")
    _launcher.stdin.flush()
    return json.loads(_launcher.stdout.readline())


def run_cycle(stack: Stack, threads: int, wait: float):
    """One `xcflushd flush` child: phases from its log, CPU and peak RSS from wait4."""
    before = stack.sim_state()["calls"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCFLUSHD_")}
    returncode, cpu, maxrss, output = launch(
        [sys.executable, "-m", "xcflushd", "flush", *stack.daemon_args(threads), "--report-auth-wait", str(wait)], env)
    line = next((ln for ln in output.splitlines() if "flush cycle:" in ln), "")
    if returncode != 0 or "failed=0" not in line:
        raise RuntimeError(f"flush failed ({returncode}):\n{output[-2000:]}")
    phases = {k: int(v) / 1000 for k, v in PHASES.findall(line)}
    after = stack.sim_state()["calls"]
    return {
        "phases_s": phases,
        "cycle_s": sum(v for k, v in phases.items() if k != "wait"),
        "calls": {k: after.get(k, 0) - before.get(k, 0) for k in after},
        "cpu_s": round(cpu, 3),
        "peak_rss_mb": round(maxrss / 1024, 1),
        "reports": int(re.search(r"reports=(\d+)", line).group(1)),
    }


def bench_cycles(n: int, args, workdir: str):
    """Cold then steady-state cycles for N applications; medians over args.runs."""
    cold, steady = [], []
    for _ in range(args.runs):
        stack = Stack(n, args.latency_ms, tempfile.mkdtemp(dir=workdir))
        try:
            stack.seed(args.metrics)
            cold.append(run_cycle(stack, args.threads, args.wait))
            stack.seed(args.metrics)
            steady.append(run_cycle(stack, args.threads, args.wait))
        finally:
            stack.close()
    return {"n": n, "cold": summarize(cold), "steady": summarize(steady)}


def summarize(runs):
    """Medians of several runs, plus the raw values."""
    out = {"runs": len(runs), "cycle_s": round(statistics.median(r["cycle_s"] for r in runs), 3),
           "cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 3),
           "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in runs), 1),
           "calls": runs[0]["calls"], "reports": runs[0]["reports"],
           "phases_s": {k: round(statistics.median(r["phases_s"].get(k, 0) for r in runs), 3)
                        for k in runs[0]["phases_s"]},
           "all_cycle_s": [round(r["cycle_s"], 3) for r in runs]}
    return out


def bench_priority(args, workdir: str):
    stack = Stack(max(args.n), args.latency_ms, tempfile.mkdtemp(dir=workdir))
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCFLUSHD_")}
    env["XCFLUSHD_METRICS_LISTEN"] = ""  # not the default port, which another daemon may hold
    daemon = subprocess.Popen([sys.executable, "-m", "xcflushd", "run", *stack.daemon_args(args.threads),
                               "--prio-threads", str(args.prio_threads)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        for line in daemon.stdout:
            if "ready:" in line:
                break
        threading.Thread(target=lambda: [None for _ in daemon.stdout], daemon=True).start()
        latencies = _steady_requests(stack, args.rate, args.duration)
        stack.sim_reset()
        answers = _burst(stack, args.burst)
        burst_calls = stack.sim_state()["calls"].get("authorize", 0)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        stack.close()
    sim_latency = args.latency_ms / 1000
    added = sorted(max(0.0, lat - sim_latency) * 1000 for lat in latencies)
    sent = int(args.rate * args.duration)
    return {
        "rate_per_s": args.rate, "duration_s": args.duration, "sent": sent, "answered": len(latencies),
        "added_latency_ms": {"p50": round(_pct(added, 50), 2), "p99": round(_pct(added, 99), 2),
                             "max": round(added[-1], 2) if added else None},
        "burst": {"identical_requests": args.burst, "answers": answers, "backend_calls": burst_calls},
    }


def _pct(values, p):
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def _steady_requests(stack: Stack, rate: float, duration: float):
    """Distinct requests at a steady rate; one psubscribe connection collects the answers."""
    sent, latencies = {}, []
    listener = stack.r.pubsub()
    listener.psubscribe("xc_channel_auth_response:*")
    listener.get_message(timeout=1)
    done = threading.Event()

    def collect():
        while not done.is_set():
            msg = listener.get_message(timeout=0.2)
            if msg and msg["type"] == "pmessage":
                t = sent.pop(msg["channel"][len("xc_channel_auth_response:"):], None)
                if t is not None:
                    latencies.append(time.perf_counter() - t)

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    publisher = redis.Redis(port=stack.redis_port, decode_responses=True)
    total = int(rate * duration)
    start = time.perf_counter()
    for i in range(total):
        service_id, creds = stack.apps[i % len(stack.apps)]
        # distinct (app, metric, referrer) each time: no dedup, no cache
        creds = Credentials(dict(creds.items(), referrer=f"r{i}.example"))
        msg = auth_request_message(service_id, creds, METRICS[i % len(METRICS)])
        target = start + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        sent[msg] = time.perf_counter()
        publisher.publish("xc_channel_auth_requests", msg)
    time.sleep(1.0)
    done.set()
    collector.join()
    listener.close()
    return latencies


def _burst(stack: Stack, count: int) -> int:
    """``count`` gateways ask for the same uncached authorization at once; how many get an answer."""
    service_id, creds = stack.apps[0]
    msg = auth_request_message(service_id, creds, "hits")
    listeners = []
    for _ in range(count):
        listener = redis.Redis(port=stack.redis_port, decode_responses=True).pubsub()
        listener.subscribe("xc_channel_auth_response:" + msg)
        listener.get_message(timeout=1)
        listeners.append(listener)
    pipe = stack.r.pipeline(transaction=False)
    for _ in range(count):
        pipe.publish("xc_channel_auth_requests", msg)
    pipe.execute()
    answers = 0
    for listener in listeners:
        reply = listener.get_message(timeout=3)
        answers += bool(reply and reply["type"] == "message")
        listener.close()
    return answers


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return
    ns = [c["n"] for c in results]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(ns, [c["cold"]["cycle_s"] for c in results], "o-", label="cold cycle")
    ax.plot(ns, [c["steady"]["cycle_s"] for c in results], "s-", label="steady-state cycle")
    ax.set_xlabel("pending applications (N)")
    ax.set_ylabel("cycle time, excluding the report->auth wait (s)")
    ax.set_title("xcflushd flush cycle vs N (5 ms backend latency, 2 cores)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def table(report):
    print(f"{'N':>7} {'kind':>7} {'cycle s':>8} {'report s':>9} {'auth s':>7} {'calls (auth/report)':>20} "
          f"{'CPU s':>6} {'RSS MB':>7}")
    for c in report["cycles"]:
        for kind in ("cold", "steady"):
            d = c[kind]
            calls = f"{d['calls'].get('authorize', 0)}/{d['calls'].get('report', 0)}"
            print(f"{c['n']:>7} {kind:>7} {d['cycle_s']:>8.2f} {d['phases_s'].get('report', 0):>9.2f} "
                  f"{d['phases_s'].get('authorize', 0):>7.2f} {calls:>20} {d['cpu_s']:>6.2f} {d['peak_rss_mb']:>7.1f}")
    if report.get("priority"):
        p = report["priority"]
        print(f"priority: {p['answered']}/{p['sent']} answered at {p['rate_per_s']}/s, added latency "
              f"p50 {p['added_latency_ms']['p50']} ms, p99 {p['added_latency_ms']['p99']} ms; burst of "
              f"{p['burst']['identical_requests']} identical -> {p['burst']['backend_calls']} backend call(s), "
              f"{p['burst']['answers']} answers")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[5000], help="pending applications (several: a plot)")
    p.add_argument("--metrics", type=int, default=3, help="metrics per application (1-4)")
    p.add_argument("--latency-ms", type=float, default=5.0, help="simulated backend latency")
    p.add_argument("--threads", type=int, default=defaults.THREADS, help="the daemon's --threads")
    p.add_argument("--prio-threads", type=int, default=defaults.PRIO_THREADS, help="the daemon's --prio-threads")
    p.add_argument("--wait", type=float, default=0.0, help="--report-auth-wait for the cycles (excluded anyway)")
    p.add_argument("--runs", type=int, default=3, help="runs per N; medians are reported")
    p.add_argument("--rate", type=float, default=500.0, help="distinct priority requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of priority load")
    p.add_argument("--burst", type=int, default=100, help="identical concurrent priority requests")
    p.add_argument("--no-priority", action="store_true", help="skip the priority-path measurements")
    p.add_argument("--out", default="tests/bench/results", help="directory for the JSON and the plot")
    args = p.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server not installed (make deps)")
    os.makedirs(args.out, exist_ok=True)
    launch([sys.executable, "-c", "pass"], {})  # start the launcher while this process is small
    workdir = tempfile.mkdtemp(prefix="xcf-bench-")
    report = {"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
              "params": vars(args), "cycles": []}
    try:
        for n in args.n:
            report["cycles"].append(bench_cycles(n, args, workdir))
            print(f"N={n} done", flush=True)
        if not args.no_priority:
            report["priority"] = bench_priority(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    path = os.path.join(args.out, "bench.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=2)
    table(report)
    print(f"results: {path}")
    if len(args.n) > 1:
        plot(report["cycles"], os.path.join(args.out, "cycle_vs_n.png"))


if __name__ == "__main__":
    main()
