//! Coverage probes that must be reached: the hard paths a sweep of each
//! family of scenarios has to exercise, or it fails naming the ones it
//! missed (`kivaloo-sim sweep --require-probes`, and the CI tests in
//! `sim/tests/scenarios.rs`). A probe is a counter a run reports
//! (`Outcome::probes`): a node's own counter (`kvlds.*`, `mux.*`), an lbs
//! log line that marks a hard path (`lbs: ...`), a disk fault injected
//! (`disk: ...`) or an event of the world (`sim: ...`). The lists name
//! them exactly, so a renamed counter fails here rather than silently
//! dropping out.

use std::collections::BTreeMap;

use crate::scenario::Scenario;

/// A family of scenarios: those whose sweeps are judged together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    /// lbs alone (`["lbs"]`).
    Lbs,
    /// kvlds on lbs, but the space oracle's scenarios.
    Kvlds,
    /// mux, kvlds and lbs, with many clients.
    Full,
    /// The space oracle's scenarios (steady updates, cleaning, no faults).
    Space,
}

impl Family {
    pub fn of(scenario: &Scenario) -> Family {
        match (scenario.components.len(), scenario.workload.space_factor.is_some()) {
            (_, true) => Family::Space,
            (1, _) => Family::Lbs,
            (2, _) => Family::Kvlds,
            _ => Family::Full,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Lbs => "lbs",
            Family::Kvlds => "kvlds",
            Family::Full => "full stack",
            Family::Space => "space",
        }
    }

    /// The probes a sweep of this family must reach.
    pub fn required(self) -> &'static [&'static str] {
        match self {
            Family::Lbs => LBS,
            Family::Kvlds => KVLDS,
            Family::Full => FULL,
            Family::Space => SPACE,
        }
    }
}

const LBS: &[&str] = &[
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
    // lbs's hard paths (its log lines).
    "lbs: torn tail cut at recovery",
    "lbs: torn new file removed at recovery",
    "lbs: torn header rewritten at recovery",
    "lbs: corruption reported on GET",
    "lbs: stopped after a failed fsync",
    "lbs: freed file removed",
];

const KVLDS: &[&str] = &[
    // The B+tree's hard paths (kvlds's own counters, summed over every
    // incarnation).
    "kvlds.commits",
    "kvlds.splits",
    "kvlds.root_splits",
    "kvlds.merges",
    "kvlds.merge_cascades",
    "kvlds.deroots",
    "kvlds.evictions",
    "kvlds.page_reads",
    "kvlds.waits_for_pages",
    "kvlds.reloads_during_commit",
    "kvlds.writes_waiting_for_next_batch",
    "kvlds.batches_on_unsynced_commit",
    "kvlds.answers_held_for_commit_below",
    "kvlds.reads_finished_on_old_root",
    "kvlds.range_answers_cut_by_budget",
    "kvlds.recoveries_found_root",
    "sim: kvlds found its root behind a torn tail lbs cut",
    "kvlds.frees",
    // Cleaning, racing commits and crashes.
    "kvlds.censuses",
    "kvlds.leaves_cleaned",
    "kvlds.cleaning_commits",
    "kvlds.cleaning_only_commits",
    "kvlds.cleaning_reads",
    "sim: crashes during a cleaning commit",
    "lbs: freed file removed",
    // The chain under faults.
    "sim: kvlds crashes",
    "sim: lbs crashes",
    "sim: power losses",
    "sim: connection resets",
    "sim: client reconnections",
    "sim: upstream reconnections",
    "sim: node timers fired",
    "sim: liveness phases passed",
    "kvlds: exited after its upstream closed",
    "lbs: stopped after a failed fsync",
    "lbs: torn tail cut at recovery",
    "disk: failed_fsyncs",
    "disk: eio_reads",
    "disk: rotted",
    "disk: misdirected",
];

const FULL: &[&str] = &[
    // The mux's hard paths (its own counters).
    "mux.requests_forwarded",
    "mux.responses_routed",
    "mux.responses_dropped",
    "mux.clients_gone_with_requests",
    "mux.accepting_paused_at_limit",
    "mux.client_reads_paused_at_bytes_bound",
    // Every component under faults, and the clients through them.
    "sim: mux crashes",
    "sim: kvlds crashes",
    "sim: lbs crashes",
    "mux: exited after its upstream closed",
    "kvlds: exited after its upstream closed",
    "sim: connection resets",
    "sim: client reconnections",
    "sim: upstream reconnections",
    "sim: clients left to make room at the mux's limit",
    "sim: liveness phases passed",
    "kvlds.commits",
    "kvlds.splits",
    "kvlds.merges",
    "kvlds.waits_for_pages",
    "kvlds.batches_on_unsynced_commit",
    "kvlds.leaves_cleaned",
    "sim: crashes during a cleaning commit",
    "lbs: stopped after a failed fsync",
    "disk: failed_fsyncs",
    "disk: misdirected",
];

const SPACE: &[&str] = &["kvlds.leaves_cleaned", "kvlds.cleaning_only_commits", "lbs: freed file removed"];

/// The probes of `family` that `probes` (summed over a sweep of it) never
/// reached.
pub fn unreached(family: Family, probes: &BTreeMap<String, u64>) -> Vec<&'static str> {
    family.required().iter().copied().filter(|p| probes.get(*p).copied().unwrap_or(0) == 0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_never_reached_is_named() {
        let mut probes: BTreeMap<String, u64> = SPACE.iter().map(|p| (p.to_string(), 1)).collect();
        assert!(unreached(Family::Space, &probes).is_empty());
        probes.insert("lbs: freed file removed".into(), 0);
        probes.remove("kvlds.leaves_cleaned");
        assert_eq!(
            unreached(Family::Space, &probes),
            vec!["kvlds.leaves_cleaned", "lbs: freed file removed"]
        );
    }
}
