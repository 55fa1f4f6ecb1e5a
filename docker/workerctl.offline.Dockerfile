# The workerctl daemon for the offline compose stack (docker-compose.offline.yaml)
# and `scripts/build-images --with-daemon`: the release binary built on the
# host (`cargo build --release --locked`) on the locally made Debian base, so
# no registry is needed. The host's glibc must not be newer than bookworm's
# (2.36). Build context: the repository root (.dockerignore sends only the
# binary and docker/).
ARG BASE_IMAGE=workerctl/base:latest
FROM ${BASE_IMAGE}
RUN useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin workerctl
# The binary to ship: the release build by default; scripts/test passes the
# debug build its tests already made (DAEMON_PROFILE=debug) to save a release
# build on CI.
ARG BINARY=target/release/workerctl
COPY ${BINARY} /usr/local/bin/workerctl
COPY docker/workerctl-entrypoint.sh /usr/local/bin/workerctl-entrypoint
EXPOSE 3000
# Starts as root only to add the Docker socket's group, then runs workerctl as
# the user workerctl (see docker/workerctl-entrypoint.sh).
ENTRYPOINT ["tini", "--", "workerctl-entrypoint"]
CMD ["run"]
