"""psycopg 3 through the proxy, in transaction and in session mode."""

import datetime
import threading

import psycopg
import psycopg.errors
import pytest
from psycopg.pq import TransactionStatus

COPY_ROWS = 200_000


@pytest.fixture(params=["transaction", "session"])
def proxy(request):
    return request.getfixturevalue("tx_proxy" if request.param == "transaction" else "session_proxy")


def connect(proxy, dsn=None, **kwargs):
    if proxy.mode == "transaction":
        # Prepare every statement (named, server-side) from its first use: the hardest case
        # for transaction pooling, where each transaction may land on another server.
        kwargs.setdefault("prepare_threshold", 0)
    return psycopg.connect(dsn or proxy.dsn(), connect_timeout=10, **kwargs)


def test_select_one(proxy):
    with connect(proxy) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_parameters_text_and_binary(proxy):
    params = (42, "héllo wörld", b"\x00\x01\xff", 2.5, None, datetime.date(2024, 2, 29))
    query = "SELECT %s::int4, %s::text, %s::bytea, %s::float8, %s::text, %s::date"
    with connect(proxy) as conn:
        assert conn.execute(query, params).fetchone() == params
        with conn.cursor(binary=True) as cur:
            # %b sends the parameters in binary too.
            cur.execute(query.replace("%s", "%b"), params)
            assert cur.fetchone() == params
            assert cur.pgresult.fformat(0) == 1, "result was not in binary format"


def test_wrong_password(proxy):
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.dsn(password="not-the-password"), connect_timeout=10)
    with connect(proxy) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_unknown_database(proxy):
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn(database="no_such_db_7"), connect_timeout=10)
    assert "no_such_db_7" in str(info.value)
    # libpq does not hand the SQLSTATE of a failed connection to psycopg; check it when it does.
    if info.value.sqlstate is not None:
        assert info.value.sqlstate == "3D000"
    with connect(proxy) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_unknown_user(proxy):
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn(user="nobody_7", password="x"), connect_timeout=10)
    assert "nobody_7" in str(info.value)
    with connect(proxy) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_pipeline_of_inserts(proxy, table):
    with connect(proxy, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
        with conn.pipeline():
            for i in range(50):
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, f"v{i}"))
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (50,)


def test_copy_in_and_out(proxy, table):
    expected_sum = COPY_ROWS * (COPY_ROWS - 1) // 2
    with connect(proxy, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {table} (id int, v text)")
        with cur.copy(f"COPY {table} (id, v) FROM STDIN") as copy:
            for i in range(COPY_ROWS):
                copy.write_row((i, f"row {i}"))
        assert cur.execute(f"SELECT count(*), sum(id) FROM {table}").fetchone() == (COPY_ROWS, expected_sum)

        count = total = 0
        with cur.copy(f"COPY {table} (id, v) TO STDOUT") as copy:
            for id_, v in copy.rows():  # text format: values arrive as str
                assert v == f"row {id_}"
                count += 1
                total += int(id_)
        assert (count, total) == (COPY_ROWS, expected_sum)
        # The connection is usable after the COPY.
        assert cur.execute("SELECT 1").fetchone() == (1,)


def test_error_in_transaction_then_rollback(proxy):
    with connect(proxy) as conn:  # not autocommit: psycopg opens the transaction
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        assert conn.info.transaction_status == TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_error_in_explicit_transaction(proxy):
    with connect(proxy, autocommit=True) as conn:
        conn.execute("BEGIN")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        conn.execute("ROLLBACK")
        assert conn.info.transaction_status == TransactionStatus.IDLE
        assert conn.execute("SELECT 3").fetchone() == (3,)


def test_settings_follow_the_connection_across_transactions(tx_proxy):
    """psycopg sends SET through the extended protocol inside its implicit transaction;
    once committed, the setting follows the connection to every later transaction and never
    reaches another connection on the same pool."""
    with connect(tx_proxy) as a, connect(tx_proxy) as b:
        a.execute("SET application_name = 'psy-a'")
        a.execute("SET statement_timeout = '100ms'")
        a.commit()
        for _ in range(3):
            assert a.execute("SHOW application_name").fetchone() == ("psy-a",)
            a.commit()
            assert b.execute("SHOW statement_timeout").fetchone() == ("0",)
            b.execute("SELECT pg_sleep(0.2)")
            b.commit()
            with pytest.raises(psycopg.errors.QueryCanceled):
                a.execute("SELECT pg_sleep(0.3)")
            a.rollback()
        a.execute("SET application_name = 'never-committed'")
        a.rollback()
        assert a.execute("SHOW application_name").fetchone() == ("psy-a",)


def test_set_config_with_a_parameter_follows_the_connection(tx_proxy):
    """psycopg binds %s server-side, in text format: set_config's value arrives in the Bind,
    and is carried to later transactions like a literal one, never to another connection."""
    with connect(tx_proxy) as a, connect(tx_proxy) as b:
        a.execute("SELECT set_config('app.tenant', %s, false)", ("tenant-a",))
        a.commit()
        for _ in range(3):
            assert a.execute("SELECT current_setting('app.tenant')").fetchone() == ("tenant-a",)
            a.commit()
            seen = b.execute("SELECT current_setting('app.tenant', true)").fetchone()[0]
            assert seen != "tenant-a"
            b.commit()


def test_reset_tells_a_pinned_client_its_own_startup_values(tx_proxy):
    """A pinned client's RESET ALL runs on its server connection, whose own defaults are the
    server's (application_name dbproxy's login name); the client's startup values are set again
    before its next request, and the driver is told them (libpq's ParameterStatus record)."""
    options = {"application_name": "resetter", "options": "-c work_mem=7777kB"}
    with connect(tx_proxy, autocommit=True, **options) as conn:
        conn.execute("LISTEN resetter")
        conn.execute("SET work_mem = '1MB'")
        conn.execute("RESET ALL")
        assert conn.execute("SHOW work_mem").fetchone() == ("7777kB",)
        assert conn.execute("SHOW application_name").fetchone() == ("resetter",)
        assert conn.info.parameter_status("application_name") == "resetter"


def test_reset_tells_a_client_its_own_startup_values(tx_proxy):
    """Not pinned: a RESET runs on a server connection whose own defaults are the server's, and
    the server reports those (application_name dbproxy's login name). The client's startup
    values apply again from its next request, and it is told them with the answer that
    confirms the RESET (after the server's), or the value it set last in the same string."""
    with connect(tx_proxy, autocommit=True, application_name="resetter2") as conn:
        for sql in ["RESET application_name", "SET application_name TO DEFAULT", "RESET ALL"]:
            conn.execute("SET application_name = 'other'")
            assert conn.info.parameter_status("application_name") == "other"
            conn.execute(sql)
            assert conn.info.parameter_status("application_name") == "resetter2", sql
            assert conn.execute("SHOW application_name").fetchone() == ("resetter2",)
        conn.execute("SET application_name = 'other'")
        conn.execute("RESET ALL; SET application_name = 'last'", prepare=False)
        assert conn.info.parameter_status("application_name") == "last"
        # DISCARD ALL alone is answered by dbproxy; through the extended protocol (a pipeline)
        # it runs on a server connection.
        conn.execute("DISCARD ALL", prepare=False)
        assert conn.info.parameter_status("application_name") == "resetter2"
        for first in [None, "SELECT 1", "SET application_name = 'mid'"]:
            conn.execute("SET application_name = 'other'")
            with conn.pipeline() as pipeline:
                if first:
                    conn.execute(first, prepare=False)
                    pipeline.sync()
                conn.execute("DISCARD ALL", prepare=False)
            assert conn.info.parameter_status("application_name") == "resetter2", first
            assert conn.execute("SHOW application_name").fetchone() == ("resetter2",), first
    # A RESET that changes nothing on the server connection (the client had SET the server's
    # own default), so the server reports nothing; an `options` item is a startup value too.
    with connect(tx_proxy, autocommit=True, options="-c TimeZone=Asia/Tokyo") as conn:
        sql = "SELECT reset_val FROM pg_settings WHERE name = 'TimeZone'"
        server_default = conn.execute(sql).fetchone()[0]
        assert server_default != "Asia/Tokyo"
        conn.execute(f"SET TimeZone = '{server_default}'")
        assert conn.info.parameter_status("TimeZone") == server_default
        conn.execute("RESET TimeZone")
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"
        assert conn.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
    # In a transaction block: the server's default until it commits.
    with connect(tx_proxy, application_name="resetter3") as conn:
        conn.execute("SET application_name = 'other'")
        conn.commit()
        conn.execute("RESET application_name")
        conn.commit()
        assert conn.info.parameter_status("application_name") == "resetter3"
        conn.execute("RESET application_name")
        conn.rollback()
        assert conn.info.parameter_status("application_name") == "resetter3"
    # No application_name of its own: the empty one it was shown at login.
    with connect(tx_proxy, autocommit=True) as conn:
        assert conn.info.parameter_status("application_name") == ""
        conn.execute("SET application_name = 'other'")
        conn.execute("RESET application_name")
        assert conn.info.parameter_status("application_name") == ""


def test_unnamed_statement_kept_across_transactions(tx_proxy):
    """libpq's PQprepare of the unnamed statement (Parse, Sync) and a later PQexecPrepared of it
    (Bind, Describe, Execute, Sync), as pgx's describe-exec mode and sqlx's non-persistent
    queries do: two transactions, each of which may land on another server connection, whose
    unnamed statement may be another client's. Every client here has a statement of its own
    (its number in the text, a parameter count of its own), so binding anyone else's shows."""
    clients, rounds = 16, 20
    failures = []

    def client(i):
        try:
            with connect(tx_proxy, autocommit=True) as conn:
                pg = conn.pgconn
                count = i % 4 + 1
                params = ", ".join(f"${k}::int" for k in range(1, count + 1))
                sql = f"SELECT {i}, ARRAY[{params}]::text".encode()
                for j in range(rounds):
                    res = pg.prepare(b"", sql)
                    assert res.status == psycopg.pq.ExecStatus.COMMAND_OK, res.error_message
                    args = [str(j * 10 + k) for k in range(count)]
                    res = pg.exec_prepared(b"", [a.encode() for a in args])
                    assert res.status == psycopg.pq.ExecStatus.TUPLES_OK, res.error_message
                    expected = [str(i).encode(), ("{" + ",".join(args) + "}").encode()]
                    assert [res.get_value(0, 0), res.get_value(0, 1)] == expected
        except Exception as e:  # collected: an assertion in a thread would go unseen
            failures.append(f"client {i}: {e!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]

