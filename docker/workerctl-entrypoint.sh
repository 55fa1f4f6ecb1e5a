#!/bin/sh
# Entry point of the workerctl images (Dockerfile, docker/workerctl.offline.Dockerfile):
# runs workerctl as the unprivileged user `workerctl`, with the group that
# owns the Docker socket added, so the daemon can manage worker containers
# without running as root.
#
# Why at start rather than `group_add` in compose: the socket's group id
# differs between hosts (the `docker` group is 999 on one, 105 on another, 0
# on Docker Desktop) and compose cannot look it up, so a fixed id would be
# wrong somewhere. Started as another user (`user:` in compose) it runs as is.
set -eu

socket=/var/run/docker.sock
case ${DOCKER_HOST:-} in unix://*) socket=${DOCKER_HOST#unix://} ;; esac

if [ "$(id -u)" != 0 ]; then
  exec workerctl "$@"
fi
if [ -S "$socket" ]; then
  groups="--groups=$(stat -c %g "$socket")"
else
  echo "workerctl-entrypoint: no Docker socket at $socket (mount it: -v /var/run/docker.sock:/var/run/docker.sock)" >&2
  groups=--clear-groups
fi
exec setpriv --reuid=workerctl --regid=workerctl "$groups" --no-new-privs -- workerctl "$@"
