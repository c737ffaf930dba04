"""The real stack for tests (devstack.py: RabbitMQ in a fresh vhost, PostgreSQL in a fresh
database, moto's S3 server, a stand-in Ollama with the real bundled model, and the six services
each as its own process, exactly as `make run` starts them), and what tests share."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import httpx
import pytest

from devstack import (  # noqa: F401 (re-exported for the tests)
    ROOT,
    SECRETS,
    SERVICES,
    TEST_ENV,
    Stack,
    free_port,
    postgres_server,
    rabbitmqctl,
    wait_for_port,
)
from devstack import running_stack as dev_stack

FIXTURES = Path(os.environ.get("STT_FIXTURES", ROOT.parent / "shared" / "fixtures"))


@contextlib.contextmanager
def private_vhost() -> Iterator[str]:
    """A RabbitMQ vhost of its own for a test, removed after it."""
    vhost = f"stt_private_{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield vhost
    finally:
        rabbitmqctl("delete_vhost", vhost)


def amqp_url(vhost: str) -> str:
    return f"amqp://guest:guest@127.0.0.1:5672/{vhost}"


# Figures the fault and bad-input tests measured, printed at the end of the run.
FIGURES: list[str] = []


def record_figure(line: str) -> None:
    FIGURES.append(line)


def pytest_terminal_summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


async def events_queue(channel: aio_pika.abc.AbstractChannel, *routing_keys: str) -> aio_pika.abc.AbstractQueue:
    """An exclusive queue bound to stt.events for these routing keys, as a subscriber makes one."""
    exchange = await channel.declare_exchange("stt.events", aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True)
    for routing_key in routing_keys:
        await queue.bind(exchange, routing_key)
    return queue


async def job_events(queue: aio_pika.abc.AbstractQueue, job_id: int | None, enough, timeout: float) -> list[dict]:
    """The bodies of the job's events (None: every job's) on `queue`, acked as they come, once
    `enough(bodies)` holds (AssertionError after `timeout` seconds)."""
    bodies: list[dict] = []
    deadline = time.monotonic() + timeout
    while not enough(bodies):
        assert time.monotonic() < deadline, f"job {job_id}: the events expected never came ({len(bodies)} came)"
        message = await queue.get(fail=False)
        if message is None:
            await asyncio.sleep(0.2)
            continue
        await message.ack()
        body = json.loads(message.body)
        if job_id is None or body["transcript_id"] == job_id:
            bodies.append(body)
    return bodies


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"audio fixtures not found at {FIXTURES} (set STT_FIXTURES)")
    return FIXTURES


@contextlib.contextmanager
def running_stack(tmp_path_factory, **overrides: str) -> Iterator[Stack]:
    """The six services plus moto and the Ollama stand-in, in a fresh vhost and database."""
    keep_logs = ROOT / "test-logs" if os.environ.get("STT_KEEP_LOGS") else None
    with dev_stack(tmp_path_factory.mktemp("stack"), env=TEST_ENV, ollama=True, keep_logs=keep_logs,
                   **overrides) as stack:
        yield stack


@contextlib.contextmanager
def another_ingest(stack: Stack, name: str, **settings: str) -> Iterator[str]:
    """One more ingest process of `stack`, with settings of its own; yields its API address once
    it is ready."""
    port = free_port()
    process = stack.start(name, "-m", "services.ingest", env={**stack.env, "API_PORT": str(port), **settings})
    api = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _answers(f"{api}/readyz"):
            assert process.poll() is None and time.monotonic() < deadline, stack.log_tail(name)
            time.sleep(0.3)
        yield api
    finally:
        stack.stop(name)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def stack(tmp_path_factory, fixtures_dir) -> Iterator[Stack]:
    with running_stack(tmp_path_factory) as running:
        yield running
