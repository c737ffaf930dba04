#!/usr/bin/env bash
# `make run`: the whole stack on this machine, each service its own process (honcho).
# Without MINIO_ENDPOINT, moto's S3 server stands in for MinIO on 127.0.0.1:9000.
# Prometheus metrics: ingest on :8000/metrics, the workers on :9101-9105 (set in the Procfile).
set -euo pipefail
cd "$(dirname "$0")/.."
# Settings: .env's, except those the shell sets (as the services themselves read .env).
if [ -f .env ]; then
  declare -A shell_env=()
  for name in $(compgen -e); do shell_env[$name]="${!name}"; done
  set -a; . ./.env; set +a
  for name in "${!shell_env[@]}"; do
    [ "${!name-}" = "${shell_env[$name]}" ] || export "$name=${shell_env[$name]}"
  done
  unset shell_env name
fi
# This machine's RabbitMQ (started if need be), unless AMQP_URL names another broker.
address="${AMQP_URL:-amqp://127.0.0.1}"; address="${address#*://}"; address="${address%%[/?]*}"
address="${address##*@}"  # host[:port], without user:password@
case "${AMQP_URL:-amqp://}" in amqp://*) ;; *) address="$address (TLS)" ;; esac
case "${address,,}" in
  127.0.0.1 | 127.0.0.1:5672 | localhost | localhost:5672) scripts/local-services.sh ;;
  *) echo "RabbitMQ: $address (AMQP_URL), none started here" ;;
esac
# Without DATABASE_URL: the embedded PostgreSQL (data in .state/postgres, kept across runs).
if [ -z "${DATABASE_URL:-}" ]; then
  DATABASE_URL="$(.venv/bin/python devstack.py database-url)"
  export DATABASE_URL
  echo "PostgreSQL (embedded): $DATABASE_URL"
fi
# Offline defaults for a laptop or this machine; any of them set in .env or the shell wins. The
# API is open without API_KEYS: on this host only, as compose publishes it, unless API_HOST says.
export API_HOST="${API_HOST:-127.0.0.1}"
export WHISPER_MODEL="${WHISPER_MODEL:-$PWD/models/whisper-base}"
export EMBEDDING_BACKEND="${EMBEDDING_BACKEND:-local}"
export DIARIZATION_BACKEND="${DIARIZATION_BACKEND:-auto}"
export PYTHONUNBUFFERED=1
# Ctrl-C: honcho kills what still runs 5 s after it signals the services. Every grace ends before
# that, ingest's two included (requests in flight, then its consumers: 2 x SHUTDOWN_GRACE_S), so a
# message held is handed back instead of counting a delivery against DELIVERY_LIMIT; this wins
# over .env and the shell (30 s suits an orchestrator's stop timeout).
export SHUTDOWN_GRACE_S=1
export PATH="$PWD/.venv/bin:$PATH"  # the Procfile's `python` is the venv's
# `-e /dev/null`: the environment above is .env's already; honcho's own reading of .env would put
# .env's values back over it (SHUTDOWN_GRACE_S, the shell's settings) in every service.
if [ -z "${MINIO_ENDPOINT:-}" ]; then
  export MINIO_ENDPOINT=127.0.0.1:9000
  exec .venv/bin/honcho start -e /dev/null -f Procfile
else
  exec .venv/bin/honcho start -e /dev/null -f Procfile ingest diarizer transcriber embedder persister notifier
fi
