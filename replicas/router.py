"""Read/write routing over a PostgreSQL primary and its streaming replicas.

* Writes run in a transaction on the primary. After the commit the primary's WAL
  position is published as the shared high-water mark (:mod:`replicas.hwm`).
* Reads are balanced (round robin) over the replicas that are healthy, not lagging
  past ``max_lag_s`` and have replayed at least up to the high-water mark; otherwise
  they go to the primary. The only extra round trip on the read path is the GET of
  the mark: health, replay positions and lag come from a background monitor.
* The monitor's view is a lower bound of each replica's replay position (replay only
  moves forward), so a stale view can only send a read to the primary needlessly,
  never to a replica that lacks an acknowledged write.
* A read that fails because its node is unreachable is retried on the next node, so a
  replica that dies between two checks costs no error. When the primary is down, reads
  keep working from the replicas (the freshest first) and writes raise
  :class:`PrimaryUnavailable` (a 503).
* Believing the primary down must not outlive its return: a write that succeeds there
  marks it up, and a mark that rose since a read last failed on it proves some instance
  wrote there since, so reads try it again before any replica behind the mark.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from common.errors import DependencyUnavailable
from replicas.hwm import HighWaterMark, format_lsn

log = logging.getLogger("barber.replicas")

T = TypeVar("T")

# pg_current_wal_lsn() fails on a standby, hence the CASE (evaluated lazily for volatile calls).
_PRIMARY_SAFE_SQL = (
    "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN NULL "
    "ELSE (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint END"
)
# The replica's own view of its staleness: zero when it has replayed all it received,
# otherwise the age of the last transaction it replayed.
_REPLICA_SQL = """
SELECT pg_is_in_recovery(),
       (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint,
       (pg_last_wal_receive_lsn() - '0/0'::pg_lsn)::bigint,
       CASE WHEN pg_last_wal_receive_lsn() IS NULL
                 OR pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0
            ELSE COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp()), 0)
       END::float8,
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END
"""
# Written after COMMIT returns: the write position is then at or past the commit record
# (with synchronous_commit on, the default, the commit is flushed before it returns).
_WRITE_LSN_SQL = text("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")

# How long primary positions are remembered to measure replica lag against them.
_SAMPLE_HORIZON_S = 120.0


class PrimaryUnavailable(DependencyUnavailable):
    """Writes are refused: the primary is unreachable (or read-only)."""

    dependency = "postgresql-primary"


class NoReadableNode(DependencyUnavailable):
    """Neither the primary nor any replica could serve a read."""

    dependency = "postgresql"


def normalize_url(url: str) -> str:
    """SQLAlchemy URL with the psycopg 3 driver, whatever scheme the operator wrote."""
    u = make_url(url.strip())
    if u.drivername in ("postgresql", "postgres", "postgresql+psycopg2", "postgresql+asyncpg"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def split_urls(urls: str | list[str] | tuple[str, ...] | None) -> list[str]:
    if not urls:
        return []
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    return [normalize_url(u) for u in items if u.strip()]


def _sqlstate(e: BaseException) -> str | None:
    orig = getattr(e, "orig", e)
    return getattr(orig, "sqlstate", None)


def describe(e: BaseException) -> str:
    """One line about an error, without the SQL or parameters SQLAlchemy appends."""
    text_ = str(getattr(e, "orig", None) or e).strip()
    return text_.splitlines()[0] if text_ else type(e).__name__


def is_node_failure(e: BaseException) -> bool:
    """True when the node itself is unreachable, as opposed to a failed statement."""
    if isinstance(e, PoolTimeout):
        return False  # our own pool is exhausted: the node is busy, not gone
    if isinstance(e, OSError):  # TimeoutError included
        return True
    if isinstance(e, DBAPIError) and e.connection_invalidated:
        return True
    if isinstance(e, (OperationalError, InterfaceError, psycopg.OperationalError, psycopg.InterfaceError)):
        state = _sqlstate(e)
        # No SQLSTATE: a client-side connection failure. 08: connection exceptions.
        # 57P: the server is shutting down or crashed.
        return state is None or state.startswith(("08", "57P"))
    return False


def is_retryable_read_error(e: BaseException) -> bool:
    """A read failure worth retrying elsewhere: node down, query cancelled, recovery conflict."""
    if is_node_failure(e) or isinstance(e, PoolTimeout):
        return True
    state = _sqlstate(e)
    # 57014 statement timeout, 40001 serialization failure (hot-standby conflict).
    return isinstance(e, (OperationalError, DBAPIError)) and state in ("57014", "40001", "25006")


class Node:
    """One PostgreSQL server: its pools and what the monitor last saw of it."""

    def __init__(
        self,
        name: str,
        role: str,
        url: str,
        *,
        connect_timeout_s: float,
        statement_timeout_ms: int,
        pool_size: int,
        max_overflow: int,
        pool_timeout_s: float,
    ) -> None:
        self.name = name
        self.role = role  # "primary" | "replica"
        self.url = normalize_url(url)
        u = make_url(self.url)
        self.address = f"{u.host}:{u.port or 5432}/{u.database}"
        # libpq takes whole seconds and treats anything under 2 as 2.
        self._connect_timeout = max(2, math.ceil(connect_timeout_s))
        self.dsn = u.set(drivername="postgresql").render_as_string(hide_password=False)
        connect_args: dict[str, Any] = {
            "connect_timeout": self._connect_timeout,
            "options": f"-c statement_timeout={int(statement_timeout_ms)}",
        }
        common = dict(
            pool_size=pool_size, max_overflow=max_overflow, pool_timeout=pool_timeout_s, connect_args=connect_args
        )
        # Reads: autocommit (no BEGIN/ROLLBACK round trips) and no pre-ping (the monitor
        # empties the pool when a node comes back, and a failed read is retried elsewhere).
        self.read_engine: AsyncEngine = create_async_engine(self.url, isolation_level="AUTOCOMMIT", **common)
        # Writes cannot be retried blindly, so their pool checks a connection before use.
        self.write_engine: AsyncEngine | None = (
            create_async_engine(self.url, pool_pre_ping=True, **common) if role == "primary" else None
        )
        self.healthy = False
        self.checked = False
        self.in_recovery: bool | None = None
        self.lsn: int | None = None  # primary: current WAL position; replica: replayed position
        self.receive_lsn: int | None = None
        self.reported_lag_s: float | None = None
        self.lag_s: float | None = None
        self.lag_bytes: int | None = None
        self.replay_paused = False
        self.lagging = False
        self.reads = 0
        self.outages = 0
        self.last_error: str | None = None
        self.checked_at: float | None = None
        self._monitor_conn: psycopg.AsyncConnection | None = None

    # -- state changes -------------------------------------------------------------
    def mark_down(self, reason: str) -> None:
        if self.healthy or not self.checked:
            log.warning("database node %s (%s) is down: %s", self.name, self.address, reason)
            self.outages += 1  # outages, not failed probes
        self.healthy = False
        self.checked = True
        self.last_error = reason

    async def mark_up(self) -> None:
        if not self.healthy:
            if self.checked:
                log.info("database node %s (%s) is back", self.name, self.address)
            # Connections pooled before it went away are dead: start afresh.
            await self.read_engine.dispose()
            if self.write_engine is not None:
                await self.write_engine.dispose()
        self.healthy = True
        self.checked = True
        self.last_error = None

    async def _close_monitor_conn(self) -> None:
        conn, self._monitor_conn = self._monitor_conn, None
        if conn is not None:
            try:
                await conn.close()
            except (psycopg.Error, OSError):
                pass

    async def probe(self, timeout_s: float) -> tuple[Any, ...]:
        """One health query on the monitor's own connection (reconnecting if needed)."""
        async with asyncio.timeout(timeout_s):
            if self._monitor_conn is None or self._monitor_conn.closed:
                self._monitor_conn = await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=self._connect_timeout
                )
            sql = _PRIMARY_SAFE_SQL if self.role == "primary" else _REPLICA_SQL
            cur = await self._monitor_conn.execute(sql)
            row = await cur.fetchone()
        assert row is not None
        return tuple(row)

    def view(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "address": self.address,
            "healthy": self.healthy,
            "lsn": format_lsn(self.lsn),
            "lag_s": None if self.lag_s is None else round(self.lag_s, 3),
            "lag_bytes": self.lag_bytes,
            "lagging": self.lagging if self.role == "replica" else None,
            "replay_paused": self.replay_paused if self.role == "replica" else None,
            "reads": self.reads,
            "outages": self.outages,
            "last_error": self.last_error,
            "checked_s_ago": None if self.checked_at is None else round(time.monotonic() - self.checked_at, 3),
        }

    async def close(self) -> None:
        await self._close_monitor_conn()
        await self.read_engine.dispose()
        if self.write_engine is not None:
            await self.write_engine.dispose()


class ReadWriteRouter:
    """Route writes to the primary and reads to fresh replicas (see module docstring)."""

    def __init__(
        self,
        primary_url: str,
        replica_urls: str | list[str] | None = None,
        *,
        redis: Redis | None = None,
        hwm_key: str = "replicas:wal_hwm",
        max_lag_s: float = 5.0,
        check_interval_s: float = 0.2,
        check_timeout_s: float = 2.0,
        connect_timeout_s: float = 2.0,
        statement_timeout_ms: int = 5000,
        pool_size: int = 5,
        max_overflow: int = 5,
        pool_timeout_s: float = 5.0,
    ) -> None:
        opts: dict[str, Any] = dict(
            connect_timeout_s=connect_timeout_s,
            statement_timeout_ms=statement_timeout_ms,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout_s=pool_timeout_s,
        )
        self.primary = Node("primary", "primary", primary_url, **opts)
        self.replicas = [
            Node(f"replica-{i + 1}", "replica", url, **opts) for i, url in enumerate(split_urls(replica_urls))
        ]
        self.hwm = HighWaterMark(redis, hwm_key)
        self.max_lag_s = max_lag_s
        self.check_interval_s = check_interval_s
        self.check_timeout_s = check_timeout_s
        self.degraded_reads = 0  # reads served by a replica behind the mark (primary down)
        # The mark at which a read last failed to reach the primary (None: none failed
        # since it was last seen up). A higher mark means a write committed there since.
        self._primary_failed_at_hwm: int | None = None
        # When a committed write's position could not be read (None: every one was).
        self._unpublished_since: float | None = None
        self.write_position_sql = _WRITE_LSN_SQL
        self._rr = itertools.count()
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.checked = asyncio.Event()

    @property
    def nodes(self) -> list[Node]:
        return [self.primary, *self.replicas]

    # -- background monitor ----------------------------------------------------------
    async def start(self, initial_timeout_s: float = 3.0) -> None:
        """Start the monitor and wait (bounded) for its first round, so early reads route well."""
        self._task = asyncio.create_task(self._monitor(), name="replicas-monitor")
        try:
            await asyncio.wait_for(self.checked.wait(), initial_timeout_s)
        except TimeoutError:
            log.warning("database nodes not checked within %.1fs; continuing", initial_timeout_s)

    async def close(self) -> None:
        if self._task is not None:
            # Let a probe in flight finish (cancelling it mid-query makes psycopg cancel
            # the query on the server and log about it); cancel only if it hangs.
            self._stopping.set()
            try:
                await asyncio.wait_for(self._task, self.check_timeout_s + 1)
            except (TimeoutError, asyncio.CancelledError):
                pass
            self._task = None
        for node in self.nodes:
            await node.close()

    async def _monitor(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the monitor must survive anything; the next round retries
                log.exception("database monitor round failed")
            self.checked.set()
            pause = max(0.0, self.check_interval_s - (time.monotonic() - started))
            try:
                await asyncio.wait_for(self._stopping.wait(), pause)
            except TimeoutError:
                pass

    async def check_once(self) -> None:
        """Probe every node concurrently, then derive lag and maintain the shared mark."""
        round_started = time.monotonic()
        await asyncio.gather(*(self._check(node) for node in self.nodes))
        now = time.monotonic()
        unpublished = self._unpublished_since
        probed = self.primary.checked_at
        if (
            unpublished is not None
            and unpublished < round_started
            and probed is not None
            and probed >= round_started
            and self.primary.healthy
            and self.primary.lsn is not None
        ):
            # This round's probe of the primary began after that commit: its position covers it.
            await self.hwm.publish(self.primary.lsn)
            self._unpublished_since = None
        if self.primary.healthy and self.primary.lsn is not None:
            if not self._samples or self._samples[-1][1] != self.primary.lsn:
                self._samples.append((now, self.primary.lsn))
            while self._samples and now - self._samples[0][0] > _SAMPLE_HORIZON_S:
                self._samples.popleft()
        for node in self.replicas:
            self._derive_lag(node, now)
        await self.hwm.maintain(self.primary.lsn if self.primary.healthy else None)

    async def _check(self, node: Node) -> None:
        try:
            row = await node.probe(self.check_timeout_s)
        except (psycopg.Error, OSError, TimeoutError) as e:
            await node._close_monitor_conn()
            node.mark_down(describe(e))
            return
        node.checked_at = time.monotonic()
        if node.role == "primary":
            in_recovery, lsn = row
            node.in_recovery = bool(in_recovery)
            if in_recovery:
                node.mark_down("the primary is in recovery (read-only)")
                return
            node.lsn = int(lsn)
        else:
            in_recovery, replay, receive, reported_lag, paused = row
            node.in_recovery = bool(in_recovery)
            if not in_recovery:
                # A promoted standby no longer follows our primary: never read from it.
                node.mark_down("not in recovery (promoted?), not following the primary")
                return
            node.lsn = None if replay is None else int(replay)
            node.receive_lsn = None if receive is None else int(receive)
            node.reported_lag_s = float(reported_lag or 0.0)
            node.replay_paused = bool(paused)
        await node.mark_up()

    def _derive_lag(self, node: Node, now: float) -> None:
        """Lag = how long ago the primary first had WAL the replica still lacks, from our
        samples of the primary's position (this also catches a replica whose WAL receiver
        lost the primary and so believes it is up to date).

        The replica's own estimate (the age of the last transaction it replayed, while it
        has WAL left to replay) is used only when the gap began before our oldest sample:
        on a quiet primary it counts the idle time since the last commit, so a replica
        caught replaying a checkpoint record would look seconds behind for one probe.
        """
        if not node.healthy or node.lsn is None:
            node.lag_s = None
            node.lag_bytes = None
            return
        behind_s = 0.0
        gap_predates_samples = not self._samples
        for i, (t, lsn) in enumerate(self._samples):
            if lsn > node.lsn:
                behind_s = now - t
                gap_predates_samples = i == 0
                break
        node.lag_s = max(node.reported_lag_s or 0.0, behind_s) if gap_predates_samples else behind_s
        node.lag_bytes = max(0, self.primary.lsn - node.lsn) if self.primary.lsn is not None else None
        lagging = node.lag_s > self.max_lag_s
        if lagging != node.lagging:
            node.lagging = lagging
            if lagging:
                log.warning(
                    "replica %s lags %.1fs behind (limit %.1fs): reads avoid it", node.name, node.lag_s, self.max_lag_s
                )
            else:
                log.info("replica %s caught up (lag %.1fs)", node.name, node.lag_s)

    # -- routing ---------------------------------------------------------------------
    def fresh_replicas(self, hwm: int | None) -> list[Node]:
        """Replicas that may serve a read at mark ``hwm`` (None: unknown, so none may)."""
        if hwm is None:
            return []
        return [
            r
            for r in self.replicas
            if r.healthy and r.lsn is not None and r.lsn >= hwm and r.lag_s is not None and r.lag_s <= self.max_lag_s
        ]

    def read_plan(self, hwm: int | None) -> list[Node]:
        """Nodes to try for one read, in order."""
        fresh = self.fresh_replicas(hwm)
        if fresh:
            start = next(self._rr) % len(fresh)
            fresh = fresh[start:] + fresh[:start]
        stale = sorted(
            (r for r in self.replicas if r.healthy and r not in fresh), key=lambda r: r.lsn or 0, reverse=True
        )
        down = [r for r in self.replicas if not r.healthy]
        if self.primary.healthy or not self.primary.checked or self._primary_may_be_back(hwm):
            return [*fresh, self.primary, *stale, *down]
        # The primary is known down: the freshest replicas serve (a degraded read) before
        # we spend a connect attempt on it; nodes believed down are the last resort.
        return [*fresh, *stale, self.primary, *down]

    def _primary_may_be_back(self, hwm: int | None) -> bool:
        """While the primary is believed down, whether a read should still try it first.

        Yes until one read failed there, and again once the mark rose past the mark of
        that failure: some instance has committed on the primary since, and a replica
        behind the mark could return state older than that acknowledged write.
        """
        if hwm is None:
            return False
        failed_at = self._primary_failed_at_hwm
        return failed_at is None or hwm > failed_at

    async def read(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``fn(conn)`` (read-only, autocommit) on the best node; retry on another if
        that node fails. ``fn`` may therefore run more than once: keep it side-effect free."""
        # Without replicas there is nothing to choose: skip the mark's round trip.
        # An acknowledged write whose position is not published yet: unknown, as if Redis were down.
        hwm = await self.hwm.current() if self.replicas and self._unpublished_since is None else None
        plan = self.read_plan(hwm)
        fresh = set(map(id, self.fresh_replicas(hwm)))
        last: BaseException | None = None
        for node in plan:
            try:
                result = await self._read_on(node, fn)
            except (DBAPIError, OSError, PoolTimeout) as e:
                if not is_retryable_read_error(e):
                    raise
                last = e
                if is_node_failure(e):
                    node.mark_down(describe(e))
                    if node is self.primary:
                        self._primary_failed_at_hwm = hwm if hwm is not None else 0
                else:
                    log.warning("read on %s failed (%s); trying another node", node.name, describe(e))
                continue
            node.reads += 1
            if node is self.primary:
                self._primary_failed_at_hwm = None
            if node.role == "replica" and id(node) not in fresh:
                self.degraded_reads += 1
                log.warning("read served by %s, which may be behind the last write (primary unavailable)", node.name)
            return result
        raise NoReadableNode("the user database is unavailable: no node could serve the read") from last

    async def _read_on(self, node: Node, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """``fn`` on one node. A pooled connection that died (its server restarted since
        it was opened) costs one more try on a new connection, not the node: SQLAlchemy
        drops the pool's older connections on a disconnect, and a node that has just come
        back, not yet seen by the monitor, must not be passed over for staler replicas."""
        checked_out = False
        try:
            async with node.read_engine.connect() as conn:
                checked_out = True
                return await fn(conn)
        except (DBAPIError, OSError) as e:
            if not (checked_out and is_node_failure(e)):
                raise
            log.info("a pooled connection to %s had died (%s); trying a new one", node.name, describe(e))
        async with node.read_engine.connect() as conn:
            return await fn(conn)

    @contextlib.asynccontextmanager
    async def on_primary(self) -> AsyncIterator[AsyncConnection]:
        """A connection to the primary, for work that runs its own transactions (prepared
        transactions); failures of the primary itself become :class:`PrimaryUnavailable`."""
        engine = self.primary.write_engine
        assert engine is not None
        try:
            async with engine.connect() as conn:
                yield conn
        except (DBAPIError, OSError, PoolTimeout) as e:
            if is_node_failure(e):
                self.primary.mark_down(describe(e))
                raise PrimaryUnavailable(
                    "the user database primary is unavailable: writes are refused until it is back"
                ) from e
            if isinstance(e, PoolTimeout):
                raise PrimaryUnavailable("the user database primary is saturated: try again shortly") from e
            if _sqlstate(e) == "25006":
                raise PrimaryUnavailable("the user database primary is read-only: writes are refused") from e
            raise

    async def write(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``fn(conn)`` in one transaction on the primary, commit, publish the mark.

        Raises :class:`PrimaryUnavailable` when the primary cannot be reached (or is
        read-only); errors of the statements themselves propagate unchanged.
        """
        async with self.on_primary() as conn:
            async with conn.begin():
                result = await fn(conn)
            await self._record_write(conn)
        return result

    async def _primary_answered(self) -> None:
        """The primary just committed for us: it is up, whatever the monitor last saw."""
        self._primary_failed_at_hwm = None
        if not self.primary.healthy:
            await self.primary.mark_up()

    async def _record_write(self, conn: AsyncConnection) -> None:
        """After a commit on ``conn``: publish the primary's WAL position as the mark.

        The write is committed whatever happens here, so nothing is raised. When the
        position cannot be read (on this connection nor on a new one), this instance reads
        from the primary and the monitor publishes the primary's position from its next
        probe, which is past the commit: other instances may miss the write for one
        monitor round at most, and only while the replicas lag.
        """
        await self._primary_answered()
        try:
            lsn = (await conn.execute(self.write_position_sql)).scalar_one()
            await conn.rollback()
        except (DBAPIError, OSError) as e:
            log.warning("committed, but could not read the primary's WAL position: %s", describe(e))
            try:
                assert self.primary.write_engine is not None
                async with self.primary.write_engine.connect() as fresh:
                    lsn = (await fresh.execute(self.write_position_sql)).scalar_one()
            except (DBAPIError, OSError, PoolTimeout) as again:
                log.warning(
                    "the WAL position is still unreadable (%s): reads use the primary until the monitor publishes it",
                    describe(again),
                )
                self._unpublished_since = time.monotonic()
                return
        await self.hwm.publish(int(lsn))

    async def mark_written(self, conn: AsyncConnection) -> None:
        """For callers that commit on the primary themselves (e.g. two-phase commit):
        call after the commit, on a connection to the primary."""
        await self._record_write(conn)

    # -- status ----------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        return {
            "primary": self.primary.view(),
            "replicas": [r.view() for r in self.replicas],
            "max_lag_s": self.max_lag_s,
            "high_water_mark": format_lsn(max(self.hwm.last_seen or 0, self.hwm.local) or None),
            "high_water_mark_store": "ok" if self.hwm.available else "unavailable",
            "reads": {n.name: n.reads for n in self.nodes},
            "degraded_reads": self.degraded_reads,
        }
