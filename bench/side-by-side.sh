#!/usr/bin/env bash
# Runs kivaloo's six benchmarks against kivaloo itself and against our
# daemons, one after the other on the same machine, ROUNDS times, and
# prints every result line. kivaloo's side is set up as its
# bench/bench-local.sh does (lbs -b 2048, kvlds with its defaults, the
# benchmark program on kvlds's socket); ours by bench/run.sh, the same way.
#
#   KIVALOO_BIN=DIR bench/side-by-side.sh [ROUNDS] [WORKLOAD...]
#
# KIVALOO_BIN holds kivaloo's built programs: lbs, kvlds, mkpairs,
# bulk_insert, bulk_update, bulk_extract, random_read, random_mixed,
# hotspot_read. ROUNDS defaults to 3. Full durations (about 18 minutes a
# round). Needs `cargo build --release` first.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${KIVALOO_BIN:?set KIVALOO_BIN to the directory of the built kivaloo programs}"
rounds=${1:-3}
shift || true
workloads=("$@")
[ ${#workloads[@]} -eq 0 ] && workloads=(bulk-insert bulk-update bulk-extract random-read random-mixed hotspot-read)
pairs=1048576

kivaloo_run() {
    local w=${1//-/_} dir
    dir=$(mktemp -d /tmp/kivaloo-c-bench.XXXXXX)
    "$KIVALOO_BIN/lbs" -d "$dir" -s "$dir/sock_lbs" -b 2048 -p "$dir/lbs.pid"
    "$KIVALOO_BIN/kvlds" -s "$dir/sock_kvlds" -l "$dir/sock_lbs" -p "$dir/kvlds.pid"
    local s=$dir/sock_kvlds
    case $w in
    bulk_insert) "$KIVALOO_BIN/mkpairs" $pairs | "$KIVALOO_BIN/bulk_insert" "$s" | tr '\n' ' ' ;;
    bulk_update)
        "$KIVALOO_BIN/mkpairs" $pairs > "$dir/pairs"
        "$KIVALOO_BIN/bulk_insert" "$s" < "$dir/pairs" > /dev/null
        # It reads its input again from the start: a file, not a pipe.
        "$KIVALOO_BIN/bulk_update" "$s" < "$dir/pairs" ;;
    bulk_extract)
        "$KIVALOO_BIN/mkpairs" $pairs | "$KIVALOO_BIN/bulk_insert" "$s" > /dev/null
        "$KIVALOO_BIN/bulk_extract" "$s" ;;
    *)
        "$KIVALOO_BIN/mkpairs" $pairs | "$KIVALOO_BIN/bulk_insert" "$s" > /dev/null
        "$KIVALOO_BIN/$w" "$s" $pairs ;;
    esac
    echo " kvlds peak RSS: $(awk '/VmHWM/ {print $2, $3}' "/proc/$(cat "$dir/kvlds.pid")/status")"
    kill "$(cat "$dir/kvlds.pid")"; sleep 0.5; kill "$(cat "$dir/lbs.pid")"; sleep 0.5
    rm -rf "$dir"
}

for round in $(seq 1 "$rounds"); do
    for w in "${workloads[@]}"; do
        echo "round $round $w kivaloo: $(kivaloo_run "$w" 2>/dev/null | tr '\n' ' ')"
        echo "round $round $w ours: $(bench/run.sh "$w" $pairs 2>/dev/null | tr '\n' ' ')"
    done
done
