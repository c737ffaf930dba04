#!/usr/bin/env bash
# Start this machine's RabbitMQ if it is installed but stopped, and wait until it answers. Used by
# `make run`, `make test` and .ci/run. PostgreSQL is embedded (devstack.py) unless DATABASE_URL
# (make run) or TEST_PG_ADMIN_URL (tests) names a server.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Listening already (started before, run by another user or in Docker, where rabbitmqctl may not
# reach it): nothing to start or wait for.
if port_open 5672; then
  echo "RabbitMQ is up (listening on 127.0.0.1:5672)"
  exit 0
fi
if ! command -v rabbitmq-server >/dev/null; then
  echo "RabbitMQ is not running on 127.0.0.1:5672 and not installed here" >&2; exit 1
fi
echo "starting RabbitMQ"
rabbitmq-server -detached || { echo "rabbitmq-server -detached failed: RabbitMQ is not running" >&2; exit 1; }
for _ in $(seq 1 90); do port_open 5672 && break; sleep 1; done
port_open 5672 || {
  echo "RabbitMQ did not start listening on port 5672 within 90 s (see its log: /var/log/rabbitmq/ on Debian)" >&2
  exit 1
}
# The AMQP port opens a little before the node accepts clients; the node this script started
# answers rabbitmqctl (same user, same cookie).
for _ in $(seq 1 60); do rabbitmqctl -q status >/dev/null 2>&1 && break; sleep 1; done
rabbitmqctl -q status >/dev/null 2>&1 || {
  echo "RabbitMQ listens on port 5672 but \`rabbitmqctl status\` got no answer within 60 s" >&2
  exit 1
}
echo "RabbitMQ is up"
