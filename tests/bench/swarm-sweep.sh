#!/usr/bin/env bash
# The swarm benchmark over a sweep of image sizes, layer counts and clients (as root):
#
#   bash tests/bench/swarm-sweep.sh [--sizes 64,256,512,1024,2048] [--layers 1,4]
#                                   [--clients curl,skopeo] [--nodes 8,16] [--mbit 100]
#                                   [--transport both|tcp|quic] [--out DIR]
#
# Runs tests/bench/swarm-bench.sh once per (size, layers, client) with --skip-registry and
# --skip-loopback, keeps each run's JSON in DIR (default: a new temp dir), and prints one
# markdown table: every fleet size of every point, all-done against one download over one link,
# the origin's egress and the nodes' CPU per GB received. A multi-layer image of the same total
# is the random bytes cut into that many layers (curl then fetches three blobs at a time, as
# docker does). docker itself is not a client here: its daemon lives outside the benchmark's
# namespaces and cannot reach their addresses.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
sizes=64,256,512,1024,2048
layers=1,4
clients=curl,skopeo
nodes=8,16
mbit=100
transport=both
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --sizes) sizes="$2"; shift 2 ;;
        --layers) layers="$2"; shift 2 ;;
        --clients) clients="$2"; shift 2 ;;
        --nodes) nodes="$2"; shift 2 ;;
        --mbit) mbit="$2"; shift 2 ;;
        --transport) transport="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        *) echo "swarm-sweep: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$out" ] || out="$(mktemp -d -t shoal-swarm-sweep-XXXXXX)"
mkdir -p "$out"

for size in ${sizes//,/ }; do
    for k in ${layers//,/ }; do
        for client in ${clients//,/ }; do
            json="$out/size${size}-layers${k}-${client}.json"
            echo "swarm-sweep: $size MiB in $k layer(s), $client -> $json" >&2
            # A point that fails (a pull that errs) is reported and the sweep goes on.
            if ! bash "$root/tests/bench/swarm-bench.sh" --nodes "$nodes" --image-mib "$size" \
                --layers "$k" --mbit "$mbit" --client "$client" --transport "$transport" \
                --skip-registry --skip-loopback --json "$json" >/dev/null; then
                echo "swarm-sweep: $size MiB in $k layer(s), $client FAILED (see above)" >&2
                echo "$size MiB, $k layer(s), $client" >> "$out/failed"
            fi
        done
    done
done

python3 - "$out" <<'PY'
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    with open(path) as f:
        r = json.load(f)
    if "ideal_computed_s" not in r or not r.get("shoal"):
        continue
    a = r["args"]
    image = r["image"]["bytes"]
    ideal = r["ideal_computed_s"]
    for n, s in sorted(r["shoal"].items(), key=lambda kv: int(kv[0])):
        cpu = sum(s["cpu_s"]) / (int(n) * image / 1e9)
        rows.append((a["image_mib"], a["layers"], a["client"], int(n), s["all_done_s"], ideal,
                     s["served0"] / image, cpu))
rows.sort()
print("| random MiB | layers | client | pullers | all done (s) | ideal (s) | / ideal "
      "| origin egress (copies) | CPU-s per GB received |")
print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
for mib, k, client, n, done, ideal, egress, cpu in rows:
    print(f"| {mib:g} | {k} | {client} | {n} | {done:.1f} | {ideal:.1f} | {done / ideal:.2f}x "
          f"| {egress:.2f} | {cpu:.1f} |")
failed = os.path.join(sys.argv[1], "failed")
if os.path.exists(failed):
    with open(failed) as f:
        print("\nFailed points: " + "; ".join(line.strip() for line in f if line.strip()))
print(f"\n(JSON of every run: {sys.argv[1]})")
PY
