"""A throwaway PostgreSQL cluster for tests: Debian's server binaries, a private data directory, a free port on
127.0.0.1 and a private Unix socket directory. As root the server runs as the `postgres` OS user (PostgreSQL
refuses to run as root). Stopping and starting again reuses the same data directory and port, so a test can take
the database away mid-session and bring it back with its data.

    with LocalPostgres() as pg:           # initdb + start (~1 s)
        pg.bootstrap()                    # Supabase's roles, auth schema, extensions, default privileges
        pg.apply_migrations(REPO / "supabase" / "migrations")
        pg.execute("select 1")            # -> [(1,)]
        pg.stop(); pg.start()             # same data, same port

Client library: psycopg 3 (`psycopg[binary]`)."""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

BOOTSTRAP_SQL = Path(__file__).with_name("bootstrap.sql")

# Settings for a disposable, fast cluster: durability off (the data lives only as long as the test session).
_SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "50",
    "shared_buffers": "32MB",
    "max_wal_senders": "0",
    "wal_level": "minimal",
    "log_min_messages": "warning",
    "timezone": "UTC",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_bin_dir() -> Path:
    """The newest installed PostgreSQL server's bin directory (Debian: /usr/lib/postgresql/<major>/bin)."""
    candidates = [Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "initdb").exists()]
    if not candidates:
        found = shutil.which("initdb") or shutil.which("pg_ctl")
        if found:
            return Path(found).resolve().parent
        raise FileNotFoundError("no PostgreSQL server binaries (apt-get install -y postgresql)")
    return max(candidates, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)


class LocalPostgres:
    """One private PostgreSQL cluster. `dsn` connects as the superuser `postgres` to the database `postgres`
    (as on Supabase). `dsn_for(user)` builds a DSN for another role (local connections are `trust`)."""

    def __init__(
        self,
        *,
        bin_dir: str | Path | None = None,
        port: int | None = None,
        base_dir: str | Path | None = None,
        keep: bool = False,
    ) -> None:
        self.bin_dir = Path(bin_dir) if bin_dir else find_bin_dir()
        self.port = port or _free_port()
        self.host = "127.0.0.1"
        self.user = "postgres"
        self.dbname = "postgres"
        self.keep = keep
        self.root = Path(tempfile.mkdtemp(prefix="localpg-", dir=base_dir))
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_file = self.root / "postgres.log"
        self._as_root = os.geteuid() == 0
        self._initialized = False
        self._running = False
        self._cleaned = False
        atexit.register(self._atexit)

    # ---- lifecycle -----------------------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        return self.dsn_for(self.user)

    def dsn_for(self, user: str, dbname: str | None = None) -> str:
        return f"host={self.host} port={self.port} user={user} dbname={dbname or self.dbname} connect_timeout=5"

    @property
    def running(self) -> bool:
        return self._running

    def _run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [str(a) for a in args]
        if self._as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
        if check and proc.returncode != 0:
            log = self.log_file.read_text(errors="replace")[-4000:] if self.log_file.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{log}")
        return proc

    def _init(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            pw = pwd.getpwnam("postgres")
            for path in (self.root, self.socket_dir):
                os.chown(path, pw.pw_uid, pw.pw_gid)
            os.chmod(self.root, 0o700)
        self._run(
            self.bin_dir / "initdb",
            "-D",
            self.data_dir,
            "-U",
            self.user,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
            "--no-instructions",
        )
        conf = "".join(f"{k} = '{v}'\n" for k, v in _SERVER_SETTINGS.items())
        conf += f"port = {self.port}\nunix_socket_directories = '{self.socket_dir}'\n"
        with open(self.data_dir / "postgresql.auto.conf", "a") as f:
            f.write(conf)
        self._initialized = True

    def start(self) -> LocalPostgres:
        """Start the server (creating the cluster on first use); returns once it accepts connections."""
        if self._running:
            return self
        if not self._initialized:
            self._init()
        self._run(self.bin_dir / "pg_ctl", "-D", self.data_dir, "-l", self.log_file, "-w", "-t", "30", "start")
        self._running = True
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn, autocommit=True):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast`: disconnect clients, roll back open transactions). Data stays on disk."""
        if not self._running:
            return
        self._run(self.bin_dir / "pg_ctl", "-D", self.data_dir, "-m", mode, "-w", "-t", "30", "stop", check=False)
        self._running = False

    def restart(self) -> LocalPostgres:
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop and delete the cluster (unless `keep=True`)."""
        self.stop(mode="immediate")
        if not self.keep and not self._cleaned:
            shutil.rmtree(self.root, ignore_errors=True)
            self._cleaned = True

    def _atexit(self) -> None:
        try:
            self.cleanup()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # ---- SQL -----------------------------------------------------------------------------------------------

    def connect(self, user: str | None = None, **kwargs: Any) -> psycopg.Connection:
        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.dsn_for(user or self.user), **kwargs)

    def execute(self, sql: str, params: Any = None, *, user: str | None = None) -> list[tuple]:
        """Run SQL (several statements allowed when `params` is None) in autocommit as the superuser (or
        `user`); returns the rows of the last statement that returned rows."""
        with self.connect(user) as conn:
            cur = conn.execute(sql, params) if params is not None else conn.execute(sql.encode())
            rows: list[tuple] = []
            while True:
                if cur.description is not None:
                    rows = cur.fetchall()
                if not cur.nextset():
                    break
            return rows

    def run_script(self, sql: str) -> None:
        """Run a multi-statement SQL script in one transaction (as `psql -1` would, minus meta-commands)."""
        with self.connect(autocommit=False) as conn:
            conn.execute(sql.encode())
            conn.commit()

    def bootstrap(self, path: str | Path = BOOTSTRAP_SQL) -> None:
        """Recreate Supabase's conventions (see bootstrap.sql)."""
        self.run_script(Path(path).read_text())

    def apply_migrations(self, directory: str | Path) -> list[Path]:
        """Apply every `*.sql` in `directory` in filename order, each in its own transaction, as the superuser
        (Supabase runs migrations as `postgres`). Returns the files applied (empty if there are none)."""
        files = sorted(Path(directory).glob("*.sql"))
        for file in files:
            try:
                self.run_script(file.read_text())
            except psycopg.Error as e:
                raise RuntimeError(f"migration {file.name} failed: {e}") from e
        return files
