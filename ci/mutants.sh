#!/usr/bin/env bash
# Shows that the simulator's oracles are not vacuous. For each deliberate
# bug below (lbs: the five of the simulator issue, three a review of the
# oracle found it missed at first, and three that show only at particular
# crash points; kvlds: the four of the kvlds issue, two a review of its
# oracle found it missed at first, and two of pipelined commits; cleaning:
# a cleaned leaf that loses a pair, and a cleaner that never cleans,
# against the space oracle's own scenario and seeds; mux: three of
# routing, against the full-stack scenarios), patch a copy of the tree, build the simulator, and
#   - sample: sweep the scenarios of that component with the seed budget
#     `cargo test` runs (CI_SEEDS in sim/tests/scenarios.rs);
#   - enumerate: crash-state enumeration of a few of its scenarios
#     (`enum_scenarios` below), every crash point, a few seeds.
# Each bug must be caught by at least one; the table prints the failing
# seed each found first, seeds run lowest first (or "not caught"). Usage:
# bash ci/mutants.sh [seeds]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
seeds=${1:-$(sed -n 's/^const CI_SEEDS: u64 = \([0-9]*\);/\1/p' sim/tests/scenarios.rs)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export CARGO_TARGET_DIR="$work/target"

# name | scenarios (file name prefix) | file | exact text | replacement
# (\n stands for a newline)
mutants=(
  "ack-before-fsync|lbs|nodes/src/lbs/mod.rs|b.stage = if fsync { BatchStage::SyncFile } else { BatchStage::Done };|b.stage = BatchStage::Done;"
  "no-dir-sync-after-create|lbs|nodes/src/lbs/mod.rs|(BatchStage::SyncFile, _) if b.new_file => b.stage = BatchStage::SyncDir,|(BatchStage::SyncFile, _) if false => b.stage = BatchStage::SyncDir,"
  "no-checksum-on-read|lbs|nodes/src/lbs/mod.rs|if let Err(e) = layout::check_record(&record, self.cfg.block_size, block) {|if let Err(e) = Ok::<(), String>(()) {"
  "recovery-keeps-torn-tail|lbs|nodes/src/lbs/startup.rs|let durable_end = self.recovery().durable_end;|let durable_end = first + (len - FILE_HEADER_LEN) / self.record_len; self.recovery().durable_end = durable_end;"
  "retry-failed-fsync|lbs|nodes/src/lbs/mod.rs|            Ok(done) => done,\n            Err(e) => {|            Ok(done) => done,\n            Err(_) if b.stage == BatchStage::SyncFile => return self.issue_batch_op(),\n            Err(e) => {"
  "ack-then-exit-on-failed-fsync|lbs|nodes/src/lbs/mod.rs|            Err(e) => {\n                return self.exit(format!(\n                    \"{verb} {blocks} failed|            Err(e) => {\n                if b.stage == BatchStage::SyncFile && b.conn.is_some() { for (req_id, next_block) in b.acks.clone() { self.send(&LbsResponse::Append(Some(next_block)), req_id); } self.flush_sends(); }\n                return self.exit(format!(\n                    \"{verb} {blocks} failed"
  "recovery-drops-later-files|lbs|nodes/src/lbs/startup.rs|            if expected != Some(len) {\n                return self.exit(|            if expected != Some(len) {\n                self.recovery().files.truncate(idx + 1);\n                self.recovery().lens.truncate(idx + 1);\n                return self.on_header(idx, bytes);\n            }\n            if false {\n                return self.exit("
  "get-serves-unsynced-blocks|lbs|nodes/src/lbs/mod.rs|block >= self.free_mark && block < self.durable_next &&|block >= self.free_mark && block < self.accepted_next &&"
  "kvlds-ack-before-append|kvlds|nodes/src/kvlds/mod.rs|        batch.writing = Some((pages, commit.root));|        for (generation, req_id, done) in std::mem::take(&mut batch.answers) { self.answer(generation, req_id, &KvldsResponse::Done(done)); }\n        batch.writing = Some((pages, commit.root));"
  "kvlds-reads-see-uncommitted-tree|kvlds|nodes/src/kvlds/mod.rs|        batch.writing = Some((pages, commit.root));|        self.committed = Some(commit.root);\n        for p in &pages { self.cache.insert(p.clone()); }\n        batch.writing = Some((pages, commit.root));"
  "kvlds-merge-drops-a-key|kvlds|nodes/src/kvlds/tree.rs|(DirtyBody::Leaf(l), DirtyBody::Leaf(r)) => l.extend(r),|(DirtyBody::Leaf(l), DirtyBody::Leaf(r)) => l.extend(r.into_iter().skip(1)),"
  "kvlds-drops-some-get-answers|kvlds|nodes/src/kvlds/mod.rs|                }\n                self.answer(op.generation, op.req_id, &response);|                }\n                if !(matches!(response, KvldsResponse::Get(_)) && op.req_id % 5 == 4) { self.answer(op.generation, op.req_id, &response); }"
  "kvlds-cache-ignores-its-bound|kvlds|nodes/src/kvlds/mod.rs|self.cache = PageCache::new(pages.clamp(1, usize::MAX as u64) as usize);|self.cache = PageCache::new(pages.clamp(1, usize::MAX as u64) as usize * 1000);"
  "mux-no-id-rewrite|full|nodes/src/mux.rs|let up_id = self.next_upstream_id;|let up_id = packet.id;"
  "mux-misroutes-a-departed-clients-answers|full|nodes/src/mux.rs|            let Some(c) = self.clients.get_mut(&route.conn) else {\n                self.probes.responses_dropped += 1;\n                continue;\n            };|            let route = if self.clients.contains_key(&route.conn) { route } else { match self.clients.keys().next() { Some(other) => Route { conn: *other, id: route.id, reserved_bytes: 0 }, None => continue } };\n            let Some(c) = self.clients.get_mut(&route.conn) else { continue };"
  "mux-answers-with-the-upstream-id|full|nodes/src/mux.rs|encode_packet(&mut c.out, route.id, &packet.record);|encode_packet(&mut c.out, packet.id, &packet.record);"
  "kvlds-cleaning-drops-a-pair|kvlds|nodes/src/kvlds/tree.rs|        self.leaf_for(key, cache)?;\n        self.modified = true;\n        Ok(true)|        let l = self.leaf_for(key, cache)?;\n        self.materialize(l);\n        if let DirtyBody::Leaf(p) = &mut self.node_mut(l).body { p.pop(); }\n        self.modified = true;\n        Ok(true)"
  "kvlds-cleaning-never-cleans|kvlds-space|nodes/src/kvlds/clean.rs|        if self.debt_cleans < 1.0 {|        if self.debt_cleans < f64::INFINITY {"
  "kvlds-recovery-takes-older-root|kvlds|nodes/src/kvlds/recovery.rs|let start = (last_block != NO_LAST_BLOCK).then_some(last_block);|let start = (last_block != NO_LAST_BLOCK).then_some(last_block.saturating_sub(1));"
  # Pipelined commits: the next batch built on the committed tree rather
  # than on the commit being written (losing that commit's changes), and
  # the answers of a batch that changed nothing sent before the commit
  # below it is durable.
  "kvlds-next-batch-below-the-commit-in-flight|kvlds|nodes/src/kvlds/mod.rs|tree: DirtyTree::new(self.tip(), self.block_size),|tree: DirtyTree::new(self.committed, self.block_size),"
  "kvlds-unchanged-batch-answered-before-the-commit-below|kvlds|nodes/src/kvlds/mod.rs|                    Some(sent) => {\n                        self.probes.answers_held_for_commit_below += answers.len() as u64;\n                        sent.answers.extend(answers);\n                    }\n                    None => {|                    Some(sent) if false => {\n                        sent.answers.extend(answers);\n                    }\n                    _ => {"
  # Three that show only at particular crash points (crash-state
  # enumeration's targets): recovery trusting a torn batch whose first and
  # last records survived (a power loss mid-APPEND, sectors reaching the
  # medium out of order); recovery serving files whose directory entries it
  # never made durable (a crash between a new file's data sync and its
  # directory sync, then a power loss); one directory fsync for several
  # removals (a power loss mid-FREE brings back an older file but not a
  # newer one: the files left are not a suffix).
  "lbs-recovery-checks-batch-ends-only|lbs|nodes/src/lbs/recovery.rs|places[lo..=j as usize]|places[lo..=lo]"
  "lbs-recovery-skips-dir-sync|lbs|nodes/src/lbs/startup.rs|(Step::SyncNewestAgain, _) => self.step(Step::SyncDir, DiskOp::SyncDir),|(Step::SyncNewestAgain, _) => self.finish_recovery(),"
  "lbs-one-dir-sync-for-many-removals|lbs|nodes/src/lbs/mod.rs|                if self.cfg.fsync {\n                    // Removals are made durable one at a time, oldest first, so\n                    // that after a crash the files left are always a suffix.|                let more = self.files.len() >= 2 && self.files[1].first_block <= self.free_mark && self.files[0].reads_in_flight == 0;\n                if self.cfg.fsync && !more {\n                    // One directory fsync makes every removal durable: issued\n                    // after the last file that can go."
)

# The unmutated tree must pass the same sweep, or a false failure would make
# every mutant look caught.
cargo build --release -q -p kivaloo-sim
# Copies the scenarios named to directory $1, but those of the space oracle.
copy_but_space() {
  local dest=$1; shift
  for f in "$@"; do grep -q '^space_factor' "$f" || cp "$f" "$dest/"; done
}
mkdir "$work/clean" && copy_but_space "$work/clean" scenarios/*.toml
if ! "$CARGO_TARGET_DIR/release/kivaloo-sim" sweep "$work/clean" --seeds "$seeds" >"$work/clean.log" \
  || ! "$CARGO_TARGET_DIR/release/kivaloo-sim" sweep scenarios/kvlds-space.toml >>"$work/clean.log"; then
  echo "the unmutated tree fails the sweep:"; grep '^FAILED' "$work/clean.log" || tail -5 "$work/clean.log"; exit 1
fi

# Crash-state enumeration's share: the scenarios of each component it
# enumerates (every crash point, occurrences 1, 2, 3, 5 and 8, at most 32
# states a crash), and the seeds of each.
enum_scenarios() {
  case $1 in
    lbs) echo "lbs-quiet lbs-crashes lbs-torn-writes lbs-torn-new-files" ;;
    kvlds) echo "kvlds-quiet kvlds-crashes" ;;
    full) echo "full-quiet full-crashes" ;;
    *) echo "" ;;
  esac
}
enum_seeds=10
# Enumerates the crash points of the scenarios of component $2 in tree $1;
# prints the first failing state, if any.
enumerate_in() {
  local tree=$1 prefix=$2 names
  names=$(enum_scenarios "$prefix")
  [ -n "$names" ] || { echo "n/a"; return; }
  rm -rf "$work/enum" && mkdir "$work/enum"
  for n in $names; do cp "$tree/scenarios/$n.toml" "$work/enum/"; done
  "$CARGO_TARGET_DIR/release/kivaloo-sim" enumerate "$work/enum" --seeds "$enum_seeds" --bound 32 --first-failure \
    | grep -m1 '^FAILED:' || true
}
for prefix in lbs kvlds full; do
  if [ "$(enumerate_in "$root" "$prefix")" != "" ]; then
    echo "the unmutated tree fails crash-state enumeration ($prefix):"; enumerate_in "$root" "$prefix"; exit 1
  fi
done

status=0
printf '%-38s | %-60s | %s\n' "bug" "sampling: first failing seed ($seeds per scenario)" \
  "enumeration: first failing crash state ($enum_seeds seeds per scenario)"
for m in "${mutants[@]}"; do
  IFS='|' read -r name prefix file from to <<<"$m"
  rm -rf "$work/tree" && mkdir "$work/tree"
  git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work/tree"
  python3 - "$work/tree/$file" "$from" "$to" <<'PY'
import sys
path, old, new = sys.argv[1], sys.argv[2].replace("\\n", "\n"), sys.argv[3].replace("\\n", "\n")
text = open(path).read()
if text.count(old) != 1:
    sys.exit(f"mutant does not apply: {old!r} found {text.count(old)} times in {path}")
open(path, "w").write(text.replace(old, new))
PY
  (cd "$work/tree" && cargo build --release -q -p kivaloo-sim 2>"$work/build.log") || {
    echo "$name: does not build"; cat "$work/build.log"; status=1; continue; }
  rm -rf "$work/scenarios" && mkdir "$work/scenarios"
  if [ "$prefix" = kvlds-space ]; then
    # The space oracle's scenario: long runs, so its own few seeds.
    cp "$work/tree/scenarios/kvlds-space.toml" "$work/scenarios/"
    out=$("$CARGO_TARGET_DIR/release/kivaloo-sim" sweep "$work/scenarios" --first-failure || true)
  else
    copy_but_space "$work/scenarios" "$work/tree/scenarios/$prefix"-*.toml
    out=$("$CARGO_TARGET_DIR/release/kivaloo-sim" sweep "$work/scenarios" --seeds "$seeds" --first-failure || true)
  fi
  first=$(echo "$out" | grep -m1 '^FAILED:' || true)
  first=${first#FAILED: $work/scenarios/}
  sampled=${first:-not caught}
  enumerated=$(enumerate_in "$work/tree" "$prefix")
  enumerated=${enumerated#FAILED: $work/enum/}
  enumerated=${enumerated:-not caught}
  printf '%-38s | %-60s | %s\n' "$name" "$(echo "$sampled" | cut -c1-60)" "$(echo "$enumerated" | cut -c1-110)"
  if [ "$sampled" = "not caught" ] && { [ "$enumerated" = "not caught" ] || [ "$enumerated" = "n/a" ]; }; then
    echo "  NOT CAUGHT: neither sampling nor enumeration found $name"
    status=1
  fi
done
exit $status
