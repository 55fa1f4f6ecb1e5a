#!/bin/bash
# Entry point of docker/rabbitmq.offline.Dockerfile, after the official
# rabbitmq image's: write the configuration from the environment
# (RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS, default guest/guest: the
# administrator RabbitMQ creates when its database is empty, i.e. on the first
# start), then run the node as the user rabbitmq in the foreground, logging to
# stdout. Any command other than `rabbitmq-server` runs as is.
set -euo pipefail

if [[ ${1:-} != rabbitmq-server ]]; then
  exec "$@"
fi

cat >/etc/rabbitmq/rabbitmq.conf <<CONF
# Written by rabbitmq-entrypoint at every start.
listeners.tcp.default = 5672
management.tcp.port = 15672
default_user = ${RABBITMQ_DEFAULT_USER:-guest}
default_pass = ${RABBITMQ_DEFAULT_PASS:-guest}
default_user_tags.administrator = true
default_permissions.configure = .*
default_permissions.read = .*
default_permissions.write = .*
# As in the official image: the default user may log in from other hosts.
loopback_users = none
log.console = true
log.console.level = info
log.file = false
CONF

chown -R rabbitmq:rabbitmq /var/lib/rabbitmq
cd /var/lib/rabbitmq
export HOME=/var/lib/rabbitmq
exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups -- /usr/lib/rabbitmq/bin/rabbitmq-server
