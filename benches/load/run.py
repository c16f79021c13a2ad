#!/usr/bin/env python3
"""Side-by-side load benchmark: pgbench against PostgreSQL directly, through PgBouncer and
through dbproxy, interleaved (A B C A B C ...) so machine noise hits all three alike.

Starts a throwaway primary (scripts/pg-cluster.sh), a release build of dbproxy and PgBouncer
(Debian package `pgbouncer`) with the same pool size, runs each scenario ROUNDS times per
target, and prints a Markdown table of median tps, average latency, and the ratios to direct
and to PgBouncer. Loopback only; every run is bounded by --seconds.

    benches/load/run.sh [--seconds 10] [--rounds 3] [--scenarios S,E,P,...]
"""

import argparse
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
POOL = 10
PASSWORD = "app-secret"

# name -> (description, pgbench arguments); all on pgbench scale 10.
SCENARIOS = {
    "S": ("-S, 50 clients, simple protocol", ["-S", "-c", "50", "-j", "2", "-M", "simple"]),
    "E": ("-S, 50 clients, extended protocol", ["-S", "-c", "50", "-j", "2", "-M", "extended"]),
    "P": ("-S, 50 clients, prepared statements", ["-S", "-c", "50", "-j", "2", "-M", "prepared"]),
    "S1": ("-S, 1 client (round-trip latency)", ["-S", "-c", "1", "-j", "1", "-M", "simple"]),
    "C": ("-S -C, new SCRAM connection per transaction, 10 clients", ["-S", "-C", "-c", "10", "-j", "2"]),
    "B": ("TPC-B (writes), 20 clients", ["-c", "20", "-j", "2", "-M", "simple"]),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on 127.0.0.1:{port}")


def as_postgres(cmd):
    """Runs cmd as the postgres user when we are root (PgBouncer refuses root)."""
    return ["runuser", "-u", "postgres", "--"] + cmd if os.geteuid() == 0 else cmd


class Bench:
    def __init__(self, args):
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="dbp-bench-"))
        os.chmod(self.dir, 0o755)
        self.procs = []

    def start(self):
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
        cluster = self.dir / "cluster"
        out = subprocess.run(
            [ROOT / "scripts/pg-cluster.sh", "up", cluster, "--watch", str(os.getpid()), "--replicas", "0"],
            check=True, capture_output=True, text=True,
        ).stdout
        env = dict(line.split("=", 1) for line in out.split())
        self.pg = int(env["PRIMARY_PORT"])
        self.proxy = free_port()
        self.bouncer = free_port()
        (self.dir / "proxy.toml").write_text(
            f'[proxy]\nlisten = "127.0.0.1:{self.proxy}"\nmax_client_conn = 20000\n'
            f'[pool]\nmode = "transaction"\nsize = {POOL}\ncheckout_timeout = "30s"\n'
            f'[routing]\nread_write_split = false\n'
            f'[[databases]]\nname = "appdb"\nprimary = "127.0.0.1:{self.pg}"\n'
            f'[[users]]\nname = "app"\npassword = "{PASSWORD}"\n'
        )
        log = open(self.dir / "dbproxy.log", "w")
        self.procs.append(subprocess.Popen(
            [ROOT / "target/release/dbproxy", "--config", self.dir / "proxy.toml"],
            stderr=log, env={**os.environ, "RUST_LOG": "warn"},
        ))
        (self.dir / "userlist.txt").write_text(f'"app" "{PASSWORD}"\n')
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"appdb = host=127.0.0.1 port={self.pg} dbname=appdb\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.bouncer}\nunix_socket_dir =\n"
            f"auth_type = scram-sha-256\nauth_file = {self.dir}/userlist.txt\n"
            f"pool_mode = transaction\ndefault_pool_size = {POOL}\nmax_client_conn = 20000\n"
            f"logfile = {self.dir}/pgbouncer.log\npidfile = {self.dir}/pgbouncer.pid\n"
        )
        subprocess.run(["chown", "-R", "postgres", self.dir], check=False)
        self.procs.append(subprocess.Popen(as_postgres(["pgbouncer", str(self.dir / "pgbouncer.ini")])))
        wait_port(self.proxy)
        wait_port(self.bouncer)
        subprocess.run(["pgbench", "-i", "-s", "10", "-q", self.url(self.pg)], check=True, capture_output=True)

    def url(self, port):
        return f"postgresql://app:{PASSWORD}@127.0.0.1:{port}/appdb"

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run([ROOT / "scripts/pg-cluster.sh", "down", self.dir / "cluster"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def pgbench(self, port, extra):
        cmd = ["pgbench", "-n", "-T", str(self.args.seconds), *extra, self.url(port)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=self.args.seconds * 4 + 60)
        tps = re.search(r"tps = ([\d.]+)", r.stdout)
        lat = re.search(r"latency average = ([\d.]+) ms", r.stdout)
        failed = re.search(r"number of failed transactions: (\d+)", r.stdout)
        if r.returncode != 0 or not tps or (failed and int(failed.group(1)) > 0):
            err = (r.stderr.strip().splitlines() or ["?"])[-1]
            return None, err
        return (float(tps.group(1)), float(lat.group(1)) if lat else float("nan")), None


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "n/a"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = ap.parse_args()
    bench = Bench(args)
    rows = []
    try:
        bench.start()
        targets = [("direct", bench.pg), ("pgbouncer", bench.bouncer), ("dbproxy", bench.proxy)]
        for key in args.scenarios.split(","):
            desc, extra = SCENARIOS[key]
            results = {name: [] for name, _ in targets}
            errors = {}
            for _ in range(args.rounds):
                for name, port in targets:
                    res, err = bench.pgbench(port, extra)
                    if res:
                        results[name].append(res)
                    else:
                        errors[name] = err
            med = {
                n: (statistics.median(t for t, _ in r), statistics.median(l for _, l in r)) if r else None
                for n, r in results.items()
            }
            rows.append((desc, med, errors))
            print(f"done: {desc}", file=sys.stderr)
    finally:
        bench.stop()
    print(f"pgbench scale 10, pool size {POOL}, transaction pooling, {args.rounds} interleaved rounds "
          f"of {args.seconds} s; medians. Latency = pgbench's average, ms.\n")
    print("| scenario | direct tps | PgBouncer tps | dbproxy tps | dbproxy / direct | dbproxy / PgBouncer "
          "| latency direct | latency PgBouncer | latency dbproxy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for desc, med, errors in rows:
        def cell(n, i):
            if med[n]:
                return f"{med[n][i]:.0f}" if i == 0 else f"{med[n][i]:.3f}"
            return "fails: " + errors.get(n, "?")[:60].replace("|", "/")
        d, b, p = (med[n][0] if med[n] else None for n in ("direct", "pgbouncer", "dbproxy"))
        print(f"| {desc} | {cell('direct', 0)} | {cell('pgbouncer', 0)} | {cell('dbproxy', 0)} "
              f"| {ratio(p, d)} | {ratio(p, b)} | {cell('direct', 1)} | {cell('pgbouncer', 1)} | {cell('dbproxy', 1)} |")


if __name__ == "__main__":
    main()
