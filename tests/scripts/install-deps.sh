#!/usr/bin/env bash
# Install the external tools Shoal's integration tests and benchmark drive:
# skopeo, podman, Debian's docker-registry (CNCF Distribution 2.8), wrk,
# busybox-static (the test image's only binary), faketime (libfaketime, for the
# fault-injection suite's skewed clocks) and the PyPI `oras` client;
# and cargo-deny, which CI runs against deny.toml.
#
# Only what is missing is installed; `apt-get update` runs at most once.
# Needs root (or sudo) for apt-get. Safe to run again.
set -euo pipefail

log() { printf 'install-deps: %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        log "not root and no sudo: cannot install system packages"
        exit 1
    fi
fi

# command-to-check:debian-package
WANTED=(
    "skopeo:skopeo"
    "podman:podman"
    "docker-registry:docker-registry"
    "wrk:wrk"
    "/bin/busybox:busybox-static"
    "faketime:faketime"
)

missing=()
for entry in "${WANTED[@]}"; do
    cmd="${entry%%:*}"
    pkg="${entry##*:}"
    if [ "${cmd#/}" != "$cmd" ]; then
        [ -x "$cmd" ] || missing+=("$pkg")
    elif ! command -v "$cmd" >/dev/null 2>&1; then
        missing+=("$pkg")
    fi
done

python_has_pip() { python3 -m pip --version >/dev/null 2>&1; }
python_has_oras() { python3 -c 'import oras.client' >/dev/null 2>&1; }

if ! command -v python3 >/dev/null 2>&1; then
    missing+=("python3" "python3-pip")
elif ! python_has_oras && ! python_has_pip; then
    missing+=("python3-pip")
fi

if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "system packages present"
fi

if ! python_has_oras; then
    log "installing PyPI package oras"
    # A Debian-managed python refuses plain pip installs (PEP 668); a pyenv or
    # venv python accepts them. Try the polite way first.
    python3 -m pip install --quiet --disable-pip-version-check oras ||
        python3 -m pip install --quiet --disable-pip-version-check --break-system-packages oras
    python_has_oras || { log "oras installed but not importable by $(command -v python3)"; exit 1; }
else
    log "python oras present"
fi

# Debian's podman reads its registries/policy config from /etc/containers;
# skopeo and podman refuse every image without a policy file.
if [ ! -e /etc/containers/policy.json ]; then
    log "writing a permissive /etc/containers/policy.json"
    $SUDO mkdir -p /etc/containers
    printf '%s\n' '{"default":[{"type":"insecureAcceptAnything"}]}' |
        $SUDO tee /etc/containers/policy.json >/dev/null
fi

# cargo-deny, pinned: deny.toml is written for this version's options. Built from source,
# unoptimised (--debug): 2.5 minutes on the 2-core test machine instead of about 9 for a
# release build, and its checks still take seconds. Once per machine.
CARGO_DENY_VERSION="0.20.2"
if [ "$(cargo deny --version 2>/dev/null)" != "cargo-deny ${CARGO_DENY_VERSION}" ]; then
    log "installing cargo-deny ${CARGO_DENY_VERSION} (cargo install --debug, builds from source)"
    cargo install --locked --quiet --debug cargo-deny --version "${CARGO_DENY_VERSION}"
else
    log "cargo-deny ${CARGO_DENY_VERSION} present"
fi

log "done"
