"""asyncpg through the proxy.

asyncpg always uses the extended protocol; with its default statement cache it creates named
prepared statements, which must keep working in session mode and in transaction mode, where
each transaction may land on another server connection. Plain test functions call asyncio.run
(no pytest-asyncio needed).
"""

import asyncio

import asyncpg
import pytest

from conftest import POOL_SIZE, running_proxies

CLIENTS = 20
QUERIES_PER_CLIENT = 10


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def concurrent_clients(dsn, cluster, clients=CLIENTS, queries=QUERIES_PER_CLIENT, **connect_kwargs):
    """CLIENTS connections at once, each running QUERIES_PER_CLIENT parameterised queries,
    while watching that the primary never sees more app connections than the pools allow."""
    peak = 0
    done = asyncio.Event()

    async def watch(monitor):
        nonlocal peak
        while not done.is_set():
            backends = await monitor.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND datname = 'appdb'"
            )
            peak = max(peak, backends)
            await asyncio.sleep(0.02)

    async def client(i):
        conn = await asyncpg.connect(dsn, **connect_kwargs)
        try:
            for j in range(queries):
                assert await conn.fetchval("SELECT $1::int * 1000 + $2::int", i, j) == i * 1000 + j
            stmt = await conn.prepare("SELECT $1::text || '-' || $2::int")
            assert await stmt.fetchval("client", i) == f"client-{i}"
        finally:
            await conn.close()

    # Direct superuser connection to the primary, bypassing the proxy.
    monitor = await asyncpg.connect(cluster.dsn())
    watcher = asyncio.create_task(watch(monitor))
    try:
        await asyncio.gather(*(client(i) for i in range(clients)))
    finally:
        done.set()
        await watcher
        await monitor.close()
    # Every running proxy (transaction and/or session) has its own pool on the primary.
    bound = POOL_SIZE * len(running_proxies)
    assert peak <= bound, f"primary saw {peak} app connections, pools allow {bound}"


def test_session_fetch_with_parameters(session_dsn):
    async def main():
        conn = await asyncpg.connect(session_dsn)
        try:
            row = await conn.fetchrow("SELECT $1::int + $2::int AS sum, $3::text AS label", 40, 2, "answer")
            assert (row["sum"], row["label"]) == (42, "answer")
            # Same text again: served from asyncpg's statement cache (a named statement).
            row = await conn.fetchrow("SELECT $1::int + $2::int AS sum, $3::text AS label", 1, 2, "x")
            assert (row["sum"], row["label"]) == (3, "x")
        finally:
            await conn.close()

    run(main())


def test_session_prepare_and_fetch(session_dsn):
    async def main():
        conn = await asyncpg.connect(session_dsn)
        try:
            stmt = await conn.prepare("SELECT n, n * $2::int AS m FROM generate_series(1, $1::int) AS n")
            assert [tuple(r) for r in await stmt.fetch(3, 10)] == [(1, 10), (2, 20), (3, 30)]
            assert await stmt.fetchval(5, 2) == 1
            assert len(await stmt.fetch(1000, 1)) == 1000
        finally:
            await conn.close()

    run(main())


def test_session_transaction(session_dsn, table):
    async def main():
        conn = await asyncpg.connect(session_dsn)
        try:
            await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
            async with conn.transaction():
                await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", 1, "one")
                assert await conn.fetchval(f"SELECT v FROM {table} WHERE id = $1", 1) == "one"
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", 2, "two")
                    raise RuntimeError("roll back")
            assert await conn.fetch(f"SELECT id, v FROM {table} ORDER BY id") == [(1, "one")]
        finally:
            await conn.close()

    run(main())


def test_session_concurrent_clients(session_dsn, cluster):
    # More clients than the pool has connections: the rest wait for a session to end.
    run(concurrent_clients(session_dsn, cluster))


def test_transaction_mode_fetchval(tx_dsn):
    async def main():
        conn = await asyncpg.connect(tx_dsn)
        try:
            assert await conn.fetchval("SELECT $1::text || $2::text", "db", "proxy") == "dbproxy"
            assert await conn.fetchval("SELECT $1::int8 * 2", 21) == 42
        finally:
            await conn.close()

    run(main())


def test_transaction_mode_concurrent_clients_default_settings(tx_dsn, cluster):
    # 40 clients with asyncpg's default statement cache multiplexed over 5 server connections.
    run(concurrent_clients(tx_dsn, cluster, clients=40, queries=20), timeout=60)


def test_transaction_mode_without_statement_cache(tx_dsn, cluster):
    # The unnamed-statement path (what PgBouncer users configure today).
    run(concurrent_clients(tx_dsn, cluster, statement_cache_size=0))


def test_unknown_database_sqlstate(tx_dsn):
    async def main():
        with pytest.raises(asyncpg.InvalidCatalogNameError) as info:
            await asyncpg.connect(tx_dsn.rsplit("/", 1)[0] + "/no_such_db_7")
        assert "no_such_db_7" in str(info.value)

    run(main())
