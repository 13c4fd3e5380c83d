//! lbs: the log-structured block store, as a sans-IO state machine.
//!
//! See `nodes/DESIGN.md` for the storage layout and the recovery rule, and
//! [`layout`] for the bytes on disk. In short: blocks are appended, each with
//! a checksummed trailer naming its block number and write batch, to files
//! `blocks-<first block>`; pending APPENDs are grouped into write batches
//! (one write and one fsync each, the next batch only after the previous
//! one's fsync succeeded); an APPEND is acknowledged only after its batch
//! (and, for a new file, the directory) is fsynced. A failed fsync, write or
//! directory sync stops the node: it is never retried.

pub mod layout;
pub mod recovery;
mod startup;

use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, VecDeque};

use kivaloo::contract::{
    ConnClosed, ConnId, DiskDone, DiskError, DiskOp, DiskOpId, ExitReason, Input, Instant, LogLevel, Node,
    Output,
};
use kivaloo::lbs_proto::{LbsRequest, LbsResponse, NO_LAST_BLOCK};
use kivaloo::packet::{Packet, PacketDecoder, HEADER_LEN};

use layout::{record_len, record_offset, BatchPlace, FILE_HEADER_LEN};
use startup::{Recovery, Step};

/// The most data one write batch carries (16 MiB), which bounds how much
/// recovery reads. A larger APPEND is written in several batches, in order,
/// and acknowledged after the last.
pub const BATCH_DATA_BYTES_MAX: usize = 16 << 20;
/// The most data one APPEND may carry: what the packet codec allows. A
/// larger one drops the connection.
pub const APPEND_DATA_BYTES_MAX: usize = kivaloo::packet::RECORD_LEN_MAX - 16;
/// Block numbers stay below this (2^62), so that no arithmetic on them can
/// overflow; an APPEND past it drops the connection, and a file named past
/// it makes recovery refuse to start.
pub const BLOCK_NUMBER_MAX: u64 = 1 << 62;
/// Bytes of blocks being read for one connection's GETs. At the bound the
/// node stops reading requests, so a client that pipelines GETs of large
/// blocks without reading the answers cannot make lbs hold more than this
/// (plus the driver's send queue).
pub const GET_BYTES_IN_FLIGHT_MAX: usize = 16 << 20;
/// Response bytes sent on one connection and not yet reported written
/// (`Input::Sent`). At the bound the node stops handling that connection's
/// requests, so a client that does not read its answers gets backpressure.
pub const UNSENT_BYTES_MAX: usize = 16 << 20;
/// Requests of one connection in progress at once (GETs reading, APPENDs
/// queued or being written, responses held by `-l`). At the bound the node
/// stops reading from the connection.
pub const PENDING_REQUESTS_MAX: usize = 4096;
/// APPEND data queued behind the batch being written. At the bound the node
/// stops reading from the connection.
pub const APPEND_QUEUE_BYTES_MAX: usize = 64 << 20;
/// Default for [`LbsConfig::file_len_min_bytes`].
pub const FILE_LEN_MIN_BYTES_DEFAULT: u64 = 64 << 20;

/// How an lbs node is set up.
#[derive(Debug, Clone)]
pub struct LbsConfig {
    /// Block size in bytes, 512..=131072 (`-b`). Fixed when the store is
    /// created; opening it with another size is refused.
    pub block_size: u32,
    /// Extra latency added to every GET response (`-l`), for testing.
    pub read_latency_ns: u64,
    /// Whether to fsync (`false` with `-L`: testing only, not durable).
    pub fsync: bool,
    /// A new file is started when the newest holds at least this many bytes
    /// and more than a sixteenth of all live blocks.
    pub file_len_min_bytes: u64,
}

impl LbsConfig {
    /// A durable configuration with `block_size`-byte blocks and defaults.
    pub fn new(block_size: u32) -> Self {
        LbsConfig {
            block_size,
            read_latency_ns: 0,
            fsync: true,
            file_len_min_bytes: FILE_LEN_MIN_BYTES_DEFAULT,
        }
    }
}

/// One file of the store, as known to the node.
#[derive(Debug)]
struct StoreFile {
    name: String,
    first_block: u64,
    reads_in_flight: u32,
}

/// An APPEND (or the rest of one) waiting for its batch.
#[derive(Debug)]
struct QueuedAppend {
    req_id: u64,
    start: u64,
    count: u64,
    data: Bytes,
    /// The APPEND ends with these blocks: acknowledge it after them.
    last_part: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchStage {
    Open,
    Write,
    SyncFile,
    SyncDir,
    Done,
}

/// The one write batch being written and synced.
#[derive(Debug)]
struct Batch {
    start: u64,
    count: u64,
    file_name: String,
    new_file: bool,
    /// (request ID, next block to report) per APPEND, for the connection
    /// `conn` that sent them.
    acks: Vec<(u64, u64)>,
    conn: Option<ConnId>,
    stage: BatchStage,
    offset: u64,
    data: Bytes,
}

#[derive(Debug)]
struct Connection {
    id: ConnId,
    decoder: PacketDecoder,
    pending: usize,
    reading: bool,
    out: BytesMut,
    /// Bytes given in `Output::Send` and not yet reported by `Input::Sent`.
    unsent_bytes: usize,
}

/// A read that may come back short, accumulated until whole.
#[derive(Debug)]
struct ReadAcc {
    name: String,
    offset: u64,
    want: u64,
    got: BytesMut,
}

/// What a disk operation in flight is for.
#[derive(Debug)]
enum Op {
    Startup(Step),
    Get { conn: ConnId, req_id: u64, block: u64, file_first: u64, issued_at: Instant, acc: ReadAcc },
    Batch,
    RemoveFreed,
    SyncDirAfterRemoveFreed,
}

#[derive(Debug)]
enum Phase {
    Recovering(Recovery),
    Serving,
    Stopped,
}

/// The lbs state machine.
#[derive(Debug)]
pub struct LbsNode {
    cfg: LbsConfig,
    record_len: u64,
    phase: Phase,
    outputs: VecDeque<Output>,
    next_op_id: u64,
    ops: BTreeMap<u64, Op>,
    /// Live files, oldest first; never empty while serving.
    files: Vec<StoreFile>,
    /// The block after the last durable (acknowledgeable) one.
    durable_next: u64,
    /// The start block the next APPEND must have.
    accepted_next: u64,
    /// Blocks below this were FREEd: GET answers "does not exist".
    free_mark: u64,
    batch: Option<Batch>,
    queued: VecDeque<QueuedAppend>,
    queued_bytes: usize,
    conn: Option<Connection>,
    accepting: bool,
    removing: bool,
    /// GET responses held back by `-l`, by (due time, sequence).
    delayed: BTreeMap<(Instant, u64), (ConnId, Bytes)>,
    delayed_seq: u64,
    /// Bytes of blocks being read for GETs.
    get_bytes_in_flight: usize,
    /// The time of the input being handled.
    now: Instant,
}

impl LbsNode {
    /// A node that starts recovering the store at once (its first outputs
    /// are disk operations). It accepts connections once recovery is done.
    ///
    /// # Panics
    /// If `cfg.block_size` is outside 512..=131072: the daemon checks its
    /// flags before building a node.
    pub fn new(cfg: LbsConfig) -> Self {
        assert!(
            (layout::BLOCK_SIZE_MIN..=layout::BLOCK_SIZE_MAX).contains(&cfg.block_size),
            "block size {} out of range",
            cfg.block_size
        );
        let mut node = LbsNode {
            record_len: record_len(cfg.block_size),
            cfg,
            phase: Phase::Recovering(Recovery::default()),
            outputs: VecDeque::new(),
            next_op_id: 0,
            ops: BTreeMap::new(),
            files: Vec::new(),
            durable_next: 0,
            accepted_next: 0,
            free_mark: 0,
            batch: None,
            queued: VecDeque::new(),
            queued_bytes: 0,
            conn: None,
            accepting: false,
            removing: false,
            delayed: BTreeMap::new(),
            delayed_seq: 0,
            get_bytes_in_flight: 0,
            now: Instant::default(),
        };
        node.start_recovery();
        node
    }

    /// The block after the last durable one (for tests and the simulator's
    /// structural checks).
    pub fn durable_next(&self) -> u64 {
        self.durable_next
    }

    /// Whether recovery has finished and the node serves requests.
    pub fn is_serving(&self) -> bool {
        matches!(self.phase, Phase::Serving)
    }

    /// The live files' names, oldest first.
    pub fn file_names(&self) -> Vec<String> {
        self.files.iter().map(|f| f.name.clone()).collect()
    }

    fn batch_blocks_max(&self) -> u64 {
        (BATCH_DATA_BYTES_MAX / self.cfg.block_size as usize) as u64
    }

    fn disk(&mut self, purpose: Op, op: DiskOp) {
        let id = self.next_op_id;
        self.next_op_id += 1;
        self.ops.insert(id, purpose);
        self.outputs.push_back(Output::Disk { id: DiskOpId(id), op });
    }

    fn log(&mut self, level: LogLevel, message: String) {
        self.outputs.push_back(Output::Log { level, message });
    }

    fn exit(&mut self, message: String) {
        if matches!(self.phase, Phase::Stopped) {
            return;
        }
        self.phase = Phase::Stopped;
        self.delayed.clear();
        if let Some(c) = self.conn.take() {
            self.outputs.push_back(Output::Close { conn: c.id, reason: "lbs is stopping".into() });
        }
        self.outputs
            .push_back(Output::Exit(ExitReason { failure: true, message: format!("lbs: {message}") }));
    }

    // ----- connections ----------------------------------------------------

    fn maybe_accept(&mut self) {
        let want = matches!(self.phase, Phase::Serving) && self.conn.is_none() && self.batch.is_none();
        if want != self.accepting {
            self.accepting = want;
            self.outputs.push_back(Output::Accepting(want));
        }
    }

    fn on_accepted(&mut self, conn: ConnId) {
        if !matches!(self.phase, Phase::Serving) || self.conn.is_some() || self.batch.is_some() {
            let reason = "lbs serves one connection at a time and is busy".to_string();
            self.outputs.push_back(Output::Close { conn, reason });
            return;
        }
        self.conn = Some(Connection {
            id: conn,
            decoder: PacketDecoder::with_record_len_max(APPEND_DATA_BYTES_MAX + 16),
            pending: 0,
            reading: true,
            out: BytesMut::new(),
            unsent_bytes: 0,
        });
        self.maybe_accept();
    }

    /// Forgets the connection: its queued APPENDs (never acknowledged) are
    /// dropped; the batch being written finishes but is not acknowledged.
    fn forget_conn(&mut self) {
        self.conn = None;
        self.queued.clear();
        self.queued_bytes = 0;
        self.accepted_next = self.batch.as_ref().map_or(self.durable_next, |b| b.start + b.count);
        self.delayed.clear();
        self.maybe_accept();
    }

    fn drop_conn(&mut self, reason: String) {
        if let Some(mut c) = self.conn.take() {
            // Responses already made go out before the close.
            if !c.out.is_empty() {
                self.outputs.push_back(Output::Send { conn: c.id, data: c.out.split().freeze() });
            }
            self.outputs.push_back(Output::Close { conn: c.id, reason: format!("lbs: {reason}") });
        }
        self.forget_conn();
    }

    fn is_current(&self, conn: ConnId) -> bool {
        self.conn.as_ref().is_some_and(|c| c.id == conn)
    }

    fn send(&mut self, response: &LbsResponse, req_id: u64) {
        if let Some(c) = &mut self.conn {
            response.encode(req_id, &mut c.out);
        }
    }

    /// Handles whole packets while the connection's bounds allow, and turns
    /// reading off or on accordingly.
    fn process_packets(&mut self) {
        loop {
            let Some(c) = &mut self.conn else { return };
            if c.pending >= PENDING_REQUESTS_MAX
                || c.unsent_bytes >= UNSENT_BYTES_MAX
                || self.queued_bytes >= APPEND_QUEUE_BYTES_MAX
                || self.get_bytes_in_flight >= GET_BYTES_IN_FLIGHT_MAX
            {
                if c.reading {
                    c.reading = false;
                    self.outputs.push_back(Output::ReadInterest { conn: c.id, enabled: false });
                }
                return;
            }
            match c.decoder.next_packet() {
                Ok(Some(packet)) => self.on_request(packet),
                Ok(None) => break,
                Err(e) => return self.drop_conn(e.to_string()),
            }
        }
        if let Some(c) = &mut self.conn {
            if !c.reading {
                c.reading = true;
                self.outputs.push_back(Output::ReadInterest { conn: c.id, enabled: true });
            }
        }
    }

    fn on_request(&mut self, packet: Packet) {
        let req_id = packet.id;
        let req = match LbsRequest::decode(packet.record) {
            Ok(r) => r,
            Err(e) => return self.drop_conn(format!("malformed request {req_id:#x}: {e}")),
        };
        let bs = self.cfg.block_size;
        match req {
            LbsRequest::Params => {
                self.send(&LbsResponse::Params { block_size: bs, next_block: self.durable_next }, req_id)
            }
            LbsRequest::Params2 => {
                let last_block = self.durable_next.checked_sub(1).unwrap_or(NO_LAST_BLOCK);
                let resp = LbsResponse::Params2 { block_size: bs, next_block: self.durable_next, last_block };
                self.send(&resp, req_id)
            }
            LbsRequest::Free { keep_from } => {
                // Past the end: acknowledged, changes nothing. Blocks not yet
                // durable are never freed: their APPENDs may yet be dropped
                // (with the connection) and the numbers written again.
                if keep_from <= self.accepted_next {
                    let keep_from = keep_from.min(self.durable_next);
                    if keep_from > self.free_mark {
                        self.free_mark = keep_from;
                        self.maybe_remove_freed();
                    }
                }
                self.send(&LbsResponse::Free, req_id)
            }
            LbsRequest::Get { block } => self.on_get(req_id, block),
            LbsRequest::Append { count, start, data } => self.on_append(req_id, count, start, data),
        }
    }

    fn on_get(&mut self, req_id: u64, block: u64) {
        let exists =
            block >= self.free_mark && block < self.durable_next && block >= self.files[0].first_block;
        if !exists {
            return self.send(&LbsResponse::Get(None), req_id);
        }
        let idx = self.files.partition_point(|f| f.first_block <= block) - 1;
        let f = &mut self.files[idx];
        f.reads_in_flight += 1;
        let acc = ReadAcc {
            name: f.name.clone(),
            offset: record_offset(self.cfg.block_size, f.first_block, block),
            want: self.record_len,
            got: BytesMut::new(),
        };
        let file_first = f.first_block;
        self.get_bytes_in_flight += self.cfg.block_size as usize;
        let conn = self.conn.as_mut().expect("request from a connection");
        conn.pending += 1;
        let conn = conn.id;
        let op = acc.read_rest();
        // `issued_at` is set by handle_input through `self.now`.
        self.disk(Op::Get { conn, req_id, block, file_first, issued_at: self.now, acc }, op);
    }

    fn on_append(&mut self, req_id: u64, count: u32, start: u64, data: Bytes) {
        let bs = self.cfg.block_size as u64;
        let count = count as u64;
        if count == 0 || data.len() as u64 != count * bs {
            return self.drop_conn(format!(
                "malformed APPEND {req_id:#x}: {count} blocks of {bs} bytes but {} bytes of data",
                data.len()
            ));
        }
        if data.len() > APPEND_DATA_BYTES_MAX {
            return self.drop_conn(format!(
                "APPEND {req_id:#x} of {} bytes exceeds the {APPEND_DATA_BYTES_MAX}-byte limit",
                data.len()
            ));
        }
        if start != self.accepted_next {
            return self.send(&LbsResponse::Append(None), req_id);
        }
        let Some(end) = start.checked_add(count).filter(|e| *e <= BLOCK_NUMBER_MAX) else {
            return self.drop_conn(format!("APPEND {req_id:#x} would run past the last block number"));
        };
        self.accepted_next = end;
        self.queued_bytes += data.len();
        self.queued.push_back(QueuedAppend { req_id, start, count, data, last_part: true });
        self.conn.as_mut().expect("request from a connection").pending += 1;
        self.maybe_start_batch();
    }

    // ----- the write path -------------------------------------------------

    fn maybe_start_batch(&mut self) {
        if self.batch.is_some() || self.queued.is_empty() || !matches!(self.phase, Phase::Serving) {
            return;
        }
        let bs = self.cfg.block_size as usize;
        let mut taken = Vec::new();
        let mut bytes = 0usize;
        while let Some(q) = self.queued.front_mut() {
            if bytes + q.data.len() <= BATCH_DATA_BYTES_MAX {
                bytes += q.data.len();
                taken.push(self.queued.pop_front().expect("front exists"));
                continue;
            }
            if taken.is_empty() {
                // An APPEND larger than a batch: its first part now, the rest
                // in the next batches, acknowledged after the last.
                let part_blocks = (BATCH_DATA_BYTES_MAX / bs) as u64;
                let part_len = part_blocks as usize * bs;
                let part = QueuedAppend {
                    req_id: q.req_id,
                    start: q.start,
                    count: part_blocks,
                    data: q.data.split_to(part_len),
                    last_part: false,
                };
                q.start += part_blocks;
                q.count -= part_blocks;
                bytes += part_len;
                taken.push(part);
            }
            break;
        }
        self.queued_bytes -= bytes;
        let start = taken[0].start;
        let count: u64 = taken.iter().map(|q| q.count).sum();
        debug_assert_eq!(start, self.durable_next, "batches are written in order");

        let last = self.files.last().expect("serving with files");
        let last_blocks = start - last.first_block;
        let live_blocks = start - self.files[0].first_block;
        let new_file =
            last_blocks * self.record_len >= self.cfg.file_len_min_bytes && last_blocks * 16 > live_blocks;
        let (file_name, offset) = if new_file {
            (layout::file_name(start), 0)
        } else {
            (last.name.clone(), record_offset(self.cfg.block_size, last.first_block, start))
        };

        let mut buf =
            BytesMut::with_capacity((FILE_HEADER_LEN * new_file as u64 + count * self.record_len) as usize);
        if new_file {
            layout::put_file_header(&mut buf, self.cfg.block_size, start);
        }
        let place = BatchPlace { batch_start: start, batch_len: count as u32 };
        let mut acks = Vec::with_capacity(taken.len());
        for q in &taken {
            for i in 0..q.count {
                let block_data = &q.data[i as usize * bs..(i as usize + 1) * bs];
                layout::put_record(&mut buf, q.start + i, place, block_data);
            }
            if q.last_part {
                acks.push((q.req_id, q.start + q.count));
            }
        }
        let conn = self.conn.as_ref().map(|c| c.id);
        let stage = if new_file { BatchStage::Open } else { BatchStage::Write };
        self.batch =
            Some(Batch { start, count, file_name, new_file, acks, conn, stage, offset, data: buf.freeze() });
        self.issue_batch_op();
    }

    fn issue_batch_op(&mut self) {
        let b = self.batch.as_ref().expect("batch in flight");
        let name = b.file_name.clone();
        let op = match b.stage {
            BatchStage::Open => DiskOp::Open { name, create: true },
            BatchStage::Write => DiskOp::Write { name, offset: b.offset, data: b.data.clone() },
            BatchStage::SyncFile => DiskOp::SyncFile { name },
            BatchStage::SyncDir => DiskOp::SyncDir,
            BatchStage::Done => unreachable!("a done batch issues nothing"),
        };
        self.disk(Op::Batch, op);
    }

    fn on_batch_disk(&mut self, result: Result<DiskDone, DiskError>) {
        let fsync = self.cfg.fsync;
        let b = self.batch.as_mut().expect("batch in flight");
        let blocks = format!("blocks {}..{} in {}", b.start, b.start + b.count, b.file_name);
        let verb = match b.stage {
            BatchStage::Open => "creating the file for",
            BatchStage::Write => "writing",
            BatchStage::SyncFile => "fsync of",
            BatchStage::SyncDir => "directory fsync after creating the file for",
            BatchStage::Done => unreachable!("a done batch gets no completions"),
        };
        let done = match result {
            Ok(done) => done,
            Err(e) => {
                return self.exit(format!(
                    "{verb} {blocks} failed: {e}; unsynced data is now in an unknown state, \
                     so lbs stops without retrying and recovers at restart"
                ))
            }
        };
        match (b.stage, done) {
            (BatchStage::Open, _) => b.stage = BatchStage::Write,
            (BatchStage::Write, DiskDone::Written { len_bytes }) => {
                if len_bytes == 0 {
                    return self.exit(format!("writing {blocks} made no progress"));
                }
                if (len_bytes as usize) < b.data.len() {
                    b.offset += len_bytes;
                    b.data = b.data.slice(len_bytes as usize..);
                } else {
                    b.stage = if fsync { BatchStage::SyncFile } else { BatchStage::Done };
                }
            }
            (BatchStage::SyncFile, _) if b.new_file => b.stage = BatchStage::SyncDir,
            (BatchStage::SyncFile | BatchStage::SyncDir, _) => b.stage = BatchStage::Done,
            (stage, done) => {
                return self.exit(format!("unexpected disk result ({}) at {stage:?}", done.describe()))
            }
        }
        if self.batch.as_ref().expect("batch").stage == BatchStage::Done {
            self.batch_durable();
        } else {
            self.issue_batch_op();
        }
    }

    fn batch_durable(&mut self) {
        let b = self.batch.take().expect("batch in flight");
        if b.new_file {
            self.files.push(StoreFile { name: b.file_name, first_block: b.start, reads_in_flight: 0 });
        }
        self.durable_next = b.start + b.count;
        if b.conn.is_some() && b.conn == self.conn.as_ref().map(|c| c.id) {
            for &(req_id, next_block) in &b.acks {
                self.send(&LbsResponse::Append(Some(next_block)), req_id);
            }
            self.conn.as_mut().expect("current").pending -= b.acks.len();
        }
        self.maybe_start_batch();
        self.maybe_accept();
        self.maybe_remove_freed();
        self.process_packets();
    }

    // ----- reads ----------------------------------------------------------

    fn on_get_disk(&mut self, op: Op, result: Result<DiskDone, DiskError>) {
        let Op::Get { conn, req_id, block, file_first, issued_at, mut acc } = op else {
            unreachable!("dispatched by op kind")
        };
        let current = self.is_current(conn);
        let bytes = match result {
            Ok(DiskDone::Read(bytes)) => Some(bytes),
            Ok(other) => {
                return self.exit(format!("unexpected disk result ({}) for a read", other.describe()))
            }
            Err(e) => {
                self.release_read(file_first);
                if current {
                    self.drop_conn(format!(
                        "GET {req_id:#x}: reading block {block} from {} failed: {e}",
                        acc.name
                    ));
                }
                return;
            }
        };
        let bytes = bytes.expect("set above");
        // Whole in one read (the usual case): no copy.
        let record = if acc.got.is_empty() && bytes.len() as u64 == acc.want {
            bytes
        } else {
            if !acc.absorb(&bytes) {
                let op = acc.read_rest();
                return self.disk(Op::Get { conn, req_id, block, file_first, issued_at, acc }, op);
            }
            std::mem::take(&mut acc.got).freeze()
        };
        self.release_read(file_first);
        if !current {
            return;
        }
        if let Err(e) = layout::check_record(&record, self.cfg.block_size, block) {
            let msg = format!("block {block} in {} is corrupt: {e}", acc.name);
            self.log(LogLevel::Error, format!("lbs: {msg}"));
            return self.drop_conn(format!("GET {req_id:#x} failed: {msg}"));
        }
        let data = record.slice(..self.cfg.block_size as usize);
        if self.cfg.read_latency_ns > 0 {
            let mut out = BytesMut::with_capacity(HEADER_LEN + 8 + data.len());
            LbsResponse::Get(Some(data)).encode(req_id, &mut out);
            let due = issued_at.after_ns(self.cfg.read_latency_ns);
            self.delayed_seq += 1;
            self.delayed.insert((due, self.delayed_seq), (conn, out.freeze()));
            return;
        }
        self.send(&LbsResponse::Get(Some(data)), req_id);
        self.conn.as_mut().expect("current").pending -= 1;
        self.process_packets();
    }

    fn release_read(&mut self, file_first: u64) {
        if let Some(f) = self.files.iter_mut().find(|f| f.first_block == file_first) {
            f.reads_in_flight -= 1;
        }
        self.get_bytes_in_flight -= self.cfg.block_size as usize;
        self.maybe_remove_freed();
    }

    fn release_delayed(&mut self, now: Instant) {
        let mut released = 0;
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (conn, bytes) = entry.remove();
            if let Some(c) = self.conn.as_mut().filter(|c| c.id == conn) {
                c.out.extend_from_slice(&bytes);
                c.pending -= 1;
                released += 1;
            }
        }
        if released > 0 {
            self.process_packets();
        }
    }

    // ----- freeing --------------------------------------------------------

    fn maybe_remove_freed(&mut self) {
        if self.removing || !matches!(self.phase, Phase::Serving) || self.files.len() < 2 {
            return;
        }
        if self.files[1].first_block > self.free_mark || self.files[0].reads_in_flight > 0 {
            return;
        }
        self.removing = true;
        let name = self.files[0].name.clone();
        self.disk(Op::RemoveFreed, DiskOp::Remove { name });
    }

    fn on_remove_disk(&mut self, op: Op, result: Result<DiskDone, DiskError>) {
        match (op, result) {
            (Op::RemoveFreed, Ok(_)) => {
                let f = self.files.remove(0);
                self.log(
                    LogLevel::Info,
                    format!("lbs: removed {} (blocks below {} were freed)", f.name, self.free_mark),
                );
                if self.cfg.fsync {
                    // Removals are made durable one at a time, oldest first, so
                    // that after a crash the files left are always a suffix.
                    self.disk(Op::SyncDirAfterRemoveFreed, DiskOp::SyncDir);
                } else {
                    self.removing = false;
                    self.maybe_remove_freed();
                }
            }
            (Op::RemoveFreed, Err(e)) => {
                // FREE is advisory: keep serving, stop removing.
                self.log(
                    LogLevel::Warn,
                    format!("lbs: removing {} failed ({e}); keeping it", self.files[0].name),
                );
            }
            (Op::SyncDirAfterRemoveFreed, Ok(_)) => {
                self.removing = false;
                self.maybe_remove_freed();
            }
            (_, Err(e)) => self.exit(format!("directory fsync after removing a freed file failed: {e}")),
            (_, Ok(done)) => {
                self.exit(format!("unexpected disk result ({}) removing a file", done.describe()))
            }
        }
    }

    fn flush_sends(&mut self) {
        if let Some(c) = &mut self.conn {
            if !c.out.is_empty() {
                let data = c.out.split().freeze();
                c.unsent_bytes += data.len();
                self.outputs.push_back(Output::Send { conn: c.id, data });
            }
        }
    }
}

impl ReadAcc {
    /// Adds the bytes of one read; true once the read is whole or the file
    /// ended (an empty read).
    fn absorb(&mut self, bytes: &[u8]) -> bool {
        self.got.extend_from_slice(bytes);
        bytes.is_empty() || self.got.len() as u64 >= self.want
    }

    /// The read for what is still missing.
    fn read_rest(&self) -> DiskOp {
        let done = self.got.len() as u64;
        DiskOp::Read {
            name: self.name.clone(),
            offset: self.offset + done,
            len: (self.want - done).min(u32::MAX as u64) as u32,
        }
    }
}

impl Node for LbsNode {
    fn handle_input(&mut self, now: Instant, input: Input) {
        if matches!(self.phase, Phase::Stopped) {
            return;
        }
        self.now = now;
        match input {
            Input::Accepted { conn } => self.on_accepted(conn),
            Input::Received { conn, data } => {
                if let Some(c) = self.conn.as_mut().filter(|c| c.id == conn) {
                    c.decoder.push(&data);
                    self.process_packets();
                }
            }
            Input::Sent { conn, len_bytes } => {
                if let Some(c) = self.conn.as_mut().filter(|c| c.id == conn) {
                    c.unsent_bytes = c.unsent_bytes.saturating_sub(len_bytes as usize);
                    self.process_packets();
                }
            }
            Input::Closed { conn, reason } => {
                if self.is_current(conn) {
                    let why = match reason {
                        ConnClosed::PeerClosed => "the client closed the connection".to_string(),
                        ConnClosed::Failed(e) => format!("the connection failed: {e}"),
                    };
                    self.log(LogLevel::Info, format!("lbs: {conn}: {why}"));
                    self.conn = None;
                    self.forget_conn();
                }
            }
            Input::Disk { id, result } => match self.ops.remove(&id.0) {
                None => self.exit(format!("completion for unknown disk operation {}", id.0)),
                Some(op) => match op {
                    Op::Get { .. } => self.on_get_disk(op, result),
                    Op::Batch => self.on_batch_disk(result),
                    Op::RemoveFreed | Op::SyncDirAfterRemoveFreed => self.on_remove_disk(op, result),
                    Op::Startup(step) => self.on_startup_disk(step, result),
                },
            },
            Input::Timeout => {}
        }
        self.release_delayed(now);
        self.flush_sends();
    }

    fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.delayed.keys().next().map(|(due, _)| *due)
    }
}
