# The workerctl daemon, built from source in two stages: a Rust toolchain
# compiles the release binary, a slim Debian image runs it under tini.
#   docker compose build workerctl      (or: docker build -t workerctl/workerctl:latest .)
# Needs a registry (the two base images) and crates.io. Without a registry use
# docker-compose.offline.yaml, which puts a binary built on the host on the
# locally made base image (docker/workerctl.offline.Dockerfile).
# The base images are arguments only so that a mirror can stand in for them.
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Outside /src, so that copying the sources never touches build output.
ENV CARGO_TARGET_DIR=/target
# The dependencies first, in a layer of their own, compiled for an empty crate
# with this manifest: a change under src/ then rebuilds workerctl alone, not
# every dependency as well (each half takes minutes on a small machine). The
# manifest loses its bench, test and example targets for this step: their
# files are not here.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' >src/main.rs \
 && touch src/lib.rs \
 && mv Cargo.toml Cargo.toml.full \
 && awk '/^\[\[(bench|test|example)\]\]/ { skip = 1; next } /^\[/ { skip = 0 } !skip' Cargo.toml.full >Cargo.toml \
 && cargo build --release --locked \
 && rm -rf src Cargo.toml Cargo.toml.full
# Everything .dockerignore lets through: the manifest, src/, migrations/
# (embedded at compile time), benches/ (named by the manifest).
COPY . .
# COPY keeps the sources' own modification times, which can be older than the
# empty crate built above; touch them so cargo sees they changed.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin workerctl

FROM ${RUNTIME_IMAGE}
# tini as PID 1: forwards SIGTERM to workerctl (which then finishes the
# container actions in flight) and reaps zombies.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin workerctl
COPY --from=build /target/release/workerctl /usr/local/bin/workerctl
COPY docker/workerctl-entrypoint.sh /usr/local/bin/workerctl-entrypoint
EXPOSE 3000
# Starts as root only to add the Docker socket's group, then runs workerctl as
# the user workerctl (see docker/workerctl-entrypoint.sh).
ENTRYPOINT ["tini", "--", "workerctl-entrypoint"]
CMD ["run"]
