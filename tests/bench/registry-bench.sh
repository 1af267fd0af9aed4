#!/usr/bin/env bash
# Shoal vs Debian's docker-registry (CNCF Distribution 2.8), one machine, one command:
#
#   bash tests/bench/registry-bench.sh [--image-mib 256] [--blob-mib 64] [--wrk-seconds 15]
#                                      [--repeat 3] [--json out.json] [--keep]
#
# Builds the release binary, builds a >=200 MB image locally, then for each registry on its
# own loopback port with temp storage measures skopeo push/pull wall time, server CPU-s per
# GB, peak RSS, and a 64 MiB blob GET under wrk. Prints a markdown table on stdout (progress
# on stderr). Everything it starts is stopped and its temp directory removed at exit.
# Needs skopeo, docker-registry, wrk, python3: `bash tests/scripts/install-deps.sh`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

missing=()
for tool in skopeo docker-registry wrk python3 cargo; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ -x /bin/busybox ] || missing+=("busybox-static")
if [ "${#missing[@]}" -gt 0 ]; then
    echo "registry-bench: missing ${missing[*]}; run: bash tests/scripts/install-deps.sh" >&2
    exit 1
fi

echo "registry-bench: cargo build --release -p shoal-node --bin shoal" >&2
cargo build --release -p shoal-node --bin shoal >&2
bin="${CARGO_TARGET_DIR:-$root/target}/release/shoal"
case "$bin" in /*) ;; *) bin="$root/$bin" ;; esac

exec python3 "$root/tests/bench/registry_bench.py" --shoal-bin "$bin" "$@"
