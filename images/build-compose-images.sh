#!/usr/bin/env bash
# The images compose.yaml runs where no registry is reachable, in Docker's image store (the
# Compose implementation this project tests: docker.io and docker-compose, Debian's packages):
#
#   localhost/flowworker-python:3.11-bookworm  Debian's python3 and venv (build-test-image.sh,
#                                              KIND=base; made with podman, loaded into Docker)
#   localhost/flowworker-redis:7               Debian's redis-server (images/redis.Containerfile)
#   localhost/flowworker-postgres:15           Debian's PostgreSQL 15 (images/postgres.Containerfile)
#   flowworker-worker                          worker/Containerfile on the base above
#
# Starts dockerd first when it does not answer (on a machine whose PID 1 is not systemd: in the
# background, log in /var/log/flowworker-dockerd.log). Docker's layer cache keeps a second run
# short. The host's CA bundle goes to the worker build as the secret pip-ca (pip behind a
# TLS-intercepting proxy).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
BASE=localhost/flowworker-python:3.11-bookworm
LABEL_KEY=org.flowworker.build-hash
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

# Debian's docker client (docker.io), whose builder takes BuildKit's RUN --mount: another docker
# earlier in PATH may want the buildx plugin for it
docker() { /usr/bin/docker "$@"; }

log() { printf '[build-compose-images] %s\n' "$*" >&2; }

ensure_docker() {
    if docker info >/dev/null 2>&1; then
        return
    fi
    if [[ "$(cat /proc/1/comm)" == systemd ]]; then
        systemctl start docker
    else
        # builds reach the package index through the host: forwarding on, as podman sets it;
        # dockerd then leaves the host's FORWARD policy alone
        sysctl -qw net.ipv4.ip_forward=1
        log "starting dockerd (log: /var/log/flowworker-dockerd.log)"
        nohup dockerd --ip-forward=false >>/var/log/flowworker-dockerd.log 2>&1 &
    fi
    local tries
    for tries in $(seq 60); do
        docker info >/dev/null 2>&1 && return
        sleep 0.5
    done
    log "dockerd did not answer within 30 s: see /var/log/flowworker-dockerd.log"
    exit 1
}

ensure_base() {
    KIND=base "$HERE/build-test-image.sh"
    local built loaded
    built="$(podman image inspect --format "{{ index .Labels \"$LABEL_KEY\" }}" "$BASE")"
    loaded="$(docker image inspect --format "{{ index .Config.Labels \"$LABEL_KEY\" }}" "$BASE" 2>/dev/null || true)"
    if [[ "$built" != "$loaded" ]]; then
        log "loading $BASE into Docker"
        podman save "$BASE" | docker load --quiet >/dev/null
    fi
}

main() {
    [[ $EUID -eq 0 ]] || { log "run as root"; exit 1; }
    ensure_docker
    ensure_base
    export DOCKER_BUILDKIT=1
    log "building localhost/flowworker-redis:7 and localhost/flowworker-postgres:15"
    docker build --quiet --build-arg "BASE_IMAGE=$BASE" -t localhost/flowworker-redis:7 \
        -f "$HERE/redis.Containerfile" "$HERE" >/dev/null
    docker build --quiet --build-arg "BASE_IMAGE=$BASE" -t localhost/flowworker-postgres:15 \
        -f "$HERE/postgres.Containerfile" "$HERE" >/dev/null
    log "building ${WORKER_IMAGE:-flowworker-worker}"
    docker build --quiet --build-arg "BASE_IMAGE=$BASE" --secret "id=pip-ca,src=$CA_BUNDLE" \
        -t "${WORKER_IMAGE:-flowworker-worker}" -f "$ROOT/worker/Containerfile" "$ROOT" >/dev/null
}

main
