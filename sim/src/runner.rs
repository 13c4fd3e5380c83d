//! Running seeds: one (with its outcome and the command that replays it),
//! or a sweep of many over a directory of scenarios, on several threads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::coverage::{unreached, Family};
use crate::enumerate::CrashPlan;
use crate::scenario::Scenario;
use crate::world::{panic_message, Outcome, World};

/// Runs `seed` of `scenario`. A panic (in a node or in the simulator) is
/// the run's failure, not the sweep's end.
pub fn run_seed(scenario: &Scenario, seed: u64, keep_trace: bool) -> Outcome {
    run_seed_with(scenario, seed, keep_trace, None)
}

/// Runs `seed` of `scenario` with a power loss forced where `plan` says
/// (crash-state enumeration; `None`: a plain run).
pub fn run_seed_with(scenario: &Scenario, seed: u64, keep_trace: bool, plan: Option<&CrashPlan>) -> Outcome {
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let world = World::new(scenario, seed, keep_trace);
        match plan {
            Some(plan) => world.with_crash_plan(plan.clone()).run(seed),
            None => world.run(seed),
        }
    }));
    run.unwrap_or_else(|panic| {
        Outcome::panicked(seed, scenario.draw(seed), format!("panicked: {}", panic_message(panic.as_ref())))
    })
}

/// The command that replays `seed` of the scenario at `path`.
pub fn replay_command(path: &Path, seed: u64) -> String {
    format!("cargo run --release -p kivaloo-sim -- run {} --seed {seed} --trace", path.display())
}

/// A failed seed, ready to report.
#[derive(Debug, Clone)]
pub struct Failure {
    pub scenario: PathBuf,
    pub outcome: Outcome,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = &self.outcome;
        writeln!(
            f,
            "FAILED: {} seed {}: {}",
            self.scenario.display(),
            o.seed,
            o.failure.as_deref().unwrap_or("?")
        )?;
        writeln!(f, "  drawn: {:?}", o.drawn)?;
        write!(f, "  replay: {}", replay_command(&self.scenario, o.seed))
    }
}

/// Totals of a sweep.
#[derive(Debug, Clone, Default)]
pub struct SweepReport {
    pub runs: u64,
    pub requests: u64,
    pub crashes: u64,
    pub power_losses: u64,
    /// Runs that ended because a damaged store reported the damage.
    pub ended_by_damage: u64,
    pub failures: Vec<Failure>,
    /// Probe counts summed over the sweep.
    pub probes: BTreeMap<String, u64>,
    /// Probe counts summed over each family of scenarios swept.
    pub probes_by_family: BTreeMap<Family, BTreeMap<String, u64>>,
    /// The space oracle's largest ratio over the sweep's runs (stored
    /// bytes over the tree's bytes), if any run checked it.
    pub space_ratio_max: Option<f64>,
}

impl SweepReport {
    /// Every probe a family swept must reach and never did, with its family.
    pub fn unreached(&self) -> Vec<(Family, &'static str)> {
        self.probes_by_family
            .iter()
            .flat_map(|(&family, probes)| unreached(family, probes).into_iter().map(move |p| (family, p)))
            .collect()
    }
}

/// The scenario files in `dir` (not in subdirectories), sorted.
///
/// # Errors
/// The directory cannot be read.
pub fn scenario_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Runs seeds `first..first + seeds` (or each scenario's own count) of
/// every scenario, on `jobs` threads, lower seeds first; with
/// `stop_at_first_failure`, no run starts after one failed (those already
/// running finish).
///
/// # Errors
/// A scenario cannot be loaded.
pub fn sweep(
    files: &[PathBuf],
    first: u64,
    seeds: Option<u64>,
    jobs: usize,
    stop_at_first_failure: bool,
) -> Result<SweepReport, String> {
    let mut work = Vec::new();
    for path in files {
        let scenario = Arc::new(Scenario::load(path)?);
        for seed in first..first + seeds.unwrap_or(scenario.seeds) {
            work.push((path.clone(), scenario.clone(), seed));
        }
    }
    work.sort_by_key(|(_, _, seed)| *seed);
    let mut report = SweepReport::default();
    let stop = AtomicBool::new(false);
    on_threads(
        &work,
        jobs,
        |(path, scenario, seed)| {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            Some((path.clone(), Family::of(scenario), run_seed(scenario, *seed, false)))
        },
        |result| {
            let Some((path, family, outcome)) = result else { return };
            if stop_at_first_failure && outcome.failure.is_some() {
                stop.store(true, Ordering::Relaxed);
            }
            let r = &mut report;
            let by_family = r.probes_by_family.entry(family).or_default();
            for (name, n) in &outcome.probes {
                *by_family.entry(name.clone()).or_default() += n;
            }
            r.runs += 1;
            r.requests += outcome.requests;
            r.crashes += outcome.crashes;
            r.power_losses += outcome.power_losses;
            r.ended_by_damage += u64::from(outcome.corruption_reported);
            if let Some(x) = outcome.space_ratio_max {
                r.space_ratio_max = Some(r.space_ratio_max.map_or(x, |m: f64| m.max(x)));
            }
            for (name, n) in &outcome.probes {
                *r.probes.entry(name.clone()).or_default() += n;
            }
            if outcome.failure.is_some() {
                r.failures.push(Failure { scenario: path, outcome });
            }
        },
    );
    report.failures.sort_by_key(|f| (f.scenario.clone(), f.outcome.seed));
    Ok(report)
}

/// Runs `f` on every item of `work` on `jobs` threads (at least one) and
/// hands each result to `done`, one at a time, in no particular order.
pub fn on_threads<T: Sync, R: Send>(
    work: &[T],
    jobs: usize,
    f: impl Fn(&T) -> R + Sync,
    done: impl FnMut(R) + Send,
) {
    let next = AtomicU64::new(0);
    let done = Mutex::new(done);
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(item) = work.get(i) else { break };
                let result = f(item);
                (done.lock().expect("results lock"))(result);
            });
        }
    });
}
