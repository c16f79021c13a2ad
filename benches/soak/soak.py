#!/usr/bin/env python3
"""Soak: thousands of concurrent clients doing a mixed read/write workload through dbproxy
(release build) in front of a throwaway primary + 2 streaming replicas, with read/write
splitting and read-your-writes on, a pool of 20 per server.

Each client owns one row. About one operation per client per second (random think time):
80 % read its own row (replicas, unless its last write is not replayed there yet), 20 %
write a new value to it in a transaction. Every read must return at least the client's last
written value (read-your-writes). Reports errors, latency percentiles, read-your-writes
violations, and dbproxy's RSS and open fds: before, at the peak, and after every client left.

    benches/soak/run.sh [--clients 5000] [--seconds 60] [--pool 20]
"""

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "app-secret"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid):
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds


class Stats:
    def __init__(self):
        self.latencies = []
        self.read_latencies = []
        self.write_latencies = []
        self.errors = 0
        self.error_samples = []
        self.stale_reads = 0
        self.reads = 0
        self.writes = 0

    def error(self, e):
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{type(e).__name__}: {e}")


async def client(i, url, go, stats, think, ready):
    try:
        conn = await asyncpg.connect(url, timeout=60)
    except Exception as e:  # noqa: BLE001 - every failure counts
        stats.error(e)
        ready.release()
        return
    ready.release()
    written = 0
    try:
        # Logins cost this process CPU (client-side SCRAM): start the workload once all are in.
        deadline = await go
        while time.monotonic() < deadline:
            await asyncio.sleep(random.uniform(0, 2 * think))
            t = time.monotonic()
            write = random.random() < 0.2
            try:
                if write:
                    written += 1
                    async with conn.transaction():
                        await conn.execute("UPDATE soak SET v = $2 WHERE id = $1", i, written)
                    stats.writes += 1
                else:
                    v = await conn.fetchval("SELECT v FROM soak WHERE id = $1", i)
                    stats.reads += 1
                    if v is None or v < written:
                        stats.stale_reads += 1
            except Exception as e:  # noqa: BLE001
                stats.error(e)
                continue
            took = time.monotonic() - t
            stats.latencies.append(took)
            (stats.write_latencies if write else stats.read_latencies).append(took)
    finally:
        await conn.close()


def pct(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def run(args, url, pid):
    stats = Stats()
    ready = asyncio.Semaphore(200)  # logins in flight at once
    tasks = []
    start = time.monotonic()
    go = asyncio.get_running_loop().create_future()
    for i in range(1, args.clients + 1):
        await ready.acquire()
        tasks.append(asyncio.create_task(client(i, url, go, stats, args.think, ready)))
    for _ in range(200):
        await ready.acquire()
    connected = time.monotonic() - start
    go.set_result(time.monotonic() + args.seconds)
    peak = proc_status(pid)
    while any(not t.done() for t in tasks):
        await asyncio.sleep(1)
        rss, fds = proc_status(pid)
        peak = (max(peak[0], rss), max(peak[1], fds))
    await asyncio.gather(*tasks)
    return stats, connected, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=5000)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--pool", type=int, default=20)
    ap.add_argument("--think", type=float, default=1.0, help="mean think time between operations, s")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="dbp-soak-"))
    os.chmod(tmp, 0o755)
    proxy = None
    try:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
        out = subprocess.run(
            [ROOT / "scripts/pg-cluster.sh", "up", tmp / "cluster", "--watch", str(os.getpid())],
            check=True, capture_output=True, text=True,
        ).stdout
        env = dict(line.split("=", 1) for line in out.split())
        primary = env["PRIMARY_PORT"]
        replicas = [p for p in env.get("REPLICA_PORTS", "").replace(",", " ").split() if p]
        port = free_port()
        (tmp / "proxy.toml").write_text(
            f'[proxy]\nlisten = "127.0.0.1:{port}"\nmax_client_conn = {args.clients + 100}\n'
            f'[pool]\nmode = "transaction"\nsize = {args.pool}\ncheckout_timeout = "30s"\n'
            f'[routing]\nread_write_split = true\nread_your_writes = true\n'
            f'[[databases]]\nname = "appdb"\nprimary = "127.0.0.1:{primary}"\n'
            f'replicas = [{", ".join(chr(34) + "127.0.0.1:" + p + chr(34) for p in replicas)}]\n'
            f'[[users]]\nname = "app"\npassword = "{PASSWORD}"\n'
        )
        log = open(tmp / "dbproxy.log", "w")
        proxy = subprocess.Popen(
            [ROOT / "target/release/dbproxy", "--config", tmp / "proxy.toml"],
            stderr=log, env={**os.environ, "RUST_LOG": "warn"},
        )
        url = f"postgresql://app:{PASSWORD}@127.0.0.1:{port}/appdb"
        direct = f"postgresql://app:{PASSWORD}@127.0.0.1:{primary}/appdb"

        async def prepare():
            for _ in range(100):
                try:
                    c = await asyncpg.connect(direct)
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            await c.execute("DROP TABLE IF EXISTS soak; CREATE TABLE soak (id int PRIMARY KEY, v int NOT NULL)")
            await c.execute(f"INSERT INTO soak SELECT g, 0 FROM generate_series(1, {args.clients}) g")
            await c.close()
            # Through the proxy once, so the baseline includes its warm pools.
            for _ in range(100):
                try:
                    c = await asyncpg.connect(url)
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            await c.fetchval("SELECT 1")
            await c.close()

        asyncio.run(prepare())
        time.sleep(2)
        base = proc_status(proxy.pid)
        stats, connected, peak = asyncio.run(run(args, url, proxy.pid))
        time.sleep(5)
        after = proc_status(proxy.pid)
        lat = [x * 1000 for x in stats.latencies]
        ops = stats.reads + stats.writes
        print(f"\n## Soak: {args.clients} clients, {args.seconds} s, pool {args.pool} per server, "
              f"2 replicas, split + read-your-writes\n")
        print(f"- all {args.clients} clients connected in {connected:.1f} s")
        print(f"- operations: {ops} ({stats.reads} reads, {stats.writes} write transactions), "
              f"{ops / args.seconds:.0f}/s")
        print(f"- errors: {stats.errors}" + (f" (e.g. {stats.error_samples})" if stats.errors else ""))
        print(f"- read-your-writes violations: {stats.stale_reads}")
        if lat:
            print(f"- latency ms: p50 {pct(lat, 0.5):.2f}, p90 {pct(lat, 0.9):.2f}, p99 {pct(lat, 0.99):.2f}, "
                  f"p99.9 {pct(lat, 0.999):.2f}, max {max(lat):.2f}, mean {statistics.fmean(lat):.2f}")
        for name, values in (("reads", stats.read_latencies), ("write transactions", stats.write_latencies)):
            ms = [x * 1000 for x in values]
            if ms:
                print(f"  - {name}: p50 {pct(ms, 0.5):.2f}, p99 {pct(ms, 0.99):.2f}, max {max(ms):.2f}")
        print(f"- dbproxy RSS KiB: before {base[0]}, peak {peak[0]}, 5 s after the clients left {after[0]}")
        print(f"- dbproxy open fds: before {base[1]}, peak {peak[1]}, 5 s after the clients left {after[1]}")
        ok = stats.errors == 0 and stats.stale_reads == 0 and after[1] <= base[1] + 2 * 3 * args.pool
        return 0 if ok else 1
    finally:
        if proxy:
            proxy.send_signal(signal.SIGTERM)
            try:
                proxy.wait(20)
            except subprocess.TimeoutExpired:
                proxy.kill()
        subprocess.run([ROOT / "scripts/pg-cluster.sh", "down", tmp / "cluster"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
