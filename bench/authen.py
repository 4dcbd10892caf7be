"""authen benchmark: reads from the replicas vs the primary only, and sign-ins per second.

Needs a running stack. By default it uses a ``make up`` stack (port offset from
``PORT_OFFSET``, default 0); ``--start-stack`` starts its own with the real launcher
(under a temporary folder, at ``--offset``, default 3500) and stops it afterwards.

It starts two extra authen instances on free ports, identical except for
``AUTHEN_REPLICA_URLS`` (the stack's two replicas vs empty = the primary serves reads),
both outside discovery so no gateway routes to them, and measures each in turn with a
keep-alive HTTP/1.1 load generator (``--concurrency`` connections, ``--seconds`` each,
``--rounds`` alternating rounds):

* ``GET /list/employee`` (a shop of ``--employees`` barbers) and ``GET /utilities/check``;
* ``POST /authen/signin`` (argon2id verification dominates) on the replica instance.

Prints requests/s, p50 and p99 latencies. The load generator shares the machine's cores
with PostgreSQL and the service, so figures are comparative, not absolute.

    .venv/bin/python bench/authen.py [--start-stack] [--seconds 5] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.internal import SERVICE_TOKEN_HEADER, read_secret  # noqa: E402
from stack.layout import Layout, service_env, signing_env  # noqa: E402


# -- a minimal keep-alive HTTP/1.1 client (low overhead, so the server is what we measure) --
class Conn:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"", headers: str = "") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n{headers}"
        if body:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        assert self.reader is not None
        status_line = await self.reader.readline()
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        return int(status_line.split()[1]), payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def load(
    port: int, method: str, paths: list[tuple[str, bytes]], seconds: float, concurrency: int
) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def worker(i: int) -> None:
        nonlocal errors
        conn = Conn("127.0.0.1", port)
        n = i
        try:
            while time.monotonic() < deadline:
                path, body = paths[n % len(paths)]
                n += concurrency
                t0 = time.perf_counter()
                code, _ = await conn.request(method, path, body)
                latencies.append(time.perf_counter() - t0)
                if code != 200:
                    errors += 1
        finally:
            conn.close()

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.monotonic() - started
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
        "errors": errors,
    }


# -- processes ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_http(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = Conn("127.0.0.1", port)
            code, _ = await conn.request("GET", "/utilities/status")
            conn.close()
            if code == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit(f"nothing healthy on port {port} after {timeout}s")


def start_authen(env: dict[str, str], port: int, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    full = {
        **os.environ,
        **env,
        "PORT": str(port),
        "DISCOVERY_URL": "",
        "ENABLE_SLEEPY": "0",
        "LOG_LEVEL": "WARNING",
        **extra,
    }
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "authen"],
            cwd=ROOT,
            env=full,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


async def call_json(port: int, method: str, path: str, body: Any = None, headers: str = "") -> tuple[int, Any]:
    conn = Conn("127.0.0.1", port)
    try:
        code, raw = await conn.request(method, path, json.dumps(body).encode() if body is not None else b"", headers)
    finally:
        conn.close()
    return code, json.loads(raw) if raw else None


def fmt(name: str, r: dict[str, float]) -> str:
    return (
        f"  {name:<34} {r['rps']:8.1f} req/s   p50 {r['p50_ms']:7.2f} ms   p99 {r['p99_ms']:7.2f} ms"
        f"   ({int(r['requests'])} requests, {int(r['errors'])} non-200)"
    )


async def run(args: argparse.Namespace, layout: Layout) -> None:
    env = {**service_env(layout), **signing_env(layout)}
    logdir = Path(tempfile.mkdtemp(prefix="bench-authen-"))
    rep_port, pri_port = free_port(), free_port()
    procs = [
        start_authen(env, rep_port, logdir / "replicas.log"),
        start_authen(env, pri_port, logdir / "primary-only.log", AUTHEN_REPLICA_URLS=""),
    ]
    try:
        await asyncio.gather(wait_http(rep_port), wait_http(pri_port))
        # A small shop: --employees barbers and one customer to look up.
        password = "bench password"
        users = []
        for i in range(args.employees + 1):
            name = f"bench_{uuid.uuid4().hex[:10]}"
            code, body = await call_json(
                rep_port,
                "POST",
                "/authen/signup",
                {
                    "username": name,
                    "password": password,
                    "first_name": "Bench",
                    "last_name": str(i),
                    "type": "employee" if i < args.employees else "customer",
                },
            )
            assert code == 201, body
            users.append((name, body["user_id"]))
        ids = [uid for _, uid in users]
        # Let the replicas replay the sign-ups so reads route to them.
        await asyncio.sleep(1.0)

        # Status details (hashing parameters, reads served) need the service credential.
        credential = f"{SERVICE_TOKEN_HEADER}: {read_secret(layout.service_secret)}\r\n"
        _, status = await call_json(rep_port, "GET", "/utilities/status", headers=credential)
        print(f"argon2id: {status['password_hashing']}  concurrency {args.concurrency}, {args.seconds:g}s per run")
        print(f"employees in the shop: {args.employees} (plus earlier sign-ups in this database)")
        checks = [(f"/utilities/check?user_id={uid}", b"") for uid in ids]
        lists = [("/list/employee", b"")]
        # Alternate the two instances, so drift in the machine's load does not favour one.
        for rnd in range(1, args.rounds + 1):
            for label, port in (("replicas", rep_port), ("primary only", pri_port)):
                _, st0 = await call_json(port, "GET", "/utilities/status", headers=credential)
                r_list = await load(port, "GET", lists, args.seconds, args.concurrency)
                r_check = await load(port, "GET", checks, args.seconds, args.concurrency)
                _, st1 = await call_json(port, "GET", "/utilities/status", headers=credential)
                served = {k: v - st0["database"]["reads"][k] for k, v in st1["database"]["reads"].items()}
                print(f"round {rnd}, reading from {label}: reads served {served}")
                print(fmt("GET /list/employee", r_list))
                print(fmt("GET /utilities/check", r_check))

        signins = [("/authen/signin", json.dumps({"username": n, "password": password}).encode()) for n, _ in users]
        for conc in sorted({1, args.signin_concurrency}):
            r = await load(rep_port, "POST", signins, args.seconds, conc)
            print(fmt(f"POST /authen/signin (concurrency {conc})", r))

        # 401 timing: a wrong password for a real user vs a user that does not exist
        # (4 tries per user, under the guard's limit of 5).
        timings: dict[str, list[float]] = {"wrong password": [], "unknown user": []}
        for _ in range(4):
            for name, _uid in users:
                for kind, who in (("wrong password", name), ("unknown user", f"ghost_{uuid.uuid4().hex[:10]}")):
                    t0 = time.perf_counter()
                    code, _ = await call_json(
                        rep_port, "POST", "/authen/signin", {"username": who, "password": "not the password"}
                    )
                    timings[kind].append(time.perf_counter() - t0)
                    assert code == 401, code
        print(
            "  401 latency, median: "
            + ", ".join(f"{k} {statistics.median(v) * 1000:.2f} ms" for k, v in timings.items())
        )
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start-stack", action="store_true", help="start a stack instead of using a running one")
    parser.add_argument("--offset", type=int, default=3500, help="port offset of the stack --start-stack starts")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--signin-concurrency", type=int, default=4)
    parser.add_argument("--employees", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    if not args.start_stack:
        offset = int(os.environ.get("PORT_OFFSET", "0"))
        asyncio.run(run(args, Layout(ROOT / os.environ.get("STACK_DIR", ".stack"), offset)))
        return
    from tests.stackproc import StackProcess

    stack = StackProcess(args.offset)
    print(f"starting a stack at offset {args.offset} in {stack.state_dir} ...", flush=True)
    stack.start()
    try:
        asyncio.run(run(args, stack.layout))
    finally:
        stack.stop()
        stack.remove()


if __name__ == "__main__":
    main()
