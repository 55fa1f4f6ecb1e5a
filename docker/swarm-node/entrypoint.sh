#!/bin/sh
# A swarm node of scripts/swarm-nodes: a Docker engine inside a container
# that is not --privileged (this machine's capability bounding set lacks
# CAP_SYS_RESOURCE, and --privileged asks for it). Docker mounts /sys and
# the cgroup hierarchies read-only in such a container; the engine inside
# needs them writable, and the container's capabilities allow a remount.
set -eu

mount -o remount,rw /sys 2>/dev/null || true
# Each cgroup hierarchy (v1: one per controller; v2: one) is mounted
# read-only; a remount in place is refused ("busy"), so mount it again, rw,
# with its own options. With --cgroupns private this is the node's own
# subtree.
grep -E '^[^ ]+ /sys/fs/cgroup[^ ]* cgroup2? ' /proc/mounts \
  | while read -r _ dir type opts _; do
      umount "$dir"
      mount -t "$type" -o "$(echo "$opts" | sed -e 's/^ro,/rw,/' -e 's/,ro,/,rw,/')" "$type" "$dir"
    done

# --tls=false: with a TCP listener and no TLS flags, dockerd waits 15 s to
# warn about it. The TCP listener is reachable only on the nodes' bridge.
exec dockerd \
  --host unix:///var/run/docker.sock \
  --host tcp://0.0.0.0:2375 \
  --tls=false \
  "$@"
