#!/usr/bin/env bash
# The fault-injection suite (tests/tests/faults.rs): real shoal nodes in network namespaces,
# killed mid-rollout, partitioned and healed, on a full disk, with skewed clocks, half of them
# restarted at once.
#
#   bash tests/scripts/faults.sh            scaled down, as the README test command runs it
#   bash tests/scripts/faults.sh --full     full size: 8 nodes (9 for the rollout), images of
#                                           three 24 MiB layers, 3 kill rounds
#   bash tests/scripts/faults.sh --bugs     also the ignored tests that reproduce known node
#                                           bugs (they fail until those are fixed)
#
# Options combine (--full --bugs). Extra arguments after `--` go to cargo nextest (a test name
# filter, for instance). Needs root and iproute2 (namespaces, a switch, tmpfs) and libfaketime
# (tests/scripts/install-deps.sh installs it); without them the tests print SKIP lines.
# SHOAL_TEST_SEED replays a run; SHOAL_TEST_KEEP=1 keeps the nodes' logs and stores.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

full=0
ignored="default"
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --full) full=1 ;;
        --bugs) ignored="all" ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "faults.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$(id -u)" -ne 0 ]; then
    echo "faults.sh: needs root (network namespaces, tmpfs mounts)" >&2
    exit 1
fi

export SHOAL_FAULTS_FULL="$full"
ignored_flag=()
if [ "$ignored" = "all" ]; then
    ignored_flag=(--run-ignored all)
fi

start=$SECONDS
status=0
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run -p shoal-tests --test faults --no-fail-fast --success-output final \
        "${ignored_flag[@]}" "${extra[@]}" || status=$?
else
    test_flags=(--nocapture)
    [ "$ignored" = "all" ] && test_flags+=(--include-ignored)
    cargo test -p shoal-tests --test faults -- "${test_flags[@]}" "${extra[@]}" || status=$?
fi
echo "faults.sh: $([ "$full" = 1 ] && echo full size || echo scaled down), $((SECONDS - start)) s"
exit $status
