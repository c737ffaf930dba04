#!/usr/bin/env bash
# `make run`: the whole stack on this machine, each service its own process (honcho).
# Without MINIO_ENDPOINT, moto's S3 server stands in for MinIO on 127.0.0.1:9000.
# Prometheus metrics: ingest on :8000/metrics, the workers on :9101-9105 (set in the Procfile).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .env ] && set -a && . ./.env && set +a
scripts/local-services.sh
# Without DATABASE_URL: the embedded PostgreSQL (data in .state/postgres, kept across runs).
if [ -z "${DATABASE_URL:-}" ]; then
  DATABASE_URL="$(.venv/bin/python devstack.py database-url)"
  export DATABASE_URL
  echo "PostgreSQL (embedded): $DATABASE_URL"
fi
# Offline defaults for a laptop or this machine; any of them set in .env or the shell wins.
export WHISPER_MODEL="${WHISPER_MODEL:-$PWD/models/whisper-base}"
export EMBEDDING_BACKEND="${EMBEDDING_BACKEND:-local}"
export DIARIZATION_BACKEND="${DIARIZATION_BACKEND:-auto}"
export PYTHONUNBUFFERED=1
# Ctrl-C: honcho kills what still runs 5 s after it signals the services. A worker's grace ends
# before that, so the message it holds is handed back instead of counting a delivery against
# DELIVERY_LIMIT; this wins over .env (whose 30 s suits an orchestrator's stop timeout).
export SHUTDOWN_GRACE_S=3
export PATH="$PWD/.venv/bin:$PATH"  # the Procfile's `python` is the venv's
if [ -z "${MINIO_ENDPOINT:-}" ]; then
  export MINIO_ENDPOINT=127.0.0.1:9000
  exec .venv/bin/honcho start -f Procfile
else
  exec .venv/bin/honcho start -f Procfile ingest diarizer transcriber embedder persister notifier
fi
