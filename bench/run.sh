#!/usr/bin/env bash
# Runs one of kivaloo's benchmarks against our lbs and kvlds daemons, set up
# the way kivaloo's bench/bench-local.sh sets up its own: lbs with 2048-byte
# blocks, kvlds on top with its defaults, the benchmark client talking to
# kvlds over a unix socket, a fresh store each time.
#
#   bench/run.sh WORKLOAD [PAIRS] [SECONDS]
#
# WORKLOAD is one of kivaloo bench's (bulk-insert, bulk-update, bulk-extract,
# random-read, random-mixed, hotspot-read). PAIRS defaults to 2^20. SECONDS,
# if given, shrinks the timed windows (quick runs; not comparable figures).
# Needs `cargo build --release` first. Prints the benchmark's result line
# and the peak RSS of kvlds (kB) from /proc.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release
workload=$1
pairs=${2:-1048576}
seconds=${3:-}
dir=$(mktemp -d /tmp/kivaloo-bench.XXXXXX)
cleanup() {
    for p in kvlds lbs; do
        [ -f "$dir/$p.pid" ] && kill "$(cat "$dir/$p.pid")" 2>/dev/null || true
    done
    sleep 0.5
    rm -rf "$dir"
}
trap cleanup EXIT
mkdir "$dir/data"
"$bin/kivaloo-lbs" -d "$dir/data" -s "$dir/sock_lbs" -b 2048 -p "$dir/lbs.pid"
"$bin/kivaloo-kvlds" -s "$dir/sock_kvlds" -l "$dir/sock_lbs" -p "$dir/kvlds.pid"
extra=()
[ -n "$seconds" ] && extra=(--seconds "$seconds")
if [ "$workload" != bulk-insert ]; then
    "$bin/kivaloo" bench bulk-insert --socket "$dir/sock_kvlds" --pairs "$pairs" --seconds 1 >/dev/null 2>&1
fi
"$bin/kivaloo" bench "$workload" --socket "$dir/sock_kvlds" --pairs "$pairs" "${extra[@]}" 2>/dev/null
echo "kvlds peak RSS: $(awk '/VmHWM/ {print $2, $3}' "/proc/$(cat "$dir/kvlds.pid")/status")"
echo "data directory: $(du -sh "$dir/data" | cut -f1)"
