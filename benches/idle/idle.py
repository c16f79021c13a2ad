#!/usr/bin/env python3
"""Memory per idle client: connects N asyncpg clients to a running dbproxy, has each run one
query (so the session's buffers have been used), then holds them idle and reports the
growth of dbproxy's RSS per client.

    python3 benches/idle/idle.py --url postgresql://app:app-secret@127.0.0.1:6432/appdb \
        --pid $(pgrep -f 'dbproxy --config') [--clients 2000]

10,000 clients need `proxy.max_client_conn` above 10,000 (it counts logins in progress) and
about 10,100 file descriptors for both this script and dbproxy (`ulimit -n`); one source
address has enough ephemeral ports (`net.ipv4.ip_local_port_range`, 28,000 by default).
"""
import argparse
import asyncio
import time

import asyncpg


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--clients", type=int, default=2000)
    args = ap.parse_args()
    warm = await asyncpg.connect(args.url)
    await warm.fetchval("SELECT 1")
    await asyncio.sleep(1)
    before = rss_kib(args.pid)
    gate = asyncio.Semaphore(100)

    async def one():
        async with gate:
            c = await asyncpg.connect(args.url, timeout=60)
            await c.fetchval("SELECT $1::int", 1)
            return c

    clients = await asyncio.gather(*(one() for _ in range(args.clients)))
    time.sleep(2)
    after = rss_kib(args.pid)
    per = (after - before) * 1024 / args.clients
    line = (f"{args.clients} idle clients: RSS {before} -> {after} KiB ({after * 1024 / 1e6:.1f} MB), "
            f"{per / 1024:.1f} KiB per client")
    if args.clients < 10000:
        line += f", {(before * 1024 + per * 10000) / 1e6:.0f} MB extrapolated to 10,000"
    print(line)
    await asyncio.sleep(float(__import__("os").environ.get("HOLD", "0")))
    await asyncio.gather(*(c.close() for c in clients))
    await warm.close()


asyncio.run(main())
