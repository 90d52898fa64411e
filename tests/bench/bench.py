#!/usr/bin/env python3
"""xcflushd benchmark: flush cycle (cold and steady state) and the priority path.

Starts its own redis-server and backend simulator (a separate process, with a
set latency) on loopback, seeds N applications in the gateway's exact format,
and runs ``xcflushd flush`` as a child process to measure per-phase wall time
(from its log line), backend calls by endpoint, CPU seconds and peak RSS
(wait4). The priority path is measured against ``xcflushd run``: added latency
(publish -> answer, minus the simulated latency) at a steady rate of distinct
requests, backend calls for a burst of identical requests, and the
cold-cache storm: thousands of distinct requests published at once against a
30 ms backend, with the daemon's default settings, measured as the gateway
sees it (answered within its 3 s REDIS_TIMEOUT, or denied).

CPU per backend call is measured twice: in a child process running only the
engine and the authorize parsing (process CPU and the engine thread's own CPU,
from /proc), and for whole flush cycles (the cycle's CPU less an empty
cycle's, per backend call). The hostile-backend table runs ``xcflushd flush``
against a raw socket server answering each broken framing: seconds to the
failed call, whether the report stayed in Redis, peak RSS.

The machine is shared: CPU time, not wall time, is what compares between runs.
``--quick`` (or XCFLUSHD_BENCH_QUICK=1) runs everything once, in a few minutes.

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
from typing import Optional

import redis

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/: rawserver
from rawserver import RawServer, read_request  # noqa: E402

from xcflushd import defaults  # noqa: E402
from xcflushd.keys import Credentials, auth_request_message, report_key  # noqa: E402
from xcflushd_sim.config import demo_config  # noqa: E402
from xcflushd_sim.devrun import gateway_credentials  # noqa: E402

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
            [sys.executable, "-m", "xcflushd_sim.cli", "--listen", f"127.0.0.1:{self.sim_port}",
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


# ---- the cold-cache storm -----------------------------------------------------------

def _proc_cpu(pid: int, tid: Optional[int] = None) -> float:
    """CPU seconds (user + system) of a process, or of one of its threads, from /proc."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(path) as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_storm(args, workdir: str):
    """``args.storm`` distinct priority requests published at once; the daemon runs its defaults.

    Every request needs a backend authorize (distinct referrers: no dedup, no
    cache). The answer times are what a gateway sees from the publish; what is
    not answered within 3 s is what apicast-xc would have denied.
    """
    stack = Stack(1000, args.storm_latency_ms, tempfile.mkdtemp(dir=workdir))
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCFLUSHD_")}
    env["XCFLUSHD_METRICS_LISTEN"] = ""
    # Defaults: no --threads, no --prio-threads.
    argv = [sys.executable, "-m", "xcflushd", "run", "--redis", f"127.0.0.1:{stack.redis_port}",
            "--backend", stack.sim_url, "--provider-key-file", stack.key_file, "-c", os.devnull]
    if args.storm_prio_threads:
        argv += ["--prio-threads", str(args.storm_prio_threads)]
    # The yardstick: the bare loop making the storm's calls, all started at once
    # with as many in flight as the daemon's priority path. The machine
    # did 5000 at 30 ms in 1.43 s with 128 in flight.
    apps = [(s, dict(c.items())) for s, c in stack.apps]
    prio = args.storm_prio_threads or defaults.PRIO_THREADS
    bare = subprocess.run([sys.executable, "-c", _BARE_CHILD,
                           json.dumps([stack.sim_url, stack.config["provider_key"], apps, args.storm, prio])],
                          capture_output=True, text=True, timeout=300, env=env)
    if bare.returncode != 0:
        raise RuntimeError(f"bare storm child failed:\n{bare.stderr[-2000:]}")
    bare_storm = {k: round(v, 3) for k, v in json.loads(bare.stdout).items()}
    stack.sim_reset()
    daemon = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    runs = []
    try:
        for line in daemon.stdout:
            if "ready:" in line:
                break
        threading.Thread(target=lambda: [None for _ in daemon.stdout], daemon=True).start()
        for run in range(args.storm_runs):
            stack.sim_reset()
            cpu_before, sim_before = _proc_cpu(daemon.pid), _proc_cpu(stack.sim_proc.pid)
            latencies, unanswered = _storm_once(stack, args.storm, f"s{run}")
            cpu = _proc_cpu(daemon.pid) - cpu_before
            calls = stack.sim_state()["calls"].get("authorize", 0)
            runs.append(dict(_storm_summary(latencies, unanswered, args.storm, cpu, calls),
                             simulator_cpu_s=round(_proc_cpu(stack.sim_proc.pid) - sim_before, 2)))
            time.sleep(1.0)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        stack.close()
    return {"requests": args.storm, "backend_latency_ms": args.storm_latency_ms,
            "prio_threads": prio, "runs": runs, "bare_pycurl": bare_storm}


def _storm_once(stack: Stack, count: int, tag: str, wait: float = 15.0):
    listener = stack.r.pubsub()
    listener.psubscribe("xc_channel_auth_response:*")
    listener.get_message(timeout=1)
    messages = []
    for i in range(count):
        service_id, creds = stack.apps[i % len(stack.apps)]
        creds = Credentials(dict(creds.items(), referrer=f"{tag}-{i}.example"))
        messages.append(auth_request_message(service_id, creds, "hits"))
    waiting = set(messages)
    latencies = []
    pipe = stack.r.pipeline(transaction=False)
    for msg in messages:
        pipe.publish("xc_channel_auth_requests", msg)
    start = time.perf_counter()
    pipe.execute()
    deadline = start + wait
    prefix = len("xc_channel_auth_response:")
    while waiting and time.perf_counter() < deadline:
        msg = listener.get_message(timeout=0.2)
        if msg and msg["type"] == "pmessage":
            key = msg["channel"][prefix:]
            if key in waiting:
                waiting.discard(key)
                latencies.append(time.perf_counter() - start)
    listener.close()
    return sorted(latencies), len(waiting)


def _storm_summary(latencies, unanswered, sent, cpu, calls):
    within = sum(1 for t in latencies if t <= 3.0)
    return {"sent": sent, "answered": len(latencies), "unanswered_after_15s": unanswered,
            "within_3s_pct": round(100.0 * within / sent, 2),
            "p50_s": round(_pct(latencies, 50), 3), "p99_s": round(_pct(latencies, 99), 3),
            "max_s": round(latencies[-1], 3) if latencies else None,
            "backend_calls": calls, "daemon_cpu_s": round(cpu, 2),
            "cpu_us_per_call": round(cpu / calls * 1e6) if calls else None}


# ---- CPU per backend call --------------------------------------------------------------

# The engine and the authorize parsing alone, in a child (its own CPU counters,
# nothing else of the daemon): CPU of the process and of the engine thread.
_CPU_CHILD = r"""
import json, os, resource, sys, time
from xcflushd.backend import make_client, ServiceCredentials
from xcflushd.keys import Credentials

url, key, apps, n, concurrency = json.loads(sys.argv[1])
apps = [(s, Credentials(c)) for s, c in apps]
client = make_client(url, ServiceCredentials(key), 5.0, 10.0)
engine = client.transport

def items(count):
    for i in range(count):
        service_id, creds = apps[i % len(apps)]
        yield i, service_id, creds

def thread_cpu(tid):
    with open(f"/proc/self/task/{tid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def process_cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime

for _ in client.authorize_many(items(500), concurrency):  # warm: connections, caches
    pass
tid = engine._thread.native_id
c0, e0, w0 = process_cpu(), thread_cpu(tid), time.perf_counter()
failed = 0
for _, outcome in client.authorize_many(items(n), concurrency):
    failed += not hasattr(outcome, "authorized")
c1, e1, w1 = process_cpu(), thread_cpu(tid), time.perf_counter()
client.close()
print(json.dumps({"calls": n, "failed": failed, "wall_s": w1 - w0, "process_us": (c1 - c0) / n * 1e6,
                  "engine_thread_us": (e1 - e0) / n * 1e6}))
"""


# The yardstick: the least a Python program can spend per call with pycurl's
# CurlMulti (perform/select, one URL option per call, body into a bytearray, no
# parsing), same calls, same simulator, same calls in flight. The issue's
# 110 us target was set against such a loop (97-105 us on its machine): the
# ratio to it is what compares across machines.
_BARE_CHILD = r"""
import json, resource, sys, time, urllib.parse
import pycurl

url, key, apps, n, concurrency = json.loads(sys.argv[1])

def process_cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime

urls = [url + "/transactions/authorize.xml?" + urllib.parse.urlencode(dict(c, provider_key=key, service_id=s))
        for s, c in apps]
multi = pycurl.CurlMulti()
free = []
for _ in range(concurrency):
    h = pycurl.Curl()
    h.body = bytearray()
    h.setopt(pycurl.WRITEFUNCTION, h.body.extend)
    h.setopt(pycurl.HTTPHEADER, ["3scale-options: hierarchy=1&rejection_reason_header=1"])
    free.append(h)

def run(count):
    started = done = failed = 0
    t0 = time.perf_counter()
    finished = []
    while done < count:
        while free and started < count:
            h = free.pop()
            h.body.clear()
            h.setopt(pycurl.URL, urls[started % len(urls)])
            multi.add_handle(h)
            started += 1
        while multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
            pass
        multi.select(1.0)
        while True:
            queued, ok, bad = multi.info_read()
            for h in ok + [b[0] for b in bad]:
                multi.remove_handle(h)
                free.append(h)
                done += 1
                finished.append(time.perf_counter() - t0)
            failed += len(bad)
            if not queued:
                break
    return failed, finished

run(500)
c0 = process_cpu()
failed, finished = run(n)
print(json.dumps({"calls": n, "failed": failed, "process_us": (process_cpu() - c0) / n * 1e6,
                  "p50_s": finished[len(finished) // 2], "p99_s": finished[int(len(finished) * 0.99) - 1],
                  "max_s": finished[-1]}))
"""


def bench_cpu_per_call(args, workdir: str):
    stack = Stack(1000, args.latency_ms, tempfile.mkdtemp(dir=workdir))
    apps = [(s, dict(c.items())) for s, c in stack.apps]
    runs, bare = [], []
    child_args = json.dumps([stack.sim_url, stack.config["provider_key"], apps, args.cpu_calls, args.threads])

    def child(code):
        out = subprocess.run([sys.executable, "-c", code, child_args], capture_output=True, text=True, timeout=300,
                             env={k: v for k, v in os.environ.items() if not k.startswith("XCFLUSHD_")})
        if out.returncode != 0:
            raise RuntimeError(f"cpu child failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout)

    try:
        for _ in range(args.cpu_runs):  # interleaved: both see the same machine
            runs.append(child(_CPU_CHILD))
            bare.append(child(_BARE_CHILD))
    finally:
        stack.close()
    proc = sorted(r["process_us"] for r in runs)
    eng = sorted(r["engine_thread_us"] for r in runs)
    ref = sorted(r["process_us"] for r in bare)
    ratios = sorted(r["process_us"] / b["process_us"] for r, b in zip(runs, bare))
    return {"calls": args.cpu_calls, "in_flight": args.threads, "backend_latency_ms": args.latency_ms,
            "process_us": {"median": round(statistics.median(proc), 1), "min": round(proc[0], 1),
                           "max": round(proc[-1], 1)},
            "engine_thread_us": {"median": round(statistics.median(eng), 1), "min": round(eng[0], 1),
                                 "max": round(eng[-1], 1)},
            "bare_pycurl_us": {"median": round(statistics.median(ref), 1), "min": round(ref[0], 1),
                               "max": round(ref[-1], 1)},
            "ratio_to_bare": {"median": round(statistics.median(ratios), 2), "min": round(ratios[0], 2),
                              "max": round(ratios[-1], 2)},
            "failed": sum(r["failed"] for r in runs) + sum(b["failed"] for b in bare),
            "wall_s": [round(r["wall_s"], 3) for r in runs]}


def empty_cycle_cpu(args, workdir: str) -> float:
    """CPU seconds of a flush cycle with nothing pending: start-up and Redis set-up, no backend call."""
    stack = Stack(10, args.latency_ms, tempfile.mkdtemp(dir=workdir))
    try:
        cpus = []
        for _ in range(3):
            env = {k: v for k, v in os.environ.items() if not k.startswith("XCFLUSHD_")}
            _, cpu, _, _ = launch([sys.executable, "-m", "xcflushd", "flush", *stack.daemon_args(args.threads),
                                   "--report-auth-wait", "0"], env)
            cpus.append(cpu)
        return statistics.median(cpus)
    finally:
        stack.close()


# ---- hostile backend ----------------------------------------------------------------------

_XML = (b'<?xml version="1.0" encoding="UTF-8"?><status><authorized>true</authorized>'
        b'<plan>Basic</plan></status>')


def _head(extra: bytes, status: bytes = b"HTTP/1.1 200 OK") -> bytes:
    return status + b"\r\nContent-Type: application/xml\r\n" + extra + b"\r\n"


#: kind -> what the server does after reading a request: (bytes to send, then "close" | "stall" | "stream")
HOSTILE = {
    "well-formed 200 (control)": (_head(b"Content-Length: %d\r\n" % len(_XML)) + _XML, "close"),
    "conflicting Content-Length": (_head(b"Content-Length: 10\r\nContent-Length: 20\r\n") + b"x" * 20, "close"),
    "chunk size -6": (_head(b"Transfer-Encoding: chunked\r\n") + b"-6\r\nabcdef\r\n0\r\n\r\n", "close"),
    "chunk size not hex": (_head(b"Transfer-Encoding: chunked\r\n") + b"zz\r\nabcdef\r\n0\r\n\r\n", "close"),
    "one 256 MiB chunk": (_head(b"Transfer-Encoding: chunked\r\n") + b"10000000\r\n", "stream"),
    "Content-Length 256 MiB": (_head(b"Content-Length: 268435456\r\n"), "stream"),
    "no length, endless body": (_head(b"Connection: close\r\n"), "stream"),
    "400 KB of 1-byte chunks": (_head(b"Transfer-Encoding: chunked\r\n") + b"1\r\nx\r\n" * 400_000 + b"0\r\n\r\n",
                                "close"),
    "truncated body, closed": (_head(b"Content-Length: 100\r\n") + b"x" * 10, "close"),
    "status line garbage": (b"\x00\xffGARBAGE 42 nope\r\n\r\nbody", "close"),
    "HTTP/0.9 (no status line)": (b"<status><authorized>true</authorized></status>", "close"),
    "closed without answer": (b"", "close"),
    "stalls mid-body": (_head(b"Content-Length: 100\r\n") + b"x" * 10, "stall"),
    "stalls before answering": (b"", "stall"),
}


def hostile_server(kind: str) -> RawServer:
    """A raw socket server answering every request with one broken response kind."""
    payload, after = HOSTILE[kind]

    def handle(conn, stopping):
        conn.settimeout(60)
        if read_request(conn) is None:
            return
        conn.sendall(payload)
        if after == "stream":
            block = b"x" * 65536
            while not stopping.is_set():
                conn.sendall(block)
        elif after == "stall":
            while not stopping.is_set() and conn.recv(65536):
                pass
    return RawServer(handle)


def bench_hostile(args, workdir: str):
    """One pending report, ``xcflushd flush`` against each kind: time to the failed call, report kept, RSS."""
    stack = Stack(10, 0, tempfile.mkdtemp(dir=workdir))
    rows = []
    try:
        service_id, creds = stack.apps[0]
        key = report_key(service_id, creds)
        for kind in HOSTILE:
            stack.r.flushall()
            stack.r.hincrby(key, "hits", 3)
            stack.r.sadd("report_keys", key)
            server = hostile_server(kind)
            env = {k: v for k, v in os.environ.items() if not k.startswith("XCFLUSHD_")}
            argv = [sys.executable, "-m", "xcflushd", "flush", "--redis", f"127.0.0.1:{stack.redis_port}",
                    "--backend", server.url, "--provider-key-file", stack.key_file, "-c", os.devnull,
                    "--report-auth-wait", "0"]
            try:
                _, _, maxrss, output = launch(argv, env)
            finally:
                server.close()
            line = next((ln for ln in output.splitlines() if "flush cycle:" in ln), "")
            phases = {k: int(v) / 1000 for k, v in PHASES.findall(line)}
            failed = re.search(r"failed=(\d+)", line)
            reason = re.search(r"kept for the next cycle: (.*)", output)
            reason = reason.group(1) if reason else ""
            kept = stack.r.hget(key, "hits") == "3" or any(
                stack.r.hget(k, "hits") == "3" for k in stack.r.keys("*") if k != key and stack.r.type(k) == "hash")
            rows.append({"kind": kind, "report_call_s": phases.get("report"),
                         "authorize_call_s": phases.get("authorize"),
                         "failed": int(failed.group(1)) if failed else None, "report_kept": kept,
                         "peak_rss_mb": round(maxrss / 1024, 1), "reason": reason[-140:]})
            print(f"hostile: {kind} done", flush=True)
    finally:
        stack.close()
    return rows


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
    empty = report.get("empty_cycle_cpu_s")
    if empty is not None:
        for c in report["cycles"]:
            for kind in ("cold", "steady"):
                d = c[kind]
                calls = sum(d["calls"].get(k, 0) for k in ("authorize", "report", "oauth_authorize"))
                print(f"cycle CPU per backend call, N={c['n']} {kind}: "
                      f"{(d['cpu_s'] - empty) / calls * 1e6:.0f} us (cycle {d['cpu_s']:.2f} s less an empty "
                      f"cycle's {empty:.2f} s, over {calls} calls)")
    if report.get("cpu_per_call"):
        c = report["cpu_per_call"]
        print(f"engine CPU per authorize call ({c['calls']} calls, {c['in_flight']} in flight, "
              f"{c['backend_latency_ms']:.0f} ms backend): process {c['process_us']['median']} us "
              f"(min {c['process_us']['min']}, max {c['process_us']['max']}), engine thread "
              f"{c['engine_thread_us']['median']} us (min {c['engine_thread_us']['min']}, "
              f"max {c['engine_thread_us']['max']}); target <= 110 us")
        if c.get("bare_pycurl_us"):
            b, q = c["bare_pycurl_us"], c["ratio_to_bare"]
            print(f"  a bare pycurl CurlMulti loop, same calls (no parsing): {b['median']} us "
                  f"(min {b['min']}, max {b['max']}); ratio engine/bare {q['median']} (min {q['min']}, "
                  f"max {q['max']}); the target is 110/101 = 1.09 of the issue's bare loop")
    if report.get("storm"):
        st = report["storm"]
        print(f"cold-cache storm: {st['requests']} distinct requests at once, "
              f"backend {st['backend_latency_ms']:.0f} ms, "
              f"prio-threads {st['prio_threads']}; target >= 99 % within 3 s, p99 <= 1.5 s")
        for r in st["runs"]:
            print(f"  within 3 s {r['within_3s_pct']:6.2f} %  p50 {r['p50_s']:.3f} s  p99 {r['p99_s']:.3f} s  "
                  f"max {r['max_s']} s  unanswered {r['unanswered_after_15s']}  backend calls {r['backend_calls']}  "
                  f"daemon CPU {r['daemon_cpu_s']} s ({r['cpu_us_per_call']} us/call), "
                  f"simulator CPU {r.get('simulator_cpu_s')} s")
        b = st.get("bare_pycurl")
        if b:
            print(f"  yardstick, a bare pycurl loop making the same calls ({st['prio_threads']} in flight, no Redis, "
                  f"no parsing): p50 {b['p50_s']} s  p99 {b['p99_s']} s  last {b['max_s']} s "
                  f"({b['process_us']:.0f} us/call); the issue's machine: 1.43 s for all 5000")
    if report.get("hostile"):
        print(f"{'hostile backend':>28} {'report call s':>13} {'auth call s':>11} {'failed':>6} {'kept':>5} "
              f"{'RSS MB':>7}  reason")
        for r in report["hostile"]:
            rep = "-" if r["report_call_s"] is None else f"{r['report_call_s']:.3f}"
            aut = "-" if r["authorize_call_s"] is None else f"{r['authorize_call_s']:.3f}"
            print(f"{r['kind']:>28} {rep:>13} {aut:>11} {str(r['failed']):>6} {str(r['report_kept']):>5} "
                  f"{r['peak_rss_mb']:>7.1f}  {r['reason'][:90]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[5000, 50000],
                   help="pending applications (several: a plot)")
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
    p.add_argument("--storm", type=int, default=5000, help="distinct priority requests published at once (0: skip)")
    p.add_argument("--storm-latency-ms", type=float, default=30.0, help="simulated backend latency for the storm")
    p.add_argument("--storm-prio-threads", type=int, default=0,
                   help="the daemon's --prio-threads for the storm (default: the daemon's own default)")
    p.add_argument("--storm-runs", type=int, default=3, help="storms (one daemon, fresh requests each)")
    p.add_argument("--cpu-calls", type=int, default=5000, help="authorize calls per CPU-per-call run (0: skip)")
    p.add_argument("--cpu-runs", type=int, default=5, help="CPU-per-call runs; median, min, max reported")
    p.add_argument("--no-hostile", action="store_true", help="skip the hostile-backend table")
    p.add_argument("--only", choices=("cycles", "priority", "storm", "cpu", "hostile"), nargs="+",
                   help="run only these parts")
    p.add_argument("--quick", action="store_true", default=bool(os.environ.get("XCFLUSHD_BENCH_QUICK")),
                   help="everything once, shorter priority load: a few minutes (env XCFLUSHD_BENCH_QUICK=1)")
    p.add_argument("--out", default="tests/bench/results", help="directory for the JSON and the plot")
    args = p.parse_args()
    if args.quick:
        args.runs, args.storm_runs, args.cpu_runs, args.duration = 1, 1, 3, 3.0
    if shutil.which("redis-server") is None:
        sys.exit("redis-server not installed (make deps)")
    os.makedirs(args.out, exist_ok=True)
    launch([sys.executable, "-c", "pass"], {})  # start the launcher while this process is small
    workdir = tempfile.mkdtemp(prefix="xcf-bench-")
    report = {"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
              "params": vars(args), "cycles": []}
    def part(name):
        return args.only is None or name in args.only

    try:
        if part("cycles"):
            report["empty_cycle_cpu_s"] = round(empty_cycle_cpu(args, workdir), 3)
            for n in args.n:
                report["cycles"].append(bench_cycles(n, args, workdir))
                print(f"N={n} done", flush=True)
        if part("cpu") and args.cpu_calls:
            report["cpu_per_call"] = bench_cpu_per_call(args, workdir)
            print("CPU per call done", flush=True)
        if part("storm") and args.storm:
            report["storm"] = bench_storm(args, workdir)
            print("storm done", flush=True)
        if part("priority") and not args.no_priority:
            report["priority"] = bench_priority(args, workdir)
        if part("hostile") and not args.no_hostile:
            report["hostile"] = bench_hostile(args, workdir)
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
