#!/usr/bin/env bash
# Start this machine's RabbitMQ if it is installed but stopped, and wait until it answers. Used by
# `make run`, `make test` and .ci/run. PostgreSQL is embedded (devstack.py) unless DATABASE_URL
# (make run) or TEST_PG_ADMIN_URL (tests) names a server.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! port_open 5672; then
  if command -v rabbitmq-server >/dev/null; then
    echo "starting RabbitMQ"
    rabbitmq-server -detached
  else
    echo "RabbitMQ is not running on 127.0.0.1:5672 and not installed here" >&2; exit 1
  fi
fi
for _ in $(seq 1 90); do port_open 5672 && break; sleep 1; done
port_open 5672 || { echo "RabbitMQ did not start listening on port 5672" >&2; exit 1; }
# The AMQP port opens a little before the node accepts clients.
for _ in $(seq 1 30); do rabbitmqctl -q status >/dev/null 2>&1 && break; sleep 1; done
echo "RabbitMQ is up"
