#!/usr/bin/env bash
# CI's simulation sweep, on both cores, beyond the seeds `cargo test` runs:
#   1. sampling: every scenario but the space oracle's, seeds
#      1000..1000+SEEDS of each, failing on any failing seed and on any
#      probe a family of scenarios must reach and never did
#      (sim/src/coverage.rs);
#   2. the space oracle's scenarios, their own seeds;
#   3. crash-state enumeration of the fault-free and crash scenarios of
#      each chain (every crash point, occurrences 1, 2, 3, 5 and 8, at most
#      64 states a crash), seeds 1000..1000+ENUM_SEEDS.
# Sized to take about two minutes on this 2-core machine (release build
# not counted); prints the seeds and simulated requests of each part.
# Usage: bash ci/sim-sweep.sh [seeds [enum_seeds]]
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-600}
enum_seeds=${2:-20}
jobs=$(nproc)
cargo build --release -q -p kivaloo-sim
sim=${CARGO_TARGET_DIR:-target}/release/kivaloo-sim
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/sampled" "$work/space" "$work/enum"
for f in scenarios/*.toml; do
  if grep -q '^space_factor' "$f"; then cp "$f" "$work/space/"; else cp "$f" "$work/sampled/"; fi
done
for n in lbs-quiet lbs-crashes kvlds-quiet kvlds-crashes full-quiet full-crashes; do
  cp "scenarios/$n.toml" "$work/enum/"
done

# The lines worth keeping, the copies' paths named as the scenarios'.
summary() {
  grep -E '^(FAILED|UNREACHED|  replay|[0-9]+ (runs|crash states) of)' | sed "s|$work/[a-z]*/|scenarios/|g" || true
}
status=0
echo "== sampling: $(ls "$work/sampled" | wc -l) scenarios, $seeds seeds each, $jobs threads"
"$sim" sweep "$work/sampled" --first-seed 1000 --seeds "$seeds" --jobs "$jobs" --require-probes >"$work/sampled.log" \
  || status=1
summary <"$work/sampled.log"
echo "-- probes reached (summed over the sampled sweep):"
sed -n '/^coverage probes/,/^[^ ]/p' "$work/sampled.log" | grep '^  ' || true
echo "== the space oracle: $(ls "$work/space" | wc -l) scenarios, their own seeds"
"$sim" sweep "$work/space" --jobs "$jobs" --require-probes >"$work/space.log" || status=1
summary <"$work/space.log"
grep '^space oracle' "$work/space.log" || true
echo "== crash-state enumeration: $(ls "$work/enum" | wc -l) scenarios, $enum_seeds seeds each"
"$sim" enumerate "$work/enum" --first-seed 1000 --seeds "$enum_seeds" --bound 64 --jobs "$jobs" >"$work/enum.log" || status=1
grep -E '^(crash point|mid-|new-file)' "$work/enum.log" || true
summary <"$work/enum.log"
exit $status
