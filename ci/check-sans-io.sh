#!/usr/bin/env bash
# Fails if the sans-IO code (nodes/ and the kivaloo crate in src/) touches
# I/O, clocks, threads, the environment, ambient randomness, or hash maps
# whose random iteration order could reach an output. Those belong in
# io-shim/ (the real runtime) or sim/ (the simulator), never in a node.
set -euo pipefail
cd "$(dirname "$0")/.."

pattern='std::(fs|net|thread|time|env|process|io::(stdin|stdout|stderr))\b|use std::\{[^}]*\b(fs|net|thread|time|env|process)\b|\btokio\b|\bmio\b|\brand(_chacha|_core)?::|thread_rng|\bHash(Map|Set)\b|SystemTime|Instant::now|\bprintln!|\beprintln!|\bprint!|\beprint!|\bdbg!'
status=0
# Comments and doc comments may mention these words; code may not.
hits=$(grep -rnE "$pattern" nodes/src src --include='*.rs' | grep -vE '^[^:]+:[0-9]+:\s*//' || true)
if [ -n "$hits" ]; then
    echo "check-sans-io: forbidden I/O, clock, thread, randomness or hash-order use in sans-IO code:"
    echo "$hits"
    status=1
fi
# Their manifests may not pull in a runtime or a random number generator.
for manifest in nodes/Cargo.toml Cargo.toml; do
    deps=$(awk '/^\[(dependencies|package)\]/{p=($0=="[dependencies]")} /^\[/{if($0!="[dependencies]")p=0} p' "$manifest")
    if echo "$deps" | grep -qE '^(tokio|mio|rand|rand_chacha|getrandom|futures)\b'; then
        echo "check-sans-io: $manifest depends on an I/O runtime or RNG:"
        echo "$deps" | grep -E '^(tokio|mio|rand|rand_chacha|getrandom|futures)\b'
        status=1
    fi
done
if [ "$status" = 0 ]; then
    echo "check-sans-io: nodes/ and src/ are free of I/O, clocks and ambient randomness"
fi
exit $status
