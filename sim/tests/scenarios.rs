//! Every scenario in scenarios/ at the seed count CI affords, each seed run
//! twice (the trace hashes must match: determinism); every regression seed;
//! and coverage: a sweep that never reaches a hard path fails, so the fault
//! model cannot silently stop exercising it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kivaloo_sim::runner::{replay_command, run_seed, scenario_files};
use kivaloo_sim::scenario::Scenario;

/// Seeds per scenario in `cargo test` (a sweep runs each scenario's own
/// count). Shared with `ci/mutants.sh`, which must find every deliberate
/// bug within this budget.
const CI_SEEDS: u64 = 100;

fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

/// Runs `seed` twice; returns the failure (with the replay command), if any,
/// and adds the probes to `probes`.
fn check_seed(
    path: &Path,
    scenario: &Scenario,
    seed: u64,
    probes: &mut BTreeMap<String, u64>,
) -> Option<String> {
    let first = run_seed(scenario, seed, false);
    let second = run_seed(scenario, seed, false);
    for (name, n) in &first.probes {
        *probes.entry(name.clone()).or_default() += n;
    }
    if let Some(f) = &first.failure {
        return Some(format!(
            "{} seed {seed}: {f}\n  replay: {}",
            path.display(),
            replay_command(path, seed)
        ));
    }
    if first.trace_hash != second.trace_hash {
        return Some(format!(
            "{} seed {seed}: not deterministic: trace hashes {:016x} and {:016x}\n  replay: {}",
            path.display(),
            first.trace_hash,
            second.trace_hash,
            replay_command(path, seed)
        ));
    }
    None
}

#[test]
fn every_scenario_passes_its_ci_seeds_twice_alike_and_reaches_every_probe() {
    let files = scenario_files(&scenarios_dir()).unwrap();
    assert!(files.len() >= 8, "scenarios missing: {files:?}");
    let mut failures = Vec::new();
    let mut probes = BTreeMap::new();
    for path in &files {
        let scenario = Scenario::load(path).unwrap();
        for seed in 0..CI_SEEDS.min(scenario.seeds) {
            failures.extend(check_seed(path, &scenario, seed, &mut probes));
        }
    }
    assert!(failures.is_empty(), "{} failing seeds:\n{}", failures.len(), failures.join("\n"));
    let must_reach = [
        "sim: crashes",
        "sim: power losses",
        "sim: connection resets",
        "sim: node timers fired",
        "disk: torn_writes",
        "disk: scattered_torn_writes",
        "disk: dropped_writes",
        "disk: failed_fsyncs",
        "disk: fsync_kept_pages",
        "disk: failed_dir_syncs",
        "disk: vanished_creates",
        "disk: eio_reads",
        "disk: eio_writes",
        "disk: enospc",
        "disk: disk_full",
        "disk: short_reads",
        "disk: short_writes",
        "disk: misdirected",
        "disk: rotted",
        "lbs: torn tail cut at recovery",
        "lbs: torn new file removed at recovery",
        "lbs: torn header rewritten at recovery",
        "lbs: corruption reported on GET",
        "lbs: stopped after a failed fsync",
        "lbs: freed file removed",
    ];
    let missed: Vec<&str> =
        must_reach.iter().copied().filter(|p| probes.get(*p).copied().unwrap_or(0) == 0).collect();
    assert!(missed.is_empty(), "the sweep never reached {missed:?}; probes: {probes:#?}");
}

#[test]
fn every_regression_seed_passes_twice_alike() {
    let dir = scenarios_dir().join("regressions");
    let mut failures = Vec::new();
    let mut probes = BTreeMap::new();
    let mut count = 0;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for file in files.iter().filter(|p| p.extension().is_some_and(|x| x == "txt")) {
        for (n, line) in std::fs::read_to_string(file).unwrap().lines().enumerate() {
            let line = line.split('#').next().unwrap().trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(scenario), Some(seed), None) = (parts.next(), parts.next(), parts.next()) else {
                panic!("{}:{}: expected `<scenario file> <seed>  # what broke`", file.display(), n + 1);
            };
            let path = scenarios_dir().join(scenario);
            let scenario = Scenario::load(&path).unwrap();
            let seed: u64 = seed.parse().unwrap();
            count += 1;
            failures.extend(check_seed(&path, &scenario, seed, &mut probes));
        }
    }
    assert!(failures.is_empty(), "{} failing regression seeds:\n{}", failures.len(), failures.join("\n"));
    eprintln!("{count} regression seeds passed");
}
