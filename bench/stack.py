"""The whole system as separate processes for end-to-end measurements, the way tests/conftest.py
starts it: moto's S3 server, the five services, a fresh RabbitMQ vhost and PostgreSQL database
(removed afterwards). Everything listens on and talks to 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

from bench.common import ROOT, WHISPER_MODEL
from tests.conftest import PG_ADMIN_URL, free_port, wait_for_port

SERVICES = ("ingest", "diarizer", "transcriber", "embedder", "persister")
WORKERS = ("diarizer", "transcriber", "embedder", "persister")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \|")


def _run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=60)


@dataclass
class Stack:
    env: dict[str, str]
    api: str
    log_dir: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=self.env, stdout=log,
                                   stderr=subprocess.STDOUT)
        self.processes[name] = process
        return process

    def start_service(self, service: str, name: str | None = None) -> subprocess.Popen:
        return self.start(name or service, "-m", f"services.{service}")

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

    def log_tail(self, name: str, lines: int = 30) -> str:
        return "\n".join(self.log_text(name).splitlines()[-lines:])

    def check_alive(self) -> None:
        dead = [n for n, p in self.processes.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"services died: {dead}\n" + "\n".join(self.log_tail(n) for n in dead))

    def wait_ready(self, workers: tuple[str, ...] = WORKERS, timeout: float = 240) -> None:
        """/readyz answers 200 and every worker logged that it consumes (models loaded)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                ok = httpx.get(f"{self.api}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok and all("consuming stt." in self.log_text(w) for w in workers):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the stack never became ready:\n"
                                   + "\n".join(f"--- {n}\n{self.log_tail(n, 10)}" for n in self.processes))
            time.sleep(0.5)

    def submit(self, path: Path, data: dict | None = None, name: str | None = None,
               client: httpx.Client | None = None) -> int:
        with path.open("rb") as f:
            response = (client or httpx).post(f"{self.api}/recognize", files={"file": (name or path.name, f)},
                                              data=data or {}, timeout=600)
        if response.status_code != 202:
            raise RuntimeError(f"POST /recognize answered {response.status_code}: {response.text[:300]}")
        return response.json()["id"]

    def status(self, job_id: int, client: httpx.Client | None = None) -> dict:
        return (client or httpx).get(f"{self.api}/status/{job_id}", timeout=30).json()

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

    def log_times(self, name: str, pattern: str) -> list[datetime]:
        """Timestamps of the log lines of process `name` that contain `pattern`."""
        out = []
        for line in self.log_text(name).splitlines():
            m = LOG_TIME.match(line)
            if m and pattern in line:
                out.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"))
        return out


@contextlib.contextmanager
def running_stack(services: tuple[str, ...] = SERVICES, keep_logs: Path | None = None,
                  **overrides: str) -> Iterator[Stack]:
    name = f"stt_bench_{uuid.uuid4().hex[:8]}"
    log_dir = Path(tempfile.mkdtemp(prefix=name))
    s3_port, api_port = free_port(), free_port()
    _run("rabbitmqctl", "add_vhost", name)
    _run("rabbitmqctl", "add_user", name, name)
    _run("rabbitmqctl", "set_permissions", "-p", name, name, ".*", ".*", ".*")
    _run("psql", PG_ADMIN_URL, "-v", "ON_ERROR_STOP=1", "-qc", f"CREATE DATABASE {name}")
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "LOG_LEVEL": "INFO",
        "AMQP_URL": f"amqp://{name}:{name}@127.0.0.1:5672/{name}",
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{name}",
        "MINIO_ENDPOINT": f"127.0.0.1:{s3_port}",
        "MINIO_ACCESS_KEY": "bench",
        "MINIO_SECRET_KEY": "bench-secret",
        "API_HOST": "127.0.0.1",
        "API_PORT": str(api_port),
        "MAX_UPLOAD_MB": "2048",
        "MAX_AUDIO_HOURS": "2",
        "INBOX_SCAN_INTERVAL_S": "60",
        "DIARIZATION_BACKEND": "offline",
        "HF_TOKEN": "",
        "WHISPER_MODEL": str(WHISPER_MODEL),
        "EMBEDDING_BACKEND": "local",
        "HF_HUB_OFFLINE": "1",
        "PYANNOTE_METRICS_ENABLED": "0",
        "METRICS_PORT": "0",  # several replicas of one service run on this host
        **overrides,
    }
    if not env.get("HF_TOKEN"):
        env.pop("HF_TOKEN")
    stack = Stack(env=env, api=f"http://127.0.0.1:{api_port}", log_dir=log_dir)
    try:
        stack.start("s3", "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port))
        wait_for_port(s3_port)
        for service in services:
            stack.start_service(service)
        stack.wait_ready(tuple(s for s in services if s in WORKERS))
        yield stack
    finally:
        for process_name in list(stack.processes):
            stack.stop(process_name)
        if keep_logs:
            shutil.copytree(log_dir, keep_logs / name, dirs_exist_ok=True)
        shutil.rmtree(log_dir, ignore_errors=True)
        subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60)
        subprocess.run(["rabbitmqctl", "delete_user", name], capture_output=True, timeout=60)
        subprocess.run(["psql", PG_ADMIN_URL, "-qc", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"],
                       capture_output=True, timeout=60)
