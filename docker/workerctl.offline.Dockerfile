# The workerctl daemon for the offline compose stack, on the locally built
# Debian base (no registry needed). `scripts/build-images --with-daemon` builds
# the release binary on the host and passes a build context holding only that
# binary, so the host's glibc must not be newer than bookworm's (2.36).
ARG BASE_IMAGE=workerctl/base:latest
FROM ${BASE_IMAGE}
RUN useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin workerctl
COPY workerctl /usr/local/bin/workerctl
# Talking to the Docker socket needs its group: add it with `group_add` in compose.
USER workerctl
ENTRYPOINT ["tini", "--", "workerctl"]
CMD ["run"]
