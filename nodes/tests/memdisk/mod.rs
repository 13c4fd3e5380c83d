//! An in-memory disk for driving nodes in tests: a directory of files, each
//! with what the process sees (the page cache), what survives a power loss,
//! and which byte ranges are dirty (written since the last sync), plus
//! durable and current directory entries. It executes every [`DiskOp`] of
//! the sans-IO contract, can lose power (keeping only durable state, a torn
//! prefix of one file's unsynced tail, or a random mix of unsynced sectors),
//! rot bytes, fail the next operation of a given kind (a failed fsync either
//! drops the dirty pages or, as Linux may, keeps them in the cache marked
//! clean without ever writing them), and return short reads and writes. A
//! process crash without power loss is simply a new node on the same
//! `MemDisk`: the page cache survives.

// Shared scaffolding: not every test binary uses every helper.
#![allow(dead_code)]

use bytes::Bytes;
use kivaloo::contract::{DiskDone, DiskError, DiskErrorKind, DiskOp};
use std::collections::BTreeMap;

/// One file (an inode): its contents as seen by the process, and as synced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemFile {
    /// What reads see (the page cache).
    pub data: Vec<u8>,
    /// What survives a crash.
    pub durable: Vec<u8>,
    /// Byte ranges written since the last sync: what an fsync would write.
    dirty: Vec<(usize, usize)>,
}

impl MemFile {
    fn is_dirty(&self, at: usize) -> bool {
        self.dirty.iter().any(|&(a, b)| a <= at && at < b)
    }

    /// What the medium holds after the dirty ranges are written: the length
    /// is the cached one; bytes never written read as zeros.
    fn synced(&self) -> Vec<u8> {
        let mut out = self.durable.clone();
        out.resize(self.data.len(), 0);
        for &(a, b) in &self.dirty {
            let b = b.min(self.data.len());
            if a < b {
                out[a..b].copy_from_slice(&self.data[a..b]);
            }
        }
        out
    }
}

/// A directory of files in memory. Names point to inodes, so a file removed
/// (but not durably) comes back after a crash with its durable contents.
#[derive(Debug, Clone, Default)]
pub struct MemDisk {
    inodes: Vec<MemFile>,
    /// Current directory entries: name -> inode.
    current: BTreeMap<String, usize>,
    /// Entries as of the last directory sync.
    durable_dir: BTreeMap<String, usize>,
    /// Failures to inject: (verb of the op, kind), each used once.
    faults: Vec<(&'static str, DiskErrorKind)>,
    /// Return at most half the bytes asked for by each Read and Write.
    pub short_io: bool,
    /// A failed fsync keeps the dirty pages in the cache marked clean (as
    /// Linux may), instead of dropping them.
    pub failed_fsync_keeps_pages: bool,
}

fn err(kind: DiskErrorKind, message: impl Into<String>) -> DiskError {
    DiskError { kind, message: message.into() }
}

impl MemDisk {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.current.keys().cloned().collect()
    }

    /// The names that would survive a crash, sorted.
    pub fn durable_names(&self) -> Vec<String> {
        self.durable_dir.keys().cloned().collect()
    }

    /// The file currently named `name`.
    pub fn file(&self, name: &str) -> Option<&MemFile> {
        self.current.get(name).map(|&i| &self.inodes[i])
    }

    /// Makes the next operation whose [`DiskOp::verb`] is `verb` fail with `kind`.
    pub fn fail_next(&mut self, verb: &'static str, kind: DiskErrorKind) {
        self.faults.push((verb, kind));
    }

    /// Forgets failures injected and not yet used.
    pub fn clear_faults(&mut self) {
        self.faults.clear();
    }

    /// Flips bits (`mask`) of the byte at `offset` of file `name`, both in the
    /// page cache and on the medium (bit rot).
    pub fn flip(&mut self, name: &str, offset: usize, mask: u8) {
        let f = &mut self.inodes[self.current[name]];
        assert!(offset < f.data.len() || offset < f.durable.len(), "flip past the end of {name}");
        for v in [&mut f.data, &mut f.durable] {
            if let Some(b) = v.get_mut(offset) {
                *b ^= mask;
            }
        }
    }

    /// The disk after a crash: only durable names, with durable contents.
    pub fn crash(&self) -> MemDisk {
        let mut out = MemDisk {
            short_io: self.short_io,
            failed_fsync_keeps_pages: self.failed_fsync_keeps_pages,
            ..MemDisk::default()
        };
        for (name, &ino) in &self.durable_dir {
            let durable = self.inodes[ino].durable.clone();
            out.current.insert(name.clone(), out.inodes.len());
            out.durable_dir.insert(name.clone(), out.inodes.len());
            out.inodes.push(MemFile { data: durable.clone(), durable, dirty: Vec::new() });
        }
        out
    }

    /// A crash that tears the unsynced tail of `name`: its durable contents
    /// plus the first `n_bytes` of what was written after them survive.
    pub fn crash_keeping_unsynced_prefix(&self, name: &str, n_bytes: usize) -> MemDisk {
        let mut d = self.clone();
        let f = &mut d.inodes[d.current[name]];
        assert!(f.data.starts_with(&f.durable), "{name}: unsynced data is not an append");
        let end = (f.durable.len() + n_bytes).min(f.data.len());
        f.durable = f.synced()[..end].to_vec();
        d.crash()
    }

    /// A power loss at an arbitrary moment, as a real disk and file system
    /// may leave it: each 512-byte sector touched by a dirty range is kept
    /// new, left old, or torn to garbage (other sectors keep what the medium
    /// has); each file's length ends up anywhere between its durable and its
    /// current length (at a sector boundary or at either end); creations and
    /// removals not yet made durable by a directory sync each happen or not.
    /// `pick(n)` returns a random number in `0..n`.
    pub fn crash_random(&self, pick: &mut dyn FnMut(u64) -> u64) -> MemDisk {
        const SECTOR: usize = 512;
        let mut d = self.clone();
        // Directory entries: a name whose entry changed since the last
        // directory sync ends up with either version.
        let mut dir = BTreeMap::new();
        let names: std::collections::BTreeSet<&String> =
            self.current.keys().chain(self.durable_dir.keys()).collect();
        for name in names {
            let (cur, dur) = (self.current.get(name), self.durable_dir.get(name));
            let keep = match (cur, dur) {
                (Some(c), Some(x)) if c == x => Some(*c),
                // Removed and created again since the last directory sync.
                (Some(c), Some(x)) => Some(if pick(2) == 0 { *c } else { *x }),
                (Some(c), None) => (pick(2) == 0).then_some(*c),
                (None, Some(x)) => (pick(2) == 0).then_some(*x),
                (None, None) => None,
            };
            if let Some(ino) = keep {
                dir.insert(name.clone(), ino);
            }
        }
        for f in &mut d.inodes {
            let synced = f.synced();
            let (old, new) = (&f.durable, &synced);
            let len = match pick(3) {
                0 => old.len(),
                1 => new.len(),
                _ => {
                    let (lo, hi) = (old.len().min(new.len()), old.len().max(new.len()));
                    let sectors = (hi - lo) / SECTOR;
                    (lo + pick(sectors as u64 + 1) as usize * SECTOR).min(hi)
                }
            };
            let mut out = vec![0u8; len];
            for start in (0..len).step_by(SECTOR) {
                let end = (start + SECTOR).min(len);
                let o = old.get(start..end.min(old.len())).unwrap_or(&[]);
                let n = new.get(start..end.min(new.len())).unwrap_or(&[]);
                let sector = &mut out[start..end];
                let touched = (start..end).any(|i| f.is_dirty(i));
                if !touched && o.len() == sector.len() {
                    sector.copy_from_slice(o);
                    continue;
                }
                match pick(3) {
                    0 if n.len() == sector.len() => sector.copy_from_slice(n),
                    1 if o.len() == sector.len() => sector.copy_from_slice(o),
                    _ => sector.iter_mut().for_each(|b| *b = pick(256) as u8),
                }
            }
            f.durable = out;
        }
        d.durable_dir = dir;
        d.crash()
    }

    fn take_fault(&mut self, op: &DiskOp) -> Option<DiskError> {
        let i = self.faults.iter().position(|(verb, _)| *verb == op.verb())?;
        let (verb, kind) = self.faults.remove(i);
        Some(err(kind, format!("injected failure of {verb}")))
    }

    fn inode(&mut self, name: &str) -> Result<&mut MemFile, DiskError> {
        match self.current.get(name) {
            Some(&i) => Ok(&mut self.inodes[i]),
            None => Err(err(DiskErrorKind::NotFound, format!("{name}: no such file"))),
        }
    }

    /// Executes one operation.
    pub fn execute(&mut self, op: &DiskOp) -> Result<DiskDone, DiskError> {
        if let Some(e) = self.take_fault(op) {
            if let DiskOp::SyncFile { name } = op {
                // The error is reported once; the dirty pages never reach the
                // medium. They are dropped, or kept in the cache marked clean
                // (so a later fsync "succeeds" without writing them).
                let keep = self.failed_fsync_keeps_pages;
                if let Ok(f) = self.inode(name) {
                    if !keep {
                        f.data = f.durable.clone();
                    }
                    f.dirty.clear();
                }
            }
            return Err(e);
        }
        let short = self.short_io;
        match op {
            DiskOp::List => Ok(DiskDone::Listed(self.names())),
            DiskOp::Open { name, create } => {
                if !self.current.contains_key(name) {
                    if !create {
                        return Err(err(DiskErrorKind::NotFound, format!("{name}: no such file")));
                    }
                    self.current.insert(name.clone(), self.inodes.len());
                    self.inodes.push(MemFile::default());
                }
                Ok(DiskDone::Opened { len_bytes: self.inode(name)?.data.len() as u64 })
            }
            DiskOp::Read { name, offset, len } => {
                let f = self.inode(name)?;
                let start = (*offset as usize).min(f.data.len());
                let mut n = (*len as usize).min(f.data.len() - start);
                if short && n > 1 {
                    n /= 2;
                }
                Ok(DiskDone::Read(Bytes::copy_from_slice(&f.data[start..start + n])))
            }
            DiskOp::Write { name, offset, data } => {
                let f = self.inode(name)?;
                let n = if short && data.len() > 1 { data.len() / 2 } else { data.len() };
                let start = *offset as usize;
                if f.data.len() < start + n {
                    f.data.resize(start + n, 0);
                }
                f.data[start..start + n].copy_from_slice(&data[..n]);
                f.dirty.push((start, start + n));
                Ok(DiskDone::Written { len_bytes: n as u64 })
            }
            DiskOp::Truncate { name, len } => {
                let f = self.inode(name)?;
                let len = *len as usize;
                let old_len = f.data.len();
                f.data.resize(len, 0);
                if len > old_len {
                    f.dirty.push((old_len, len));
                }
                Ok(DiskDone::Done)
            }
            DiskOp::SyncFile { name } => {
                let f = self.inode(name)?;
                f.durable = f.synced();
                f.dirty.clear();
                Ok(DiskDone::Done)
            }
            DiskOp::DropCache { name } => {
                let f = self.inode(name)?;
                for i in 0..f.data.len() {
                    if !f.is_dirty(i) {
                        f.data[i] = f.durable.get(i).copied().unwrap_or(0);
                    }
                }
                Ok(DiskDone::Done)
            }
            DiskOp::SyncDir => {
                self.durable_dir = self.current.clone();
                Ok(DiskDone::Done)
            }
            DiskOp::Remove { name } => match self.current.remove(name) {
                Some(_) => Ok(DiskDone::Done),
                None => Err(err(DiskErrorKind::NotFound, format!("{name}: no such file"))),
            },
        }
    }
}
