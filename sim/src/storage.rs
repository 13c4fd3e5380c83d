//! The simulated file system of one node's directory: it executes the
//! contract's [`DiskOp`]s with the whole disk fault model of DESIGN.md,
//! deterministically from the disk [`Stream`] (no other randomness; every
//! collection that is iterated is a `BTreeMap`). The stream is drawn from
//! only for faults whose probability is not zero, for garbage bytes and for
//! crash outcomes, so a quiet disk's plain operations leave it untouched.
//!
//! **Files and the page cache.** Each file (an inode) has what reads see
//! (the cache), what survives a power loss (the durable bytes) and an
//! ordered log of what was done to it since its last successful sync:
//! writes (offset, bytes) and length changes (Truncate). The cache is not
//! a second copy of the file: it is the durable bytes seen through an
//! overlay of the byte ranges changed since (shared `Bytes`, no copy), so
//! that a write, a sync and a crash cost what they change, never the size
//! of the file. A successful SyncFile applies the log to the durable bytes
//! (they become exactly what the cache shows for the written ranges, and
//! their length the cache's length) and clears it. A process crash without
//! power loss is not modelled here: the driver restarts the node on the
//! same `SimDisk`, page cache and all.
//!
//! **Directory.** Names map to inodes. Creating (Open with `create` of a
//! missing name) and Remove change the current map at once; they become
//! durable at a successful SyncDir. At a crash, each name whose entry
//! differs between the current and the durable map ends up, 50/50, with
//! either version: a new file can vanish (`vanished_creates`), and a
//! removed one can come back with its durable contents
//! (`resurrected_removes`, also counted when a removed-then-recreated name
//! reverts to its old file).
//!
//! **Crash: whole, dropped or torn writes.** At [`SimDisk::crash`], the log
//! of every inode is applied to its durable bytes in order. Each write is,
//! with probability `torn_write`, torn: half the time a random prefix
//! (possibly empty, never all) of the 512-byte sectors it touches, on the
//! file's absolute sector grid, is written and every other sector it touches
//! is filled with garbage (including any old bytes of those sectors that the
//! write did not cover); the other half each sector it touches is new or
//! garbage independently, at least one garbage (sectors reach the medium in
//! any order); otherwise it is kept whole or dropped, 50/50. Each Truncate is
//! kept or dropped, 50/50. So the durable length becomes the maximum of the
//! old length and the end of every kept or torn write, unless a kept
//! Truncate cut it. Then the cache is the durable state and the logs are
//! empty.
//!
//! **Never-written sectors.** A write that starts past the end of the file
//! fills the gap with garbage, never zeros: in the cache at once (the gap is
//! logged as a write of its own, so that a sync makes it durable as it was
//! read) and on the medium wherever a kept write lands past the durable end
//! at a crash (because an earlier extending write was dropped). A Truncate
//! that extends a file fills with zeros, as the contract says.
//!
//! **Bit rot.** At each crash, after the logs are applied, each visible file
//! with durable bytes has probability `bit_rot` of one random bit of one
//! random durable byte being flipped, recorded as [`Damage::BitRot`].
//!
//! **Failed fsync (Linux, "fsyncgate").** A SyncFile of a file with unsynced
//! writes fails with probability `fsync_eio`. The error is reported once and
//! the log is discarded: those writes never reach the medium. With 50% the
//! dirty pages are dropped (the cache reverts to the durable bytes); with
//! 50% they stay in the cache, marked clean: reads keep seeing them, but they
//! are not in the log any more, so a later successful SyncFile does not make
//! them durable (it only sets the durable length to the cache's, the never
//! written sectors reading as garbage) and a crash loses them. A retried
//! SyncFile, with nothing left to write, succeeds. (A SyncFile with nothing
//! to write never fails, as on Linux, where an fsync reports a writeback
//! error only once.)
//!
//! **Failed directory sync.** A SyncDir with pending creations or removals
//! fails with probability `dir_sync_eio`; they stay non-durable (a later
//! SyncDir may make them durable). A SyncDir with nothing pending succeeds.
//!
//! **DropCache.** The cache of the file becomes the durable bytes plus the
//! effect of the still-unsynced log: pages that a failed fsync left clean
//! but never wrote are dropped, dirty ones stay (so the cache length is the
//! durable length as extended or cut by the log).
//!
//! **Reads.** A read at or past the end returns no bytes; one that reaches
//! past the end is short at the end. With probability `read_eio` a read
//! fails with Io; with probability `short_read` it returns a random nonzero
//! proper prefix of what was available.
//!
//! **Writes.** A write that would make the visible files hold more than
//! `capacity_bytes` fails with NoSpace, and so does any write with
//! probability `enospc`; nothing is written. With probability `write_eio` it
//! fails with Io, and then, 50/50, nothing or a random nonzero prefix of it
//! reaches the cache (and the log). With probability `short_write` it
//! writes (and logs) a random nonzero proper prefix and reports that length.
//! With probability `misdirected_write` it reports full success but its
//! bytes are written (and logged) at another 512-aligned offset within
//! `[0, file length]`, or, with 25% (or when no other offset exists), lost
//! altogether; recorded as [`Damage::Misdirected`]. A write of no bytes does
//! nothing and never fails (except NotFound). A file may not grow past
//! [`MAX_FILE_BYTES`] (Io, "file too large"): a guard against a node bug
//! making the simulator allocate without bound.
//!
//! **Truncate** changes the cache length (an extension reads as zeros) and
//! is logged; the capacity limit and `enospc` apply to extensions.
//!
//! **Names.** Open without `create`, and every other operation on a name,
//! fail with NotFound when the name is missing. List returns the current
//! names. Error messages name the operation and the file.

use crate::rng::Stream;
use crate::tape::FaultTape;
use bytes::Bytes;
use kivaloo::contract::{DiskDone, DiskError, DiskErrorKind, DiskOp};
use std::collections::BTreeMap;

/// The sector size of the simulated device: the unit a torn write garbles.
pub const SECTOR: u64 = 512;

/// The largest file the simulator holds (in memory): larger writes and
/// truncates fail with Io ("file too large").
pub const MAX_FILE_BYTES: u64 = 1 << 32;

const SECTOR_USIZE: usize = SECTOR as usize;

/// Fault probabilities for one seed (already drawn from the scenario's ranges).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiskFaults {
    /// A Read fails with Io.
    pub read_eio: f64,
    /// A Write fails with Io (nothing or a prefix of it reaches the cache).
    pub write_eio: f64,
    /// A SyncFile with something to write fails with Io, Linux semantics.
    pub fsync_eio: f64,
    /// A SyncDir with something pending fails with Io (the pending directory
    /// changes stay non-durable).
    pub dir_sync_eio: f64,
    /// A Write (or a Truncate that extends) fails with NoSpace, nothing written.
    pub enospc: f64,
    /// A Read returns fewer bytes (at least 1 if any were available).
    pub short_read: f64,
    /// A Write reports (and applies) fewer bytes (at least 1).
    pub short_write: f64,
    /// A Write lands at another 512-aligned offset of the same file (or is
    /// lost), reporting success.
    pub misdirected_write: f64,
    /// At each crash, per file, the chance to flip one random bit of its
    /// durable bytes.
    pub bit_rot: f64,
    /// At a crash, each unsynced write is torn with this probability (else
    /// kept whole or dropped, 50/50).
    pub torn_write: f64,
    /// Total file bytes allowed (disk full): writes past it fail with NoSpace.
    pub capacity_bytes: Option<u64>,
}

/// A fault that may have damaged durable data (for the oracles).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    /// One bit of the byte at `offset` of `file` was flipped at a crash.
    BitRot { file: String, offset: u64 },
    /// A write of `len` bytes meant for `intended_offset` of `file` landed at
    /// `landed_offset`, or nowhere (lost) when `None`.
    Misdirected { file: String, intended_offset: u64, landed_offset: Option<u64>, len: u64 },
}

/// Counters of the faults injected (and crash outcomes), for coverage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Reads failed with Io.
    pub eio_reads: u64,
    /// Writes failed with Io.
    pub eio_writes: u64,
    /// ... of which a prefix reached the cache.
    pub eio_partial_writes: u64,
    /// SyncFiles failed with Io.
    pub failed_fsyncs: u64,
    /// ... after which the dirty pages were dropped from the cache.
    pub fsync_dropped_pages: u64,
    /// ... after which the dirty pages stayed in the cache, marked clean.
    pub fsync_kept_pages: u64,
    /// SyncDirs failed with Io.
    pub failed_dir_syncs: u64,
    /// Writes and truncates failed with NoSpace at random.
    pub enospc: u64,
    /// Writes and truncates failed with NoSpace because the disk was full.
    pub disk_full: u64,
    /// Short reads.
    pub short_reads: u64,
    /// Short writes.
    pub short_writes: u64,
    /// Misdirected writes (landed elsewhere or lost).
    pub misdirected: u64,
    /// ... of which lost altogether.
    pub lost_writes: u64,
    /// Bits flipped by bit rot.
    pub rotted: u64,
    /// Unsynced writes torn at a crash.
    pub torn_writes: u64,
    /// Of those, the ones whose sectors landed in any order (not a prefix).
    pub scattered_torn_writes: u64,
    /// Unsynced writes dropped at a crash.
    pub dropped_writes: u64,
    /// Unsynced writes kept whole at a crash.
    pub kept_writes: u64,
    /// Unsynced truncates kept at a crash.
    pub kept_truncates: u64,
    /// Unsynced truncates dropped at a crash.
    pub dropped_truncates: u64,
    /// Names created and not durable that vanished at a crash.
    pub vanished_creates: u64,
    /// Names removed (or replaced) and not durable that came back at a crash.
    pub resurrected_removes: u64,
    /// Power losses.
    pub crashes: u64,
}

impl FaultCounts {
    /// Every counter with its name, in a fixed order.
    pub fn pairs(&self) -> [(&'static str, u64); 23] {
        [
            ("eio_reads", self.eio_reads),
            ("eio_writes", self.eio_writes),
            ("eio_partial_writes", self.eio_partial_writes),
            ("failed_fsyncs", self.failed_fsyncs),
            ("fsync_dropped_pages", self.fsync_dropped_pages),
            ("fsync_kept_pages", self.fsync_kept_pages),
            ("failed_dir_syncs", self.failed_dir_syncs),
            ("enospc", self.enospc),
            ("disk_full", self.disk_full),
            ("short_reads", self.short_reads),
            ("short_writes", self.short_writes),
            ("misdirected", self.misdirected),
            ("lost_writes", self.lost_writes),
            ("rotted", self.rotted),
            ("torn_writes", self.torn_writes),
            ("scattered_torn_writes", self.scattered_torn_writes),
            ("dropped_writes", self.dropped_writes),
            ("kept_writes", self.kept_writes),
            ("kept_truncates", self.kept_truncates),
            ("dropped_truncates", self.dropped_truncates),
            ("vanished_creates", self.vanished_creates),
            ("resurrected_removes", self.resurrected_removes),
            ("crashes", self.crashes),
        ]
    }
}

/// One unsynced change to a file, in the order it was made.
#[derive(Debug, Clone)]
enum Entry {
    Write { offset: usize, data: Bytes },
    Truncate { len: usize },
}

/// One file. Invariant: every byte below `len` not covered by `overlay` lies
/// below `durable.len()`, and the cache shows `durable` there.
#[derive(Debug, Clone, Default)]
struct Inode {
    /// What survives a power loss.
    durable: Vec<u8>,
    /// Byte ranges where the cache differs (or may differ) from `durable`:
    /// start -> bytes, non-overlapping, never empty.
    overlay: BTreeMap<usize, Bytes>,
    /// The cache's length: what Open reports and reads are bounded by.
    len: usize,
    /// Changes since the last successful sync (or crash).
    log: Vec<Entry>,
    /// A failed fsync left pages in the cache that are in neither `durable`
    /// nor `log`: the cache is no longer `durable` + `log`.
    stale: bool,
}

/// `n` random bytes.
fn garbage(rng: &mut Stream, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    rng.fill(&mut v);
    v
}

/// Writes `data` at `offset` of `buf`, filling any gap before it with garbage.
fn apply_write(buf: &mut Vec<u8>, offset: usize, data: &[u8], rng: &mut Stream) {
    if offset > buf.len() {
        let old = buf.len();
        buf.resize(offset, 0);
        rng.fill(&mut buf[old..]);
    }
    let inside = (buf.len() - offset).min(data.len());
    buf[offset..offset + inside].copy_from_slice(&data[..inside]);
    buf.extend_from_slice(&data[inside..]);
}

/// Cuts `buf` to `len` bytes or extends it with zeros.
fn apply_truncate(buf: &mut Vec<u8>, len: usize) {
    buf.resize(len, 0);
}

impl Inode {
    /// The cache's bytes `start..end` (`start < end <= len`).
    fn read(&self, start: usize, end: usize) -> Bytes {
        let before = self.overlay.range(..=start).next_back();
        if let Some((&s, seg)) = before {
            if s + seg.len() >= end {
                return seg.slice(start - s..end - s);
            }
        }
        let mut out = Vec::with_capacity(end - start);
        let mut pos = start;
        let from = before.map_or(start, |(&s, _)| s);
        for (&s, seg) in self.overlay.range(from..end) {
            let e = s + seg.len();
            if e <= pos {
                continue;
            }
            if s > pos {
                out.extend_from_slice(&self.durable[pos..s]);
                pos = s;
            }
            let upto = e.min(end);
            out.extend_from_slice(&seg[pos - s..upto - s]);
            pos = upto;
        }
        if pos < end {
            out.extend_from_slice(&self.durable[pos..end]);
        }
        Bytes::from(out)
    }

    /// Puts `data` (not empty) into the overlay at `start`, over whatever was there.
    fn overlay_put(&mut self, start: usize, data: Bytes) {
        let end = start + data.len();
        if let Some((&s, seg)) = self.overlay.range(..start).next_back() {
            let e = s + seg.len();
            if e > start {
                let seg = seg.clone();
                self.overlay.insert(s, seg.slice(..start - s));
                if e > end {
                    self.overlay.insert(end, seg.slice(end - s..));
                }
            }
        }
        while let Some((&s, _)) = self.overlay.range(start..end).next() {
            let seg = self.overlay.remove(&s).expect("present");
            if s + seg.len() > end {
                self.overlay.insert(end, seg.slice(end - s..));
            }
        }
        self.overlay.insert(start, data);
    }

    /// Cuts the overlay at `len`.
    fn overlay_cut(&mut self, len: usize) {
        if let Some((&s, seg)) = self.overlay.range(..len).next_back() {
            if s + seg.len() > len {
                let head = seg.slice(..len - s);
                self.overlay.insert(s, head);
            }
        }
        drop(self.overlay.split_off(&len));
    }

    /// A write reaching the cache (and the log); a gap before it is filled
    /// with garbage, logged as a write of its own.
    fn cache_write(&mut self, offset: usize, data: Bytes, rng: &mut Stream) {
        if data.is_empty() {
            return;
        }
        if offset > self.len {
            let at = self.len;
            let gap = Bytes::from(garbage(rng, offset - at));
            self.overlay_put(at, gap.clone());
            self.log.push(Entry::Write { offset: at, data: gap });
        }
        let end = offset + data.len();
        self.overlay_put(offset, data.clone());
        self.log.push(Entry::Write { offset, data });
        self.len = self.len.max(end);
    }

    /// A truncate reaching the cache (and the log).
    fn cache_truncate(&mut self, len: usize) {
        if len < self.len {
            self.overlay_cut(len);
        } else if len > self.len {
            let at = self.len;
            self.overlay_put(at, Bytes::from(vec![0; len - at]));
        }
        self.len = len;
        self.log.push(Entry::Truncate { len });
    }

    /// A successful fsync: the log reaches the medium, whose length becomes
    /// the cache's.
    fn sync(&mut self, rng: &mut Stream) {
        let mut log = std::mem::take(&mut self.log);
        for entry in log.drain(..) {
            match entry {
                Entry::Write { offset, data } => apply_write(&mut self.durable, offset, &data, rng),
                Entry::Truncate { len } => apply_truncate(&mut self.durable, len),
            }
        }
        self.log = log;
        if self.stale {
            // Pages kept (clean) after a failed fsync: only the length
            // reaches the medium; sectors never written read as garbage.
            if self.durable.len() < self.len {
                let old = self.durable.len();
                self.durable.resize(self.len, 0);
                rng.fill(&mut self.durable[old..]);
            } else {
                self.durable.truncate(self.len);
            }
        } else {
            debug_assert_eq!(self.durable.len(), self.len, "cache is durable + log");
            self.overlay.clear();
        }
    }

    /// The cache reverts to the durable bytes; the log is forgotten.
    fn revert(&mut self) {
        self.log.clear();
        self.overlay.clear();
        self.len = self.durable.len();
        self.stale = false;
    }

    /// DropCache: the cache becomes durable + log (a no-op unless a failed
    /// fsync left clean pages that never reached the medium).
    fn drop_cache(&mut self, rng: &mut Stream) {
        if !self.stale {
            return;
        }
        let log = std::mem::take(&mut self.log);
        self.revert();
        for entry in log {
            match entry {
                Entry::Write { offset, data } => self.cache_write(offset, data, rng),
                Entry::Truncate { len } => self.cache_truncate(len),
            }
        }
    }

    /// Power loss: each logged change reaches the medium whole, torn or not
    /// at all, as `fates` decides; then the cache is the medium.
    fn crash(&mut self, fates: &mut Fates<'_>, rng: &mut Stream, counts: &mut FaultCounts) {
        let log = std::mem::take(&mut self.log);
        for entry in log {
            match entry {
                Entry::Write { offset, data } => {
                    let first = offset / SECTOR_USIZE;
                    let last = (offset + data.len() - 1) / SECTOR_USIZE;
                    match fates.write(last - first + 1, rng) {
                        WriteFate::Kept => {
                            counts.kept_writes += 1;
                            apply_write(&mut self.durable, offset, &data, rng);
                        }
                        WriteFate::Dropped => counts.dropped_writes += 1,
                        WriteFate::Hole(k) => {
                            // Every sector but one reached the medium.
                            counts.torn_writes += 1;
                            counts.scattered_torn_writes += 1;
                            apply_write(&mut self.durable, offset, &data, rng);
                            let from = (first + k) * SECTOR_USIZE;
                            let to = (from + SECTOR_USIZE).min(self.durable.len());
                            rng.fill(&mut self.durable[from..to]);
                        }
                        WriteFate::Torn { written, scattered } => {
                            counts.torn_writes += 1;
                            apply_write(&mut self.durable, offset, &data, rng);
                            if !scattered.unwrap_or_else(|| rng.below(2) != 0) {
                                // A prefix of its sectors reached the medium.
                                let from = (first + written) * SECTOR_USIZE;
                                let to = ((last + 1) * SECTOR_USIZE).min(self.durable.len());
                                rng.fill(&mut self.durable[from..to]);
                                continue;
                            }
                            // Sectors reached the medium in any order: each one
                            // is new or garbage, at least one garbage.
                            counts.scattered_torn_writes += 1;
                            let surely_torn = first + rng.below((last - first + 1) as u64) as usize;
                            for sector in first..=last {
                                if sector == surely_torn || rng.below(2) == 0 {
                                    let from = sector * SECTOR_USIZE;
                                    let to = ((sector + 1) * SECTOR_USIZE).min(self.durable.len());
                                    rng.fill(&mut self.durable[from..to]);
                                }
                            }
                        }
                    }
                }
                Entry::Truncate { len } => {
                    if fates.either(rng) {
                        counts.kept_truncates += 1;
                        apply_truncate(&mut self.durable, len);
                    } else {
                        counts.dropped_truncates += 1;
                    }
                }
            }
        }
        self.revert();
    }
}

/// What became of one unsynced write at a power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteFate {
    Kept,
    Dropped,
    /// Torn: either its first `written` sectors reached the medium (fewer
    /// than all) and the rest of the sectors it touches are garbage, or
    /// (`scattered`) each sector it touches is new or garbage, at least one
    /// garbage. `scattered: None`: a coin of the disk stream decides, after
    /// the write's gap (if any) is filled, as the random path always drew.
    Torn {
        written: usize,
        scattered: Option<bool>,
    },
    /// Every sector it touches reached the medium but this one (counted
    /// from its first), which is garbage: sectors in any order, one
    /// missing (enumeration only; sampling draws scattered patterns).
    Hole(usize),
}

/// Who decides what a power loss keeps: the disk stream (with the
/// scenario's `torn_write` probability), or a crash-state enumeration,
/// which names one choice per decision (`SimDisk::crash_choosing`).
pub enum Fates<'a> {
    Random {
        torn_write: f64,
    },
    /// Given a decision's number of options, the option taken (0 first).
    Chosen(&'a mut dyn FnMut(u64) -> u64),
}

impl Fates<'_> {
    /// A two-way decision: true for the first option (a directory entry's
    /// new version, a truncate kept).
    fn either(&mut self, rng: &mut Stream) -> bool {
        match self {
            Fates::Random { .. } => rng.below(2) == 0,
            Fates::Chosen(choose) => choose(2) == 0,
        }
    }

    /// The fate of a write touching `sectors` sectors. Enumerated, its
    /// options are: kept, dropped, torn after 0..sectors-1 sectors, every
    /// sector but one for each sector but the last (a hole in the last is
    /// torn after sectors-1), and scattered (whose pattern the disk stream
    /// draws): `2 * sectors + 2`.
    fn write(&mut self, sectors: usize, rng: &mut Stream) -> WriteFate {
        match self {
            Fates::Random { torn_write } => {
                if rng.chance(*torn_write) {
                    WriteFate::Torn { written: rng.below(sectors as u64) as usize, scattered: None }
                } else if rng.below(2) == 0 {
                    WriteFate::Kept
                } else {
                    WriteFate::Dropped
                }
            }
            Fates::Chosen(choose) => match choose(2 * sectors as u64 + 2) as usize {
                0 => WriteFate::Kept,
                1 => WriteFate::Dropped,
                n if n - 2 < sectors => WriteFate::Torn { written: n - 2, scattered: Some(false) },
                n if n - 2 - sectors < sectors - 1 => WriteFate::Hole(n - 2 - sectors),
                _ => WriteFate::Torn { written: 0, scattered: Some(true) },
            },
        }
    }
}

/// The simulated directory of one node.
#[derive(Debug, Clone, Default)]
pub struct SimDisk {
    faults: DiskFaults,
    /// Inodes by number; only those some name (current or durable) refers to.
    inodes: BTreeMap<u64, Inode>,
    next_inode: u64,
    /// Current directory entries: name -> inode.
    current: BTreeMap<String, u64>,
    /// Directory entries as of the last successful SyncDir.
    durable_dir: BTreeMap<String, u64>,
    damage: Vec<Damage>,
    counts: FaultCounts,
    /// Numbers every fault decided; a replay's cut says which are carried out.
    tape: FaultTape,
}

fn err(kind: DiskErrorKind, message: String) -> DiskError {
    DiskError { kind, message }
}

fn not_found(verb: &str, name: &str) -> DiskError {
    err(DiskErrorKind::NotFound, format!("{verb} {name}: no such file"))
}

impl SimDisk {
    /// An empty directory with these fault probabilities.
    pub fn new(faults: DiskFaults) -> SimDisk {
        SimDisk { faults, ..SimDisk::default() }
    }

    /// The fault probabilities in force.
    pub fn faults(&self) -> &DiskFaults {
        &self.faults
    }

    /// Changes the fault probabilities (e.g. to stop faults and check liveness).
    pub fn set_faults(&mut self, faults: DiskFaults) {
        self.faults = faults;
    }

    /// Faults that may have damaged durable data so far (appended in order;
    /// never cleared).
    pub fn damage(&self) -> &[Damage] {
        &self.damage
    }

    /// Names currently visible, sorted.
    pub fn names(&self) -> Vec<String> {
        self.current.keys().cloned().collect()
    }

    /// Whether a file whose data has reached the medium (an fsync) has a
    /// directory entry that has not (a crash may make it vanish).
    pub fn synced_file_not_yet_in_durable_dir(&self) -> bool {
        self.current.iter().any(|(name, ino)| {
            self.durable_dir.get(name) != Some(ino) && !self.inodes[ino].durable.is_empty()
        })
    }

    /// Whether a removed file's entry is still durable (a crash may bring
    /// the file back).
    pub fn removal_not_yet_durable(&self) -> bool {
        self.durable_dir.iter().any(|(name, ino)| self.current.get(name) != Some(ino))
    }

    /// Names that would survive a crash for sure, sorted.
    pub fn durable_names(&self) -> Vec<String> {
        self.durable_dir.keys().cloned().collect()
    }

    /// Sum of the visible files' lengths.
    pub fn stored_bytes(&self) -> u64 {
        self.current.values().map(|ino| self.inodes[ino].len as u64).sum()
    }

    /// The tape of the disk's faults (numbered as decided, cut by a replay).
    pub fn tape(&self) -> &FaultTape {
        &self.tape
    }

    pub fn tape_mut(&mut self) -> &mut FaultTape {
        &mut self.tape
    }

    /// Counters of faults injected, by kind.
    pub fn fault_counts(&self) -> &FaultCounts {
        &self.counts
    }

    /// Power loss: what survives is decided now (at random), and the page
    /// cache is emptied (reads see the durable state).
    pub fn crash(&mut self, rng: &mut Stream) {
        let torn_write = self.faults.torn_write;
        self.crash_with(&mut Fates::Random { torn_write }, rng);
    }

    /// A power loss whose every decision `choose` takes: given the number
    /// of options, the option (0 first). The decisions come in a fixed
    /// order for a given disk state: each directory entry that differs
    /// from its durable version (2: the new version, the old), then every
    /// file's unsynced changes in order, whether or not a name for it
    /// survived (a write: `2 * sectors + 2`, see [`Fates`]; a truncate: 2,
    /// kept or dropped). No bit rot.
    pub fn crash_choosing(&mut self, choose: &mut dyn FnMut(u64) -> u64, rng: &mut Stream) {
        let bit_rot = std::mem::take(&mut self.faults.bit_rot);
        self.crash_with(&mut Fates::Chosen(choose), rng);
        self.faults.bit_rot = bit_rot;
    }

    fn crash_with(&mut self, fates: &mut Fates<'_>, rng: &mut Stream) {
        self.counts.crashes += 1;
        // The directory: each name whose entry changed since the last
        // SyncDir ends up with either version.
        let mut dir = BTreeMap::new();
        let mut cur = self.current.iter().peekable();
        let mut dur = self.durable_dir.iter().peekable();
        loop {
            let (name, now, then) = match (cur.peek(), dur.peek()) {
                (None, None) => break,
                (Some(&(c, &ci)), Some(&(d, &di))) if c == d => {
                    cur.next();
                    dur.next();
                    (c, Some(ci), Some(di))
                }
                (Some(&(c, &ci)), Some(&(d, _))) if c < d => {
                    cur.next();
                    (c, Some(ci), None)
                }
                (Some(&(c, &ci)), None) => {
                    cur.next();
                    (c, Some(ci), None)
                }
                (_, Some(&(d, &di))) => {
                    dur.next();
                    (d, None, Some(di))
                }
            };
            let survivor = match (now, then) {
                (Some(a), Some(b)) if a == b => Some(a),
                _ if fates.either(rng) => now,
                _ => {
                    if now.is_some() && then.is_none() {
                        self.counts.vanished_creates += 1;
                    } else {
                        self.counts.resurrected_removes += 1;
                    }
                    then
                }
            };
            if let Some(ino) = survivor {
                dir.insert(name.clone(), ino);
            }
        }
        self.current = dir;
        self.durable_dir = self.current.clone();
        // Every file's changes are decided, whichever version of the
        // directory survived, so that the decisions (and their number) do
        // not depend on the directory's: an enumeration's choices keep
        // their places. Files no name refers to any more are then dropped.
        for inode in self.inodes.values_mut() {
            inode.crash(fates, rng, &mut self.counts);
        }
        self.collect_inodes();
        if self.faults.bit_rot > 0.0 {
            for (name, ino) in &self.current {
                let inode = self.inodes.get_mut(ino).expect("named inode");
                if inode.durable.is_empty()
                    || !(rng.chance(self.faults.bit_rot) && self.tape.admit("bit rot"))
                {
                    continue;
                }
                let offset = rng.below(inode.durable.len() as u64);
                let bit = rng.below(8);
                inode.durable[offset as usize] ^= 1 << bit;
                self.counts.rotted += 1;
                self.damage.push(Damage::BitRot { file: name.clone(), offset });
            }
        }
    }

    /// Forgets inodes that no name (current or durable) refers to.
    fn collect_inodes(&mut self) {
        let (current, durable) = (&self.current, &self.durable_dir);
        if self.inodes.len() > current.len() {
            let used: std::collections::BTreeSet<u64> =
                current.values().chain(durable.values()).copied().collect();
            self.inodes.retain(|ino, _| used.contains(ino));
        }
    }

    /// The inode currently named `name`.
    fn ino(&self, verb: &str, name: &str) -> Result<u64, DiskError> {
        self.current.get(name).copied().ok_or_else(|| not_found(verb, name))
    }

    fn inode_mut(&mut self, ino: u64) -> &mut Inode {
        self.inodes.get_mut(&ino).expect("named inode")
    }

    /// NoSpace if growing the visible files by `growth` bytes would pass
    /// the capacity, or at random.
    fn check_space(
        &mut self,
        verb: &str,
        name: &str,
        growth: u64,
        rng: &mut Stream,
    ) -> Result<(), DiskError> {
        if let (Some(cap), true) = (self.faults.capacity_bytes, growth > 0) {
            let used = self.stored_bytes();
            if used + growth > cap {
                self.counts.disk_full += 1;
                return Err(err(
                    DiskErrorKind::NoSpace,
                    format!("no space left on device: {verb} of {name} needs {growth} bytes, {used} of {cap} used"),
                ));
            }
        }
        if rng.chance(self.faults.enospc) && self.tape.admit("ENOSPC") {
            self.counts.enospc += 1;
            return Err(err(DiskErrorKind::NoSpace, format!("injected ENOSPC on {verb} to {name}")));
        }
        Ok(())
    }

    /// Executes one operation; `rng` is the disk stream.
    pub fn execute(&mut self, op: &DiskOp, rng: &mut Stream) -> Result<DiskDone, DiskError> {
        let verb = op.verb();
        match op {
            DiskOp::List => Ok(DiskDone::Listed(self.names())),
            DiskOp::Open { name, create } => {
                if let Some(ino) = self.current.get(name) {
                    return Ok(DiskDone::Opened { len_bytes: self.inodes[ino].len as u64 });
                }
                if !create {
                    return Err(not_found(verb, name));
                }
                let ino = self.next_inode;
                self.next_inode += 1;
                self.inodes.insert(ino, Inode::default());
                self.current.insert(name.clone(), ino);
                Ok(DiskDone::Opened { len_bytes: 0 })
            }
            DiskOp::Read { name, offset, len } => {
                let ino = self.ino(verb, name)?;
                if rng.chance(self.faults.read_eio) && self.tape.admit("EIO on read") {
                    self.counts.eio_reads += 1;
                    return Err(err(
                        DiskErrorKind::Io,
                        format!("injected EIO on read of {name} at offset {offset} ({len} bytes)"),
                    ));
                }
                let inode = &self.inodes[&ino];
                let file_len = inode.len as u64;
                if *offset >= file_len || *len == 0 {
                    return Ok(DiskDone::Read(Bytes::new()));
                }
                let mut n = (*len as u64).min(file_len - offset) as usize;
                if n > 1 && rng.chance(self.faults.short_read) && self.tape.admit("short read") {
                    n = rng.range(1, n as u64 - 1) as usize;
                    self.counts.short_reads += 1;
                }
                let start = *offset as usize;
                Ok(DiskDone::Read(inode.read(start, start + n)))
            }
            DiskOp::Write { name, offset, data } => self.write(name, *offset, data, rng),
            DiskOp::Truncate { name, len } => {
                let ino = self.ino(verb, name)?;
                let file_len = self.inodes[&ino].len as u64;
                if *len > MAX_FILE_BYTES {
                    return Err(err(
                        DiskErrorKind::Io,
                        format!("truncate of {name} to {len} bytes: file too large (simulator limit {MAX_FILE_BYTES})"),
                    ));
                }
                if *len > file_len {
                    self.check_space(verb, name, len - file_len, rng)?;
                }
                self.inode_mut(ino).cache_truncate(*len as usize);
                Ok(DiskDone::Done)
            }
            DiskOp::SyncFile { name } => {
                let ino = self.ino(verb, name)?;
                let inode = self.inodes.get_mut(&ino).expect("named inode");
                if !inode.log.is_empty()
                    && rng.chance(self.faults.fsync_eio)
                    && self.tape.admit("failed fsync")
                {
                    let unsynced = inode.log.len();
                    inode.log.clear();
                    let fate = if rng.below(2) == 0 {
                        inode.revert();
                        self.counts.fsync_dropped_pages += 1;
                        "dirty pages dropped"
                    } else {
                        inode.stale = true;
                        self.counts.fsync_kept_pages += 1;
                        "dirty pages kept in the cache, marked clean"
                    };
                    self.counts.failed_fsyncs += 1;
                    return Err(err(
                        DiskErrorKind::Io,
                        format!("injected EIO on fsync of {name}: {unsynced} unsynced changes lost ({fate})"),
                    ));
                }
                inode.sync(rng);
                Ok(DiskDone::Done)
            }
            DiskOp::SyncDir => {
                if self.current != self.durable_dir
                    && rng.chance(self.faults.dir_sync_eio)
                    && self.tape.admit("failed directory sync")
                {
                    self.counts.failed_dir_syncs += 1;
                    return Err(err(
                        DiskErrorKind::Io,
                        "injected EIO on fsync of the directory: creations and removals not durable".into(),
                    ));
                }
                self.durable_dir.clone_from(&self.current);
                self.collect_inodes();
                Ok(DiskDone::Done)
            }
            DiskOp::Remove { name } => {
                let ino = self.current.remove(name).ok_or_else(|| not_found(verb, name))?;
                if !self.durable_dir.values().any(|&i| i == ino) {
                    self.inodes.remove(&ino);
                }
                Ok(DiskDone::Done)
            }
            DiskOp::DropCache { name } => {
                let ino = self.ino(verb, name)?;
                self.inode_mut(ino).drop_cache(rng);
                Ok(DiskDone::Done)
            }
        }
    }

    fn write(
        &mut self,
        name: &str,
        offset: u64,
        data: &Bytes,
        rng: &mut Stream,
    ) -> Result<DiskDone, DiskError> {
        let verb = "write";
        let ino = self.ino(verb, name)?;
        let file_len = self.inodes[&ino].len as u64;
        let n = data.len() as u64;
        if n == 0 {
            return Ok(DiskDone::Written { len_bytes: 0 });
        }
        let end = offset.saturating_add(n);
        if end > MAX_FILE_BYTES {
            return Err(err(
                DiskErrorKind::Io,
                format!(
                    "write to {name} at offset {offset} ({n} bytes): file too large (simulator limit {MAX_FILE_BYTES})"
                ),
            ));
        }
        self.check_space(verb, name, end.saturating_sub(file_len), rng)?;
        let at = offset as usize;
        if rng.chance(self.faults.write_eio) && self.tape.admit("EIO on write") {
            self.counts.eio_writes += 1;
            let reached = if rng.below(2) == 0 {
                self.counts.eio_partial_writes += 1;
                let k = rng.range(1, n) as usize;
                self.inode_mut(ino).cache_write(at, data.slice(..k), rng);
                k
            } else {
                0
            };
            return Err(err(
                DiskErrorKind::Io,
                format!("injected EIO on write to {name} at offset {offset} ({n} bytes, {reached} reached the cache)"),
            ));
        }
        if n > 1 && rng.chance(self.faults.short_write) && self.tape.admit("short write") {
            self.counts.short_writes += 1;
            let k = rng.range(1, n - 1) as usize;
            self.inode_mut(ino).cache_write(at, data.slice(..k), rng);
            return Ok(DiskDone::Written { len_bytes: k as u64 });
        }
        if rng.chance(self.faults.misdirected_write) && self.tape.admit("misdirected write") {
            self.counts.misdirected += 1;
            let landed = if rng.below(4) == 0 {
                None
            } else {
                let slots = file_len / SECTOR + 1;
                let mut slot = rng.below(slots);
                if slot * SECTOR == offset {
                    slot = (slot + 1) % slots;
                }
                (slot * SECTOR != offset).then_some(slot * SECTOR)
            };
            match landed {
                Some(to) => self.inode_mut(ino).cache_write(to as usize, data.clone(), rng),
                None => self.counts.lost_writes += 1,
            }
            self.damage.push(Damage::Misdirected {
                file: name.to_string(),
                intended_offset: offset,
                landed_offset: landed,
                len: n,
            });
            return Ok(DiskDone::Written { len_bytes: n });
        }
        self.inode_mut(ino).cache_write(at, data.clone(), rng);
        Ok(DiskDone::Written { len_bytes: n })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Concern;

    fn rng(seed: u64) -> Stream {
        Stream::new(seed, Concern::Disk)
    }

    fn open(d: &mut SimDisk, r: &mut Stream, name: &str) -> u64 {
        match d.execute(&DiskOp::Open { name: name.into(), create: true }, r) {
            Ok(DiskDone::Opened { len_bytes }) => len_bytes,
            other => panic!("open {name}: {other:?}"),
        }
    }

    fn try_write(
        d: &mut SimDisk,
        r: &mut Stream,
        name: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<DiskDone, DiskError> {
        d.execute(&DiskOp::Write { name: name.into(), offset, data: Bytes::copy_from_slice(data) }, r)
    }

    fn write(d: &mut SimDisk, r: &mut Stream, name: &str, offset: u64, data: &[u8]) {
        let done = try_write(d, r, name, offset, data);
        assert_eq!(done, Ok(DiskDone::Written { len_bytes: data.len() as u64 }), "write {name}");
    }

    fn sync(d: &mut SimDisk, r: &mut Stream, name: &str) -> Result<DiskDone, DiskError> {
        d.execute(&DiskOp::SyncFile { name: name.into() }, r)
    }

    fn sync_dir(d: &mut SimDisk, r: &mut Stream) {
        assert_eq!(d.execute(&DiskOp::SyncDir, r), Ok(DiskDone::Done));
    }

    fn read(d: &mut SimDisk, r: &mut Stream, name: &str, offset: u64, len: u32) -> Vec<u8> {
        match d.execute(&DiskOp::Read { name: name.into(), offset, len }, r) {
            Ok(DiskDone::Read(b)) => b.to_vec(),
            other => panic!("read {name}: {other:?}"),
        }
    }

    /// The whole file as the cache shows it.
    fn contents(d: &mut SimDisk, r: &mut Stream, name: &str) -> Vec<u8> {
        let len = open(d, r, name);
        read(d, r, name, 0, len as u32)
    }

    /// A file holding `data`, synced, its name durable.
    fn durable_file(d: &mut SimDisk, r: &mut Stream, name: &str, data: &[u8]) {
        open(d, r, name);
        write(d, r, name, 0, data);
        sync(d, r, name).unwrap();
        sync_dir(d, r);
    }

    /// A power loss taking `option` at every decision; returns each
    /// decision's number of options.
    fn crash_taking(d: &mut SimDisk, r: &mut Stream, option: u64) -> Vec<u64> {
        let mut arities = Vec::new();
        d.crash_choosing(
            &mut |n| {
                arities.push(n);
                option
            },
            r,
        );
        arities
    }

    /// Each 512-byte sector of `after`: `n` as in `new`, `o` as in `old`,
    /// `g` garbage.
    fn sector_fates(after: &[u8], old: &[u8], new: &[u8]) -> String {
        (0..after.len() / 512)
            .map(|s| {
                let range = s * 512..(s + 1) * 512;
                if after[range.clone()] == new[range.clone()] {
                    'n'
                } else if after[range.clone()] == old[range] {
                    'o'
                } else {
                    'g'
                }
            })
            .collect()
    }

    fn pattern(len: usize, salt: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt)).collect()
    }

    /// The internal invariant of every inode.
    fn check_invariants(d: &SimDisk) {
        for inode in d.inodes.values() {
            // Every byte below `len` outside the overlay is on the medium.
            let mut pos = 0;
            for (&s, seg) in &inode.overlay {
                assert!(!seg.is_empty() && s >= pos, "overlay segments overlap or are empty");
                if s > pos {
                    assert!(s <= inode.durable.len(), "bytes {pos}..{s} nowhere");
                }
                pos = s + seg.len();
            }
            assert!(pos <= inode.len, "overlay past the end");
            assert!(
                inode.len <= inode.durable.len() || pos == inode.len,
                "tail {pos}..{} nowhere",
                inode.len
            );
            assert!(inode.stale || !inode.log.is_empty() || inode.overlay.is_empty());
        }
    }

    #[test]
    fn data_is_durable_only_after_sync() {
        let (old, new) = (pattern(2048, 1), pattern(2048, 2));
        let mut lost = 0;
        for seed in 0..64 {
            let mut r = rng(seed);
            let faults = DiskFaults { torn_write: 0.5, ..DiskFaults::default() };
            let mut d = SimDisk::new(faults);
            durable_file(&mut d, &mut r, "f", &old);
            write(&mut d, &mut r, "f", 2048, &new);
            assert_eq!(contents(&mut d, &mut r, "f"), [&old[..], &new[..]].concat(), "the cache sees it");
            d.crash(&mut r);
            let after = contents(&mut d, &mut r, "f");
            assert_eq!(after[..2048], old[..], "synced data survives any crash");
            if after.len() == 2048 {
                lost += 1;
            }
            // Synced: survives whatever the crash does to unsynced writes.
            write(&mut d, &mut r, "f", 2048, &new);
            sync(&mut d, &mut r, "f").unwrap();
            write(&mut d, &mut r, "f", 4096, &old);
            d.crash(&mut r);
            let after = contents(&mut d, &mut r, "f");
            assert_eq!(after[..4096], [&old[..], &new[..]].concat()[..]);
            check_invariants(&d);
        }
        assert!(lost > 0, "an unsynced write is sometimes lost");
    }

    #[test]
    fn crash_keeps_writes_whole_dropped_or_torn() {
        const N: usize = 4;
        let (old, new) = (pattern(N * 512, 7), pattern(N * 512, 100));
        let (mut kept, mut dropped, mut torn) = (0, 0, 0);
        for seed in 0..300 {
            let mut r = rng(seed);
            let mut d = SimDisk::new(DiskFaults { torn_write: 0.3, ..DiskFaults::default() });
            durable_file(&mut d, &mut r, "f", &old);
            write(&mut d, &mut r, "f", 0, &new);
            d.crash(&mut r);
            let after = contents(&mut d, &mut r, "f");
            assert_eq!(after.len(), N * 512);
            let sectors = sector_fates(&after, &old, &new);
            match sectors.as_str() {
                "nnnn" => kept += 1,
                "oooo" => dropped += 1,
                s if s.contains('g') && s.chars().all(|c| c == 'n' || c == 'g') => torn += 1,
                s => panic!("seed {seed}: sectors {s} are neither whole, dropped nor torn"),
            }
        }
        assert!(kept > 0 && dropped > 0 && torn > 0, "kept {kept}, dropped {dropped}, torn {torn}");
    }

    #[test]
    fn an_enumerated_crash_takes_each_legal_state_of_a_write_once() {
        const N: usize = 4;
        let (old, new) = (pattern(N * 512, 7), pattern(N * 512, 100));
        let mut seen = Vec::new();
        for option in 0..(2 * N as u64 + 2) {
            let mut r = rng(option);
            let mut d = SimDisk::new(DiskFaults::default());
            durable_file(&mut d, &mut r, "f", &old);
            write(&mut d, &mut r, "f", 0, &new);
            let arities = crash_taking(&mut d, &mut r, option);
            assert_eq!(arities, vec![2 * N as u64 + 2], "one decision: the write's");
            let after = contents(&mut d, &mut r, "f");
            let sectors = sector_fates(&after, &old, &new);
            seen.push(sectors);
        }
        let expected = [
            "nnnn", "oooo", // kept, dropped
            "gggg", "nggg", "nngg", "nnng", // torn after 0..3 sectors
            "gnnn", "ngnn", "nngn", // one sector missing (the last: torn after 3)
        ];
        assert_eq!(&seen[..9], &expected[..]);
        let scattered = &seen[9];
        assert!(scattered.contains('g') && !scattered.contains('o'), "scattered: {scattered}");
    }

    #[test]
    fn an_unsynced_directory_entry_is_one_decision_of_two_options() {
        for option in 0..2 {
            let mut r = rng(option);
            let mut d = SimDisk::new(DiskFaults::default());
            open(&mut d, &mut r, "new");
            write(&mut d, &mut r, "new", 0, &pattern(512, 1));
            sync(&mut d, &mut r, "new").unwrap();
            let arities = crash_taking(&mut d, &mut r, option);
            assert_eq!(arities, vec![2], "the entry; the file's data was synced");
            assert_eq!(
                d.names().len(),
                1 - option as usize,
                "option 0 keeps the new entry, 1 the old (none)"
            );
        }
    }

    #[test]
    fn torn_write_garbles_the_whole_sectors_it_touches() {
        let old = pattern(2048, 3);
        for seed in 0..50 {
            let mut r = rng(seed);
            let mut d = SimDisk::new(DiskFaults { torn_write: 1.0, ..DiskFaults::default() });
            durable_file(&mut d, &mut r, "f", &old);
            // 100 bytes in the middle of sector 1: the only sector touched.
            write(&mut d, &mut r, "f", 600, &[0xAA; 100]);
            d.crash(&mut r);
            let after = contents(&mut d, &mut r, "f");
            assert_eq!(after[..512], old[..512]);
            assert_eq!(after[1024..], old[1024..]);
            // Sector 1 is garbage throughout: its untouched old bytes too.
            assert_ne!(after[512..600], old[512..600]);
            assert_ne!(after[600..700], [0xAA; 100]);
            assert_ne!(after[700..1024], old[700..1024]);
            assert_eq!(d.fault_counts().torn_writes, 1);
        }
    }

    #[test]
    fn never_written_sectors_read_as_garbage() {
        let mut r = rng(5);
        let mut d = SimDisk::new(DiskFaults::default());
        open(&mut d, &mut r, "f");
        write(&mut d, &mut r, "f", 4096, &[1; 512]);
        let cache = contents(&mut d, &mut r, "f");
        assert_eq!(cache.len(), 4608);
        assert_ne!(cache[..4096], [0; 4096], "a gap is garbage, not zeros");
        sync(&mut d, &mut r, "f").unwrap();
        sync_dir(&mut d, &mut r);
        d.crash(&mut r);
        assert_eq!(contents(&mut d, &mut r, "f"), cache, "synced as it was read");
        // A write past the durable end kept while the one before it is dropped.
        let mut gaps = 0;
        for seed in 0..40 {
            let mut r = rng(seed);
            let mut d = SimDisk::new(DiskFaults::default());
            durable_file(&mut d, &mut r, "f", &[]);
            write(&mut d, &mut r, "f", 0, &[0; 1024]);
            write(&mut d, &mut r, "f", 1024, &[2; 512]);
            d.crash(&mut r);
            let after = contents(&mut d, &mut r, "f");
            if after.len() == 1536 && after[1024..] == [2; 512] && after[..1024] != [0; 1024] {
                gaps += 1;
                assert!(after[..512] != [0; 512] && after[512..1024] != [0; 512]);
            }
        }
        assert!(gaps > 0, "the gap case occurred");
        // Extending with Truncate reads as zeros.
        let mut d = SimDisk::new(DiskFaults::default());
        open(&mut d, &mut r, "t");
        d.execute(&DiskOp::Truncate { name: "t".into(), len: 1000 }, &mut r).unwrap();
        assert_eq!(contents(&mut d, &mut r, "t"), vec![0; 1000]);
    }

    #[test]
    fn new_file_vanishes_without_sync_dir_and_survives_with_it() {
        let (mut vanished, mut kept) = (0, 0);
        for seed in 0..40 {
            let mut r = rng(seed);
            let mut d = SimDisk::new(DiskFaults::default());
            open(&mut d, &mut r, "new");
            write(&mut d, &mut r, "new", 0, b"hello");
            sync(&mut d, &mut r, "new").unwrap();
            d.crash(&mut r);
            match d.names().as_slice() {
                [] => vanished += 1,
                [n] if n == "new" => {
                    kept += 1;
                    assert_eq!(contents(&mut d, &mut r, "new"), b"hello");
                }
                other => panic!("{other:?}"),
            }
            let mut d = SimDisk::new(DiskFaults::default());
            durable_file(&mut d, &mut r, "new", b"hello");
            d.crash(&mut r);
            assert_eq!(d.names(), ["new"]);
            assert_eq!(contents(&mut d, &mut r, "new"), b"hello");
        }
        assert!(vanished > 0 && kept > 0, "vanished {vanished}, kept {kept}");
    }

    #[test]
    fn removed_file_comes_back_without_sync_dir() {
        let (mut back, mut gone) = (0, 0);
        for seed in 0..40 {
            let mut r = rng(seed);
            let mut d = SimDisk::new(DiskFaults::default());
            durable_file(&mut d, &mut r, "old", b"durable");
            write(&mut d, &mut r, "old", 0, b"DURABLE");
            assert_eq!(d.execute(&DiskOp::Remove { name: "old".into() }, &mut r), Ok(DiskDone::Done));
            assert!(d.names().is_empty());
            let missing = d.execute(&DiskOp::Open { name: "old".into(), create: false }, &mut r);
            assert_eq!(missing.unwrap_err().kind, DiskErrorKind::NotFound);
            d.crash(&mut r);
            if d.names() == ["old"] {
                back += 1;
                let c = contents(&mut d, &mut r, "old");
                assert!(c == b"durable" || c == b"DURABLE", "its durable contents (or the unsynced write)");
            } else {
                gone += 1;
            }
            // Durable removal.
            let mut d = SimDisk::new(DiskFaults::default());
            durable_file(&mut d, &mut r, "old", b"durable");
            d.execute(&DiskOp::Remove { name: "old".into() }, &mut r).unwrap();
            sync_dir(&mut d, &mut r);
            assert!(d.inodes.is_empty(), "the inode is freed");
            d.crash(&mut r);
            assert!(d.names().is_empty());
        }
        assert!(back > 0 && gone > 0, "back {back}, gone {gone}");
        let mut r = rng(0);
        let mut d = SimDisk::new(DiskFaults::default());
        let e = d.execute(&DiskOp::Remove { name: "x".into() }, &mut r).unwrap_err();
        assert_eq!(e.kind, DiskErrorKind::NotFound);
        assert!(e.message.contains("remove x"), "{}", e.message);
    }

    #[test]
    fn failed_fsync_loses_the_data_in_both_page_cache_variants() {
        let (old, new) = (pattern(1024, 1), pattern(1024, 2));
        let mut variants = [0; 2];
        for seed in 0..40 {
            let mut r = rng(seed);
            let mut d = SimDisk::new(DiskFaults { torn_write: 0.3, ..DiskFaults::default() });
            durable_file(&mut d, &mut r, "f", &old);
            d.set_faults(DiskFaults { fsync_eio: 1.0, torn_write: 0.3, ..DiskFaults::default() });
            write(&mut d, &mut r, "f", 512, &new);
            let e = sync(&mut d, &mut r, "f").unwrap_err();
            assert_eq!(e.kind, DiskErrorKind::Io);
            assert!(e.message.contains("fsync of f"), "{}", e.message);
            assert_eq!(sync(&mut d, &mut r, "f"), Ok(DiskDone::Done), "the retry 'succeeds'");
            let expected_new = [&old[..512], &new[..]].concat();
            let kept = d.fault_counts().fsync_kept_pages == 1;
            variants[kept as usize] += 1;
            let cache = contents(&mut d, &mut r, "f");
            if kept {
                assert_eq!(cache, expected_new, "kept pages are read before DropCache");
                d.execute(&DiskOp::DropCache { name: "f".into() }, &mut r).unwrap();
                let dropped = contents(&mut d, &mut r, "f");
                // The retry set the durable length (1536); the sectors never
                // written read as garbage.
                assert_eq!(dropped[..1024], old[..], "after DropCache, the durable bytes");
                assert_eq!(dropped.len(), 1536);
                assert_ne!(dropped[1024..], new[512..]);
            } else {
                assert_eq!(cache, old, "dropped pages: the durable bytes");
            }
            d.crash(&mut r);
            let after = contents(&mut d, &mut r, "f");
            assert_eq!(after[..1024], old[..], "never durable");
            assert_ne!(after[512..1024], new[..512]);
        }
        assert!(variants[0] > 0 && variants[1] > 0, "{variants:?}");
    }

    #[test]
    fn kept_pages_are_not_made_durable_by_a_later_sync() {
        let mut found = false;
        for seed in 0..20 {
            let mut r = rng(seed);
            let mut d = SimDisk::new(DiskFaults::default());
            durable_file(&mut d, &mut r, "f", &[1; 1024]);
            d.set_faults(DiskFaults { fsync_eio: 1.0, ..DiskFaults::default() });
            write(&mut d, &mut r, "f", 0, &[2; 512]);
            assert!(sync(&mut d, &mut r, "f").is_err());
            if d.fault_counts().fsync_kept_pages == 0 {
                continue;
            }
            found = true;
            d.set_faults(DiskFaults::default());
            write(&mut d, &mut r, "f", 512, &[3; 512]);
            write(&mut d, &mut r, "f", 1024, &[4; 100]);
            assert_eq!(
                contents(&mut d, &mut r, "f"),
                [[2; 512], [3; 512]].concat().into_iter().chain([4; 100]).collect::<Vec<_>>()
            );
            // DropCache keeps the dirty (logged) pages, drops the stale ones.
            d.execute(&DiskOp::DropCache { name: "f".into() }, &mut r).unwrap();
            let expected = [[1; 512], [3; 512]].concat().into_iter().chain([4; 100]).collect::<Vec<_>>();
            assert_eq!(contents(&mut d, &mut r, "f"), expected);
            sync(&mut d, &mut r, "f").unwrap();
            // Again stale, then a successful sync: only the logged writes are durable.
            d.set_faults(DiskFaults { fsync_eio: 1.0, ..DiskFaults::default() });
            write(&mut d, &mut r, "f", 0, &[5; 10]);
            let before = d.fault_counts().fsync_kept_pages;
            assert!(sync(&mut d, &mut r, "f").is_err());
            d.set_faults(DiskFaults::default());
            write(&mut d, &mut r, "f", 100, &[6; 10]);
            sync(&mut d, &mut r, "f").unwrap();
            let mut durable = expected.clone();
            durable[100..110].copy_from_slice(&[6; 10]);
            if d.fault_counts().fsync_kept_pages > before {
                let mut cache = durable.clone();
                cache[..10].copy_from_slice(&[5; 10]);
                assert_eq!(contents(&mut d, &mut r, "f"), cache);
            }
            check_invariants(&d);
            d.crash(&mut r);
            assert_eq!(contents(&mut d, &mut r, "f"), durable);
        }
        assert!(found);
    }

    #[test]
    fn short_reads_and_writes() {
        let mut r = rng(11);
        let data = pattern(4096, 9);
        let mut d = SimDisk::new(DiskFaults { short_read: 1.0, short_write: 1.0, ..DiskFaults::default() });
        open(&mut d, &mut r, "f");
        let mut at = 0;
        while at < data.len() {
            match try_write(&mut d, &mut r, "f", at as u64, &data[at..]) {
                Ok(DiskDone::Written { len_bytes }) => {
                    let k = len_bytes as usize;
                    assert!(k >= 1 && (k < data.len() - at || data.len() - at == 1));
                    at += k;
                    assert_eq!(open(&mut d, &mut r, "f"), at as u64, "only the prefix is applied");
                }
                other => panic!("{other:?}"),
            }
        }
        let mut got = Vec::new();
        while got.len() < data.len() {
            let part = read(&mut d, &mut r, "f", got.len() as u64, 4096);
            let left = data.len() - got.len();
            assert!(!part.is_empty() && (part.len() < left || left == 1));
            got.extend_from_slice(&part);
        }
        assert_eq!(got, data);
        assert!(read(&mut d, &mut r, "f", 4096, 10).is_empty(), "at EOF: empty");
        assert!(read(&mut d, &mut r, "f", 9999, 10).is_empty());
        assert!(d.fault_counts().short_reads > 0 && d.fault_counts().short_writes > 0);
        // Without faults, a read past the end is short at the end.
        d.set_faults(DiskFaults::default());
        assert_eq!(read(&mut d, &mut r, "f", 4000, 1000), data[4000..]);
    }

    #[test]
    fn eio_on_reads_and_writes() {
        let mut r = rng(3);
        let mut d = SimDisk::new(DiskFaults::default());
        durable_file(&mut d, &mut r, "blocks-00", &[7; 1024]);
        d.set_faults(DiskFaults { read_eio: 1.0, write_eio: 1.0, ..DiskFaults::default() });
        let e =
            d.execute(&DiskOp::Read { name: "blocks-00".into(), offset: 0, len: 10 }, &mut r).unwrap_err();
        assert_eq!(e.kind, DiskErrorKind::Io);
        assert!(e.message.contains("injected EIO on read of blocks-00"), "{}", e.message);
        let mut partial = 0;
        for _ in 0..20 {
            let e = try_write(&mut d, &mut r, "blocks-00", 1024, &[8; 1024]).unwrap_err();
            assert_eq!(e.kind, DiskErrorKind::Io);
            assert!(e.message.contains("injected EIO on write to blocks-00"), "{}", e.message);
            d.set_faults(DiskFaults::default());
            let len = open(&mut d, &mut r, "blocks-00");
            if len > 1024 {
                partial += 1;
                assert_eq!(read(&mut d, &mut r, "blocks-00", 1024, 2048), vec![8; len as usize - 1024]);
                d.execute(&DiskOp::Truncate { name: "blocks-00".into(), len: 1024 }, &mut r).unwrap();
            }
            d.set_faults(DiskFaults { read_eio: 1.0, write_eio: 1.0, ..DiskFaults::default() });
        }
        assert!(partial > 0 && partial < 20, "{partial}");
        assert_eq!(d.fault_counts().eio_writes, 20);
    }

    #[test]
    fn no_space_at_capacity_or_injected() {
        let mut r = rng(4);
        let mut d = SimDisk::new(DiskFaults { capacity_bytes: Some(4096), ..DiskFaults::default() });
        open(&mut d, &mut r, "a");
        open(&mut d, &mut r, "b");
        write(&mut d, &mut r, "a", 0, &[1; 3000]);
        write(&mut d, &mut r, "b", 0, &[2; 1096]);
        assert_eq!(d.stored_bytes(), 4096);
        let e = try_write(&mut d, &mut r, "b", 1096, &[3]).unwrap_err();
        assert_eq!(e.kind, DiskErrorKind::NoSpace);
        assert!(e.message.contains("write of b"), "{}", e.message);
        assert_eq!(open(&mut d, &mut r, "b"), 1096, "nothing written");
        write(&mut d, &mut r, "a", 0, &[4; 3000]);
        let e = d.execute(&DiskOp::Truncate { name: "a".into(), len: 3001 }, &mut r).unwrap_err();
        assert_eq!(e.kind, DiskErrorKind::NoSpace);
        d.execute(&DiskOp::Truncate { name: "a".into(), len: 1000 }, &mut r).unwrap();
        write(&mut d, &mut r, "b", 1096, &[3; 2000]);
        assert_eq!(d.execute(&DiskOp::Remove { name: "b".into() }, &mut r), Ok(DiskDone::Done));
        assert_eq!(d.stored_bytes(), 1000);
        assert_eq!(d.fault_counts().disk_full, 2);
        d.set_faults(DiskFaults { enospc: 1.0, ..DiskFaults::default() });
        let e = try_write(&mut d, &mut r, "a", 0, &[5; 10]).unwrap_err();
        assert_eq!(e.kind, DiskErrorKind::NoSpace);
        assert!(e.message.contains("injected ENOSPC on write to a"), "{}", e.message);
        assert_eq!(contents(&mut d, &mut r, "a"), vec![4; 1000]);
        assert_eq!(d.fault_counts().enospc, 1);
        // Too large for the simulator.
        let e = try_write(&mut d, &mut r, "a", MAX_FILE_BYTES, &[1]).unwrap_err();
        assert_eq!(e.kind, DiskErrorKind::Io);
    }

    #[test]
    fn misdirected_writes_report_success_and_record_damage() {
        let mut r = rng(8);
        let mut d = SimDisk::new(DiskFaults::default());
        durable_file(&mut d, &mut r, "f", &[0; 8192]);
        d.set_faults(DiskFaults { misdirected_write: 1.0, ..DiskFaults::default() });
        let (mut landed, mut lost) = (0, 0);
        for i in 0..40u8 {
            let before = contents(&mut d, &mut r, "f");
            write(&mut d, &mut r, "f", 4096, &[i + 1; 512]);
            let after = contents(&mut d, &mut r, "f");
            match d.damage().last() {
                Some(Damage::Misdirected {
                    file,
                    intended_offset: 4096,
                    landed_offset: Some(at),
                    len: 512,
                }) => {
                    assert_eq!(file, "f");
                    assert!(*at != 4096 && at % 512 == 0 && *at <= before.len() as u64);
                    assert_eq!(after[*at as usize..*at as usize + 512], [i + 1; 512]);
                    landed += 1;
                }
                Some(Damage::Misdirected { landed_offset: None, .. }) => {
                    assert_eq!(after, before, "lost");
                    lost += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(d.damage().len(), 40);
        assert!(landed > 0 && lost > 0, "landed {landed}, lost {lost}");
        assert_eq!(d.fault_counts().misdirected, 40);
        assert_eq!(d.fault_counts().lost_writes, lost);
    }

    #[test]
    fn bit_rot_flips_exactly_one_bit() {
        for seed in 0..20 {
            let mut r = rng(seed);
            let data = pattern(3000, seed as u8);
            let mut d = SimDisk::new(DiskFaults::default());
            durable_file(&mut d, &mut r, "f", &data);
            durable_file(&mut d, &mut r, "empty", &[]);
            d.set_faults(DiskFaults { bit_rot: 1.0, ..DiskFaults::default() });
            d.crash(&mut r);
            let after = contents(&mut d, &mut r, "f");
            let flipped: u32 = after.iter().zip(&data).map(|(a, b)| (a ^ b).count_ones()).sum();
            assert_eq!(flipped, 1);
            let at = after.iter().zip(&data).position(|(a, b)| a != b).unwrap() as u64;
            assert_eq!(d.damage(), [Damage::BitRot { file: "f".into(), offset: at }]);
            assert_eq!(d.fault_counts().rotted, 1);
        }
    }

    #[test]
    fn cache_agrees_with_a_simple_model() {
        // No faults: the cache must read exactly as a plain vector would
        // (gap bytes are garbage: unknown), and after syncing everything,
        // a crash keeps exactly that.
        for seed in 0..30 {
            let mut r = rng(seed);
            let mut w = Stream::new(seed, Concern::Workload);
            let mut d = SimDisk::new(DiskFaults::default());
            let mut model: Vec<Option<u8>> = Vec::new();
            open(&mut d, &mut r, "f");
            for step in 0..400 {
                match w.below(10) {
                    0..=3 => {
                        let off = w.below(model.len() as u64 + 2000);
                        let len = w.range(1, 1500) as usize;
                        let byte = step as u8;
                        write(&mut d, &mut r, "f", off, &vec![byte; len]);
                        let off = off as usize;
                        if model.len() < off + len {
                            model.resize(off + len, None);
                        }
                        model[off..off + len].iter_mut().for_each(|b| *b = Some(byte));
                    }
                    4 => {
                        let len = w.below(model.len() as u64 + 1000) as usize;
                        d.execute(&DiskOp::Truncate { name: "f".into(), len: len as u64 }, &mut r).unwrap();
                        model.resize(len, Some(0));
                    }
                    5 => {
                        sync(&mut d, &mut r, "f").unwrap();
                    }
                    6 => {
                        d.execute(&DiskOp::DropCache { name: "f".into() }, &mut r).unwrap();
                    }
                    _ => {
                        let off = w.below(model.len() as u64 + 10);
                        let len = w.below(3000) as u32;
                        let got = read(&mut d, &mut r, "f", off, len);
                        let off = off as usize;
                        let expect_len = (len as usize).min(model.len().saturating_sub(off));
                        assert_eq!(got.len(), expect_len, "seed {seed} step {step}");
                        for (i, g) in got.iter().enumerate() {
                            if let Some(m) = model[off + i] {
                                assert_eq!(*g, m, "seed {seed} step {step} byte {}", off + i);
                            }
                        }
                    }
                }
                check_invariants(&d);
            }
            let before = contents(&mut d, &mut r, "f");
            assert_eq!(before.len(), model.len());
            sync(&mut d, &mut r, "f").unwrap();
            sync_dir(&mut d, &mut r);
            d.crash(&mut r);
            assert_eq!(contents(&mut d, &mut r, "f"), before, "seed {seed}");
        }
    }

    /// Every operation with every fault, crashes included; the results'
    /// hash.
    fn chaos_run(seed: u64) -> (u64, FaultCounts) {
        let faults = DiskFaults {
            read_eio: 0.05,
            write_eio: 0.05,
            fsync_eio: 0.1,
            dir_sync_eio: 0.1,
            enospc: 0.02,
            short_read: 0.1,
            short_write: 0.1,
            misdirected_write: 0.05,
            bit_rot: 0.2,
            torn_write: 0.3,
            capacity_bytes: Some(80_000),
        };
        let mut r = rng(seed);
        let mut w = Stream::new(seed, Concern::Workload);
        let mut d = SimDisk::new(faults);
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut mix = |s: &str| {
            for b in s.bytes() {
                h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
            }
        };
        let names = ["a", "b", "c"];
        for _ in 0..2000 {
            let name = names[w.below(3) as usize].to_string();
            let op = match w.below(12) {
                0 => DiskOp::Open { name, create: w.below(4) != 0 },
                1 | 2 => {
                    let len = w.range(1, 3000) as usize;
                    let data = Bytes::from(garbage(&mut w, len));
                    DiskOp::Write { name, offset: w.below(40_000), data }
                }
                3 | 4 => DiskOp::Read { name, offset: w.below(40_000), len: w.below(5000) as u32 },
                5 => DiskOp::SyncFile { name },
                6 => DiskOp::SyncDir,
                7 => DiskOp::Remove { name },
                8 => DiskOp::Truncate { name, len: w.below(30_000) },
                9 => DiskOp::DropCache { name },
                10 => DiskOp::List,
                _ => {
                    d.crash(&mut r);
                    mix(&format!("crash {:?}", d.names()));
                    continue;
                }
            };
            let result = d.execute(&op, &mut r);
            mix(&format!("{op:?} {result:?}"));
            check_invariants(&d);
        }
        mix(&format!("{:?} {:?} {}", d.damage(), d.fault_counts(), d.stored_bytes()));
        (h, d.fault_counts().clone())
    }

    #[test]
    fn same_seed_same_results() {
        let a = chaos_run(42);
        assert_eq!(a, chaos_run(42));
        assert_ne!(a.0, chaos_run(43).0);
    }

    #[test]
    fn chaos_runs_exercise_every_fault() {
        let mut total = BTreeMap::new();
        for seed in 0..4 {
            for (name, count) in chaos_run(seed).1.pairs() {
                *total.entry(name).or_insert(0) += count;
            }
        }
        let missing: Vec<_> = total.iter().filter(|(_, &n)| n == 0).map(|(name, _)| *name).collect();
        assert!(missing.is_empty(), "never injected: {missing:?} in {total:?}");
    }

    #[test]
    fn sync_with_nothing_to_write_never_fails() {
        let mut r = rng(0);
        let mut d = SimDisk::new(DiskFaults::default());
        durable_file(&mut d, &mut r, "f", &[1; 10]);
        d.set_faults(DiskFaults { fsync_eio: 1.0, dir_sync_eio: 1.0, ..DiskFaults::default() });
        for _ in 0..10 {
            assert_eq!(sync(&mut d, &mut r, "f"), Ok(DiskDone::Done));
            sync_dir(&mut d, &mut r);
        }
        open(&mut d, &mut r, "g");
        let e = d.execute(&DiskOp::SyncDir, &mut r).unwrap_err();
        assert_eq!(e.kind, DiskErrorKind::Io);
        assert_eq!(d.durable_names(), ["f"], "the creation stays pending");
        d.set_faults(DiskFaults::default());
        sync_dir(&mut d, &mut r);
        assert_eq!(d.durable_names(), ["f", "g"]);
    }

    #[test]
    fn quiet_disk_draws_nothing_for_plain_operations() {
        let mut r = rng(1);
        let mut d = SimDisk::new(DiskFaults::default());
        durable_file(&mut d, &mut r, "f", &[1; 4096]);
        write(&mut d, &mut r, "f", 4096, &[2; 4096]);
        read(&mut d, &mut r, "f", 0, 8192);
        sync(&mut d, &mut r, "f").unwrap();
        assert_eq!(r.u64(), rng(1).u64(), "no randomness used");
    }

    #[test]
    #[ignore = "benchmark: cargo test --release -p kivaloo-sim --lib storage -- --ignored --nocapture"]
    fn bench_write_sync_read() {
        let mut r = rng(1);
        let mut d = SimDisk::new(DiskFaults::default());
        open(&mut d, &mut r, "f");
        sync_dir(&mut d, &mut r);
        let data = Bytes::from(vec![7u8; 4096]);
        let cycles = 100_000u64;
        let t = std::time::Instant::now();
        for i in 0..cycles {
            let offset = (i % 1024) * 4096;
            d.execute(&DiskOp::Write { name: "f".into(), offset, data: data.clone() }, &mut r).unwrap();
            d.execute(&DiskOp::SyncFile { name: "f".into() }, &mut r).unwrap();
            d.execute(&DiskOp::Read { name: "f".into(), offset, len: 4096 }, &mut r).unwrap();
        }
        let e = t.elapsed();
        println!(
            "{cycles} write+fsync+read cycles of 4 KiB in place (a 4 MiB file) in {e:?}: {:.0} cycles/s",
            cycles as f64 / e.as_secs_f64()
        );
        let t = std::time::Instant::now();
        for i in 0..cycles {
            let offset = i * 4096;
            d.execute(&DiskOp::Write { name: "f".into(), offset, data: data.clone() }, &mut r).unwrap();
            d.execute(&DiskOp::SyncFile { name: "f".into() }, &mut r).unwrap();
            d.execute(&DiskOp::Read { name: "f".into(), offset, len: 4096 }, &mut r).unwrap();
        }
        let e = t.elapsed();
        println!(
            "{cycles} write+fsync+read cycles of 4 KiB appended (a 400 MiB file) in {e:?}: {:.0} cycles/s",
            cycles as f64 / e.as_secs_f64()
        );
        for i in 0..1000 {
            d.execute(&DiskOp::Write { name: "f".into(), offset: i * 4096, data: data.clone() }, &mut r)
                .unwrap();
        }
        let t = std::time::Instant::now();
        d.crash(&mut r);
        println!(
            "crash of a {} MiB file with 1000 unsynced writes: {:?}",
            d.stored_bytes() >> 20,
            t.elapsed()
        );
    }
}
