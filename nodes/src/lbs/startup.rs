//! Recovery at start, step by step: find the files, check the older ones,
//! make the newest one's contents durable and read them from the device,
//! find its durable end ([`super::recovery`]), repair what a crash can
//! leave (a torn tail, a new file's torn header), and make the result
//! durable before serving. Each step is one disk operation; the next is
//! asked for when it completes.

use bytes::{Bytes, BytesMut};

use kivaloo::contract::{DiskDone, DiskError, DiskOp, LogLevel};

use super::layout::{self, FileHeader, FILE_HEADER_LEN};
use super::recovery::{find_durable_end, tail_slots_to_read, TailRegion};
use super::{LbsNode, Op, Phase, ReadAcc, StoreFile, BLOCK_NUMBER_MAX};

/// Where recovery is; fields are filled as it goes.
#[derive(Debug, Default)]
pub(super) struct Recovery {
    /// (first block, name), sorted.
    files: Vec<(u64, String)>,
    /// Lengths of `files`, as opened.
    lens: Vec<u64>,
    /// The block after the last durable one, once known.
    durable_end: u64,
    /// The first block of a store created because the directory holds no
    /// file: 0, or past any file removed as never durable.
    first_block_if_empty: u64,
}

/// Steps of recovery, as the purposes of its disk operations.
#[derive(Debug)]
pub(super) enum Step {
    List,
    Open { idx: usize },
    SyncNewest,
    DropNewestCache,
    ReadHeader { idx: usize, acc: ReadAcc },
    ReadTail { acc: ReadAcc, region: TailRegion, header: Option<FileHeader> },
    RemoveDamagedNewest,
    SyncDirAfterRemove,
    RewriteHeader { offset: u64, data: Bytes },
    Truncate,
    SyncNewestAgain,
    SyncDir,
    CreateFirst,
    WriteFirstHeader { offset: u64, data: Bytes },
    SyncFirstFile,
    SyncFirstDir,
}

impl Step {
    fn describe(&self) -> &'static str {
        match self {
            Step::List => "listing the directory",
            Step::Open { .. } => "opening a file",
            Step::SyncNewest | Step::SyncNewestAgain => "fsync of the newest file",
            Step::DropNewestCache => "dropping the newest file's cached pages",
            Step::ReadHeader { .. } => "reading a file header",
            Step::ReadTail { .. } => "reading the newest file's tail",
            Step::RemoveDamagedNewest => "removing a never-durable newest file",
            Step::SyncDirAfterRemove | Step::SyncDir | Step::SyncFirstDir => "directory fsync",
            Step::RewriteHeader { .. } => "rewriting a torn header",
            Step::Truncate => "cutting a torn tail",
            Step::CreateFirst => "creating the first file",
            Step::WriteFirstHeader { .. } => "writing the first file's header",
            Step::SyncFirstFile => "fsync of the first file",
        }
    }
}

impl LbsNode {
    pub(super) fn start_recovery(&mut self) {
        self.step(Step::List, DiskOp::List);
    }

    fn step(&mut self, step: Step, op: DiskOp) {
        self.disk(Op::Startup(step), op);
    }

    fn recovery(&mut self) -> &mut Recovery {
        match &mut self.phase {
            Phase::Recovering(r) => r,
            _ => unreachable!("recovery step outside recovery"),
        }
    }

    fn newest(&mut self) -> (u64, String, u64) {
        let r = self.recovery();
        let (first, name) = r.files.last().expect("files").clone();
        (first, name, *r.lens.last().expect("lens"))
    }

    pub(super) fn on_startup_disk(&mut self, step: Step, result: Result<DiskDone, DiskError>) {
        let bs = self.cfg.block_size;
        let fsync = self.cfg.fsync;
        let done = match result {
            Ok(done) => done,
            Err(e) => return self.exit(format!("recovery failed {}: {e}", step.describe())),
        };
        match (step, done) {
            (Step::List, DiskDone::Listed(names)) => {
                let mut files: Vec<(u64, String)> =
                    names.into_iter().filter_map(|n| layout::parse_file_name(&n).map(|f| (f, n))).collect();
                files.sort();
                if let Some((first, name)) = files.iter().find(|(first, _)| *first >= BLOCK_NUMBER_MAX) {
                    return self
                        .exit(format!("{name} starts at block {first}, past the largest block number"));
                }
                let r = self.recovery();
                r.files = files;
                r.lens.clear();
                if r.files.is_empty() {
                    let name = layout::file_name(r.first_block_if_empty);
                    self.log(LogLevel::Info, format!("lbs: creating a new store with {bs}-byte blocks"));
                    self.step(Step::CreateFirst, DiskOp::Open { name, create: true });
                } else {
                    let name = r.files[0].1.clone();
                    self.step(Step::Open { idx: 0 }, DiskOp::Open { name, create: false });
                }
            }
            (Step::Open { idx }, DiskDone::Opened { len_bytes }) => {
                let r = self.recovery();
                r.lens.push(len_bytes);
                if idx + 1 < r.files.len() {
                    let name = r.files[idx + 1].1.clone();
                    self.step(Step::Open { idx: idx + 1 }, DiskOp::Open { name, create: false });
                } else if fsync {
                    // What a crashed process left unsynced in the page cache
                    // becomes durable now, before anything is served from it.
                    let name = self.newest().1;
                    self.step(Step::SyncNewest, DiskOp::SyncFile { name });
                } else {
                    self.drop_newest_cache();
                }
            }
            (Step::SyncNewest, _) => self.drop_newest_cache(),
            (Step::DropNewestCache, _) => self.read_header(0),
            (Step::ReadHeader { idx, mut acc }, DiskDone::Read(bytes)) => {
                if !acc.absorb(&bytes) {
                    let op = acc.read_rest();
                    return self.step(Step::ReadHeader { idx, acc }, op);
                }
                self.on_header(idx, &acc.got);
            }
            (Step::ReadTail { mut acc, region, header }, DiskDone::Read(bytes)) => {
                if !acc.absorb(&bytes) {
                    let op = acc.read_rest();
                    return self.step(Step::ReadTail { acc, region, header }, op);
                }
                self.on_tail(region, header, &acc.got);
            }
            (Step::RemoveDamagedNewest, _) => {
                if fsync {
                    self.step(Step::SyncDirAfterRemove, DiskOp::SyncDir);
                } else {
                    self.start_recovery();
                }
            }
            (Step::SyncDirAfterRemove, _) => self.start_recovery(),
            (Step::RewriteHeader { offset, data }, DiskDone::Written { len_bytes }) => {
                if len_bytes < data.len() as u64 {
                    let name = self.newest().1;
                    return self.continue_write(name, offset, data, len_bytes, |offset, data| {
                        Step::RewriteHeader { offset, data }
                    });
                }
                self.cut_tail();
            }
            (Step::Truncate, _) => self.sync_recovered(),
            (Step::SyncNewestAgain, _) => self.step(Step::SyncDir, DiskOp::SyncDir),
            (Step::SyncDir, _) => self.finish_recovery(),
            (Step::CreateFirst, _) => {
                let first = self.recovery().first_block_if_empty;
                let mut header = BytesMut::new();
                layout::put_file_header(&mut header, bs, first);
                let data = header.freeze();
                let op = DiskOp::Write { name: layout::file_name(first), offset: 0, data: data.clone() };
                self.step(Step::WriteFirstHeader { offset: 0, data }, op);
            }
            (Step::WriteFirstHeader { offset, data }, DiskDone::Written { len_bytes }) => {
                let name = layout::file_name(self.recovery().first_block_if_empty);
                if len_bytes < data.len() as u64 {
                    return self.continue_write(name, offset, data, len_bytes, |offset, data| {
                        Step::WriteFirstHeader { offset, data }
                    });
                }
                if fsync {
                    self.step(Step::SyncFirstFile, DiskOp::SyncFile { name });
                } else {
                    self.created_first();
                }
            }
            (Step::SyncFirstFile, _) => self.step(Step::SyncFirstDir, DiskOp::SyncDir),
            (Step::SyncFirstDir, _) => self.created_first(),
            (step, done) => self.exit(format!(
                "recovery got an unexpected disk result {} {}",
                done.describe(),
                step.describe()
            )),
        }
    }

    /// Asks for the rest of a short write, or stops if it made no progress.
    fn continue_write(
        &mut self,
        name: String,
        offset: u64,
        data: Bytes,
        written: u64,
        step: impl FnOnce(u64, Bytes) -> Step,
    ) {
        if written == 0 {
            return self.exit(format!("writing {name} at {offset} made no progress"));
        }
        let (offset, data) = (offset + written, data.slice(written as usize..));
        let op = DiskOp::Write { name, offset, data: data.clone() };
        self.step(step(offset, data), op);
    }

    fn drop_newest_cache(&mut self) {
        // After a failed fsync, Linux may keep pages that never reached the
        // disk in its cache, marked clean: reading them would make lbs serve
        // (and build on) blocks that a power loss can still take away.
        let name = self.newest().1;
        self.step(Step::DropNewestCache, DiskOp::DropCache { name });
    }

    fn read_header(&mut self, idx: usize) {
        let name = self.recovery().files[idx].1.clone();
        let acc = ReadAcc { name, offset: 0, want: FILE_HEADER_LEN, got: BytesMut::new() };
        let op = acc.read_rest();
        self.step(Step::ReadHeader { idx, acc }, op);
    }

    fn on_header(&mut self, idx: usize, bytes: &[u8]) {
        let bs = self.cfg.block_size;
        let rec_len = self.record_len;
        let (first, name) = self.recovery().files[idx].clone();
        let len = self.recovery().lens[idx];
        let is_newest = idx + 1 == self.recovery().files.len();
        let header = layout::parse_file_header(bytes);
        if let Ok(h) = &header {
            if h.block_size != bs {
                return self.exit(format!(
                    "the store was created with {}-byte blocks and cannot be opened with -b {bs}",
                    h.block_size
                ));
            }
            if h.first_block != first {
                return self.exit(format!("{name}: header says its first block is {}", h.first_block));
            }
        }
        if !is_newest {
            if let Err(e) = header {
                return self.exit(format!("{name}: damaged header ({e}); refusing to start"));
            }
            let next_first = self.recovery().files[idx + 1].0;
            let expected =
                (next_first - first).checked_mul(rec_len).and_then(|b| b.checked_add(FILE_HEADER_LEN));
            if expected != Some(len) {
                return self.exit(format!(
                    "{name} is {len} bytes but should hold blocks {first}..{next_first} \
                     ({expected:?} bytes): blocks are missing; refusing to start"
                ));
            }
            return self.read_header(idx + 1);
        }
        // The newest file: read enough of its end to find the durable end.
        let slots = len.saturating_sub(FILE_HEADER_LEN) / rec_len;
        let region_first_slot = slots.saturating_sub(tail_slots_to_read(self.batch_blocks_max()));
        let offset = FILE_HEADER_LEN + region_first_slot * rec_len;
        let region = TailRegion {
            block_size: bs,
            file_first_block: first,
            region_first_block: first + region_first_slot,
            batch_blocks_max: self.batch_blocks_max(),
        };
        let want = len.saturating_sub(offset);
        let acc = ReadAcc { name, offset, want, got: BytesMut::with_capacity(want as usize) };
        let header = header.ok();
        if want == 0 {
            return self.on_tail(region, header, &[]);
        }
        let op = acc.read_rest();
        self.step(Step::ReadTail { acc, region, header }, op);
    }

    fn on_tail(&mut self, region: TailRegion, header: Option<FileHeader>, bytes: &[u8]) {
        let (first, name, len) = self.newest();
        let verdict = match find_durable_end(&region, bytes) {
            Ok(v) => v,
            Err(e) => return self.exit(format!("{name}: {e}; refusing to start")),
        };
        self.recovery().durable_end = verdict.durable_end;
        if header.is_some() {
            return self.cut_tail();
        }
        if verdict.durable_end == first {
            // Created for a batch that never became durable: nothing in it
            // was acknowledged. Such a file holds at most one batch.
            if len > FILE_HEADER_LEN + region.batch_blocks_max * self.record_len {
                return self.exit(format!(
                    "{name}: damaged header and no complete block in {len} bytes; refusing to start"
                ));
            }
            // Should it be the only file, the store starts again at its
            // first block, so that no block number is reused.
            let r = self.recovery();
            r.first_block_if_empty = r.first_block_if_empty.max(first);
            self.log(LogLevel::Warn, format!("lbs: removing {name}, a new file whose first write was torn"));
            return self.step(Step::RemoveDamagedNewest, DiskOp::Remove { name });
        }
        if verdict.newest_batch_start == Some(first) {
            // The header and the file's first batch went out in one write,
            // which a crash tore in the header's sector: that batch was never
            // acknowledged, but it is whole, so keep it and mend the header
            // (the name and the block size determine it).
            self.log(LogLevel::Warn, format!("lbs: {name}: rewriting a header torn by a crash"));
            let mut h = BytesMut::new();
            layout::put_file_header(&mut h, self.cfg.block_size, first);
            let data = h.freeze();
            let op = DiskOp::Write { name, offset: 0, data: data.clone() };
            return self.step(Step::RewriteHeader { offset: 0, data }, op);
        }
        self.exit(format!(
            "{name}: damaged header but complete blocks up to {}; refusing to start",
            verdict.durable_end - 1
        ))
    }

    /// Cuts what follows the durable end, if anything.
    fn cut_tail(&mut self) {
        let (first, name, len) = self.newest();
        let durable_end = self.recovery().durable_end;
        let durable_len = FILE_HEADER_LEN + (durable_end - first) * self.record_len;
        if durable_len == len {
            return self.sync_recovered();
        }
        self.log(
            LogLevel::Warn,
            format!(
                "lbs: {name}: discarding {} bytes after block {} (a write torn by a crash, never acknowledged)",
                len - durable_len,
                durable_end as i128 - 1
            ),
        );
        self.step(Step::Truncate, DiskOp::Truncate { name, len: durable_len });
    }

    /// Makes the recovered newest file (its contents, length and directory
    /// entry) durable before anything is served from it.
    fn sync_recovered(&mut self) {
        if !self.cfg.fsync {
            return self.finish_recovery();
        }
        let name = self.newest().1;
        self.step(Step::SyncNewestAgain, DiskOp::SyncFile { name });
    }

    fn created_first(&mut self) {
        let r = self.recovery();
        let first = r.first_block_if_empty;
        r.files = vec![(first, layout::file_name(first))];
        r.durable_end = first;
        self.finish_recovery();
    }

    fn finish_recovery(&mut self) {
        let r = std::mem::take(self.recovery());
        self.files = r
            .files
            .into_iter()
            .map(|(first_block, name)| StoreFile { name, first_block, reads_in_flight: 0 })
            .collect();
        self.durable_next = r.durable_end;
        self.accepted_next = r.durable_end;
        self.free_mark = 0;
        self.phase = Phase::Serving;
        let first = self.files[0].first_block;
        self.log(
            LogLevel::Info,
            format!(
                "lbs: serving {}-byte blocks {first}..{} in {} file(s){}",
                self.cfg.block_size,
                self.durable_next,
                self.files.len(),
                if self.cfg.fsync { "" } else { " WITHOUT fsync (-L)" }
            ),
        );
        self.maybe_accept();
    }
}
