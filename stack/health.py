"""``stack status``: each component of a running stack with its health."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import redis.asyncio as aioredis
from pymongo import AsyncMongoClient

from stack import datatier
from stack.layout import Layout


async def _primary(layout: Layout) -> dict[str, Any]:
    async with await psycopg.AsyncConnection.connect(
        layout.pg_dsn("postgres"), connect_timeout=2, autocommit=True
    ) as conn:
        rows = await (
            await conn.execute(
                "SELECT application_name, state, sync_state, "
                "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn) AS lag_bytes, "
                "extract(epoch FROM replay_lag) AS replay_lag_s FROM pg_stat_replication ORDER BY 1"
            )
        ).fetchall()
        return {
            "healthy": True,
            "replication": [
                {
                    "replica": r[0],
                    "state": r[1],
                    "sync": r[2],
                    "lag_bytes": int(r[3] or 0),
                    "replay_lag_s": float(r[4] or 0),
                }
                for r in rows
            ],
        }


async def _replica(layout: Layout, index: int) -> dict[str, Any]:
    async with await psycopg.AsyncConnection.connect(
        layout.pg_dsn("postgres", index), connect_timeout=2, autocommit=True
    ) as conn:
        row = await (
            await conn.execute(
                "SELECT pg_is_in_recovery(), status, "
                "pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), "
                "pg_is_wal_replay_paused() "
                "FROM pg_stat_wal_receiver"
            )
        ).fetchone()
        if row is None:
            return {"healthy": True, "streaming": False}
        return {
            "healthy": True,
            "in_recovery": row[0],
            "receiver": row[1],
            "streaming": row[1] == "streaming",
            "unreplayed_bytes": int(row[2] or 0),
            "replay_paused": row[3],
        }


async def _cluster(layout: Layout) -> dict[str, Any]:
    port = layout.ports("redis_cluster")[0]
    info = await datatier.cluster_info(port)
    client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=2, decode_responses=True)
    try:
        shards = await client.execute_command("CLUSTER SLOTS")
    finally:
        await client.aclose()
    masters = []
    for shard in shards:
        start, end, master = shard[0], shard[1], shard[2]
        masters.append(
            {
                "slots": f"{start}-{end}",
                "master": f"{master[0]}:{master[1]}",
                "replicas": [f"{r[0]}:{r[1]}" for r in shard[3:]],
            }
        )
    return {
        "healthy": info.get("cluster_state") == "ok",
        "state": info.get("cluster_state"),
        "slots_ok": info.get("cluster_slots_ok"),
        "masters": sorted(masters, key=lambda m: m["slots"]),
    }


async def _mongo(layout: Layout) -> dict[str, Any]:
    client: AsyncMongoClient = AsyncMongoClient(layout.mongo_url, serverSelectionTimeoutMS=1500)
    try:
        return {"healthy": (await client.admin.command("ping")).get("ok") == 1}
    finally:
        await client.close()


async def _safe(coro: Any) -> dict[str, Any]:
    try:
        return await coro
    except Exception as e:  # a component that is down is reported, not fatal
        return {"healthy": False, "error": f"{type(e).__name__}: {e}"}


async def describe(layout: Layout, control_status: dict[str, Any]) -> dict[str, Any]:
    primary, r1, r2, cluster, mongo = await asyncio.gather(
        _safe(_primary(layout)),
        _safe(_replica(layout, 1)),
        _safe(_replica(layout, 2)),
        _safe(_cluster(layout)),
        _safe(_mongo(layout)),
    )
    return {
        "ready": control_status["ready"],
        "processes": control_status["processes"],
        "postgres": {"primary": primary, "replica-1": r1, "replica-2": r2},
        "redis_cluster": cluster,
        "mongo": mongo,
    }


def render(report: dict[str, Any]) -> str:
    lines = [f"stack ready: {report['ready']}", "processes:"]
    for name, p in report["processes"].items():
        lines.append(f"  {name:<20} {p['state']:<9} pid={p['pid']} restarts={p['restarts']} ports={p['ports']}")
    pg = report["postgres"]
    lines.append(
        f"postgres primary: {'healthy' if pg['primary'].get('healthy') else 'DOWN ' + pg['primary'].get('error', '')}"
    )
    for r in pg["primary"].get("replication", []):
        lines.append(f"  -> {r['replica']}: {r['state']}, lag {r['lag_bytes']} bytes / {r['replay_lag_s']:.3f}s")
    for key in ("replica-1", "replica-2"):
        r = pg[key]
        lines.append(
            f"postgres {key}: "
            + (
                f"streaming={r.get('streaming')} unreplayed={r.get('unreplayed_bytes')}B paused={r.get('replay_paused')}"
                if r.get("healthy")
                else "DOWN " + r.get("error", "")
            )
        )
    c = report["redis_cluster"]
    lines.append(
        f"redis cluster: state={c.get('state')} slots_ok={c.get('slots_ok')}"
        + ("" if c.get("healthy") else " " + c.get("error", ""))
    )
    for m in c.get("masters", []):
        lines.append(f"  master {m['master']} slots {m['slots']} replicas {', '.join(m['replicas'])}")
    lines.append(f"mongo: {'ok' if report['mongo'].get('healthy') else 'DOWN ' + report['mongo'].get('error', '')}")
    return "\n".join(lines)
