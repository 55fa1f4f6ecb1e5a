# RabbitMQ for the offline compose stack (docker-compose.offline.yaml), from
# Debian's packages on the locally made base image: a stand-in for the
# official `rabbitmq:3-management` image, keeping what the stack relies on:
# RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS (an administrator with full
# rights on vhost /, created on the first start), RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS
# (the compose file's quorum tick; read by rabbitmq-server itself), AMQP on 5672, the management
# UI and HTTP API on 15672, logs on stdout, data in /var/lib/rabbitmq (the
# volume; give the container a fixed `hostname`, the node name depends on
# it), `rabbitmq-diagnostics` for the healthcheck, the server in the
# foreground. Debian bookworm ships RabbitMQ 3.10.
ARG BASE_IMAGE=workerctl/base:latest
FROM ${BASE_IMAGE}
# policy-rc.d: start no service while installing. The Erlang cookie the
# package made goes: each node makes its own on the first start, in the volume,
# instead of every container of this image sharing one.
RUN printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server \
 && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d /var/lib/rabbitmq/.erlang.cookie \
 && echo '[rabbitmq_management].' >/etc/rabbitmq/enabled_plugins
COPY rabbitmq-entrypoint.sh /usr/local/bin/rabbitmq-entrypoint
VOLUME /var/lib/rabbitmq
EXPOSE 5672 15672
ENTRYPOINT ["tini", "--", "rabbitmq-entrypoint"]
CMD ["rabbitmq-server"]
