#!/usr/bin/env bash
# Start this machine's PostgreSQL and RabbitMQ if they are installed but stopped, wait until
# both answer, and create the `stt` database. Used by `make run`, `make test` and .ci/run.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # name port seconds
  for _ in $(seq 1 "$3"); do port_open "$2" && return 0; sleep 1; done
  echo "$1 did not start listening on port $2" >&2; return 1
}

if ! port_open 5432; then
  if command -v pg_ctlcluster >/dev/null; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start
  else
    echo "PostgreSQL is not running on 127.0.0.1:5432 and not installed here" >&2; exit 1
  fi
fi
if ! port_open 5672; then
  if command -v rabbitmq-server >/dev/null; then
    echo "starting RabbitMQ"
    rabbitmq-server -detached
  else
    echo "RabbitMQ is not running on 127.0.0.1:5672 and not installed here" >&2; exit 1
  fi
fi
wait_port PostgreSQL 5432 60
wait_port RabbitMQ 5672 90
# The AMQP port opens a little before the node accepts clients.
for _ in $(seq 1 30); do rabbitmqctl -q status >/dev/null 2>&1 && break; sleep 1; done

DB_NAME="${STT_DB_NAME:-stt}"
if ! psql "postgresql://postgres@127.0.0.1:5432/postgres" -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'" | grep -q 1; then
  psql "postgresql://postgres@127.0.0.1:5432/postgres" -qc "CREATE DATABASE $DB_NAME"
fi
echo "PostgreSQL and RabbitMQ are up"
