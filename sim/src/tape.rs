//! The fault tape: every fault a run injects is numbered, per source (the
//! world's chaos: crashes, power losses, resets; the disk: EIO, ENOSPC,
//! short I/O, failed syncs, misdirected writes, bit rot), in the order the
//! random streams decide it, and logged with its virtual time. A replay
//! may cut the tape: keep only some numbers. A cut fault's decision is
//! still drawn, only not carried out; the draws the fault would have led
//! to (its shape, the restart delay after a crash, a power loss's
//! outcomes) do not happen, so the streams shift from there. This is what
//! shrinking (`shrink.rs`) cuts.
//!
//! A number names "the k-th fault this source decided", so once a cut
//! changes what the nodes do, later numbers may name other faults than in
//! the uncut run: a cut is a new run, judged again, never assumed to be a
//! sub-run. Power-loss outcomes (which unsynced writes survive, torn or
//! not) are not on the tape: they are the crash's, not extra faults.

use std::collections::BTreeSet;
use std::sync::Arc;

/// Who injected a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// The world's chaos: crashes, power losses, connection resets.
    Chaos,
    /// The disk's faults of one operation (and bit rot at a power loss).
    Disk,
}

/// One fault decided during a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultNote {
    pub source: Source,
    /// Its number within its source (from 0).
    pub index: u64,
    /// Virtual time it was decided, in ns.
    pub at_ns: u64,
    pub what: &'static str,
    /// It was carried out (not cut).
    pub kept: bool,
}

/// Which faults of one source a run carries out: only these numbers, or
/// (`None`) all.
pub type Cut = Option<Arc<BTreeSet<u64>>>;

/// The tape of one source: numbers faults as they are decided, says
/// whether each is carried out, and logs it.
#[derive(Debug, Clone)]
pub struct FaultTape {
    source: Source,
    cut: Cut,
    decided: u64,
    /// The virtual time now (the owner keeps it current), in ns.
    pub now_ns: u64,
    notes: Vec<FaultNote>,
}

/// The most notes a tape keeps (a bound on its memory); faults past it are
/// still numbered and cut as asked, only not logged.
pub const NOTES_MAX: usize = 100_000;

impl FaultTape {
    pub fn new(source: Source, cut: Cut) -> FaultTape {
        FaultTape { source, cut, decided: 0, now_ns: 0, notes: Vec::new() }
    }

    /// A fault of kind `what` was just decided by the random stream:
    /// numbers and logs it; true if it is to be carried out.
    pub fn admit(&mut self, what: &'static str) -> bool {
        let index = self.decided;
        self.decided += 1;
        let kept = self.cut.as_ref().is_none_or(|k| k.contains(&index));
        if self.notes.len() < NOTES_MAX {
            self.notes.push(FaultNote { source: self.source, index, at_ns: self.now_ns, what, kept });
        }
        kept
    }

    /// Faults decided so far (carried out or cut).
    pub fn decided(&self) -> u64 {
        self.decided
    }

    pub fn notes(&self) -> &[FaultNote] {
        &self.notes
    }
}

impl Default for FaultTape {
    fn default() -> FaultTape {
        FaultTape::new(Source::Disk, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_uncut_tape_keeps_everything_and_numbers_in_order() {
        let mut t = FaultTape::new(Source::Chaos, None);
        assert!(t.admit("crash") && t.admit("reset"));
        assert_eq!(t.decided(), 2);
        assert_eq!(
            t.notes()[1],
            FaultNote { source: Source::Chaos, index: 1, at_ns: 0, what: "reset", kept: true }
        );
    }

    #[test]
    fn a_cut_keeps_only_its_numbers() {
        let mut t = FaultTape::new(Source::Disk, Some(Arc::new([1, 3].into_iter().collect())));
        let admitted: Vec<bool> = (0..5).map(|_| t.admit("eio")).collect();
        assert_eq!(admitted, vec![false, true, false, true, false]);
        assert_eq!(t.decided(), 5);
        assert_eq!(t.notes().iter().filter(|n| n.kept).map(|n| n.index).collect::<Vec<_>>(), vec![1, 3]);
    }
}
