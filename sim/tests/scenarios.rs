//! Every scenario in scenarios/ at the seed count CI affords, each seed run
//! twice (the trace hashes must match: determinism); every regression seed;
//! and coverage: a sweep that never reaches a hard path fails, so the fault
//! model cannot silently stop exercising it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kivaloo_sim::coverage::Family;
use kivaloo_sim::runner::{replay_command, run_seed, scenario_files};
use kivaloo_sim::scenario::Scenario;

/// Seeds per lbs scenario in `cargo test` (a sweep runs each scenario's
/// own count). Shared with `ci/mutants.sh`, which must find every
/// deliberate bug within this budget.
const CI_SEEDS: u64 = 100;

/// Seeds per kvlds scenario (`kvlds-*.toml`) in `cargo test`: a kvlds run
/// costs far more than an lbs one (two nodes, a B+tree, a linearizability
/// check), so CI affords fewer. Chosen so that the four kvlds scenarios,
/// each seed run twice, take under about two minutes in the test profile on
/// two cores (about 50 s when this was set, beside the lbs sweep), leaving
/// room for the node to grow.
const KVLDS_CI_SEEDS: u64 = 300;

/// Seeds per full-stack scenario (`full-*.toml`: clients -> mux -> kvlds
/// -> lbs) in `cargo test`; a run costs about what a kvlds one does.
const FULL_CI_SEEDS: u64 = 300;

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

/// Runs the CI seeds of every scenario file whose name starts with
/// `prefix`, `seeds` each (or fewer if the scenario has fewer), twice;
/// returns the failures and the summed probes. Space oracle scenarios
/// have a test of their own.
fn sweep_ci(prefix: &str, seeds: u64) -> (usize, Vec<String>, BTreeMap<String, u64>) {
    let files: Vec<PathBuf> = scenario_files(&scenarios_dir())
        .unwrap()
        .into_iter()
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix)))
        .collect();
    let mut failures = Vec::new();
    let mut probes = BTreeMap::new();
    for path in &files {
        let scenario = Scenario::load(path).unwrap();
        if scenario.workload.space_factor.is_some() {
            continue;
        }
        for seed in 0..seeds.min(scenario.seeds) {
            failures.extend(check_seed(path, &scenario, seed, &mut probes));
        }
    }
    (files.len(), failures, probes)
}

#[test]
fn the_space_oracle_holds_for_every_seed_of_its_scenarios_and_is_checked() {
    let mut checked = 0;
    let mut probes = BTreeMap::new();
    for path in scenario_files(&scenarios_dir()).unwrap() {
        let scenario = Scenario::load(&path).unwrap();
        let Some(factor) = scenario.workload.space_factor else { continue };
        for seed in 0..scenario.seeds {
            if let Some(failure) = check_seed(&path, &scenario, seed, &mut probes) {
                panic!("{failure}");
            }
            let ratio = run_seed(&scenario, seed, false).space_ratio_max;
            let ratio =
                ratio.unwrap_or_else(|| panic!("{} seed {seed}: space never checked", path.display()));
            // The allowance adds two files to the factor; the ratio itself
            // stays under it in these scenarios (files are small).
            assert!(ratio <= factor, "{} seed {seed}: {ratio:.2} times the tree", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 4, "space oracle seeds missing: {checked} run");
    assert_reached(Family::Space.required(), &probes);
}

#[test]
fn every_scenario_file_is_in_a_ci_sweep() {
    for path in scenario_files(&scenarios_dir()).unwrap() {
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with("lbs-") || name.starts_with("kvlds-") || name.starts_with("full-"),
            "{name}: CI sweeps lbs-*.toml, kvlds-*.toml and full-*.toml only; name it so, or add a sweep"
        );
        Scenario::load(&path).unwrap();
    }
}

/// Fails naming every probe of `must_reach` that the sweep never reached.
fn assert_reached(must_reach: &[&str], probes: &BTreeMap<String, u64>) {
    let missed: Vec<&str> =
        must_reach.iter().copied().filter(|p| probes.get(*p).copied().unwrap_or(0) == 0).collect();
    assert!(missed.is_empty(), "the sweep never reached {missed:?}; probes: {probes:#?}");
}

#[test]
fn every_lbs_scenario_passes_its_ci_seeds_twice_alike_and_reaches_every_probe() {
    let (files, failures, probes) = sweep_ci("lbs-", CI_SEEDS);
    assert!(files >= 8, "lbs scenarios missing: {files} found");
    assert!(failures.is_empty(), "{} failing seeds:\n{}", failures.len(), failures.join("\n"));
    assert_reached(Family::Lbs.required(), &probes);
}

#[test]
fn every_kvlds_scenario_passes_its_ci_seeds_twice_alike_and_reaches_every_probe() {
    let (files, failures, probes) = sweep_ci("kvlds-", KVLDS_CI_SEEDS);
    assert!(files >= 4, "kvlds scenarios missing: {files} found");
    assert!(failures.is_empty(), "{} failing seeds:\n{}", failures.len(), failures.join("\n"));
    assert_reached(Family::Kvlds.required(), &probes);
}

#[test]
fn every_full_stack_scenario_passes_its_ci_seeds_twice_alike_and_reaches_every_probe() {
    let (files, failures, probes) = sweep_ci("full-", FULL_CI_SEEDS);
    assert!(files >= 3, "full-stack scenarios missing: {files} found");
    assert!(failures.is_empty(), "{} failing seeds:\n{}", failures.len(), failures.join("\n"));
    assert_reached(Family::Full.required(), &probes);
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
    // Shrunk reproductions: a scenario file of its own, with its seed.
    for path in files.iter().filter(|p| p.extension().is_some_and(|x| x == "toml")) {
        let scenario = Scenario::load(path).unwrap();
        let seed = scenario
            .replay
            .as_ref()
            .unwrap_or_else(|| panic!("{}: a regression file needs its [replay] seed", path.display()))
            .seed;
        count += 1;
        failures.extend(check_seed(path, &scenario, seed, &mut probes));
    }
    assert!(failures.is_empty(), "{} failing regression seeds:\n{}", failures.len(), failures.join("\n"));
    eprintln!("{count} regression seeds passed");
}
