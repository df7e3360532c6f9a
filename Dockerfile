# syntax=docker/dockerfile:1
#
# One image for every batchq role: the command picks it.
#
#   docker build -t batchq .
#   docker run --rm batchq splitter --help
#   docker run --rm -e AMQP_URL=amqp://user:pass@broker:5672/%2f batchq worker
#
# Build context: the repository root (.dockerignore keeps target/ and data out of it).

# The builder's Rust must satisfy every locked dependency's rust-version, not only the
# workspace's (refinery 0.10 asks for 1.92). tests/tests/deploy.rs checks this against
# Cargo.lock.
ARG RUST_VERSION=1.92
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
ENV CARGO_TERM_COLOR=never

# 1. Dependencies only. The manifests, the lock file and empty crates: this layer (the slow
#    part, SQLite included) is rebuilt only when a Cargo.toml or Cargo.lock changes.
#    Every workspace member's manifest must be here (tests/tests/deploy.rs checks it).
COPY Cargo.toml Cargo.lock ./
COPY common/Cargo.toml common/Cargo.toml
COPY splitter/Cargo.toml splitter/Cargo.toml
COPY worker/Cargo.toml worker/Cargo.toml
COPY reducer/Cargo.toml reducer/Cargo.toml
COPY client/Cargo.toml client/Cargo.toml
COPY batchctl/Cargo.toml batchctl/Cargo.toml
COPY tests/Cargo.toml tests/Cargo.toml
RUN set -eu; \
    for krate in common splitter worker reducer client tests; do \
        mkdir -p "$krate/src"; : > "$krate/src/lib.rs"; \
    done; \
    for bin in splitter worker reducer batchctl; do \
        mkdir -p "$bin/src"; echo 'fn main() {}' > "$bin/src/main.rs"; \
    done; \
    cargo build --release --locked -p batchq-splitter -p batchq-worker -p batchq-reducer -p batchctl --bins

# 2. The real sources. COPY keeps the files' own modification times, which may be older than
#    the placeholders built above: touch them so cargo rebuilds the workspace's crates (and only
#    those). The tests crate keeps its placeholder: nothing here depends on it.
COPY common common
COPY splitter splitter
COPY worker worker
COPY reducer reducer
COPY client client
COPY batchctl batchctl
RUN set -eu; \
    find common splitter worker reducer client batchctl -name '*.rs' -exec touch {} +; \
    cargo build --release --locked -p batchq-splitter -p batchq-worker -p batchq-reducer -p batchctl --bins; \
    mkdir -p /out; \
    for bin in splitter worker reducer batchctl; do \
        install -m 0755 "target/release/$bin" "/out/$bin"; \
    done

# ---------------------------------------------------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS runtime

# ca-certificates: the roots an `amqps://` broker's certificate is checked against (beside
# BATCHQ_TLS_CA_FILE), and what users' `exec` commands reach over TLS. tini: PID 1 that forwards
# SIGTERM to the batchq process (only to it: a worker's running `exec` child must be allowed
# to finish its operation) and reaps whatever those commands leave behind. /bin/sh and the
# coreutils that `exec` commands commonly call are part of every Debian image. sqlite3: online
# backups of the state stores (`sqlite3 {db} ".backup {file}"`, docs/operations.md).
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates sqlite3 tini; \
    rm -rf /var/lib/apt/lists/*

ARG BATCHQ_UID=10001
RUN set -eux; \
    groupadd --system --gid "${BATCHQ_UID}" batchq; \
    useradd --system --uid "${BATCHQ_UID}" --gid batchq --home-dir /var/lib/batchq \
        --no-create-home --shell /usr/sbin/nologin batchq; \
    install -d -o batchq -g batchq -m 0750 /var/lib/batchq

COPY --from=builder /out/ /usr/local/bin/

# Splitter and reducer keep their SQLite stores here ({dir}/splitter/{ns}.db,
# {dir}/reducer/{ns}.db). Declared after the chown, so a fresh named volume starts owned by
# the batchq user.
ENV BATCHQ_DATA_DIR=/var/lib/batchq
VOLUME ["/var/lib/batchq"]
WORKDIR /var/lib/batchq

# The reducer's Prometheus endpoint.
EXPOSE 9464

# Numeric, so Kubernetes can verify runAsNonRoot without a runAsUser of its own.
USER ${BATCHQ_UID}:${BATCHQ_UID}
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["worker"]
