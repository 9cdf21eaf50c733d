#!/usr/bin/env bash
# Build a local podman image of Debian bookworm that boots systemd as PID 1,
# for molecule / testinfra role tests (KIND=systemd), or a plain one with
# Python 3.11 and venv, the base of the Compose images (KIND=base: Debian's
# stand-in for python:3.11-slim).  No container registry is used: the
# root filesystem is made with debootstrap from the host's own apt mirror and
# fed to `podman import`.
#
# Usage: images/build-test-image.sh [--check]
#   --check  after building (or finding) the image, boot one container, wait
#            for systemd, print failed units, and remove the container.
# Env:
#   KIND    systemd or base (default systemd)
#   IMAGE   image name      (default localhost/flowworker-systemd:bookworm,
#                            KIND=base: localhost/flowworker-python:3.11-bookworm)
#   SUITE   Debian suite    (default bookworm)
#   MIRROR  Debian mirror   (default: the URI the host's apt sources use)
#   FORCE=1 rebuild even if an up-to-date image exists
#
# Idempotent: the image carries a label with a hash of this script and of
# containers.conf; when it matches, the script returns in about a second.
#
# KIND=base: python3 python3-venv ca-certificates (+ the host's extra CAs and
# apt sources, so that images built from it install Debian packages), no
# systemd; CMD python3.
#
# KIND=systemd: packages baked into the image (everything else is the role's job):
#   systemd systemd-sysv dbus   boot systemd as PID 1
#   python3 python3-apt         ansible modules (apt module needs python3-apt)
#   python3-venv                roles that make virtualenvs
#   sudo                        become
#   openssh-server              sshd enabled, for roles/tests that use ssh
#   iproute2 procps             `ip`, `ps` for testinfra socket/process checks
#   ca-certificates             + the host's extra CAs from
#                               /usr/local/share/ca-certificates
set -euo pipefail

KIND="${KIND:-systemd}"
case "$KIND" in
    systemd) IMAGE="${IMAGE:-localhost/flowworker-systemd:bookworm}" ;;
    base) IMAGE="${IMAGE:-localhost/flowworker-python:3.11-bookworm}" ;;
    *) echo "KIND must be systemd or base, got '$KIND'" >&2; exit 2 ;;
esac
SUITE="${SUITE:-bookworm}"
FORCE="${FORCE:-0}"
CHECK=0
for arg in "$@"; do
    case "$arg" in
        --check) CHECK=1 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONF_SRC="$HERE/containers.conf"
CONF_DST=/etc/containers/containers.conf
if [[ "$KIND" == base ]]; then
    INCLUDE="python3,python3-venv,ca-certificates"
else
    INCLUDE="systemd,systemd-sysv,dbus,python3,python3-apt,python3-venv,sudo,openssh-server,iproute2,procps,ca-certificates"
fi
LABEL_KEY=org.flowworker.build-hash
BUILD_HASH="$({ cat "${BASH_SOURCE[0]}" "$CONF_SRC"; echo "$KIND"; } | sha256sum | cut -c1-16)"

log() { printf '[build-test-image] %s\n' "$*" >&2; }

# --- host tools -------------------------------------------------------------
ensure_host_tools() {
    if command -v podman >/dev/null && command -v runc >/dev/null \
        && command -v debootstrap >/dev/null; then
        return
    fi
    log "installing podman runc debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq podman runc debootstrap >/dev/null
}

# --- podman configuration ---------------------------------------------------
ensure_containers_conf() {
    if cmp -s "$CONF_SRC" "$CONF_DST"; then
        return
    fi
    mkdir -p "$(dirname "$CONF_DST")"
    if [[ -e "$CONF_DST" && ! -e "$CONF_DST.orig" ]]; then
        cp -a "$CONF_DST" "$CONF_DST.orig"
        log "kept previous $CONF_DST as $CONF_DST.orig"
    fi
    install -m 0644 "$CONF_SRC" "$CONF_DST"
    log "installed $CONF_DST"
}

# --- the host's Debian mirror -----------------------------------------------
# Prints the first URI of an enabled "deb" source for $SUITE, from deb822
# *.sources files or one-line *.list files.
host_mirror() {
    local files=()
    shopt -s nullglob
    files=(/etc/apt/sources.list.d/*.sources)
    local sources=("${files[@]}")
    files=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list)
    shopt -u nullglob
    if ((${#sources[@]})); then
        awk -v suite="$SUITE" '
            BEGIN { RS = ""; FS = "\n" }
            {
                types = ""; uris = ""; suites = ""; enabled = "yes"
                for (i = 1; i <= NF; i++) {
                    line = $i
                    if (line ~ /^[ \t]*#/) continue
                    if (match(line, /^[A-Za-z-]+:/)) {
                        key = tolower(substr(line, 1, RLENGTH - 1))
                        val = substr(line, RLENGTH + 1)
                        if (key == "types") types = val
                        else if (key == "uris") uris = val
                        else if (key == "suites") suites = val
                        else if (key == "enabled") enabled = tolower(val)
                    }
                }
                gsub(/^[ \t]+|[ \t]+$/, "", enabled)
                if (enabled == "no") next
                if ((" " types " ") !~ /[ \t]deb[ \t]/) next
                n = split(suites, s, /[ \t]+/)
                for (j = 1; j <= n; j++) if (s[j] == suite) {
                    split(uris, u, /[ \t]+/)
                    for (k = 1; k in u; k++) if (u[k] != "") { print u[k]; exit }
                }
            }' "${sources[@]}"
    fi
    local f
    for f in "${files[@]}"; do
        [[ -r "$f" ]] || continue
        awk -v suite="$SUITE" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while ($i !~ /\]$/ && i < NF) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }' "$f"
    done
}

# --- build ------------------------------------------------------------------
ROOT=""
cleanup() {
    [[ -n "$ROOT" && -d "$ROOT" ]] || return 0
    # debootstrap may leave proc/sys (or a bind-mounted /dev) mounted if it
    # failed: unmount everything under ROOT before deleting anything.
    local m
    while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done < <(findmnt -rno TARGET | grep -F "$ROOT/" | sort -r)
    if findmnt -rno TARGET | grep -qF "$ROOT/"; then
        log "WARNING: mounts left under $ROOT; not deleting it"
        return 0
    fi
    rm -rf --one-file-system "$(dirname "$ROOT")"
}

copy_apt_config() {
    local f kr
    # Sources: the host's own (deb822 and one-line), minus the one debootstrap
    # wrote when the host keeps its Debian sources elsewhere.
    if [[ -s /etc/apt/sources.list ]] && grep -qE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list; then
        cp /etc/apt/sources.list "$ROOT/etc/apt/sources.list"
    else
        rm -f "$ROOT/etc/apt/sources.list"
    fi
    shopt -s nullglob
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
        cp "$f" "$ROOT/etc/apt/sources.list.d/"
        # keyrings named by Signed-By / signed-by= that the image lacks
        while read -r kr; do
            if [[ -f "$kr" && ! -e "$ROOT$kr" ]]; then
                mkdir -p "$ROOT$(dirname "$kr")"
                cp "$kr" "$ROOT$kr"
            fi
        done < <(grep -ohiE '(signed-by:[[:space:]]*|signed-by=)/[^] ,]+' "$f" | sed -E 's/^[^/]*//')
    done
    # apt proxy / auth / validity settings (not hooks that call host binaries)
    for f in /etc/apt/apt.conf.d/*; do
        if grep -v '^[[:space:]]*//' "$f" | grep -qiE 'proxy|Acquire::(https?|Check-Valid-Until|Check-Date)'; then
            cp "$f" "$ROOT/etc/apt/apt.conf.d/"
        fi
    done
    [[ -f /etc/apt/auth.conf ]] && install -m 0600 /etc/apt/auth.conf "$ROOT/etc/apt/auth.conf"
    for f in /etc/apt/auth.conf.d/*; do
        mkdir -p "$ROOT/etc/apt/auth.conf.d"
        install -m 0600 "$f" "$ROOT/etc/apt/auth.conf.d/"
    done
    # extra CA certificates (e.g. for an https mirror or proxy)
    local cas=(/usr/local/share/ca-certificates/*)
    shopt -u nullglob
    if ((${#cas[@]})); then
        cp -r "${cas[@]}" "$ROOT/usr/local/share/ca-certificates/"
        # (openssl rehash warns about the bundle file itself; harmless)
        chroot "$ROOT" update-ca-certificates >/dev/null 2>&1
    fi
}

configure_systemd() {
    # Each container gets its own machine-id (systemd makes one at boot).
    rm -f "$ROOT/var/lib/dbus/machine-id"
    # No background apt runs fighting the roles for the dpkg lock.
    chroot "$ROOT" systemctl mask apt-daily.timer apt-daily-upgrade.timer \
        apt-daily.service apt-daily-upgrade.service >/dev/null 2>&1
    # Units that cannot work in a container and only add noise to --failed.
    chroot "$ROOT" systemctl mask systemd-remount-fs.service \
        getty@tty1.service serial-getty@.service console-getty.service \
        systemd-firstboot.service sys-kernel-config.mount \
        sys-kernel-debug.mount sys-kernel-tracing.mount >/dev/null 2>&1
    chroot "$ROOT" systemctl enable ssh.service >/dev/null 2>&1
    # Note: ssh host keys are generated once here and shared by every
    # container from this image; fine for throwaway test hosts.
}

build_image() {
    local mirror="${MIRROR:-}"
    if [[ -z "$mirror" ]]; then
        mirror="$(host_mirror | head -n1)"
    fi
    if [[ -z "$mirror" ]]; then
        log "no apt source for suite '$SUITE' found on the host; set MIRROR"
        exit 1
    fi
    # debootstrap fetches with wget: hand it apt's proxy if one is configured
    local HTTP_PROXY_APT="" HTTPS_PROXY_APT=""
    eval "$(apt-config shell HTTP_PROXY_APT Acquire::http::Proxy HTTPS_PROXY_APT Acquire::https::Proxy)"
    [[ -n "$HTTP_PROXY_APT" && "$HTTP_PROXY_APT" != DIRECT ]] && export http_proxy="$HTTP_PROXY_APT"
    [[ -n "$HTTPS_PROXY_APT" && "$HTTPS_PROXY_APT" != DIRECT ]] && export https_proxy="$HTTPS_PROXY_APT"

    ROOT="$(mktemp -d /var/tmp/flowworker-rootfs.XXXXXX)/root"
    trap cleanup EXIT
    mkdir -p "$ROOT"

    log "debootstrap $SUITE from $mirror"
    local t0=$SECONDS
    if ! debootstrap --variant=minbase --include="$INCLUDE" \
        "$SUITE" "$ROOT" "$mirror" >"$ROOT.debootstrap.log" 2>&1; then
        tail -n 30 "$ROOT.debootstrap.log" >&2
        [[ -f "$ROOT/debootstrap/debootstrap.log" ]] && tail -n 30 "$ROOT/debootstrap/debootstrap.log" >&2
        exit 1
    fi
    log "debootstrap done in $((SECONDS - t0)) s"

    copy_apt_config

    : >"$ROOT/etc/machine-id"
    if [[ "$KIND" == systemd ]]; then
        configure_systemd
    fi

    chroot "$ROOT" apt-get clean
    rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin \
        "$ROOT"/var/log/*.log "$ROOT"/var/log/apt/* "$ROOT"/tmp/* \
        "$ROOT"/var/cache/debconf/*-old

    log "importing as $IMAGE"
    local old_id=""
    old_id="$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
    local changes=(--change 'CMD ["python3"]')
    if [[ "$KIND" == systemd ]]; then
        changes=(--change 'CMD ["/lib/systemd/systemd"]' --change 'STOPSIGNAL SIGRTMIN+3')
    fi
    tar --numeric-owner --xattrs -C "$ROOT" -c . | podman import --quiet \
        "${changes[@]}" \
        --change "LABEL $LABEL_KEY=$BUILD_HASH" \
        --message "debootstrap $SUITE minbase + $INCLUDE" \
        - "$IMAGE" >/dev/null
    if [[ -n "$old_id" ]]; then
        # the old image is now untagged; drop it unless a container uses it
        podman rmi "$old_id" >/dev/null 2>&1 || true
    fi
    log "built $IMAGE in $((SECONDS - t0)) s ($(podman image inspect --format '{{.Size}}' "$IMAGE") bytes)"
}

check_image() {
    local name="flowworker-check-$$" state
    log "booting $IMAGE as $name"
    podman run -d --name "$name" --systemd=always "$IMAGE" >/dev/null
    # shellcheck disable=SC2064
    trap "podman rm -f $name >/dev/null 2>&1 || true; cleanup" EXIT
    local t0=$SECONDS
    state="$(timeout 120 podman exec "$name" systemctl is-system-running --wait || true)"
    log "systemd state '$state' after $((SECONDS - t0)) s"
    podman exec "$name" systemctl --failed --no-legend --plain >&2 || true
    podman rm -f "$name" >/dev/null
    [[ "$state" == running || "$state" == degraded ]]
}

main() {
    [[ $EUID -eq 0 ]] || { log "run as root"; exit 1; }
    ensure_host_tools
    ensure_containers_conf
    local have=""
    have="$(podman image inspect --format "{{ index .Labels \"$LABEL_KEY\" }}" "$IMAGE" 2>/dev/null || true)"
    if [[ "$FORCE" != 1 && "$have" == "$BUILD_HASH" ]]; then
        log "$IMAGE is up to date ($BUILD_HASH)"
    else
        build_image
    fi
    if ((CHECK)) && [[ "$KIND" == systemd ]]; then
        check_image
    fi
}

main
