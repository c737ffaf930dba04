"""The dev stack (devstack.py, the same one the tests start) with the benchmarks' settings:
production-like limits, the offline diarizer and the local embedding model; it is ready once
every worker consumes (models loaded)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from devstack import BENCH_ENV, SERVICES, Stack
from devstack import running_stack as dev_stack


@contextlib.contextmanager
def running_stack(services: tuple[str, ...] = SERVICES, keep_logs: Path | None = None,
                  **overrides: str) -> Iterator[Stack]:
    log_dir = Path(tempfile.mkdtemp(prefix="stt_bench_"))
    try:
        with dev_stack(log_dir, env=BENCH_ENV, services=services, wait_for_workers=True,
                       keep_logs=keep_logs, **overrides) as stack:
            yield stack
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
