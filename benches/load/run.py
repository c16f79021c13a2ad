#!/usr/bin/env python3
"""Side-by-side load benchmark: pgbench against PostgreSQL directly, through PgBouncer and
through dbproxy, interleaved (A B C A B C ...) so machine noise hits all three alike.

Starts a throwaway primary with two streaming replicas (scripts/pg-cluster.sh), a release
build of dbproxy and PgBouncer (Debian package `pgbouncer`) with the same pool size, runs each
scenario ROUNDS times per target, and prints a Markdown table of median tps, average and p99
latency, and the ratios to direct and to PgBouncer; with --chart, also a PNG bar chart of the
ratios (needs matplotlib; run.sh provides it). Loopback only; every run is bounded by --seconds.

Scenario R (read-heavy mix, 9 reads to 1 TPC-B write transaction) runs dbproxy with read/write
splitting on, and reports how the transactions spread over the primary and the replicas; every
other scenario uses one dbproxy with splitting off, so all three targets use the primary alone.
Scenario U runs a second dbproxy and a second PgBouncer that both reach the primary through its
unix-domain socket instead of TCP (clients, and the direct target, still use TCP). The servers
have TLS on (pg-cluster.sh --ssl) but every scenario except T connects in plain TCP; T runs a
third dbproxy and PgBouncer with TLS to the server (sslmode require, no certificate check) and
pgbench directly with sslmode=require; clients reach the proxies in plain TCP.

With --relay, a fourth target runs in the primary-only TCP scenarios (S, S500, E, P, S1, C, B):
HAProxy (Debian package `haproxy`) in TCP mode with two threads, one server connection per client
and no look at the protocol. It makes the same socket calls per transaction as a proxy can at
the least (a read and a write each way), so it measures what relaying through the kernel costs
on this machine, whatever the proxy does on top; a second table gives its ratios.

    benches/load/run.sh [--seconds 10] [--rounds 3] [--scenarios S,S500,E,P,...] [--chart out.png]
        [--relay] [--result-mb 300]

Then (unless --result-mb 0) one large result is read through each target, interleaved: the
seconds it takes, and the proxies' peak RSS growth while it passes through them.
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
    "S500": ("-S, 500 clients, simple protocol", ["-S", "-c", "500", "-j", "2", "-M", "simple"]),
    "U": ("-S, 50 clients; both proxies reach the server by its unix socket (clients: TCP)",
          ["-S", "-c", "50", "-j", "2", "-M", "simple"]),
    "R": ("read-heavy mix (9 -S : 1 TPC-B), 50 clients; dbproxy splits reads to 2 replicas "
          "(read_your_writes off)",
          ["-b", "select-only@9", "-b", "tpcb-like@1", "-c", "50", "-j", "2", "-M", "simple"]),
    "T": ("-S, 50 clients; TLS to the server (sslmode require: pgbench directly, both proxies; "
          "clients to the proxies: plain TCP)",
          ["-S", "-c", "50", "-j", "2", "-M", "simple"]),
}
# Scenarios whose direct runs and proxies use TLS to the server; every other one is plain TCP.
TLS_SCENARIOS = {"T"}
# Scenarios the --relay target runs in: the primary alone, over plain TCP.
RELAY_SCENARIOS = {"S", "S500", "E", "P", "S1", "C", "B"}
# Fraction of transactions pgbench logs, for the p99 latency.
SAMPLING = "0.2"


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
            [ROOT / "scripts/pg-cluster.sh", "up", cluster, "--watch", str(os.getpid()), "--replicas", "2", "--ssl"],
            check=True, capture_output=True, text=True,
        ).stdout
        env = dict(line.split("=", 1) for line in out.split())
        self.pg = int(env["PRIMARY_PORT"])
        self.replicas = [int(p) for p in env["REPLICA_PORTS"].split(",") if p]
        self.cluster = cluster
        if "S500" in self.args.scenarios.split(","):
            # 500 direct clients need more than the cluster's 300 connections.
            for port in [self.pg] + self.replicas:
                subprocess.run(["psql", "-XAtq", f"postgresql://postgres@127.0.0.1:{port}/postgres",
                                "-c", "ALTER SYSTEM SET max_connections = 700"], check=True)
            for node in ["primary", "replica1", "replica2"]:
                subprocess.run([ROOT / "scripts/pg-cluster.sh", "stop-node", cluster, node], check=True)
                subprocess.run([ROOT / "scripts/pg-cluster.sh", "start-node", cluster, node], check=True)
        self.proxy = free_port()
        self.split = free_port()
        self.unix = free_port()
        self.tls = free_port()
        self.bouncer = free_port()
        self.bouncer_unix = free_port()
        self.bouncer_tls = free_port()
        replicas = ", ".join(f'"127.0.0.1:{p}"' for p in self.replicas)
        for name, port, split in (("proxy", self.proxy, False), ("split", self.split, True),
                                  ("unix", self.unix, False), ("tls", self.tls, False)):
            primary = f"{cluster}:{self.pg}" if name == "unix" else f"127.0.0.1:{self.pg}"
            (self.dir / f"{name}.toml").write_text(
                f'[proxy]\nlisten = "127.0.0.1:{port}"\nmax_client_conn = 20000\n'
                f'[pool]\nmode = "transaction"\nsize = {POOL}\ncheckout_timeout = "30s"\n'
                f'[routing]\nread_write_split = {"true" if split else "false"}\n'
                # Scenario R shows the spread; with read-your-writes each pgbench client's reads
                # follow its own writes (every tenth transaction) to the primary until replayed.
                + ('read_your_writes = false\n' if split else "")
                + f'[[databases]]\nname = "appdb"\nprimary = "{primary}"\n'
                + (f'replicas = [{replicas}]\n' if split else "")
                + f'[[users]]\nname = "app"\npassword = "{PASSWORD}"\n'
                + f'[server_tls]\nsslmode = "{"require" if name == "tls" else "disable"}"\n'
            )
            log = open(self.dir / f"{name}.log", "w")
            self.procs.append(subprocess.Popen(
                [ROOT / "target/release/dbproxy", "--config", self.dir / f"{name}.toml"],
                stderr=log, env={**os.environ, "RUST_LOG": "warn"},
            ))
        (self.dir / "userlist.txt").write_text(f'"app" "{PASSWORD}"\n')
        for name, port, host in (("pgbouncer", self.bouncer, "127.0.0.1"),
                                 ("pgbouncer-unix", self.bouncer_unix, cluster),
                                 ("pgbouncer-tls", self.bouncer_tls, "127.0.0.1")):
            (self.dir / f"{name}.ini").write_text(
                "[databases]\n"
                f"appdb = host={host} port={self.pg} dbname=appdb\n"
                "[pgbouncer]\n"
                f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
                f"auth_type = scram-sha-256\nauth_file = {self.dir}/userlist.txt\n"
                f"pool_mode = transaction\ndefault_pool_size = {POOL}\nmax_client_conn = 20000\n"
                f"logfile = {self.dir}/{name}.log\npidfile = {self.dir}/{name}.pid\n"
                f"server_tls_sslmode = {'require' if name == 'pgbouncer-tls' else 'disable'}\n"
            )
        subprocess.run(["chown", "-R", "postgres", self.dir], check=False)
        for name in ("pgbouncer", "pgbouncer-unix", "pgbouncer-tls"):
            self.procs.append(subprocess.Popen(as_postgres(["pgbouncer", str(self.dir / f"{name}.ini")])))
        ports = [self.proxy, self.split, self.unix, self.tls, self.bouncer, self.bouncer_unix, self.bouncer_tls]
        if self.args.relay:
            self.relay = free_port()
            (self.dir / "haproxy.cfg").write_text(
                "global\n    maxconn 4000\n    nbthread 2\n"
                "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n"
                f"listen pg\n    bind 127.0.0.1:{self.relay}\n    server primary 127.0.0.1:{self.pg}\n"
            )
            # -db: in the foreground, so that stop() ends it like the others.
            self.procs.append(subprocess.Popen(["haproxy", "-db", "-f", self.dir / "haproxy.cfg"],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            ports.append(self.relay)
        for port in ports:
            wait_port(port)
        subprocess.run(["pgbench", "-i", "-s", "10", "-q", self.url(self.pg)], check=True, capture_output=True)

    def url(self, port, sslmode="disable"):
        return f"postgresql://app:{PASSWORD}@127.0.0.1:{port}/appdb?sslmode={sslmode}"

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

    def pgbench(self, port, extra, sslmode="disable"):
        logs = Path(tempfile.mkdtemp(prefix="log-", dir=self.dir))
        clients = int(extra[extra.index("-c") + 1])
        # Long enough that logging every client in (a backend fork each, directly) is a small part.
        seconds = max(self.args.seconds, clients // 50)
        cmd = ["pgbench", "-n", "-T", str(seconds), "-l", "--sampling-rate", SAMPLING,
               "--log-prefix", str(logs / "pgbench_log"), *extra, self.url(port, sslmode)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=self.args.seconds * 4 + 60)
        tps = re.search(r"tps = ([\d.]+)", r.stdout)
        lat = re.search(r"latency average = ([\d.]+) ms", r.stdout)
        failed = re.search(r"number of failed transactions: (\d+)", r.stdout)
        if r.returncode != 0 or not tps or (failed and int(failed.group(1)) > 0):
            err = (r.stderr.strip().splitlines() or ["?"])[-1]
            shutil.rmtree(logs, ignore_errors=True)
            return None, err
        # Per-transaction log lines: client, transaction, latency in us, ...
        samples = []
        for f in logs.iterdir():
            for line in f.read_text().splitlines():
                parts = line.split()
                if len(parts) > 2 and parts[2].isdigit():
                    samples.append(int(parts[2]))
        shutil.rmtree(logs, ignore_errors=True)
        samples.sort()
        p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))] / 1000 if samples else float("nan")
        return (float(tps.group(1)), float(lat.group(1)) if lat else float("nan"), p99), None

    def big_result(self, port, pid, mb):
        """Reads one result of about `mb` MB (1 kB rows) with psql through `port`; returns the
        seconds it took and, when `pid` is a proxy, its RSS before and its peak RSS growth
        during the read, in MB (the peak is VmHWM, reset through /proc/PID/clear_refs)."""
        status = Path(f"/proc/{pid}/status") if pid else None

        def kib(field):
            m = re.search(rf"^{field}:\s+(\d+) kB", status.read_text(), re.M)
            return int(m.group(1))

        if status:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            before = kib("VmRSS")
        started = time.monotonic()
        subprocess.run(["psql", "-XAtq", "-o", "/dev/null", "-c",
                        f"SELECT repeat('x', 1000) FROM generate_series(1, {mb * 1000})", self.url(port)],
                       check=True, timeout=600)
        took = time.monotonic() - started
        if not status:
            return took, None, None
        return took, before / 1024, (kib("VmHWM") - before) / 1024

    def commits(self):
        """Committed transactions in appdb on each node (standbys count their own read-only ones)."""
        out = {}
        for name, port in [("primary", self.pg)] + [(f"replica{i + 1}", p) for i, p in enumerate(self.replicas)]:
            r = subprocess.run(["psql", "-XAtq", f"postgresql://postgres@127.0.0.1:{port}/appdb", "-c",
                                "SELECT xact_commit FROM pg_stat_database WHERE datname = 'appdb'"],
                               capture_output=True, text=True)
            out[name] = int(r.stdout.strip() or 0)
        return out


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "n/a"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--chart", help="write a PNG bar chart of the ratios here")
    ap.add_argument("--relay", action="store_true",
                    help="also run HAProxy as a plain TCP relay (see above)")
    ap.add_argument("--result-mb", type=int, default=300,
                    help="also read one result of this many MB through each target, reporting the "
                         "proxies' RSS growth (0: skip)")
    args = ap.parse_args()
    bench = Bench(args)
    rows = []
    spread = None
    big = {}
    try:
        bench.start()
        for key in args.scenarios.split(","):
            desc, extra = SCENARIOS[key]
            proxy = {"R": bench.split, "U": bench.unix, "T": bench.tls}.get(key, bench.proxy)
            bouncer = {"U": bench.bouncer_unix, "T": bench.bouncer_tls}.get(key, bench.bouncer)
            targets = [("direct", bench.pg), ("pgbouncer", bouncer), ("dbproxy", proxy)]
            if args.relay and key in RELAY_SCENARIOS:
                targets.append(("relay", bench.relay))
            results = {name: [] for name, _ in targets}
            errors = {}
            moved = {}
            for _ in range(args.rounds):
                for name, port in targets:
                    before = bench.commits() if key == "R" and name == "dbproxy" else None
                    tls = key in TLS_SCENARIOS and name == "direct"
                    res, err = bench.pgbench(port, extra, "require" if tls else "disable")
                    if before is not None:
                        after = bench.commits()
                        for node in after:
                            moved[node] = moved.get(node, 0) + after[node] - before[node]
                    if res:
                        results[name].append(res)
                    else:
                        errors[name] = err
            if moved:
                spread = moved
            med = {
                n: tuple(statistics.median(x[i] for x in r) for i in range(3)) if r else None
                for n, r in results.items()
            }
            rows.append((key, desc, med, errors))
            print(f"done: {desc}", file=sys.stderr)
        if args.result_mb:
            bouncer_pid = int((bench.dir / "pgbouncer.pid").read_text().split()[0])
            for _ in range(args.rounds):
                for name, port, pid in (("direct", bench.pg, None), ("pgbouncer", bench.bouncer, bouncer_pid),
                                        ("dbproxy", bench.proxy, bench.procs[0].pid)):
                    big.setdefault(name, []).append(bench.big_result(port, pid, args.result_mb))
            print(f"done: {args.result_mb} MB result", file=sys.stderr)
    finally:
        bench.stop()
    print(f"pgbench scale 10, pool size {POOL}, transaction pooling, {args.rounds} interleaved rounds "
          f"of {args.seconds} s; medians. Latency in ms: pgbench's average, and the 99th percentile "
          f"of a {SAMPLING} sample of transactions (pgbench -l).\n")
    print("| scenario | direct tps | PgBouncer tps | dbproxy tps | dbproxy / direct | dbproxy / PgBouncer "
          "| avg latency direct / PgBouncer / dbproxy | p99 latency direct / PgBouncer / dbproxy |")
    print("|---|---|---|---|---|---|---|---|")
    for _, desc, med, errors in rows:
        def cell(n, i):
            if med[n]:
                return f"{med[n][i]:.0f}" if i == 0 else f"{med[n][i]:.2f}"
            return "fails: " + errors.get(n, "?")[:60].replace("|", "/")
        d, b, p = (med[n][0] if med[n] else None for n in ("direct", "pgbouncer", "dbproxy"))
        lat = " / ".join(cell(n, 1) for n in ("direct", "pgbouncer", "dbproxy"))
        p99 = " / ".join(cell(n, 2) for n in ("direct", "pgbouncer", "dbproxy"))
        print(f"| {desc} | {cell('direct', 0)} | {cell('pgbouncer', 0)} | {cell('dbproxy', 0)} "
              f"| {ratio(p, d)} | {ratio(p, b)} | {lat} | {p99} |")
    relayed = [(desc, med) for _, desc, med, _ in rows if med.get("relay")]
    if relayed:
        print("\nHAProxy as a plain TCP relay (one server connection per client, no pooling), same "
              "rounds:\n")
        print("| scenario | relay tps | relay / direct | PgBouncer / relay | dbproxy / relay "
              "| avg latency ms, relay | p99 latency ms, relay |")
        print("|---|---|---|---|---|---|---|")
        for desc, med in relayed:
            r, d, b, p = (med[n][0] if med[n] else None for n in ("relay", "direct", "pgbouncer", "dbproxy"))
            print(f"| {desc} | {r:.0f} | {ratio(r, d)} | {ratio(b, r)} | {ratio(p, r)} "
                  f"| {med['relay'][1]:.2f} | {med['relay'][2]:.2f} |")
    if spread:
        total = sum(spread.values()) or 1
        print("\nScenario R through dbproxy, transactions committed per server: " + ", ".join(
            f"{node} {count} ({100 * count / total:.0f} %)" for node, count in spread.items()))
    if big:
        print(f"\nOne {args.result_mb} MB result (`SELECT repeat('x', 1000) FROM generate_series(1, "
              f"{args.result_mb * 1000})` read by psql), {len(big['direct'])} interleaved rounds; medians. RSS "
              "growth: the proxy's peak RSS during the read (VmHWM) above its RSS before it.\n")
        print("| target | seconds | proxy RSS before, MB | proxy RSS growth, MB |")
        print("|---|---|---|---|")
        for name, runs in big.items():
            took = statistics.median(r[0] for r in runs)
            if runs[0][1] is None:
                print(f"| {name} | {took:.2f} | - | - |")
            else:
                before = statistics.median(r[1] for r in runs)
                growth = statistics.median(r[2] for r in runs)
                print(f"| {name} | {took:.2f} | {before:.1f} | {growth:.2f} (at most {max(r[2] for r in runs):.2f}) |")
    if args.chart:
        chart(rows, args.chart)


def chart(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, _, med, _ in rows if med["direct"] and med["dbproxy"]]
    meds = {k: med for k, _, med, _ in rows}
    vs_direct = [meds[k]["dbproxy"][0] / meds[k]["direct"][0] for k in keys]
    vs_bouncer = [meds[k]["dbproxy"][0] / meds[k]["pgbouncer"][0] if meds[k]["pgbouncer"] else 0 for k in keys]
    bouncer_vs_direct = [meds[k]["pgbouncer"][0] / meds[k]["direct"][0] if meds[k]["pgbouncer"] else 0
                         for k in keys]
    x = range(len(keys))
    w = 0.27
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar([i - w for i in x], bouncer_vs_direct, w, label="PgBouncer / direct", color="#9aa5b1")
    ax.bar(list(x), vs_direct, w, label="dbproxy / direct", color="#2f6db5")
    ax.bar([i + w for i in x], vs_bouncer, w, label="dbproxy / PgBouncer", color="#e07b39")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(keys)
    ax.set_ylabel("throughput ratio (tps)")
    ax.set_title("dbproxy vs PgBouncer vs direct (pgbench, interleaved medians; higher is better)")
    ax.legend(loc="upper left", framealpha=0.95)
    for i, v in enumerate(vs_bouncer):
        # No ratio where PgBouncer's run failed (e.g. -M prepared, which it does not track).
        label = f"{v:.2f}" if v else "PgBouncer\nfailed"
        ax.text(i + w, v + 0.03, label, ha="center", fontsize=8)
    for i, v in enumerate(vs_direct):
        ax.text(i, v + 0.03, f"{v:.2f}", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nchart: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
