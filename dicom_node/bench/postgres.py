"""A real, throwaway PostgreSQL server for the tests and the benchmarks (the Debian
`postgresql` binaries).

`PostgresServer.start()` runs ``initdb`` into a fresh temporary folder and starts
``postgres`` on it, listening on 127.0.0.1 at a free port and on a Unix socket in that
folder, then waits (with a deadline) until it accepts connections. Each test gets its
own database (`create_database`, from template0) and drops it afterwards; `stop()` ends
the server and removes the folder.

initdb refuses to run as root: as root, the server runs as the `postgres` system user
(created by the Debian package) and the folder is made its own. Durability settings
are off (fsync, synchronous_commit): a test server that loses its data in a power cut
costs nothing, and the machine is shared. (A benchmark's figures are therefore those of
the node with a PostgreSQL that does not wait for its disk.)
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from dicom_node.bench.processes import free_ports

START_TIMEOUT = 60
SUPERUSER = "postgres"


def postgres_bin_dir() -> Path | None:
    """The folder of the newest installed PostgreSQL server binaries, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    return Path(on_path).parent if on_path else None


class PostgresServer:
    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        # Not tempfile's current directory: start_scp (an earlier test in the session) points
        # it at a node's data_dir/tmp, which the postgres user cannot reach.
        self.root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-", dir=os.environ.get("TMPDIR") or "/tmp"))
        self.data = self.root / "data"
        self.port = free_ports(1)[0]
        self.process: subprocess.Popen | None = None
        self._names = itertools.count(1)
        self._run_as = SUPERUSER if os.geteuid() == 0 else None

    def _as_owner(self) -> dict:
        """subprocess arguments that run a server binary as its owner (not root)."""
        if not self._run_as:
            return {"cwd": self.root}
        user = pwd.getpwnam(self._run_as)
        return {"cwd": self.root, "user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def start(self) -> PostgresServer:
        if self._run_as:
            user = pwd.getpwnam(self._run_as)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        if not self.data.exists():
            self._initdb()
        self.log = open(self.root / "server.log", "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-k", str(self.root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                "-c", "max_connections=200",
            ],
            stdout=self.log, stderr=subprocess.STDOUT, **self._as_owner(),
        )
        self._wait_until_ready()
        return self

    def _initdb(self) -> None:
        subprocess.run(
            [str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
             "--auth=trust", "--encoding=UTF8", "--no-sync"],
            check=True, capture_output=True, timeout=START_TIMEOUT, **self._as_owner(),
        )

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.process.returncode}: {self.server_log()}")
            ready = subprocess.run(
                [str(self.bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER],
                check=False, capture_output=True,
            )
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not accept connections in {START_TIMEOUT} s: {self.server_log()}")
            time.sleep(0.1)

    def server_log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def url(self, database: str = "postgres", *, user: str = SUPERUSER, password: str | None = None) -> str:
        """A SQLAlchemy URL for `database` on this server (psycopg 3, over TCP)."""
        credentials = user if password is None else f"{user}:{password}"
        return f"postgresql+psycopg://{credentials}@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str) -> None:
        """Run `sql` as the superuser, outside a transaction (CREATE/DROP DATABASE)."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(sql)

    def create_database(self) -> str:
        """A fresh, empty database; returns its name."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        self.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return name

    def drop_database(self, name: str) -> None:
        # FORCE: end the connections a test's child processes may have left behind.
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self, *, remove: bool = True) -> None:
        """Stop the server; with remove=False its data stays, for start() again (same port)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # "fast" shutdown: ends client sessions
            try:
                self.process.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if hasattr(self, "log"):
            self.log.close()
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)
