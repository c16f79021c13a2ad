"""Fixtures for the Python driver tests.

A real PostgreSQL primary with two streaming replicas (scripts/pg-cluster.sh) runs for the whole
session, and so do two dbproxy binaries in front of it: one in transaction mode, one in session
mode. Tests talk to the proxies exactly as an application would, through a connection string.

The proxy binary is $DBPROXY_BIN, default target/debug/dbproxy (build it with `cargo build`).
"""

import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = ROOT / "scripts" / "pg-cluster.sh"
PROXY_START_TIMEOUT = 15.0
# Backstop for a hung test (e.g. a proxy that never answers): fail instead of blocking CI.
TEST_TIMEOUT = 60

APP_USER, APP_PASSWORD = "app", "app-secret"
ADMIN_USER, ADMIN_PASSWORD = "admin", "admin-secret"
POOL_SIZE = 5


@dataclass
class Cluster:
    dir: str
    primary_port: int
    replica_ports: list

    def dsn(self, port=None, database="appdb"):
        """Direct superuser connection to a server (trusted on 127.0.0.1), bypassing the proxy."""
        return f"postgresql://postgres@127.0.0.1:{port or self.primary_port}/{database}"


@pytest.fixture(scope="session")
def cluster():
    # A short path under /tmp: the servers' unix sockets live in it, and as root the postgres
    # user must be able to reach it (pytest's own tmp_path sits under a root-only directory).
    base = tempfile.mkdtemp(prefix="dbp-py-", dir="/tmp")
    # --watch: if this pytest process dies without running teardown, the cluster still goes.
    up = subprocess.run(
        [str(CLUSTER_SCRIPT), "up", base, "--watch", str(os.getpid())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if up.returncode != 0:
        subprocess.run([str(CLUSTER_SCRIPT), "down", base], check=False)
        pytest.fail(f"pg-cluster.sh up failed:\n{up.stderr}", pytrace=False)
    env = dict(line.split("=", 1) for line in up.stdout.splitlines() if "=" in line)
    try:
        yield Cluster(
            dir=base,
            primary_port=int(env["PRIMARY_PORT"]),
            replica_ports=[int(p) for p in env["REPLICA_PORTS"].split(",") if p],
        )
    finally:
        subprocess.run([str(CLUSTER_SCRIPT), "down", base], check=False)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proxy_config(port, cluster, mode):
    """A config file in the format of CONTRACT.md; routing stays off for these tests.
    The session-mode proxy runs on one thread (workers = 1: tokio's single-threaded
    scheduler), the transaction-mode one on the default multi-threaded runtime."""
    replicas = ", ".join(f'"127.0.0.1:{p}"' for p in cluster.replica_ports)
    workers = "workers = 1" if mode == "session" else ""
    return f"""\
[proxy]
listen = "127.0.0.1:{port}"
admin_users = ["{ADMIN_USER}"]
{workers}

[pool]
mode = "{mode}"
size = {POOL_SIZE}
checkout_timeout = "10s"

[routing]
read_write_split = false
balance = "round_robin"
read_your_writes = true

[[databases]]
name = "appdb"
primary = "127.0.0.1:{cluster.primary_port}"
replicas = [{replicas}]

[[users]]
name = "{APP_USER}"
password = "{APP_PASSWORD}"

[[users]]
name = "{ADMIN_USER}"
password = "{ADMIN_PASSWORD}"
"""


class Proxy:
    """One dbproxy process; its stderr goes to a log file shown when something fails."""

    def __init__(self, binary, workdir, cluster, mode):
        self.mode = mode
        self.port = free_port()
        self.config = workdir / f"proxy-{mode}.toml"
        self.config.write_text(proxy_config(self.port, cluster, mode))
        self.log_path = workdir / f"proxy-{mode}.log"
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self._wait_until_listening()

    def _wait_until_listening(self):
        deadline = time.monotonic() + PROXY_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"dbproxy ({self.mode}) exited with {self.proc.returncode} during startup:\n"
                    + self.log_tail(),
                    pytrace=False,
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail(
            f"dbproxy ({self.mode}) did not accept connections on port {self.port} within "
            f"{PROXY_START_TIMEOUT:.0f} s:\n" + self.log_tail(),
            pytrace=False,
        )

    def dsn(self, user=APP_USER, password=APP_PASSWORD, database="appdb"):
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def log_tail(self, lines=60):
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self):
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


running_proxies = []


def _start_proxy(tmp_path_factory, cluster, mode):
    binary = os.environ.get("DBPROXY_BIN") or str(ROOT / "target" / "debug" / "dbproxy")
    if not os.access(binary, os.X_OK):
        pytest.fail(f"no dbproxy binary at {binary}; run `cargo build` or set DBPROXY_BIN", pytrace=False)
    proxy = Proxy(binary, tmp_path_factory.mktemp(f"proxy-{mode}"), cluster, mode)
    running_proxies.append(proxy)
    return proxy


@pytest.fixture(scope="session")
def tx_proxy(tmp_path_factory, cluster):
    proxy = _start_proxy(tmp_path_factory, cluster, "transaction")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def session_proxy(tmp_path_factory, cluster):
    proxy = _start_proxy(tmp_path_factory, cluster, "session")
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def tx_dsn(tx_proxy):
    return tx_proxy.dsn()


@pytest.fixture(scope="session")
def session_dsn(session_proxy):
    return session_proxy.dsn()


@pytest.fixture(autouse=True)
def _guard():
    """Time out a hung test, and fail a test after which a proxy has died (with its log)."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"test exceeded {TEST_TIMEOUT} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    for proxy in list(running_proxies):
        if proxy.proc.poll() is not None:
            running_proxies.remove(proxy)  # report each death once
            pytest.fail(
                f"dbproxy ({proxy.mode}) exited with {proxy.proc.returncode} during this test:\n"
                + proxy.log_tail(),
                pytrace=False,
            )


@pytest.fixture
def table(cluster):
    """A unique table name; the table (if the test created it) is dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")
