//! Shrinking: a failing run comes out smaller (fewer requests, no faults
//! it does not need), still failing the same oracle, and its scenario file
//! replays that failure by itself.

use kivaloo_sim::runner::run_seed;
use kivaloo_sim::scenario::Scenario;
use kivaloo_sim::shrink::{oracle_of, shrink};

/// A store that must stay within 0.01 times its tree fails the space
/// oracle once it checks (half-way through the requests) whatever the
/// faults do; the crashes and resets are there to be shrunk away.
const OVERFULL: &str = include_str!("data/overfull.toml");

#[test]
fn a_failure_shrinks_to_fewer_requests_and_no_needless_faults_and_its_file_replays_it() {
    let scenario = Scenario::parse(OVERFULL).unwrap();
    let seed = 3;
    let original = run_seed(&scenario, seed, false);
    let failure = original.failure.expect("an impossible space factor fails");
    assert_eq!(oracle_of(&failure), "space");
    let faults = original.fault_tape.iter().filter(|n| n.kept).count();
    assert!(faults > 0, "the run must have faults to shrink away");

    let shrunk = shrink(&scenario, seed, 300, &mut |_| {}).unwrap();
    assert_eq!(shrunk.oracle, "space");
    assert_eq!(shrunk.before.faults, faults as u64);
    assert_eq!(shrunk.after.faults, 0, "no fault is needed to fail the space oracle: {:?}", shrunk.after);
    assert!(
        shrunk.after.requests < shrunk.before.requests / 2,
        "the space oracle fails as soon as it checks: {:?}",
        shrunk.after
    );

    // The file, read back, replays the same failure by itself.
    let text = shrunk.scenario.to_toml();
    let replay = Scenario::parse(&text).unwrap();
    let seed_again = replay.replay.as_ref().expect("a [replay] table").seed;
    assert_eq!(seed_again, seed);
    let again = run_seed(&replay, seed_again, false);
    assert_eq!(again.failure, shrunk.outcome.failure);
    assert_eq!(again.trace_hash, shrunk.outcome.trace_hash);
    assert_eq!(again.fault_tape.iter().filter(|n| n.kept).count(), 0);
}

#[test]
fn a_cut_tape_carries_out_only_the_faults_it_keeps() {
    let mut scenario = Scenario::parse(OVERFULL).unwrap();
    scenario.workload.space_factor = None;
    let seed = 5;
    let full = run_seed(&scenario, seed, false);
    assert!(full.failure.is_none(), "{:?}", full.failure);
    let kept: Vec<_> = full.fault_tape.iter().filter(|n| n.kept).cloned().collect();
    assert!(kept.len() >= 3, "{kept:?}");
    // Keep the first chaos fault only: the run is the same up to the
    // second one, which is decided but not carried out.
    let first = kept.iter().find(|n| n.source == kivaloo_sim::tape::Source::Chaos).unwrap().index;
    scenario.replay = Some(kivaloo_sim::scenario::Replay {
        seed,
        chaos_faults: Some(vec![first]),
        disk_faults: Some(vec![]),
        ..Default::default()
    });
    let cut = run_seed(&scenario, seed, false);
    assert!(cut.failure.is_none(), "{:?}", cut.failure);
    let carried: Vec<_> = cut.fault_tape.iter().filter(|n| n.kept).map(|n| (n.source, n.index)).collect();
    assert_eq!(carried, vec![(kivaloo_sim::tape::Source::Chaos, first)]);
    assert!(cut.fault_tape.iter().any(|n| !n.kept), "later faults are decided, and cut");
}
