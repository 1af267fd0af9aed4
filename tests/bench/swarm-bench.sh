#!/usr/bin/env bash
# Shoal swarm rollout benchmark, one command (as root):
#
#   bash tests/bench/swarm-bench.sh [--nodes 8,16] [--image-mib 512] [--mbit 100]
#                                   [--client skopeo|curl] [--skip-registry] [--skip-loopback]
#                                   [--transport quic|tcp|both] [--json out.json] [--keep]
#                                   [--loopback-only] [--perf FILE]
#
# Builds the release binary, then in network namespaces it creates (198.18.1.0/24 only, links
# shaped with tbf both ways) times N pullers fetching one image at once from a Shoal swarm and
# from Debian's docker-registry, against the ideal (one download over one link), and measures
# node-to-node throughput on unshaped loopback. Prints a markdown table on stdout (progress on
# stderr). See tests/bench/swarm_bench.py for the details.
#
# Everything it creates (namespaces, processes, temp dir) is removed at exit, also on failure:
# the Python side cleans up after itself, and the trap below deletes any namespace with this
# run's prefix that is still there (stopping the processes inside it, which are ours).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

if [ "$(id -u)" -ne 0 ]; then
    echo "swarm-bench: needs root (ip netns, tc)" >&2
    exit 1
fi
missing=()
for tool in skopeo docker-registry curl ip tc python3 cargo; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ -x /bin/busybox ] || missing+=("busybox-static")
if [ "${#missing[@]}" -gt 0 ]; then
    echo "swarm-bench: missing ${missing[*]}; run: bash tests/scripts/install-deps.sh" >&2
    exit 1
fi

prefix="swb$$-"
cleanup() {
    local ns pid
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${prefix}" || true); do
        for pid in $(ip netns pids "$ns" 2>/dev/null || true); do
            kill -9 "$pid" 2>/dev/null || true
        done
        ip netns del "$ns" 2>/dev/null || true
        echo "swarm-bench: removed leftover namespace $ns" >&2
    done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "swarm-bench: cargo build --release -p shoal-node --bin shoal" >&2
cargo build --release -p shoal-node --bin shoal >&2
bin="${CARGO_TARGET_DIR:-$root/target}/release/shoal"
case "$bin" in /*) ;; *) bin="$root/$bin" ;; esac

python3 "$root/tests/bench/swarm_bench.py" --shoal-bin "$bin" --prefix "$prefix" "$@"
