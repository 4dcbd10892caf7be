"""Chat throughput and latency: senders on one chat instance, receivers on the other.

Against a running local stack (``make up``, or ``PORT_OFFSET=N python -m stack up``)::

    python bench/chat.py [--offset 0] [--chats 200] [--rates 1000,1500,2000] [--duration 10]

Setup: one customer and one employee per chat (signed up through authen), one chat per
pair. Every customer socket connects to chat instance 1 and every employee socket to
chat instance 2. For each offered rate, one process sends ``rate`` messages/s spread
evenly over the chats for ``duration`` seconds, and another process receives on the
other instance. A message carries its send time (CLOCK_MONOTONIC is shared by the
processes of one machine), so the receiver measures send -> delivery. Reported per
rate: messages offered, sent, stored (the sender's echo: stored in MongoDB), delivered
on the other instance, their rates, p50/p99/max latency, and whether every chat's seqs
arrived in order without gaps or repeats.

"Sustained" means: the sender kept the offered rate, every message was stored and
delivered, in order, and p99 stayed under 100 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tornado.httpclient import AsyncHTTPClient  # noqa: E402
from tornado.websocket import websocket_connect  # noqa: E402

from stack.layout import Layout  # noqa: E402

PAD = "x" * 60
P99_GOAL_S = 0.100


# -- setup -------------------------------------------------------------------------------
async def _call(method: str, url: str, body: Any = None, token: str | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    resp = await AsyncHTTPClient().fetch(
        url,
        method=method,
        headers=headers,
        body=json.dumps(body) if body is not None else ("" if method == "POST" else None),
        request_timeout=60,
        raise_error=False,
    )
    if resp.code >= 400:
        raise RuntimeError(f"{method} {url}: {resp.code} {resp.body[:200]!r}")
    return json.loads(resp.body)


async def _user(authen: str, type_: str, n: int, run: str) -> dict[str, Any]:
    username = f"bench_{run}_{type_[:1]}{n}"
    body = {
        "username": username,
        "password": "bench password",
        "first_name": f"B{n}",
        "last_name": type_.title(),
        "type": type_,
    }
    await _call("POST", authen + "/authen/signup", body)
    signed = await _call("POST", authen + "/authen/signin", {"username": username, "password": "bench password"})
    return {"id": signed["user_id"], "token": signed["token"]}


async def setup(layout: Layout, chats: int) -> list[dict[str, Any]]:
    authens = [f"http://127.0.0.1:{p}" for p in layout.ports("authen")]
    chat1 = f"http://127.0.0.1:{layout.port('chat', 0)}"
    run = uuid.uuid4().hex[:6]
    limit = asyncio.Semaphore(8)

    async def one(i: int) -> dict[str, Any]:
        async with limit:
            authen = authens[i % len(authens)]
            customer = await _user(authen, "customer", i, run)
            employee = await _user(authen, "employee", i, run)
            started = await _call("POST", f"{chat1}/chats/start?employee_id={employee['id']}", token=customer["token"])
            return {"chat_id": started["chat_id"], "customer": customer, "employee": employee}

    t0 = time.monotonic()
    pairs = await asyncio.gather(*(one(i) for i in range(chats)))
    print(f"setup: {chats} chats, {2 * chats} users in {time.monotonic() - t0:.1f}s", flush=True)
    return list(pairs)


# -- worker processes --------------------------------------------------------------------
async def _connect_all(base: str, pairs: list[dict[str, Any]], who: str) -> list[Any]:
    limit = asyncio.Semaphore(50)

    async def one(p: dict[str, Any]) -> Any:
        async with limit:
            url = f"{base}/chat/{p['chat_id']}?token={p[who]['token']}&since=0"
            return await websocket_connect(url, max_message_size=1 << 20)

    return await asyncio.gather(*(one(p) for p in pairs))


def receiver_main(base: str, pairs: list[dict[str, Any]], conn: Any) -> None:
    """Employee sockets on instance 2: record send -> delivery per phase."""

    async def main() -> None:
        sockets = await _connect_all(base, pairs, "employee")
        latencies: dict[str, list[float]] = {}
        last_seq = [0] * len(sockets)
        order_errors = [0]

        async def read(i: int, ws: Any) -> None:
            while True:
                raw = await ws.read_message()
                if raw is None:
                    order_errors[0] += 1_000_000  # a socket dropped: shows up in the report
                    return
                now = time.monotonic()
                msg = json.loads(raw)
                if msg.get("type") != "chat_message":
                    continue
                if msg["seq"] != last_seq[i] + 1:
                    order_errors[0] += 1
                last_seq[i] = msg["seq"]
                phase, _, sent, _ = msg["message"].split("|", 3)
                latencies.setdefault(phase, []).append(now - float(sent))

        readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(sockets)]
        conn.send("ready")
        loop = asyncio.get_running_loop()
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            if cmd == "stop":
                break
            phase = cmd
            conn.send({"latencies": latencies.pop(phase, []), "order_errors": order_errors[0]})
        for r in readers:
            r.cancel()

    asyncio.run(main())


def sender_main(base: str, pairs: list[dict[str, Any]], conn: Any) -> None:
    """Customer sockets on instance 1: send at the offered rate, count stored echoes."""

    async def main() -> None:
        sockets = await _connect_all(base, pairs, "customer")
        echoes: dict[str, int] = {}
        store_lat: dict[str, list[float]] = {}
        errors: list[str] = []

        async def read(ws: Any) -> None:
            while True:
                raw = await ws.read_message()
                if raw is None:
                    errors.append("socket closed")
                    return
                msg = json.loads(raw)
                if msg.get("type") == "chat_message":
                    phase, _, sent, _ = msg["message"].split("|", 3)
                    echoes[phase] = echoes.get(phase, 0) + 1
                    store_lat.setdefault(phase, []).append(time.monotonic() - float(sent))
                elif msg.get("type") == "error":
                    errors.append(msg.get("code", "?"))

        readers = [asyncio.create_task(read(ws)) for ws in sockets]
        conn.send("ready")
        loop = asyncio.get_running_loop()
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            if cmd == "stop":
                break
            phase, rate, duration = cmd
            total = int(rate * duration)
            sent = 0
            t0 = time.monotonic()
            while sent < total:
                due = min(total, int((time.monotonic() - t0) * rate) + 1)
                while sent < due:
                    ws = sockets[sent % len(sockets)]
                    text = f"{phase}|{sent}|{time.monotonic():.6f}|{PAD}"
                    ws.write_message(json.dumps({"type": "chat_message", "message": text}))
                    sent += 1
                await asyncio.sleep(0.002)
            elapsed = time.monotonic() - t0
            conn.send({"sent": sent, "send_s": elapsed})
            # Then report stored echoes when asked (after the drain wait).
            await loop.run_in_executor(None, conn.recv)
            conn.send({"stored": echoes.pop(phase, 0), "errors": list(errors), "store_lat": store_lat.pop(phase, [])})
            errors.clear()
        for r in readers:
            r.cancel()

    asyncio.run(main())


# -- the driver ----------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> None:
    layout = Layout(Path("."), args.offset)
    pairs = asyncio.run(setup(layout, args.chats))
    ws1 = f"ws://127.0.0.1:{layout.port('chat', 0)}"
    ws2 = f"ws://127.0.0.1:{layout.port('chat', 1)}"
    ctx = mp.get_context("spawn")
    s_here, s_there = ctx.Pipe()
    r_here, r_there = ctx.Pipe()
    sender = ctx.Process(target=sender_main, args=(ws1, pairs, s_there), daemon=True)
    receiver = ctx.Process(target=receiver_main, args=(ws2, pairs, r_there), daemon=True)
    receiver.start()
    sender.start()
    assert r_here.recv() == "ready" and s_here.recv() == "ready"
    print(
        f"connected: {args.chats} sender sockets on :{layout.port('chat', 0)}, "
        f"{args.chats} receiver sockets on :{layout.port('chat', 1)}",
        flush=True,
    )
    print(
        f"{'offered/s':>9} {'sent/s':>8} {'stored':>7} {'delivered':>9} {'deliv/s':>8} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'order':>6} {'echo p50/p99':>13}  sustained"
    )
    if args.warmup > 0:
        # Not reported: the first seconds after setup pay for cold caches and connections.
        s_here.send(("warmup", 200, args.warmup))
        s_here.recv()
        time.sleep(1.0)
        r_here.send("warmup")
        r_here.recv()
        s_here.send("report")
        s_here.recv()
    best = 0
    for i, rate in enumerate(args.rates):
        phase = f"p{i}"
        s_here.send((phase, rate, args.duration))
        report = s_here.recv()
        sent, send_s = report["sent"], report["send_s"]
        # Let the tail arrive (bounded).
        deadline = time.monotonic() + args.drain
        time.sleep(min(1.0, args.drain))
        r_here.send(phase)
        got = r_here.recv()
        while len(got["latencies"]) < sent and time.monotonic() < deadline:
            time.sleep(0.5)
            r_here.send(phase)
            more = r_here.recv()
            got["latencies"] += more["latencies"]
            got["order_errors"] = more["order_errors"]
        s_here.send("report")
        stored = s_here.recv()
        lat = got["latencies"]
        delivered = len(lat)
        window = send_s + (max(lat) if lat else 0)
        p50, p99, worst = pct(lat, 0.50) * 1000, pct(lat, 0.99) * 1000, (max(lat) * 1000 if lat else float("nan"))
        kept_rate = sent / send_s >= 0.97 * rate
        ok = (
            kept_rate
            and stored["stored"] == sent
            and delivered == sent
            and got["order_errors"] == 0
            and p99 / 1000 < P99_GOAL_S
            and not stored["errors"]
        )
        if ok:
            best = max(best, rate)
        print(
            f"{rate:>9} {sent / send_s:>8.0f} {stored['stored']:>7} {delivered:>9} {delivered / window:>8.0f} "
            f"{p50:>7.1f} {p99:>7.1f} {worst:>7.1f} {'ok' if got['order_errors'] == 0 else 'BAD':>6} "
            f"{pct(stored['store_lat'], 0.5) * 1000:>6.1f}/{pct(stored['store_lat'], 0.99) * 1000:<6.1f}  "
            f"{'yes' if ok else 'no'}{'  errors: ' + ','.join(sorted(set(stored['errors']))) if stored['errors'] else ''}",
            flush=True,
        )
        if not ok and args.stop_on_fail:
            break
    s_here.send("stop")
    r_here.send("stop")
    sender.join(10)
    receiver.join(10)
    print(f"highest sustained rate: {best} messages/s" if best else "no rate sustained")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--offset", type=int, default=0, help="PORT_OFFSET of the running stack")
    parser.add_argument("--chats", type=int, default=200)
    parser.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 1500, 2000, 2500])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    parser.add_argument("--drain", type=float, default=10.0, help="seconds to wait for stragglers")
    parser.add_argument("--stop-on-fail", action="store_true")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds at 200 msg/s before measuring")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
