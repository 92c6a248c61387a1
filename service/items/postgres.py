"""The item store on PostgreSQL, for several API hosts on one database (psycopg 3, a pool).

Chosen by `SIMCLR_EMBED_STORE_URL=postgresql://user@host/db`. The logic is the shared
`SqlItemStore` (sqlstore.py); this module holds only what PostgreSQL does differently: the
schema and its migrations, and how a transaction is opened.

Transactions. Every write takes `pg_advisory_xact_lock(WRITE_LOCK)` first, so writers run
one at a time, as SQLite's do: a check-then-write (an add that must not overwrite, the
completion check, the re-embedding claim) is atomic under READ COMMITTED, and the counter
rows are never locked in two orders (no deadlocks). A write is short (the embedding is done
before it) and its commit waits for the WAL flush (`synchronous_commit` on, the server's
default), so a 2xx is sent only for a durable row. Multi-statement reads run in a
REPEATABLE READ, READ ONLY transaction (one snapshot).

The change log and gaps. PostgreSQL hands out SEQUENCE/IDENTITY values before commit and
never gives them back, so a reader following such numbers can see seq 12 committed while 11
is still in flight, and 11 may never appear (rolled back). The log's numbers here are not
taken from a sequence: `_record` adds to the space's `models.changes` counter in the
write's own transaction (`UPDATE ... RETURNING`). That row stays locked until commit (and
the write lock serialises writers anyway), so the next writer reads the counter only after
the previous one committed: numbers become visible in commit order, and a rolled-back write
takes its numbers with it, leaving no hole. The reader (`follower.LogFollower`) still
tolerates holes, as a second line: rows above a hole are applied at once, the hole's window
is read again at each poll until it fills, and a hole open longer than its grace period is
passed as a rolled-back write. Item pks do come from an IDENTITY column: they need to be
unique and never reused (FAISS ids), not gapless.

Compaction is the shared rule: rows at or below this host's snapshot position and older
than `index_log_retention_s` (a day by default) are dropped; a host down for longer than
that finds its snapshot older than the log and rebuilds its index from the store.

Migrations. `simclr_schema` holds the schema version; the steps above it run at open, in
one transaction under `pg_advisory_xact_lock(MIGRATE_LOCK)`, so hosts starting together
migrate once: the first runs the steps, the others wait on the lock and find them done.

Unreachable database: a pool timeout or a broken connection raises StoreUnavailableError
(503 at the API); the pool checks a connection before lending it, so the store recovers by
itself when the server is back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from service.items.errors import StoreUnavailableError
from service.items.sqlstore import Db, SqlItemStore, apply_migrations

log = logging.getLogger(__name__)

WRITE_LOCK = 0x53494D434C52_01  # advisory lock keys (per database): "SIMCLR" + 1, + 2
MIGRATE_LOCK = 0x53494D434C52_02

_V1 = """
CREATE TABLE items (
    pk BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    metadata TEXT,
    sha256 TEXT NOT NULL,
    content_type TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL
);
CREATE INDEX items_sha256 ON items(sha256);
CREATE TABLE vectors (
    model_id TEXT NOT NULL,
    item BIGINT NOT NULL REFERENCES items(pk) ON DELETE CASCADE,
    vec BYTEA NOT NULL,
    PRIMARY KEY (model_id, item)
);
ALTER TABLE vectors ALTER COLUMN vec SET STORAGE EXTERNAL;
CREATE INDEX vectors_item ON vectors(item);
CREATE TABLE models (
    model_id TEXT PRIMARY KEY,
    dim INTEGER NOT NULL,
    changes BIGINT NOT NULL DEFAULT 0,
    count BIGINT NOT NULL DEFAULT 0,
    complete INTEGER NOT NULL DEFAULT 0,
    completed_at DOUBLE PRECISION
);
CREATE TABLE counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO counters(name, value) VALUES ('items', 0);
CREATE TABLE changelog (
    space TEXT NOT NULL,
    seq BIGINT NOT NULL,
    item BIGINT NOT NULL,
    op SMALLINT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (space, seq)
);
CREATE TABLE reembed (
    space TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    started DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    error TEXT
)
"""
# Step i brings the schema to version i + 1. Vectors are stored EXTERNAL: float bytes do not compress.
_V2 = """
CREATE TABLE orphans (sha256 TEXT PRIMARY KEY, since DOUBLE PRECISION NOT NULL, deleting DOUBLE PRECISION)
"""
# The classifiers (service/classifiers/storage.py): parameters as an .npz blob.
_V3 = """
CREATE TABLE classifiers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    method TEXT NOT NULL,
    label_key TEXT,
    examples TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL
);
CREATE TABLE classifier_fits (
    classifier_id TEXT NOT NULL REFERENCES classifiers(id) ON DELETE CASCADE,
    model_id TEXT NOT NULL,
    fit_id TEXT NOT NULL UNIQUE,
    fitted_at DOUBLE PRECISION NOT NULL,
    classes TEXT NOT NULL,
    counts TEXT NOT NULL,
    cv TEXT NOT NULL,
    params BYTEA NOT NULL,
    PRIMARY KEY (classifier_id, model_id)
)
"""
MIGRATIONS = (_V1, _V2, _V3)
SCHEMA_VERSION = len(MIGRATIONS)


@lru_cache(maxsize=512)
def _placeholders(sql: str) -> str:
    """The shared SQL's `?` placeholders as psycopg's `%s` (a literal `%` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PgDb:
    """A psycopg connection speaking the shared `Db` protocol."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] | None = None, /) -> psycopg.Cursor[Any]:
        if params is None:
            return self.conn.execute(sql)
        return self.conn.execute(_placeholders(sql), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> psycopg.Cursor[Any]:
        cur = self.conn.cursor()
        cur.executemany(_placeholders(sql), rows)
        return cur


class PgItemStore(SqlItemStore):
    """Thread-safe: a pool of connections (`pool_size` at most), each lent to one statement
    or transaction."""

    def __init__(self, url: str, *, pool_size: int = 8, timeout_s: float = 5.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True, "connect_timeout": max(1, round(timeout_s))},
            check=ConnectionPool.check_connection,
            timeout=timeout_s,
            # A failed connection attempt is retried with a doubling wait (1, 2, 4, ... s) until
            # this much time has passed; the next borrower then starts a fresh attempt at once.
            # Kept short, so the store is back within seconds of the server, however long it
            # was down (the pool's default of 300 s left a 45 s outage 14 s to recover).
            reconnect_timeout=max(2.0, timeout_s),
            open=True,
            name="item-store",
        )
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        try:
            self._ensure_schema()
        except StoreUnavailableError as exc:  # started while the server is down: migrate on first use
            log.warning("%s; the schema is checked again on the next use", exc.message)
        except BaseException:
            self._pool.close()
            raise

    def _ensure_schema(self) -> None:
        """Apply the migrations above the stored version (once per store object; several hosts
        starting at once take turns on an advisory lock)."""
        with self._schema_lock:
            if self._schema_ready:
                return
            with self._pooled() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
                conn.execute("CREATE TABLE IF NOT EXISTS simclr_schema (version INTEGER NOT NULL)")
                row = conn.execute("SELECT version FROM simclr_schema").fetchone()
                version = row[0] if row else 0
                if version < SCHEMA_VERSION:
                    apply_migrations(_PgDb(conn), version, MIGRATIONS)
                    conn.execute("DELETE FROM simclr_schema")
                    conn.execute("INSERT INTO simclr_schema(version) VALUES (%s)", (SCHEMA_VERSION,))
            self._schema_ready = True

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection to a migrated schema; an unreachable server becomes StoreUnavailableError."""
        if not self._schema_ready:
            self._ensure_schema()
        with self._pooled() as conn:
            yield conn

    @contextmanager
    def _pooled(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise StoreUnavailableError(
                f"the item store (PostgreSQL) is unreachable: no connection within {self.timeout_s:g} s; "
                "nothing was written, retry shortly"
            ) from exc
        except psycopg.OperationalError as exc:
            raise StoreUnavailableError(
                f"the item store (PostgreSQL) connection failed ({str(exc).strip() or type(exc).__name__}); "
                "nothing was written, retry shortly"
            ) from exc

    @contextmanager
    def _tx(self) -> Iterator[Db]:
        with self._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            yield _PgDb(conn)

    @contextmanager
    def _read(self) -> Iterator[Db]:
        with self._connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield _PgDb(conn)

    @contextmanager
    def _conn(self) -> Iterator[Db]:
        with self._connection() as conn:
            yield _PgDb(conn)
