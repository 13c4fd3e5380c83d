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
const BOUND: u64 = 32;

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios").join(name)
}

#[test]
fn every_persisted_state_at_each_crash_point_recovers_and_passes_every_oracle() {
    let files: Vec<PathBuf> =
        ["lbs-quiet.toml", "kvlds-quiet.toml", "full-quiet.toml"].into_iter().map(scenario).collect();
    let plan = SweepPlan {
        points: &CrashPoint::ALL,
        occurrences: OCCURRENCES,
        bound: BOUND,
        stop_at_first_failure: false,
    };
    let sweep = enumerate_sweep(&files, 0, Some(SEEDS), &plan, 2).unwrap();
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
    for point in CrashPoint::ALL {
        let t = &sweep.points[&point];
        eprintln!("{point}: {t:?}");
        assert!(t.reached > 0, "{point} never reached");
        assert!(t.exhaustive > 0, "{point}: no crash enumerated exhaustively");
        assert!(t.states_run > t.reached, "{point}: one state per crash is sampling, not enumeration");
    }
    // The points with most at stake are reached in most runs.
    for point in [CrashPoint::MidAppend, CrashPoint::NewFileBeforeDirSync, CrashPoint::MidFree] {
        let t = &sweep.points[&point];
        assert!(t.reached * 10 >= t.tried * 9, "{point}: reached in {} of {} runs", t.reached, t.tried);
    }
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
