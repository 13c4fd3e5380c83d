//! Shrinking a failing run to a small reproduction that fails the same
//! oracle: fewer client requests, fewer clients, fewer faults, and faults
//! moved later. A candidate is a scenario with a [`Replay`] (the seed, the
//! clients kept, the faults kept by their numbers on the run's fault tape,
//! `tape.rs`) and a smaller `requests`; it is run from scratch and kept
//! only if it fails with the same oracle ([`oracle_of`]). The result is a
//! scenario file that replays the reproduction by itself.
//!
//! Order of a pass: requests (binary search for the fewest that still
//! fail), clients (the fewest), faults (Zeller's ddmin over the kept
//! faults of both tapes), then each kept fault replaced by a later one of
//! the same kind that the tape decided but did not carry out. Passes
//! repeat until one changes nothing or the run budget is spent.

use std::collections::BTreeSet;

use crate::runner::run_seed;
use crate::scenario::{Replay, Scenario};
use crate::tape::{FaultNote, Source, NOTES_MAX};
use crate::world::Outcome;

/// The oracle a failure message comes from (a coarse class: shrinking
/// keeps a candidate only if it fails the same one).
pub fn oracle_of(failure: &str) -> &'static str {
    const ORACLES: &[(&str, &str)] = &[
        ("panicked", "panic (a node's invariant or the simulator)"),
        ("linearizability violation", "linearizability"),
        ("liveness", "liveness"),
        ("did not finish", "liveness"),
        ("nothing left to happen", "liveness"),
        ("space:", "space"),
        ("cache holds", "cache bound"),
        ("not deterministic", "determinism"),
        ("honesty", "honesty"),
        ("cache bound", "cache bound"),
        ("not pending", "routing"),
        ("malformed", "well-formed answers"),
        ("exited", "availability"),
        ("did not come up", "availability"),
        ("dropped", "availability"),
        ("kept running", "availability"),
        ("never sent", "honesty"),
        ("is missing", "durability"),
        ("next block", "durability"),
    ];
    ORACLES.iter().find(|(needle, _)| failure.contains(needle)).map_or("answers", |(_, oracle)| oracle)
}

/// What a reproduction holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub requests: u64,
    pub clients: u64,
    /// Faults carried out (both tapes).
    pub faults: u64,
}

/// The smallest reproduction found.
pub struct Shrunk {
    /// The scenario with its `replay` and cut `requests`: write it out.
    pub scenario: Scenario,
    /// Its failing run.
    pub outcome: Outcome,
    pub oracle: &'static str,
    pub before: Size,
    pub after: Size,
    /// Runs spent.
    pub runs: u64,
}

struct Shrinker<'a> {
    seed: u64,
    oracle: &'static str,
    best: Scenario,
    outcome: Outcome,
    runs: u64,
    runs_max: u64,
    log: &'a mut dyn FnMut(&str),
}

/// Zeller's ddmin: a smallest-found sublist of `items` for which `fails`
/// holds (given that it holds for all of `items`): try removing each of
/// `n` chunks (from 2), keep any removal that still fails (and go on with
/// one chunk fewer), else double `n` until chunks are single items.
pub fn ddmin<T: Clone>(mut items: Vec<T>, fails: &mut dyn FnMut(&[T]) -> bool) -> Vec<T> {
    if items.is_empty() || fails(&[]) {
        return Vec::new();
    }
    let mut chunks = 2;
    while items.len() > 1 {
        let n = chunks.min(items.len());
        let size = items.len().div_ceil(n);
        let mut removed = false;
        for start in (0..items.len()).step_by(size) {
            let mut rest = items.clone();
            rest.drain(start..(start + size).min(items.len()));
            if fails(&rest) {
                items = rest;
                chunks = (n - 1).max(2);
                removed = true;
                break;
            }
        }
        if !removed {
            if n >= items.len() {
                break;
            }
            chunks = (n * 2).min(items.len());
        }
    }
    items
}

/// The faults a run carried out, by source and number.
fn carried_out(tape: &[FaultNote]) -> Vec<(Source, u64)> {
    tape.iter().filter(|n| n.kept).map(|n| (n.source, n.index)).collect()
}

fn size(scenario: &Scenario, outcome: &Outcome) -> Size {
    Size {
        requests: scenario.workload.requests,
        clients: outcome.drawn.kvlds.as_ref().map_or(1, |k| k.clients),
        faults: carried_out(&outcome.fault_tape).len() as u64,
    }
}

/// `scenario` keeping exactly `faults`.
fn with_faults(scenario: &Scenario, faults: &[(Source, u64)]) -> Scenario {
    let mut s = scenario.clone();
    let r = s.replay.get_or_insert_with(Replay::default);
    let pick = |source| Some(faults.iter().filter(|(s, _)| *s == source).map(|(_, i)| *i).collect());
    r.chaos_faults = pick(Source::Chaos);
    r.disk_faults = pick(Source::Disk);
    s
}

impl Shrinker<'_> {
    /// Runs `candidate`; keeps it as the best if it fails the same oracle.
    fn try_candidate(&mut self, candidate: Scenario) -> bool {
        if self.runs >= self.runs_max {
            return false;
        }
        self.runs += 1;
        let outcome = run_seed(&candidate, self.seed, false);
        let same = outcome.failure.as_deref().is_some_and(|f| oracle_of(f) == self.oracle);
        if same {
            // Keep only the faults the run carried out: numbers it never
            // reached change nothing in it.
            self.best = with_faults(&candidate, &carried_out(&outcome.fault_tape));
            self.outcome = outcome;
        }
        same
    }

    fn requests(&mut self) {
        let (mut lo, mut hi) = (1, self.best.workload.requests);
        while lo < hi && self.runs < self.runs_max {
            let mid = lo + (hi - lo) / 2;
            let mut c = self.best.clone();
            c.workload.requests = mid;
            if self.try_candidate(c) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
    }

    fn clients(&mut self) {
        let now = size(&self.best, &self.outcome).clients;
        for clients in 1..now {
            let mut c = self.best.clone();
            c.replay.get_or_insert_with(Replay::default).clients = Some(clients);
            if self.try_candidate(c) {
                return;
            }
        }
    }

    /// ddmin over the faults carried out.
    fn fewer_faults(&mut self) {
        let faults = carried_out(&self.outcome.fault_tape);
        ddmin(faults, &mut |rest| {
            let candidate = with_faults(&self.best, rest);
            self.try_candidate(candidate)
        });
    }

    /// Each kept fault, last first, replaced by one of the next few faults
    /// of the same kind that the tape decided and did not carry out.
    fn later_faults(&mut self) {
        const TRIES_PER_FAULT: usize = 3;
        let kept = carried_out(&self.outcome.fault_tape);
        for (source, index) in kept.into_iter().rev() {
            let tape = self.outcome.fault_tape.clone();
            let Some(what) = tape.iter().find(|n| n.source == source && n.index == index).map(|n| n.what)
            else {
                continue;
            };
            let later: Vec<u64> = tape
                .iter()
                .filter(|n| n.source == source && n.index > index && n.what == what && !n.kept)
                .map(|n| n.index)
                .take(TRIES_PER_FAULT)
                .collect();
            for to in later {
                let faults: BTreeSet<(Source, u64)> = carried_out(&self.outcome.fault_tape)
                    .into_iter()
                    .map(|f| if f == (source, index) { (source, to) } else { f })
                    .collect();
                let faults: Vec<_> = faults.into_iter().collect();
                if self.try_candidate(with_faults(&self.best, &faults)) {
                    break;
                }
            }
        }
    }
}

/// Shrinks the failing `seed` of `scenario` with at most `runs_max` runs;
/// `log` hears progress.
///
/// # Errors
/// The seed does not fail.
pub fn shrink(
    scenario: &Scenario,
    seed: u64,
    runs_max: u64,
    log: &mut dyn FnMut(&str),
) -> Result<Shrunk, String> {
    let mut start = scenario.clone();
    start.replay.get_or_insert_with(Replay::default).seed = seed;
    let outcome = run_seed(&start, seed, false);
    let Some(failure) = outcome.failure.clone() else {
        return Err(format!("seed {seed} of {} does not fail: nothing to shrink", scenario.name));
    };
    for source in [Source::Chaos, Source::Disk] {
        if outcome.fault_tape.iter().filter(|n| n.source == source).count() >= NOTES_MAX {
            return Err(format!(
                "seed {seed} decided over {NOTES_MAX} {source:?} faults, more than the tape logs: not shrinkable"
            ));
        }
    }
    let oracle = oracle_of(&failure);
    let start = with_faults(&start, &carried_out(&outcome.fault_tape));
    let before = size(&start, &outcome);
    log(&format!("shrinking a {oracle} failure: {before:?}"));
    let mut s = Shrinker { seed, oracle, best: start, outcome, runs: 1, runs_max, log };
    loop {
        let pass_start = size(&s.best, &s.outcome);
        s.requests();
        s.clients();
        s.fewer_faults();
        s.later_faults();
        let now = size(&s.best, &s.outcome);
        (s.log)(&format!("after {} runs: {now:?}", s.runs));
        if now == pass_start || s.runs >= s.runs_max {
            break;
        }
    }
    let after = size(&s.best, &s.outcome);
    let mut scenario = s.best;
    scenario.seeds = 1;
    Ok(Shrunk { scenario, outcome: s.outcome, oracle, before, after, runs: s.runs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddmin_finds_the_two_items_that_matter_and_nothing_else() {
        let mut tests = 0;
        let found = ddmin((0..40).collect(), &mut |s: &[u32]| {
            tests += 1;
            s.contains(&3) && s.contains(&31)
        });
        assert_eq!(found, vec![3, 31]);
        assert!(tests < 120, "{tests} tests");
        assert_eq!(ddmin((0..9).collect(), &mut |_: &[u32]| true), Vec::<u32>::new());
        assert_eq!(ddmin(vec![5], &mut |s: &[u32]| s == [5]), vec![5]);
    }

    #[test]
    fn failures_map_to_their_oracle() {
        assert_eq!(oracle_of("linearizability violation on key 01\n..."), "linearizability");
        assert_eq!(oracle_of("panicked: B+tree invariant"), "panic (a node's invariant or the simulator)");
        assert_eq!(oracle_of("liveness: faults stopped 30 s ago"), "liveness");
        assert_eq!(oracle_of("block 7, acknowledged or read before, is missing"), "durability");
        assert_eq!(oracle_of("GET answered Done(true)"), "answers");
    }
}
