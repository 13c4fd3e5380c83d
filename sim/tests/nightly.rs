//! The long sweep: one short round over a scenario that always fails
//! leaves a report naming the failures and shrunk reproductions beside it
//! that replay the failure by themselves.

use std::time::Duration;

use kivaloo_sim::nightly::{nightly, NightlyConfig};
use kivaloo_sim::runner::run_seed;
use kivaloo_sim::scenario::Scenario;

/// kvlds under crashes with an impossible space factor: every seed fails
/// the space oracle once it checks.
const OVERFULL: &str = include_str!("data/overfull.toml");

#[test]
fn a_round_reports_its_failures_with_shrunk_reproductions_that_replay_them() {
    let dir = std::env::temp_dir().join(format!("kivaloo-nightly-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let scenario_path = dir.join("overfull.toml");
    std::fs::write(&scenario_path, OVERFULL).unwrap();
    let cfg = NightlyConfig {
        files: vec![scenario_path],
        report: dir.join("report.md"),
        // Rounds go on for this long (a round here takes milliseconds);
        // shrinking happens only while time is left.
        duration: Duration::from_millis(800),
        first_seed: 40,
        seeds_per_round: 3,
        enumerated_per_round: 1,
        bound: 8,
        jobs: 2,
        shrink_runs: 100,
    };
    let clean = nightly(&cfg, &mut |_| {}).unwrap();
    assert!(!clean, "every seed fails");
    let report = std::fs::read_to_string(&cfg.report).unwrap();
    let failing: u64 = report
        .split("failing seeds: ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count of failing seeds: {report}"));
    assert!(failing >= 3, "{report}");
    assert!(report.contains("seed 40 (space)") && report.contains("seed 42 (space)"), "{report}");
    // Two shrinks per scenario and oracle, the first two failures.
    let shrunk: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("-shrunk.toml"))
        .collect();
    assert_eq!(shrunk.len(), 2, "{shrunk:?}");
    for path in &shrunk {
        let s = Scenario::load(path).unwrap();
        let seed = s.replay.as_ref().unwrap().seed;
        let outcome = run_seed(&s, seed, false);
        assert!(outcome.failure.unwrap().starts_with("space:"), "{}", path.display());
        assert!(report.contains(&path.display().to_string()), "the report names {}", path.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
