# Postgres for the offline compose stack (docker-compose.offline.yaml), from
# Debian's packages on the locally made base image: a stand-in for the
# official `postgres:15` image, keeping what the stack relies on: the
# environment POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB, a cluster
# created on the first start in PGDATA (/var/lib/postgresql/data, the volume),
# port 5432 open to the network with password login, `pg_isready` on PATH,
# the server in the foreground. Not supported: /docker-entrypoint-initdb.d.
# Same major version as the online stack, so one data volume serves both.
ARG BASE_IMAGE=workerctl/base:latest
FROM ${BASE_IMAGE}
ARG PG_MAJOR=15
# policy-rc.d: start no service while installing. The first install brings
# postgresql-common, whose configuration then stops the package from creating
# a cluster of its own: the entry point makes the one the stack uses.
RUN printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-common \
 && sed -ri 's/^#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' /etc/postgresql-common/createcluster.conf \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-${PG_MAJOR} \
 && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d
ENV PATH=/usr/lib/postgresql/${PG_MAJOR}/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
VOLUME /var/lib/postgresql/data
EXPOSE 5432
# SIGINT is Postgres's fast shutdown (as in the official image): SIGTERM would
# wait for every client to disconnect.
STOPSIGNAL SIGINT
ENTRYPOINT ["tini", "--", "postgres-entrypoint"]
CMD ["postgres"]
