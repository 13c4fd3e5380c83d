//! The long sweep, for a nightly job: rounds of fresh seeds over every
//! scenario, each followed by crash-state enumeration of some of those
//! seeds, until a deadline. Every failing seed is shrunk (`shrink.rs`) and
//! its reproduction written as a scenario file beside the report (while
//! time is left); every failing crash state is reported with its replay
//! command. The report (Markdown) is rewritten after each round's
//! sampling and after its enumeration, so a job stopped at its time limit
//! still leaves one. A round may run past the deadline by its own length. Memory stays bounded over hours: totals only,
//! and at most [`FAILURES_KEPT`] failures in detail.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::coverage::{unreached, Family};
use crate::enumerate::{enumerate_sweep, show_choices, CrashPoint, PointTotals, SweepPlan};
use crate::runner::{replay_command, sweep};
use crate::scenario::Scenario;
use crate::shrink::{oracle_of, shrink};

/// Failures reported in detail (the rest are counted).
pub const FAILURES_KEPT: usize = 200;

/// Failing seeds shrunk per scenario and oracle (shrinking costs hundreds
/// of runs; one bug tends to fail many seeds alike).
pub const SHRINKS_PER_ORACLE: usize = 2;

/// What the long sweep does.
#[derive(Debug, Clone)]
pub struct NightlyConfig {
    pub files: Vec<PathBuf>,
    /// The report (Markdown); shrunk scenarios go in its directory.
    pub report: PathBuf,
    /// How long to run (rounds do not start after it).
    pub duration: Duration,
    /// The first seed of the first round.
    pub first_seed: u64,
    /// Seeds per scenario per round.
    pub seeds_per_round: u64,
    /// Of those, seeds per scenario whose crash points are enumerated.
    pub enumerated_per_round: u64,
    /// The most states per enumerated crash.
    pub bound: u64,
    pub jobs: usize,
    /// The most runs one shrink may spend.
    pub shrink_runs: u64,
}

/// A failure found, as the report gives it.
struct Found {
    title: String,
    message: String,
    replay: String,
    shrunk: Option<String>,
}

#[derive(Default)]
struct Totals {
    rounds: u64,
    runs: u64,
    requests: u64,
    crashes: u64,
    power_losses: u64,
    enumerated_requests: u64,
    failed_seeds: u64,
    failed_states: u64,
    points: BTreeMap<CrashPoint, PointTotals>,
    probes: BTreeMap<Family, BTreeMap<String, u64>>,
    found: Vec<Found>,
    shrinks: BTreeMap<(PathBuf, &'static str), usize>,
}

/// Runs the long sweep; true if nothing failed.
///
/// # Errors
/// A scenario cannot be loaded, or the report cannot be written.
pub fn nightly(cfg: &NightlyConfig, log: &mut dyn FnMut(&str)) -> Result<bool, String> {
    let started = Instant::now();
    let dir = cfg.report.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let mut t = Totals::default();
    let mut next = cfg.first_seed;
    // The space oracle's long runs are not enumerated (no faults, and a
    // crash point there costs a hundred of the others).
    let mut enumerable = Vec::new();
    for path in &cfg.files {
        if Family::of(&Scenario::load(path)?) != Family::Space {
            enumerable.push(path.clone());
        }
    }
    while started.elapsed() < cfg.duration {
        let round = sweep(&cfg.files, next, Some(cfg.seeds_per_round), cfg.jobs, false)?;
        t.rounds += 1;
        t.runs += round.runs;
        t.requests += round.requests;
        t.crashes += round.crashes;
        t.power_losses += round.power_losses;
        for (family, probes) in round.probes_by_family {
            let sum = t.probes.entry(family).or_default();
            for (name, n) in probes {
                *sum.entry(name).or_default() += n;
            }
        }
        for f in round.failures {
            t.failed_seeds += 1;
            let message = f.outcome.failure.clone().unwrap_or_default();
            let oracle = oracle_of(&message);
            let key = (f.scenario.clone(), oracle);
            let in_time = started.elapsed() < cfg.duration;
            let shrunk = if in_time && t.shrinks.get(&key).copied().unwrap_or(0) < SHRINKS_PER_ORACLE {
                *t.shrinks.entry(key).or_default() += 1;
                log(&format!("shrinking {} seed {}", f.scenario.display(), f.outcome.seed));
                Some(shrink_to_file(&f.scenario, f.outcome.seed, cfg.shrink_runs, &dir))
            } else {
                None
            };
            if t.found.len() < FAILURES_KEPT {
                t.found.push(Found {
                    title: format!("{} seed {} ({oracle})", f.scenario.display(), f.outcome.seed),
                    message,
                    replay: replay_command(&f.scenario, f.outcome.seed),
                    shrunk,
                });
            }
        }
        write_report(cfg, &t, next + cfg.seeds_per_round, started.elapsed())?;
        if started.elapsed() >= cfg.duration {
            break;
        }
        let enumerated = enumerate_sweep(
            &enumerable,
            next,
            Some(cfg.enumerated_per_round),
            &SweepPlan {
                points: &CrashPoint::ALL,
                occurrences: &[1, 2, 3, 5, 8],
                bound: cfg.bound,
                stop_at_first_failure: false,
            },
            cfg.jobs,
        )?;
        t.enumerated_requests += enumerated.requests;
        for (point, p) in enumerated.points {
            let sum = t.points.entry(point).or_default();
            sum.tried += p.tried;
            sum.reached += p.reached;
            sum.exhaustive += p.exhaustive;
            sum.states_run += p.states_run;
            sum.states_legal_max = sum.states_legal_max.max(p.states_legal_max);
        }
        for (path, seed, e) in enumerated.failures {
            for (choices, message) in e.failures {
                t.failed_states += 1;
                if t.found.len() < FAILURES_KEPT {
                    let at = format!("{}:{}", e.point, e.occurrence);
                    let state = show_choices(&choices);
                    t.found.push(Found {
                        title: format!(
                            "{} seed {seed}, power loss at {at}, state {state} ({})",
                            path.display(),
                            oracle_of(&message)
                        ),
                        message,
                        replay: format!(
                            "cargo run --release -p kivaloo-sim -- run {} --seed {seed} --crash-at {at} \
                             --crash-state {state} --trace",
                            path.display()
                        ),
                        shrunk: None,
                    });
                }
            }
        }
        next += cfg.seeds_per_round;
        write_report(cfg, &t, next, started.elapsed())?;
        log(&format!(
            "round {}: seeds {}..{next}, {} runs, {} failed seeds, {} failed crash states so far",
            t.rounds, cfg.first_seed, t.runs, t.failed_seeds, t.failed_states
        ));
    }
    if t.rounds == 0 {
        write_report(cfg, &t, next, started.elapsed())?;
    }
    Ok(t.failed_seeds == 0 && t.failed_states == 0)
}

/// Shrinks a failing seed and writes the reproduction into `dir`; returns
/// how to run it (or why it could not be shrunk).
fn shrink_to_file(path: &Path, seed: u64, runs_max: u64, dir: &Path) -> String {
    let scenario = match Scenario::load(path) {
        Ok(s) => s,
        Err(e) => return format!("not shrunk: {e}"),
    };
    match shrink(&scenario, seed, runs_max, &mut |_| {}) {
        Err(e) => format!("not shrunk: {e}"),
        Ok(s) => {
            let mut reproduction = s.scenario;
            reproduction.name = format!("{}-seed-{seed}-shrunk", scenario.name);
            reproduction.description =
                format!("{} (seed {seed}, shrunk: it fails the {} oracle)", scenario.description, s.oracle);
            let file = dir.join(format!("{}.toml", reproduction.name));
            if let Err(e) = std::fs::write(&file, reproduction.to_toml()) {
                return format!("shrunk, but {} could not be written: {e}", file.display());
            }
            format!(
                "shrunk in {} runs: requests {} -> {}, clients {} -> {}, faults {} -> {}; reproduce: \
                 `cargo run --release -p kivaloo-sim -- run {} --trace`",
                s.runs,
                s.before.requests,
                s.after.requests,
                s.before.clients,
                s.after.clients,
                s.before.faults,
                s.after.faults,
                file.display()
            )
        }
    }
}

fn write_report(cfg: &NightlyConfig, t: &Totals, next: u64, elapsed: Duration) -> Result<(), String> {
    let secs = elapsed.as_secs_f64();
    let mut r = String::new();
    let _ = writeln!(r, "# kivaloo-sim: long sweep report\n");
    let _ = writeln!(
        r,
        "{} scenarios, seeds {}..{next} of each ({} rounds of {}; crash points enumerated for the first {} \
         seeds of each round, at most {} states per crash), {secs:.0} s of {} s, {} threads.\n",
        cfg.files.len(),
        cfg.first_seed,
        t.rounds,
        cfg.seeds_per_round,
        cfg.enumerated_per_round,
        cfg.bound,
        cfg.duration.as_secs(),
        cfg.jobs
    );
    let _ = writeln!(
        r,
        "- sampled runs: {} ({} simulated requests, {:.0} a second; {} crashes, {} power losses)",
        t.runs,
        t.requests,
        t.requests as f64 / secs.max(1e-9),
        t.crashes,
        t.power_losses
    );
    let states: u64 = t.points.values().map(|p| p.states_run).sum();
    let _ = writeln!(r, "- enumerated crash states: {states} ({} simulated requests)", t.enumerated_requests);
    let _ = writeln!(r, "- failing seeds: {}; failing crash states: {}\n", t.failed_seeds, t.failed_states);
    let _ = writeln!(r, "| crash point | tried | reached | exhaustive | states run | most legal states |");
    let _ = writeln!(r, "|---|---|---|---|---|---|");
    for (point, p) in &t.points {
        let _ = writeln!(
            r,
            "| {point} | {} | {} | {} | {} | {} |",
            p.tried, p.reached, p.exhaustive, p.states_run, p.states_legal_max
        );
    }
    let _ = writeln!(r, "\n## Failures\n");
    if t.found.is_empty() {
        let _ = writeln!(r, "None.");
    }
    for f in &t.found {
        let _ = writeln!(r, "### {}\n", f.title);
        let _ = writeln!(r, "```\n{}\n```\n", f.message.lines().take(20).collect::<Vec<_>>().join("\n"));
        let _ = writeln!(r, "- replay: `{}`", f.replay);
        if let Some(s) = &f.shrunk {
            let _ = writeln!(r, "- {s}");
        }
        let _ = writeln!(r);
    }
    let _ = writeln!(r, "## Coverage\n");
    for (family, probes) in &t.probes {
        let missed = unreached(*family, probes);
        let _ = writeln!(
            r,
            "- {} scenarios: {}",
            family.name(),
            if missed.is_empty() {
                "every required probe reached".to_string()
            } else {
                format!("UNREACHED {missed:?}")
            }
        );
    }
    let _ = writeln!(r, "\n| probe | count |\n|---|---|");
    let mut all: BTreeMap<&str, u64> = BTreeMap::new();
    for probes in t.probes.values() {
        for (name, n) in probes {
            *all.entry(name).or_default() += n;
        }
    }
    for (name, n) in all {
        let _ = writeln!(r, "| {name} | {n} |");
    }
    std::fs::write(&cfg.report, r).map_err(|e| format!("{}: {e}", cfg.report.display()))
}
