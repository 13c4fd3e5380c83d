//! Crash-state enumeration: instead of sampling one outcome of a power
//! loss, run recovery and every oracle on each legal persisted state of
//! the disk at a chosen crash point.
//!
//! A [`CrashPlan`] names a point ([`CrashPoint`]) and which occurrence of
//! it in the run; when the run reaches it, the machine loses power there
//! (every component dies, the disk keeps what the plan's choices say, see
//! `SimDisk::crash_choosing`), faults stop, and the run goes on as any
//! other: liveness, the quiet phase, the read-back and the final checks.
//! The run up to the crash does not depend on the choices, so one run
//! with the all-zero choices (everything unsynced kept) learns the
//! decisions and their numbers of options; each state is then a run from
//! the start with its own choices.
//!
//! The legal states are the product of the options: per directory entry
//! not yet synced, the new or the old version; per unsynced write, kept,
//! dropped, torn after each of its sectors, every sector but one (for
//! each sector: sectors reach the medium in any order), or scattered (a subset
//! drawn from the disk stream); per unsynced truncate, kept or dropped. Up to `bound` states, all are run (an
//! odometer over the choices). Above it, a stratified sample of `bound`
//! distinct states: everything kept, everything dropped (so every
//! decision's first two options), then, round-robin over the decisions,
//! each further option (the torn ones) of each decision with the other
//! decisions drawn at random (mostly kept or dropped), so that every
//! option of every decision is run at least once when the bound allows;
//! then states drawn uniformly up to the bound.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::rng::{Concern, Stream};
use crate::runner::{on_threads, run_seed_with};
use crate::scenario::Scenario;

/// Where a forced power loss strikes. Each is counted in the order the
/// run reaches it; a plan picks one occurrence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CrashPoint {
    /// Right after a write of lbs reached the page cache, before its fsync
    /// (an APPEND's data, or a new file's header).
    MidAppend,
    /// Right after any disk operation while a new file's data has been
    /// fsynced and its name is not yet durable (no directory fsync since
    /// it was created): the fsync itself, and whatever follows it before
    /// the directory fsync.
    NewFileBeforeDirSync,
    /// Right after a write while kvlds's commit carrying cleaned leaves is
    /// in flight.
    MidCleaning,
    /// Right after any disk operation while a removed file's name is still
    /// durable (lbs removed a freed file; no directory fsync since).
    MidFree,
}

impl CrashPoint {
    pub const ALL: [CrashPoint; 4] = [
        CrashPoint::MidAppend,
        CrashPoint::NewFileBeforeDirSync,
        CrashPoint::MidCleaning,
        CrashPoint::MidFree,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CrashPoint::MidAppend => "mid-append",
            CrashPoint::NewFileBeforeDirSync => "new-file-before-dir-sync",
            CrashPoint::MidCleaning => "mid-cleaning",
            CrashPoint::MidFree => "mid-free",
        }
    }

    pub fn parse(name: &str) -> Option<CrashPoint> {
        CrashPoint::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl fmt::Display for CrashPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A power loss forced at the `occurrence`-th time (from 1) the run
/// reaches `point`, keeping what `choices` says (missing ones: option 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashPlan {
    pub point: CrashPoint,
    pub occurrence: u64,
    pub choices: Vec<u64>,
}

/// What a forced power loss decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForcedCrash {
    /// Virtual time of the power loss, in ns.
    pub at_ns: u64,
    /// Each decision's number of options, in order.
    pub arities: Vec<u64>,
    /// The option taken at each decision.
    pub taken: Vec<u64>,
}

/// Choices as text: `0.3.1` (the form `--crash-state` reads).
pub fn show_choices(choices: &[u64]) -> String {
    if choices.is_empty() {
        return "0".into();
    }
    choices.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
}

/// Reads `0.3.1`.
pub fn parse_choices(text: &str) -> Option<Vec<u64>> {
    text.split('.').map(|c| c.parse().ok()).collect()
}

/// The result of enumerating one crash point of one seed.
#[derive(Debug, Clone)]
pub struct Enumeration {
    pub point: CrashPoint,
    pub occurrence: u64,
    /// The run reached the point that many times (if at all).
    pub reached: bool,
    /// Each decision's number of options.
    pub arities: Vec<u64>,
    /// The number of legal states (saturating).
    pub states_legal: u128,
    /// States run (recovery and every oracle on each).
    pub states_run: u64,
    /// Every legal state was run.
    pub exhaustive: bool,
    /// Simulated requests over all the runs.
    pub requests: u64,
    /// The states that failed, with the failure (at most `FAILURES_KEPT`).
    pub failures: Vec<(Vec<u64>, String)>,
}

/// Failing states kept per enumeration (the first ones).
pub const FAILURES_KEPT: usize = 4;

/// The state after `path` in the odometer over `arities` (last decision
/// fastest), or `None` after the last.
fn next_state(path: &[u64], arities: &[u64]) -> Option<Vec<u64>> {
    let mut next = path.to_vec();
    next.resize(arities.len(), 0);
    for i in (0..arities.len()).rev() {
        if next[i] + 1 < arities[i] {
            next[i] += 1;
            return Some(next);
        }
        next[i] = 0;
    }
    None
}

/// `bound` states stratified over the decisions (see the module doc),
/// none twice.
fn stratified(arities: &[u64], bound: u64, seed: u64) -> Vec<Vec<u64>> {
    let mut rng = Stream::new(seed, Concern::Crash);
    let random = |rng: &mut Stream, a: u64| -> u64 {
        if a <= 2 || rng.below(4) != 0 {
            rng.below(a.min(2))
        } else {
            rng.below(a)
        }
    };
    let all_kept = vec![0; arities.len()];
    let all_dropped: Vec<u64> = arities.iter().map(|&a| a.min(2) - 1).collect();
    let mut seen = BTreeSet::from([all_kept.clone(), all_dropped.clone()]);
    let mut states = vec![all_kept];
    if seen.len() == 2 {
        states.push(all_dropped);
    }
    let mut add = |states: &mut Vec<Vec<u64>>, s: Vec<u64>| {
        if states.len() as u64 >= bound || !seen.insert(s.clone()) {
            return;
        }
        states.push(s);
    };
    // Options 0 and 1 of every decision are in the first two states: the
    // round-robin starts at option 2 (the torn ones).
    let widest = arities.iter().copied().max().unwrap_or(0);
    for option in 2..widest {
        for (i, &a) in arities.iter().enumerate() {
            if option < a {
                let mut s: Vec<u64> = arities.iter().map(|&a| random(&mut rng, a)).collect();
                s[i] = option;
                add(&mut states, s);
            }
        }
    }
    // Then states drawn uniformly up to the bound (a bounded number of
    // tries: a draw may repeat a state).
    for _ in 0..bound.saturating_mul(4) {
        if states.len() as u64 >= bound {
            break;
        }
        let s = arities.iter().map(|&a| rng.below(a)).collect();
        add(&mut states, s);
    }
    states.truncate(bound.max(1) as usize);
    states
}

/// Enumerates the persisted states at the `occurrence`-th `point` of
/// `seed`: all of them up to `bound`, else a stratified sample of `bound`.
pub fn enumerate(
    scenario: &Scenario,
    seed: u64,
    point: CrashPoint,
    occurrence: u64,
    bound: u64,
) -> Enumeration {
    let mut e = Enumeration {
        point,
        occurrence,
        reached: false,
        arities: Vec::new(),
        states_legal: 0,
        states_run: 0,
        exhaustive: false,
        requests: 0,
        failures: Vec::new(),
    };
    let run = |e: &mut Enumeration, choices: Vec<u64>| {
        let plan = CrashPlan { point, occurrence, choices };
        let outcome = run_seed_with(scenario, seed, false, Some(&plan));
        e.states_run += 1;
        e.requests += outcome.requests;
        if let (Some(f), true) = (&outcome.failure, e.failures.len() < FAILURES_KEPT) {
            e.failures.push((plan.choices, f.clone()));
        }
        outcome.forced_crash
    };
    let Some(first) = run(&mut e, Vec::new()) else {
        e.failures.clear(); // a run that never reached the point is not this point's failure
        e.states_run = 0;
        return e;
    };
    e.reached = true;
    e.arities = first.arities;
    e.states_legal = e.arities.iter().fold(1u128, |n, &a| n.saturating_mul(u128::from(a)));
    let arities = e.arities.clone();
    if e.states_legal <= u128::from(bound) {
        e.exhaustive = true;
        let mut state = vec![0; arities.len()];
        while let Some(next) = next_state(&state, &arities) {
            run(&mut e, next.clone());
            state = next;
        }
    } else {
        for state in stratified(&arities, bound, seed ^ occurrence.rotate_left(32)).into_iter().skip(1) {
            run(&mut e, state);
        }
    }
    e
}

/// Totals of one crash point over an enumeration sweep.
#[derive(Debug, Clone, Default)]
pub struct PointTotals {
    /// (seed, occurrence) pairs tried.
    pub tried: u64,
    /// Of those, the runs that reached the point.
    pub reached: u64,
    /// Of those, enumerated exhaustively.
    pub exhaustive: u64,
    pub states_run: u64,
    /// The most legal states one crash had.
    pub states_legal_max: u128,
}

/// Totals of an enumeration sweep.
#[derive(Debug, Clone, Default)]
pub struct EnumerationSweep {
    pub points: BTreeMap<CrashPoint, PointTotals>,
    /// Simulated requests over every run.
    pub requests: u64,
    /// Enumerations with a failing state: scenario file, seed, result.
    pub failures: Vec<(PathBuf, u64, Enumeration)>,
}

/// What an enumeration sweep enumerates at each seed.
#[derive(Debug, Clone, Copy)]
pub struct SweepPlan<'a> {
    pub points: &'a [CrashPoint],
    /// Occurrences of each point to crash at (from 1).
    pub occurrences: &'a [u64],
    /// The most states per crash; above it, a stratified sample.
    pub bound: u64,
    pub stop_at_first_failure: bool,
}

/// Enumerates `points` at each of `occurrences` for seeds `first..first +
/// seeds` (or each scenario's own count) of every scenario, on `jobs`
/// threads, lower seeds first; with `stop_at_first_failure`, no
/// enumeration starts after one failed (those already running finish).
///
/// # Errors
/// A scenario cannot be loaded.
pub fn enumerate_sweep(
    files: &[PathBuf],
    first: u64,
    seeds: Option<u64>,
    what: &SweepPlan<'_>,
    jobs: usize,
) -> Result<EnumerationSweep, String> {
    let SweepPlan { points, occurrences, bound, stop_at_first_failure } = *what;
    let mut work = Vec::new();
    for path in files {
        let scenario = Arc::new(Scenario::load(path)?);
        for seed in first..first + seeds.unwrap_or(scenario.seeds) {
            for &point in points {
                for &occurrence in occurrences {
                    work.push((path.clone(), scenario.clone(), seed, point, occurrence));
                }
            }
        }
    }
    work.sort_by_key(|(_, _, seed, _, _)| *seed);
    let mut sweep = EnumerationSweep::default();
    let stop = AtomicBool::new(false);
    on_threads(
        &work,
        jobs,
        |(path, scenario, seed, point, occurrence)| {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            Some((path.clone(), *seed, enumerate(scenario, *seed, *point, *occurrence, bound)))
        },
        |result| {
            let Some((path, seed, e)) = result else { return };
            if stop_at_first_failure && !e.failures.is_empty() {
                stop.store(true, Ordering::Relaxed);
            }
            let t = sweep.points.entry(e.point).or_default();
            t.tried += 1;
            t.reached += u64::from(e.reached);
            t.exhaustive += u64::from(e.exhaustive);
            t.states_run += e.states_run;
            t.states_legal_max = t.states_legal_max.max(e.states_legal);
            sweep.requests += e.requests;
            if !e.failures.is_empty() {
                sweep.failures.push((path, seed, e));
            }
        },
    );
    sweep.failures.sort_by_key(|(path, seed, e)| (path.clone(), *seed, e.point, e.occurrence));
    Ok(sweep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_odometer_visits_every_state_once() {
        let arities = [2, 3, 1, 2];
        let mut seen = vec![vec![0; 4]];
        while let Some(next) = next_state(seen.last().unwrap(), &arities) {
            seen.push(next);
        }
        assert_eq!(seen.len(), 12);
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 12);
        assert!(seen.iter().all(|s| s.iter().zip(&arities).all(|(c, a)| c < a)));
    }

    #[test]
    fn a_stratified_sample_takes_every_option_of_every_decision_within_its_bound() {
        let arities = [2, 7, 2, 5];
        let states = stratified(&arities, 100, 1);
        assert!(states.len() <= 100);
        assert_eq!(states[0], vec![0, 0, 0, 0]);
        assert_eq!(states[1], vec![1, 1, 1, 1]);
        for (i, &a) in arities.iter().enumerate() {
            for option in 0..a {
                assert!(states.iter().any(|s| s[i] == option), "decision {i} option {option}");
            }
        }
        assert!(states.iter().all(|s| s.iter().zip(&arities).all(|(c, a)| c < a)));
        assert_eq!(stratified(&arities, 5, 1).len(), 5);
        let mut distinct = states.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), states.len(), "no state twice");
        assert_eq!(states.len(), 100, "filled up to the bound (140 states exist)");
    }

    #[test]
    fn choices_read_back() {
        assert_eq!(parse_choices(&show_choices(&[0, 3, 1])), Some(vec![0, 3, 1]));
        assert_eq!(parse_choices("0"), Some(vec![0]));
        assert_eq!(parse_choices("1.x"), None);
        assert_eq!(CrashPoint::parse("mid-free"), Some(CrashPoint::MidFree));
    }
}
