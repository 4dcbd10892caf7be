"""Gateway benchmark: GET /authen/utilities/status direct, through the gateway, through nginx.

Run by hand against a running local stack (``make up``; ``PORT_OFFSET`` if it runs under
another offset)::

    .venv/bin/python bench/gateway.py [--duration 10] [--connections 32]

Six targets, in one run, with the same load generator:
  direct   one authen instance, GET /utilities/status
  gateway  the stack's gateway, GET /authen/utilities/status (balanced over both instances;
           task limits shared through Redis, admitted on leased slots: rarely a round trip)
  gw-local a gateway started here with TASK_LIMIT_SCOPE=local (no Redis on the hot path)
  gw-tornado a gateway started here with GATEWAY_FRONT=tornado: Tornado's HTTP server for
           every request, without the lean front (gateway/front.py), for comparison
  nginx    Debian's nginx, started here on a free port with a temporary config, proxying
           /authen/ to the same two instances with keep-alive upstream connections and
           an access log (the gateway writes one too); skipped with a message when the
           nginx binary is missing.
  express  the original design's gateway (Node, Express + axios, an INCR/DECR task counter
           per request in the stack's plain Redis; bench/peers/express-gateway/), started
           here on a free port, proxying /authen/ round robin to the same two instances with
           keep-alive agents; ``npm ci`` runs first when its node_modules is missing; skipped
           with a message when node or npm is missing.

The "cpu us/req" column is the CPU time of the serving process(es) (the proxy; for
"direct", authen itself) per request in the throughput run (needs psutil): it varies far
less than req/s on a machine shared with other work.

Each target gets a throughput run (``--connections`` concurrent keep-alive connections)
and a latency run (one connection, so p50 shows what a hop adds, not queueing). The load
generator is ``wrk`` when installed (``apt-get install wrk``), else a bounded asyncio
loop over aiohttp keep-alive connections.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stack.layout import Layout, service_env  # noqa: E402


@dataclass
class Result:
    name: str
    mode: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    tool: str
    # CPU time the serving process (the proxy; for "direct", authen itself) spent per
    # request: steadier than req/s on a machine shared with other work.
    cpu_us: float | None = None


def listener_pids(port: int) -> list[int]:
    """Processes holding the socket that listens on ``port`` (nginx: master and workers)."""
    try:
        import psutil
    except ImportError:
        return []
    pids = {
        c.pid
        for c in psutil.net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid
    }
    return sorted(pids)


def cpu_seconds(pids: list[int]) -> float | None:
    try:
        import psutil

        total = 0.0
        for pid in pids:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        return total if pids else None
    except (ImportError, OSError):
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- load generators -------------------------------------------------------------------
_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not m:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def run_wrk(url: str, connections: int, duration_s: float) -> tuple[float, float, float, int]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{int(duration_s)}s", "--latency", url],
        capture_output=True,
        text=True,
        timeout=duration_s + 30,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return rps, p50, p99, errors


async def _asyncio_load(url: str, connections: int, duration_s: float) -> tuple[float, float, float, int]:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration_s
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    async with http.get(url) as r:
                        await r.read()
                        if r.status != 200:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return len(latencies) / elapsed, q[49] * 1000, q[98] * 1000, errors


def load(url: str, connections: int, duration_s: float) -> tuple[tuple[float, float, float, int], str]:
    if shutil.which("wrk"):
        return run_wrk(url, connections, duration_s), "wrk"
    return asyncio.run(_asyncio_load(url, connections, duration_s)), "asyncio+aiohttp"


# -- nginx -----------------------------------------------------------------------------
NGINX_CONF = """
worker_processes {workers};
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream authen {{
        {servers}
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port};
        location /authen/ {{
            proxy_pass http://authen/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


class Nginx:
    def __init__(self, upstreams: list[str], workers: int) -> None:
        self.binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        self.upstreams = upstreams
        self.workers = workers
        self.port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        assert self.binary is not None
        self.tmp.chmod(0o777)
        conf = self.tmp / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                workers=self.workers,
                tmp=self.tmp,
                port=self.port,
                servers="\n        ".join(f"server {u};" for u in self.upstreams),
            )
        )
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf), "-p", str(self.tmp), "-e", str(self.tmp / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return f"http://127.0.0.1:{self.port}"
            time.sleep(0.05)
        raise RuntimeError("nginx did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


class LocalGateway:
    """A gateway process of the bench's own, joined to the running stack."""

    def __init__(self, layout: Layout, **env: str) -> None:
        self.port = free_port()
        self.env = {**os.environ, **service_env(layout), "PORT": str(self.port), **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parent.parent,
        )
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                check(url + "/authen/utilities/status")
                return url
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the bench's gateway did not become ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


class ExpressGateway:
    """The original design's Express gateway (bench/peers/express-gateway/), one node process."""

    DIR = Path(__file__).resolve().parent / "peers" / "express-gateway"

    def __init__(self, layout: Layout, upstreams: list[str]) -> None:
        self.node = shutil.which("node")
        self.npm = shutil.which("npm")
        self.port = free_port()
        self.env = {
            **os.environ,
            "PORT": str(self.port),
            "AUTHEN_UPSTREAMS": ",".join(upstreams),
            "REDIS_URL": layout.redis_url,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkstemp(prefix="bench-express-", suffix=".log")[1])

    def missing(self) -> str | None:
        """Why this target cannot run here, or None."""
        if self.node is None or self.npm is None:
            return "node/npm not installed (apt-get install -y nodejs npm)"
        return None

    def install(self) -> None:
        """``npm ci`` from the committed lock file, once: node_modules is not committed."""
        if (self.DIR / "node_modules").is_dir():
            return
        assert self.npm is not None
        print("express: node_modules missing; running npm ci")
        done = subprocess.run(
            [self.npm, "ci", "--no-audit", "--no-fund"], cwd=self.DIR, capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            raise RuntimeError(f"npm ci failed: {done.stderr.strip()[-500:]}")

    def start(self) -> str:
        assert self.node is not None
        self.install()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [self.node, "server.js"],
                cwd=self.DIR,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}: {self.log.read_text()[-500:]}")
            try:
                check(url + "/status")
                return url
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the express gateway did not become ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.unlink(missing_ok=True)


# -- main ------------------------------------------------------------------------------
def check(url: str) -> None:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        if r.status != 200:
            raise RuntimeError(f"{url} answered {r.status}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--offset", type=int, default=int(os.environ.get("PORT_OFFSET", "0")))
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per throughput run")
    ap.add_argument("--latency-duration", type=float, default=5.0, help="seconds per one-connection run")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument(
        "--nginx-workers", type=int, default=1, help="nginx worker processes (1: one process, like the gateway)"
    )
    ap.add_argument(
        "--state-dir",
        default=os.environ.get("STACK_DIR", ".stack"),
        help="the stack's state folder (keys for the bench's own gateway)",
    )
    args = ap.parse_args()

    layout = Layout(Path(args.state_dir), args.offset)
    authen = [f"127.0.0.1:{p}" for p in layout.ports("authen")]
    targets = {
        "direct": f"http://{authen[0]}/utilities/status",
        "gateway": f"{layout.gateway_url}/authen/utilities/status",
    }
    for url in targets.values():
        check(url)
    own_gateways = {
        "gw-local": LocalGateway(layout, TASK_LIMIT_SCOPE="local"),
        "gw-tornado": LocalGateway(layout, GATEWAY_FRONT="tornado"),
    }
    for name, own in own_gateways.items():
        try:
            targets[name] = own.start() + "/authen/utilities/status"
        except (RuntimeError, OSError) as e:
            print(f"{name}: could not start ({e}); skipping it")
    nginx = Nginx(authen, args.nginx_workers)
    if nginx.binary is None:
        print("nginx: not installed (apt-get install -y nginx); skipping the nginx target")
    else:
        try:
            targets["nginx"] = nginx.start() + "/authen/utilities/status"
            check(targets["nginx"])
        except (RuntimeError, OSError) as e:
            print(f"nginx: could not start ({e}); skipping the nginx target")
            targets.pop("nginx", None)

    express = ExpressGateway(layout, authen)
    if (why := express.missing()) is not None:
        print(f"express: {why}; skipping the express target")
    else:
        try:
            targets["express"] = express.start() + "/authen/utilities/status"
            check(targets["express"])
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            print(f"express: could not start ({e}); skipping the express target")
            targets.pop("express", None)

    results: list[Result] = []
    try:
        for name, url in targets.items():
            load(url, args.connections, 2)  # warm-up: connections, caches, JIT-less but warm
            pids = listener_pids(int(url.split(":")[2].split("/")[0]))
            cpu0, t0 = cpu_seconds(pids), time.monotonic()
            (rps, p50, p99, err), tool = load(url, args.connections, args.duration)
            cpu1, t1 = cpu_seconds(pids), time.monotonic()
            cpu_us = (cpu1 - cpu0) / (rps * (t1 - t0)) * 1e6 if cpu0 is not None and cpu1 is not None and rps else None
            results.append(Result(name, f"c={args.connections}", rps, p50, p99, err, tool, cpu_us))
            (rps1, p50_1, p99_1, err1), tool = load(url, 1, args.latency_duration)
            results.append(Result(name, "c=1", rps1, p50_1, p99_1, err1, tool))
    finally:
        express.stop()
        nginx.stop()
        for own in own_gateways.values():
            own.stop()

    print(f"\nGET /authen/utilities/status ({results[0].tool}; {os.cpu_count()} cores shared with the stack)")
    print(f"{'target':<10} {'mode':<6} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'cpu us/req':>11}")
    for r in results:
        cpu = f"{r.cpu_us:>11.0f}" if r.cpu_us is not None else f"{'':>11}"
        print(f"{r.name:<10} {r.mode:<6} {r.rps:>9.0f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.errors:>7} {cpu}")
    by = {(r.name, r.mode): r for r in results}
    mode = f"c={args.connections}"
    if ("nginx", mode) in by:
        n = by[("nginx", mode)]
        direct_p50 = by[("direct", "c=1")].p50_ms
        print(f"\nnginx adds {by[('nginx', 'c=1')].p50_ms - direct_p50:+.2f} ms at p50 (c=1)")
        for name in ("gateway", "gw-local", "gw-tornado"):
            if (name, mode) in by:
                g = by[(name, mode)]
                print(
                    f"{name}: throughput {100 * g.rps / n.rps:.0f}% of nginx's (goal >= 80%), "
                    f"adds {by[(name, 'c=1')].p50_ms - direct_p50:+.2f} ms at p50 (c=1; goal < 0.3 ms)"
                )
    if ("express", mode) in by:
        e = by[("express", mode)]
        for name in ("gateway", "gw-local", "gw-tornado"):
            if (name, mode) in by:
                g = by[(name, mode)]
                cpu = (
                    f", {g.cpu_us / e.cpu_us:.2f}x its CPU per request"
                    if g.cpu_us is not None and e.cpu_us is not None
                    else ""
                )
                print(f"{name}: throughput {g.rps / e.rps:.2f}x the express gateway's{cpu}")


if __name__ == "__main__":
    main()
