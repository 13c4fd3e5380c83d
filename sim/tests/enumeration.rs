//! Crash-state enumeration at the crash points that matter most: for a
//! few seeds of the fault-free scenarios of each chain, a power loss
//! forced mid-APPEND, after a new file's data is synced but before its
//! directory entry is, mid-cleaning and mid-FREE, at several occurrences
//! of each; every legal persisted state up to the bound (a stratified
//! sample above it) must recover and pass every oracle.

use std::path::{Path, PathBuf};

use kivaloo_sim::enumerate::{enumerate, enumerate_sweep, show_choices, CrashPoint, SweepPlan};
use kivaloo_sim::scenario::Scenario;

/// Seeds per scenario, occurrences per point, and the bound on states per
/// crash, sized for `cargo test` (a few thousand runs).
const SEEDS: u64 = 5;
const OCCURRENCES: &[u64] = &[1, 2, 3, 5, 8];
const BOUND: u64 = 48;

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios").join(name)
}

/// Enumerates `points` in `files`; fails naming every failing state;
/// checks each point was reached and enumerated (more than one state a
/// crash, at least one crash exhaustively).
fn enumerate_and_check(files: &[&str], seeds: u64, points: &[CrashPoint], occurrences: &[u64]) {
    let files: Vec<PathBuf> = files.iter().map(|f| scenario(f)).collect();
    let plan = SweepPlan { points, occurrences, bound: BOUND, stop_at_first_failure: false };
    let sweep = enumerate_sweep(&files, 0, Some(seeds), &plan, 2).unwrap();
    let failures: Vec<String> = sweep
        .failures
        .iter()
        .flat_map(|(path, seed, e)| {
            e.failures.iter().map(move |(choices, f)| {
                format!(
                    "{} seed {seed} --crash-at {}:{} --crash-state {}: {f}",
                    path.display(),
                    e.point,
                    e.occurrence,
                    show_choices(choices)
                )
            })
        })
        .collect();
    assert!(failures.is_empty(), "{} failing states:\n{}", failures.len(), failures.join("\n"));
    for point in points {
        let t = &sweep.points[point];
        eprintln!("{point}: {t:?}");
        assert!(t.reached > 0, "{point} never reached");
        assert!(t.exhaustive > 0, "{point}: no crash enumerated exhaustively");
        assert!(t.states_run > t.reached, "{point}: one state per crash is sampling, not enumeration");
    }
}

#[test]
fn every_persisted_state_mid_append_before_a_dir_sync_and_mid_free_passes_every_oracle() {
    let points = [CrashPoint::MidAppend, CrashPoint::NewFileBeforeDirSync, CrashPoint::MidFree];
    enumerate_and_check(
        &["lbs-quiet.toml", "kvlds-quiet.toml", "full-quiet.toml"],
        SEEDS,
        &points,
        OCCURRENCES,
    );
}

#[test]
fn every_persisted_state_mid_cleaning_passes_every_oracle() {
    // Cleaning commits are rarer: more seeds, scenarios that clean.
    enumerate_and_check(
        &["kvlds-quiet.toml", "kvlds-crashes.toml"],
        12,
        &[CrashPoint::MidCleaning],
        &[1, 2, 3],
    );
}

#[test]
fn a_crash_enumerated_exhaustively_runs_each_state_once_and_replays_alike() {
    let s = Scenario::load(&scenario("kvlds-quiet.toml")).unwrap();
    let e = enumerate(&s, 1, CrashPoint::MidAppend, 3, 10_000);
    assert!(e.reached && e.exhaustive, "{e:?}");
    assert!(e.failures.is_empty(), "{:?}", e.failures);
    let legal: u64 = e.arities.iter().product();
    assert_eq!(u128::from(legal), e.states_legal);
    assert_eq!(e.states_run, legal);
    assert!(legal >= 3, "a write in flight has at least kept, dropped and torn: {:?}", e.arities);
    let again = enumerate(&s, 1, CrashPoint::MidAppend, 3, 10_000);
    assert_eq!((again.arities, again.states_run, again.requests), (e.arities, e.states_run, e.requests));
}
