#!/bin/bash
# Entry point of docker/postgres.offline.Dockerfile, after the official
# postgres image's: on the first start (empty PGDATA) create the cluster with
# superuser POSTGRES_USER / POSTGRES_PASSWORD and the database POSTGRES_DB,
# accepting password logins from the network; then run the server as the user
# postgres in the foreground. Any command other than `postgres ...` runs as is.
set -euo pipefail

if [[ ${1:-} != postgres ]]; then
  exec "$@"
fi

POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
PGDATA=${PGDATA:-/var/lib/postgresql/data}
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }

mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"
chmod 2775 /var/run/postgresql

if [[ ! -s $PGDATA/PG_VERSION ]]; then
  if [[ -z ${POSTGRES_PASSWORD:-} ]]; then
    echo "postgres-entrypoint: POSTGRES_PASSWORD must be set (the database is reachable from the network)" >&2
    exit 1
  fi
  echo "postgres-entrypoint: creating the cluster in $PGDATA (user $POSTGRES_USER, database $POSTGRES_DB)"
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  chown postgres "$pwfile"
  as_postgres initdb --pgdata="$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
    --encoding=UTF8 --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  if [[ $POSTGRES_DB != postgres ]]; then
    # Single-user mode: no server listens while the cluster is not ready.
    printf 'CREATE DATABASE "%s"\n' "${POSTGRES_DB//\"/\"\"}" \
      | as_postgres postgres --single -D "$PGDATA" -c log_min_messages=warning postgres >/dev/null
  fi
fi

exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"
