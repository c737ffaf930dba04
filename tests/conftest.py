"""The real stack for tests: RabbitMQ (a fresh vhost), PostgreSQL (a fresh database), moto's
S3 server, a stand-in Ollama with the real bundled model, and the five services each as its
own process, exactly as `make run` starts them."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import asyncpg
import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("STT_FIXTURES", ROOT.parent / "shared" / "fixtures"))
SERVICES = ("ingest", "diarizer", "transcriber", "embedder", "persister")
PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


# Figures the fault and bad-input tests measured, printed at the end of the run.
FIGURES: list[str] = []


def record_figure(line: str) -> None:
    FIGURES.append(line)


def pytest_terminal_summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port}")


async def events_queue(channel: aio_pika.abc.AbstractChannel, *routing_keys: str) -> aio_pika.abc.AbstractQueue:
    """An exclusive queue bound to stt.events for these routing keys, as a subscriber makes one."""
    exchange = await channel.declare_exchange("stt.events", aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True)
    for routing_key in routing_keys:
        await queue.bind(exchange, routing_key)
    return queue


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def psql(sql: str) -> None:
    subprocess.run(["psql", PG_ADMIN_URL, "-v", "ON_ERROR_STOP=1", "-qc", sql], check=True,
                   capture_output=True, timeout=60)


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

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        self.processes[name] = process
        return process

    def start_service(self, name: str) -> subprocess.Popen:
        port = self.metrics_ports.get(name)
        env = {**self.env, "METRICS_PORT": str(port)} if port else None
        return self.start(name, "-m", f"services.{name}", env=env)

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

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def s3(self):
        from minio import Minio

        return Minio(self.env["MINIO_ENDPOINT"], access_key="test",
                     secret_key=self.env["MINIO_SECRET_KEY"], secure=False)

    def query(self, sql: str, *args) -> list:
        """Run one SQL statement on the stack's database; usable from sync and async tests."""
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
        """Settings for running a component in the test process against this stack."""
        from common.settings import Settings

        same = {name: self.env[name.upper()] for name in Settings.model_fields if name.upper() in self.env}
        return Settings(**{**same, **overrides})

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.api}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.processes["ingest"].poll() is not None:
                raise RuntimeError("ingest never became ready:\n" + self.log_tail("ingest"))
            time.sleep(0.5)

    # ---- client helpers -------------------------------------------------------------------

    def submit(self, path: Path | str, data: dict | None = None, name: str | None = None) -> httpx.Response:
        path = Path(path)
        with path.open("rb") as f:
            return httpx.post(f"{self.api}/recognize", files={"file": (name or path.name, f)},
                              data=data or {}, timeout=60)

    def wait_finished(self, job_id: int, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            document = httpx.get(f"{self.api}/status/{job_id}", timeout=10).json()
            if document["status"] != "processing":
                return document
            dead = [n for n, p in self.processes.items() if p.poll() is not None]
            if dead:
                raise AssertionError(f"services died: {dead}\n" + "\n".join(self.log_tail(n) for n in dead))
            time.sleep(0.5)
        tails = "\n".join(f"--- {n}\n{self.log_tail(n, 15)}" for n in SERVICES)
        raise AssertionError(f"job {job_id} still processing after {timeout} s\n{tails}")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"audio fixtures not found at {FIXTURES} (set STT_FIXTURES)")
    return FIXTURES


# Secrets the stack runs with; tests assert none of them ever reaches a log line or response.
SECRETS = {
    "AMQP_PASSWORD": "amqp-Pw-7f3c9e",
    "DB_PASSWORD": "db-Pw-51ab0d",
    "MINIO_SECRET_KEY": "s3-Secret-9d27aa",
    "HF_TOKEN": "hf_SecretToken0123456789abcdef",
}


@contextlib.contextmanager
def running_stack(tmp_path_factory, **overrides: str) -> Iterator[Stack]:
    """The five services plus moto and the Ollama stand-in, in a fresh vhost and database."""
    name = f"stt_test_{uuid.uuid4().hex[:8]}"
    log_dir = tmp_path_factory.mktemp(name)
    s3_port, api_port, ollama_port = free_port(), free_port(), free_port()
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("add_user", name, SECRETS["AMQP_PASSWORD"])
    rabbitmqctl("set_permissions", "-p", name, name, ".*", ".*", ".*")
    psql(f"CREATE DATABASE {name}")
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "LOG_LEVEL": "INFO",
        "AMQP_URL": f"amqp://{name}:{SECRETS['AMQP_PASSWORD']}@127.0.0.1:5672/{name}",
        # trust auth here ignores the password, but the services still carry it
        "DATABASE_URL": f"postgresql://postgres:{SECRETS['DB_PASSWORD']}@127.0.0.1:5432/{name}",
        "MINIO_ENDPOINT": f"127.0.0.1:{s3_port}",
        "MINIO_ACCESS_KEY": "test",
        "MINIO_SECRET_KEY": SECRETS["MINIO_SECRET_KEY"],
        "API_HOST": "127.0.0.1",
        "API_PORT": str(api_port),
        "MAX_UPLOAD_MB": "5",
        "MAX_AUDIO_HOURS": "0.1",
        "INBOX_SCAN_INTERVAL_S": "1",
        "RETRY_DELAYS_S": "1,2",
        "DELIVERY_LIMIT": "3",
        # auto + a token: the diarizer tries pyannote (not installed here) and falls back
        "DIARIZATION_BACKEND": "auto",
        "HF_TOKEN": SECRETS["HF_TOKEN"],
        "WHISPER_MODEL": str(ROOT / "models" / "whisper-base"),
        "EMBEDDING_BACKEND": "ollama",
        "OLLAMA_URL": f"http://127.0.0.1:{ollama_port}",
        "HF_HUB_OFFLINE": "1",
        "METRICS_PORT": "0",  # workers get their own below; other processes serve none
        **overrides,
    }
    stack = Stack(env=env, api=f"http://127.0.0.1:{api_port}", log_dir=log_dir,
                  metrics_ports={s: free_port() for s in SERVICES if s != "ingest"})
    try:
        stack.start("s3", "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port))
        stack.start("ollama", "-m", "tests.fake_ollama", "--port", str(ollama_port))
        wait_for_port(s3_port)
        for service in SERVICES:
            stack.start_service(service)
        stack.wait_ready()
        wait_for_port(ollama_port, timeout=120)
        yield stack
    finally:
        for process_name in list(stack.processes):
            stack.stop(process_name)
        if os.environ.get("STT_KEEP_LOGS"):
            shutil.copytree(log_dir, ROOT / "test-logs" / name, dirs_exist_ok=True)
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60)
        subprocess.run(["rabbitmqctl", "delete_user", name], capture_output=True, timeout=60)
        subprocess.run(["psql", PG_ADMIN_URL, "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"],
                       capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def stack(tmp_path_factory, fixtures_dir) -> Iterator[Stack]:
    with running_stack(tmp_path_factory) as running:
        yield running
