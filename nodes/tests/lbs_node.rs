//! The lbs node driven in-process against an in-memory disk: no sockets, no
//! threads, no files. Each test asserts what a client (or an operator
//! restarting the daemon) would notice.

mod memdisk;

use bytes::{Bytes, BytesMut};
use kivaloo::contract::{
    ConnClosed, ConnId, DiskDone, DiskErrorKind, DiskOp, DiskOpId, ExitReason, Input, Instant, LogLevel,
    Node, Output,
};
use kivaloo::lbs_proto::{request_type, LbsRequest, LbsRequestKind, LbsResponse, NO_LAST_BLOCK};
use kivaloo::packet::{encode_packet, PacketDecoder};
use kivaloo_nodes::lbs::layout::{file_name, record_len, FILE_HEADER_LEN};
use kivaloo_nodes::lbs::{LbsConfig, LbsNode, PENDING_REQUESTS_MAX};
use memdisk::MemDisk;
use std::collections::{BTreeMap, VecDeque};

const BS: u32 = 512;

/// The client side of one connection.
#[derive(Default)]
struct Client {
    decoder: PacketDecoder,
    kinds: BTreeMap<u64, LbsRequestKind>,
    responses: BTreeMap<u64, LbsResponse>,
    closed: Option<String>,
}

/// Drives one node: feeds inputs at a virtual time, drains outputs, and runs
/// disk operations on a [`MemDisk`], at once (FIFO until quiescent) or, with
/// `hold`, only when a test completes them.
struct Harness {
    node: LbsNode,
    disk: MemDisk,
    now: Instant,
    hold: bool,
    held: VecDeque<(DiskOpId, DiskOp)>,
    /// Every disk operation the node asked for, in order.
    issued: Vec<DiskOp>,
    clients: BTreeMap<ConnId, Client>,
    accepting: Vec<bool>,
    read_interest: Vec<(ConnId, bool)>,
    logs: Vec<(LogLevel, String)>,
    exit: Option<ExitReason>,
    /// Outputs emitted after `Exit` (there must be none).
    after_exit: Vec<Output>,
    next_conn: u64,
    next_id: u64,
    rng: u64,
}

impl Harness {
    fn with(cfg: LbsConfig, disk: MemDisk, hold: bool) -> Self {
        let mut h = Harness {
            node: LbsNode::new(cfg),
            disk,
            now: Instant::from_nanos(1_000),
            hold,
            held: VecDeque::new(),
            issued: Vec::new(),
            clients: BTreeMap::new(),
            accepting: Vec::new(),
            read_interest: Vec::new(),
            logs: Vec::new(),
            exit: None,
            after_exit: Vec::new(),
            next_conn: 1,
            next_id: 100,
            rng: 0x9E37_79B9_7F4A_7C15,
        };
        h.drain();
        if !hold {
            h.run();
        }
        h
    }

    /// A node started on `disk`, its disk operations run at once.
    fn new(cfg: LbsConfig, disk: MemDisk) -> Self {
        Self::with(cfg, disk, false)
    }

    /// A node on a new, empty store with `BS`-byte blocks, ready to serve.
    fn fresh() -> Self {
        let h = Self::new(LbsConfig::new(BS), MemDisk::new());
        assert_eq!(h.accepting, vec![true]);
        h
    }

    fn drain(&mut self) {
        while let Some(out) = self.node.poll_output() {
            if self.exit.is_some() {
                self.after_exit.push(out);
                continue;
            }
            match out {
                Output::Send { conn, data } => {
                    let c = self.clients.get_mut(&conn).expect("send on a connection the node knows");
                    assert!(c.closed.is_none(), "{conn}: send after close");
                    c.decoder.push(&data);
                    while let Some(p) = c.decoder.next_packet().expect("the node sends valid packets") {
                        let kind = c.kinds.remove(&p.id).expect("a response to a request in flight");
                        let resp = LbsResponse::decode(kind, p.record).expect("a well-formed response");
                        assert!(c.responses.insert(p.id, resp).is_none(), "two responses to {:#x}", p.id);
                    }
                }
                Output::Close { conn, reason } => {
                    let c = self.clients.entry(conn).or_default();
                    assert!(c.closed.is_none(), "{conn} closed twice");
                    c.closed = Some(reason);
                }
                Output::ReadInterest { conn, enabled } => self.read_interest.push((conn, enabled)),
                Output::Accepting(on) => self.accepting.push(on),
                Output::Disk { id, op } => {
                    self.issued.push(op.clone());
                    self.held.push_back((id, op));
                }
                Output::Log { level, message } => self.logs.push((level, message)),
                Output::Exit(reason) => self.exit = Some(reason),
            }
        }
    }

    fn feed(&mut self, input: Input) {
        self.node.handle_input(self.now, input);
        self.drain();
        if !self.hold {
            self.run();
        }
    }

    /// Completes held operation `i` on the disk.
    fn complete(&mut self, i: usize) {
        let (id, op) = self.held.remove(i).expect("a held operation");
        let result = self.disk.execute(&op);
        self.node.handle_input(self.now, Input::Disk { id, result });
        self.drain();
    }

    /// Completes the oldest held operation, checking its verb.
    fn step(&mut self, verb: &str) {
        assert_eq!(self.held.front().map(|(_, op)| op.verb()), Some(verb), "held: {:?}", self.held);
        self.complete(0);
    }

    /// Completes the oldest held operation whose verb is `verb`.
    fn complete_verb(&mut self, verb: &str) {
        let i = self.held.iter().position(|(_, op)| op.verb() == verb);
        self.complete(i.unwrap_or_else(|| panic!("no held {verb}: {:?}", self.held)));
    }

    /// Completes every outstanding operation, FIFO, until quiescent.
    fn run(&mut self) {
        while !self.held.is_empty() {
            self.complete(0);
        }
    }

    fn held_verbs(&self) -> Vec<&'static str> {
        self.held.iter().map(|(_, op)| op.verb()).collect()
    }

    fn count_issued(&self, verb: &str) -> usize {
        self.issued.iter().filter(|op| op.verb() == verb).count()
    }

    fn connect(&mut self) -> ConnId {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.clients.insert(conn, Client::default());
        self.feed(Input::Accepted { conn });
        conn
    }

    fn rand(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Delivers `bytes` on `conn`, split at random boundaries.
    fn send_raw(&mut self, conn: ConnId, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = (1 + self.rand() % 100).min(rest.len() as u64) as usize;
            let (piece, tail) = rest.split_at(n);
            rest = tail;
            self.feed(Input::Received { conn, data: Bytes::copy_from_slice(piece) });
        }
    }

    /// Sends a request; returns its ID.
    fn send(&mut self, conn: ConnId, req: &LbsRequest) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.clients.get_mut(&conn).expect("connected").kinds.insert(id, req.kind());
        let mut out = BytesMut::new();
        req.encode(id, &mut out);
        self.send_raw(conn, &out);
        id
    }

    fn resp(&self, conn: ConnId, id: u64) -> Option<&LbsResponse> {
        self.clients[&conn].responses.get(&id)
    }

    fn closed(&self, conn: ConnId) -> Option<&str> {
        self.clients[&conn].closed.as_deref()
    }

    /// Sends a request and returns its response, which must have come.
    fn call(&mut self, conn: ConnId, req: LbsRequest) -> LbsResponse {
        let id = self.send(conn, &req);
        match self.resp(conn, id) {
            Some(r) => r.clone(),
            None => panic!("no response to {req:?}; closed: {:?}", self.closed(conn)),
        }
    }

    fn append(&mut self, conn: ConnId, start: u64, count: u32) -> LbsResponse {
        self.call(conn, append_req(start, count))
    }

    fn get(&mut self, conn: ConnId, block: u64) -> Option<Bytes> {
        match self.call(conn, LbsRequest::Get { block }) {
            LbsResponse::Get(data) => data,
            other => panic!("GET answered {other:?}"),
        }
    }

    fn params2(&mut self, conn: ConnId) -> (u32, u64, u64) {
        match self.call(conn, LbsRequest::Params2) {
            LbsResponse::Params2 { block_size, next_block, last_block } => {
                (block_size, next_block, last_block)
            }
            other => panic!("PARAMS2 answered {other:?}"),
        }
    }

    /// Moves the clock forward and fires the timer if it is due.
    fn advance(&mut self, ns: u64) {
        self.now = self.now.after_ns(ns);
        if self.node.poll_timeout().is_some_and(|t| t <= self.now) {
            self.feed(Input::Timeout);
        }
    }

    fn exit_reason(&self) -> &ExitReason {
        self.exit.as_ref().expect("the node exited")
    }
}

/// The data of block `b`: differs between any two blocks less than 256 apart.
fn block_data(b: u64) -> Vec<u8> {
    (0..BS as u64).map(|i| (b.wrapping_mul(131) ^ i.wrapping_mul(7) ^ (i >> 8)) as u8).collect()
}

fn blocks(start: u64, count: u32) -> Bytes {
    (start..start + count as u64).flat_map(block_data).collect::<Vec<u8>>().into()
}

fn append_req(start: u64, count: u32) -> LbsRequest {
    LbsRequest::Append { count, start, data: blocks(start, count) }
}

/// Offset of block `b` in a file whose first block is `first`.
fn offset_of(first: u64, b: u64) -> usize {
    (FILE_HEADER_LEN + (b - first) * record_len(BS)) as usize
}

fn rec() -> usize {
    record_len(BS) as usize
}

/// Checks that blocks `range` read back exactly.
fn assert_blocks(h: &mut Harness, conn: ConnId, range: std::ops::Range<u64>) {
    for b in range {
        assert_eq!(h.get(conn, b).as_deref(), Some(&block_data(b)[..]), "block {b}");
    }
}

fn tiny_files() -> LbsConfig {
    LbsConfig { file_len_min_bytes: 1, ..LbsConfig::new(BS) }
}

#[test]
fn fresh_store_recovers_before_accepting_and_reports_empty_params() {
    let mut h = Harness::with(LbsConfig::new(BS), MemDisk::new(), true);
    assert_eq!(h.held_verbs(), ["list"]);
    for verb in ["list", "open", "write", "fsync"] {
        h.step(verb);
        assert!(h.accepting.is_empty(), "accepting before the store is durable (after {verb})");
    }
    assert!(
        matches!(&h.issued[1], DiskOp::Open { name, create: true } if *name == file_name(0)),
        "{:?}",
        h.issued
    );
    h.step("fsync-dir");
    assert_eq!(h.accepting, vec![true]);
    assert!(h.held.is_empty());
    assert_eq!(h.disk.durable_names(), [file_name(0)]);
    h.hold = false;
    let c = h.connect();
    assert_eq!(h.accepting, vec![true, false]);
    assert_eq!(h.params2(c), (BS, 0, NO_LAST_BLOCK));
    assert_eq!(h.call(c, LbsRequest::Params), LbsResponse::Params { block_size: BS, next_block: 0 });
    assert!(h.exit.is_none());
}

#[test]
fn appended_blocks_read_back_exactly() {
    let mut h = Harness::fresh();
    let c = h.connect();
    assert_eq!(h.append(c, 0, 3), LbsResponse::Append(Some(3)));
    assert_blocks(&mut h, c, 0..3);
    assert_eq!(h.get(c, 3), None);
    assert_eq!(h.get(c, u64::MAX), None);
    assert_eq!(h.params2(c), (BS, 3, 2));
    assert_eq!(h.call(c, LbsRequest::Params), LbsResponse::Params { block_size: BS, next_block: 3 });
    assert!(h.closed(c).is_none());
}

#[test]
fn append_at_a_wrong_start_is_refused_and_the_connection_stays_open() {
    let mut h = Harness::fresh();
    let c = h.connect();
    assert_eq!(h.append(c, 1, 1), LbsResponse::Append(None));
    assert_eq!(h.append(c, 0, 2), LbsResponse::Append(Some(2)));
    assert_eq!(h.append(c, 0, 1), LbsResponse::Append(None));
    assert_eq!(h.append(c, 5, 1), LbsResponse::Append(None));
    assert!(h.closed(c).is_none());
    assert_blocks(&mut h, c, 0..2);
    assert_eq!(h.params2(c), (BS, 2, 1));
}

#[test]
fn pipelined_appends_are_all_acked_and_grouped_into_fewer_writes() {
    let mut h = Harness::fresh();
    let c = h.connect();
    h.hold = true;
    let writes_before = h.count_issued("write");
    let reqs = [(0, 1), (1, 2), (3, 1), (4, 3), (7, 2)];
    let ids: Vec<u64> = reqs.iter().map(|&(s, n)| h.send(c, &append_req(s, n))).collect();
    assert_eq!(h.held_verbs(), ["write"], "the first APPEND's batch starts at once, the rest wait");
    assert!(h.clients[&c].responses.is_empty());
    h.run();
    for (id, (s, n)) in ids.iter().zip(reqs) {
        assert_eq!(h.resp(c, *id), Some(&LbsResponse::Append(Some(s + n as u64))));
    }
    let writes = h.count_issued("write") - writes_before;
    assert_eq!(writes, 2, "one batch for the first APPEND, one for the four queued behind it");
    h.hold = false;
    assert_blocks(&mut h, c, 0..9);
    assert_eq!(h.params2(c), (BS, 9, 8));
}

#[test]
fn append_is_acked_only_after_its_fsync_and_a_new_files_directory_sync() {
    let mut h = Harness::new(tiny_files(), MemDisk::new());
    let c = h.connect();
    h.hold = true;
    let id = h.send(c, &append_req(0, 2));
    h.step("write");
    assert_eq!(h.held_verbs(), ["fsync"]);
    assert_eq!(h.resp(c, id), None, "acked before fsync");
    h.step("fsync");
    assert_eq!(h.resp(c, id), Some(&LbsResponse::Append(Some(2))));

    // The next batch starts a new file: create, write, fsync, fsync-dir.
    let id = h.send(c, &append_req(2, 1));
    assert!(matches!(&h.held[0].1, DiskOp::Open { name, create: true } if *name == file_name(2)));
    for verb in ["open", "write", "fsync"] {
        h.step(verb);
        assert_eq!(h.resp(c, id), None, "acked before the directory sync (after {verb})");
    }
    h.step("fsync-dir");
    assert_eq!(h.resp(c, id), Some(&LbsResponse::Append(Some(3))));
    assert!(h.held.is_empty());
    h.hold = false;
    assert_blocks(&mut h, c, 0..3);
}

#[test]
fn many_gets_are_outstanding_at_once_and_complete_in_any_order() {
    let mut h = Harness::fresh();
    let c = h.connect();
    assert_eq!(h.append(c, 0, 50), LbsResponse::Append(Some(50)));
    h.hold = true;
    let ids: Vec<u64> = (0..50).map(|b| h.send(c, &LbsRequest::Get { block: b })).collect();
    assert_eq!(h.held.len(), 50);
    assert!(h.held_verbs().iter().all(|v| *v == "read"));
    for i in (0..50).rev() {
        h.complete(i);
        assert!(ids[i..].iter().all(|id| h.resp(c, *id).is_some()), "response {i} not sent at once");
        assert!(ids[..i].iter().all(|id| h.resp(c, *id).is_none()), "responses before their reads");
    }
    for (b, id) in ids.iter().enumerate() {
        assert_eq!(h.resp(c, *id), Some(&LbsResponse::Get(Some(block_data(b as u64).into()))));
    }
}

#[test]
fn free_removes_old_files_but_never_the_newest() {
    let mut h = Harness::new(tiny_files(), MemDisk::new());
    let c = h.connect();
    for start in [0, 2, 4, 6] {
        assert_eq!(h.append(c, start, 2), LbsResponse::Append(Some(start + 2)));
    }
    let names: Vec<String> = [0, 2, 4, 6].map(file_name).into();
    assert_eq!(h.disk.durable_names(), names);

    // FREE past the end: acked, changes nothing.
    assert_eq!(h.call(c, LbsRequest::Free { keep_from: 100 }), LbsResponse::Free);
    assert_eq!(h.count_issued("remove"), 0);
    assert_blocks(&mut h, c, 0..8);

    let first_new = h.issued.len();
    assert_eq!(h.call(c, LbsRequest::Free { keep_from: 6 }), LbsResponse::Free);
    let verbs: Vec<&str> = h.issued[first_new..].iter().map(DiskOp::verb).collect();
    assert_eq!(verbs, ["remove", "fsync-dir", "remove", "fsync-dir", "remove", "fsync-dir"]);
    for (op, name) in h.issued[first_new..].iter().step_by(2).zip(&names) {
        assert_eq!(op, &DiskOp::Remove { name: name.clone() });
    }
    assert_eq!(h.disk.durable_names(), [file_name(6)]);
    assert_eq!(h.node.file_names(), [file_name(6)]);
    for b in 0..6 {
        assert_eq!(h.get(c, b), None, "freed block {b}");
    }
    assert_blocks(&mut h, c, 6..8);
    assert_eq!(h.params2(c), (BS, 8, 7));

    // Freeing everything keeps the newest file, and appends go on.
    assert_eq!(h.call(c, LbsRequest::Free { keep_from: 8 }), LbsResponse::Free);
    assert_eq!(h.disk.durable_names(), [file_name(6)]);
    assert_eq!(h.append(c, 8, 1), LbsResponse::Append(Some(9)));
    assert_blocks(&mut h, c, 8..9);
    assert!(h.disk.names().contains(&file_name(8)));
    assert!(h.closed(c).is_none() && h.exit.is_none());
}

/// A store with acked batches `batches`, then one more APPEND `torn` whose
/// write completed but whose fsync never did. Returns the harness (held).
fn acked_then_unsynced(batches: &[(u64, u32)], torn: (u64, u32)) -> Harness {
    let mut h = Harness::fresh();
    let c = h.connect();
    for &(s, n) in batches {
        assert_eq!(h.append(c, s, n), LbsResponse::Append(Some(s + n as u64)));
    }
    h.hold = true;
    let id = h.send(c, &append_req(torn.0, torn.1));
    h.step("write");
    assert_eq!(h.held_verbs(), ["fsync"]);
    assert_eq!(h.resp(c, id), None);
    h
}

fn restart(disk: MemDisk) -> (Harness, ConnId) {
    let mut h = Harness::new(LbsConfig::new(BS), disk);
    assert!(h.exit.is_none(), "refused to start: {:?}", h.exit);
    assert_eq!(h.accepting, vec![true]);
    let c = h.connect();
    (h, c)
}

#[test]
fn a_torn_tail_is_cut_at_restart_and_acked_blocks_survive() {
    let h = acked_then_unsynced(&[(0, 2), (2, 1)], (3, 3));
    let disk = h.disk.crash_keeping_unsynced_prefix(&file_name(0), rec() + rec() / 2);
    let (mut h, c) = restart(disk);
    let cut = DiskOp::Truncate { name: file_name(0), len: offset_of(0, 3) as u64 };
    assert!(h.issued.contains(&cut), "{:?}", h.issued);
    assert_eq!(h.params2(c), (BS, 3, 2));
    assert_blocks(&mut h, c, 0..3);
    for b in 3..6 {
        assert_eq!(h.get(c, b), None, "torn block {b}");
    }
    assert_eq!(h.append(c, 3, 1), LbsResponse::Append(Some(4)));
    assert_blocks(&mut h, c, 0..4);
}

#[test]
fn a_batch_torn_in_its_first_record_is_rolled_back_whole() {
    let h = acked_then_unsynced(&[(0, 2), (2, 1)], (3, 3));
    let mut disk = h.disk.crash_keeping_unsynced_prefix(&file_name(0), 3 * rec());
    assert_eq!(disk.file(&file_name(0)).unwrap().data.len(), offset_of(0, 6));
    disk.flip(&file_name(0), offset_of(0, 3) + 100, 0x40);
    let (mut h, c) = restart(disk);
    assert!(h.issued.contains(&DiskOp::Truncate { name: file_name(0), len: offset_of(0, 3) as u64 }));
    assert_eq!(h.params2(c), (BS, 3, 2));
    assert_blocks(&mut h, c, 0..3);
    for b in 3..6 {
        assert_eq!(h.get(c, b), None, "block {b} of the rolled-back batch");
    }
}

#[test]
fn damage_inside_the_newest_file_is_reported_by_get_never_returned() {
    let mut h = Harness::fresh();
    let c = h.connect();
    for (s, n) in [(0, 2), (2, 1), (3, 2)] {
        assert_eq!(h.append(c, s, n), LbsResponse::Append(Some(s + n as u64)));
    }
    let mut disk = h.disk.crash();
    disk.flip(&file_name(0), offset_of(0, 2) + 10, 0x01);
    let (mut h, c) = restart(disk);
    assert_eq!(h.params2(c), (BS, 5, 4));
    assert_blocks(&mut h, c, 0..2);
    assert_blocks(&mut h, c, 3..5);
    let id = h.send(c, &LbsRequest::Get { block: 2 });
    assert_eq!(h.resp(c, id), None, "corrupt data returned");
    let reason = h.closed(c).expect("connection dropped");
    assert!(reason.contains("corrupt") && reason.contains("block 2"), "{reason}");
    assert!(h.logs.iter().any(|(l, m)| *l == LogLevel::Error && m.contains("corrupt")));
    assert!(h.exit.is_none());
    assert_eq!(h.accepting.last(), Some(&true));
    let c = h.connect();
    assert_blocks(&mut h, c, 3..5);
}

#[test]
fn damage_in_an_acked_batch_before_a_torn_later_one_refuses_to_start() {
    let h = acked_then_unsynced(&[(0, 2), (2, 2)], (4, 2));
    let mut disk = h.disk.crash_keeping_unsynced_prefix(&file_name(0), rec() + rec() / 2);
    disk.flip(&file_name(0), offset_of(0, 2) + 5, 0x80);
    let h = Harness::new(LbsConfig::new(BS), disk);
    let exit = h.exit_reason();
    assert!(exit.failure);
    assert!(exit.message.contains("refusing to start"), "{}", exit.message);
    assert!(h.accepting.is_empty(), "accepted connections on a damaged store");
    assert_eq!(h.count_issued("truncate"), 0, "cut acknowledged data");
}

#[test]
fn a_misdirected_batch_over_older_acked_batches_refuses_to_start() {
    // Simulator seed 36 of lbs-everything.toml: the device reports the
    // write of batch 4..7 done but puts it one sector into the file, over
    // the records of the acknowledged batches 0..2, 2..3 and 3..4. Every
    // slot then reads as garbage, as after a torn write; cutting them would
    // silently lose four acknowledged blocks.
    let mut h = Harness::fresh();
    let c = h.connect();
    for (s, n) in [(0, 2), (2, 1), (3, 1)] {
        assert_eq!(h.append(c, s, n), LbsResponse::Append(Some(s + n as u64)));
    }
    h.hold = true;
    let id = h.send(c, &append_req(4, 3));
    let (op_id, op) = h.held.pop_front().expect("the batch's write");
    let DiskOp::Write { name, offset, data } = op else { panic!("not a write: {op:?}") };
    assert_eq!(offset as usize, offset_of(0, 4));
    let landed = DiskOp::Write { name, offset: FILE_HEADER_LEN + 512, data: data.clone() };
    assert!(h.disk.execute(&landed).is_ok());
    let result = Ok(DiskDone::Written { len_bytes: data.len() as u64 });
    h.node.handle_input(h.now, Input::Disk { id: op_id, result });
    h.drain();
    h.hold = false;
    h.run();
    assert_eq!(h.resp(c, id), Some(&LbsResponse::Append(Some(7))));
    assert_eq!(h.disk.file(&file_name(0)).unwrap().data.len(), offset_of(0, 4));

    let h = Harness::new(LbsConfig::new(BS), h.disk.crash());
    let exit = h.exit_reason();
    assert!(exit.failure);
    assert!(
        exit.message.contains("refusing to start") && exit.message.contains("misdirected"),
        "{}",
        exit.message
    );
    assert_eq!(h.count_issued("truncate"), 0, "cut acknowledged data");
}

#[test]
fn reopening_with_another_block_size_exits_naming_both() {
    let h = Harness::fresh();
    let h = Harness::new(LbsConfig::new(1024), h.disk.crash());
    let exit = h.exit_reason();
    assert!(exit.failure);
    assert!(exit.message.contains("512") && exit.message.contains("1024"), "{}", exit.message);
    assert!(h.accepting.is_empty());
    assert_eq!(h.count_issued("write") + h.count_issued("truncate") + h.count_issued("remove"), 0);
}

#[test]
fn a_failed_fsync_stops_the_node_without_acking() {
    let mut h = Harness::fresh();
    let c = h.connect();
    assert_eq!(h.append(c, 0, 2), LbsResponse::Append(Some(2)));
    h.disk.fail_next("fsync", DiskErrorKind::Io);
    let id = h.send(c, &append_req(2, 1));
    let exit = h.exit_reason().clone();
    assert!(exit.failure, "{exit:?}");
    assert!(exit.message.contains("fsync"), "{}", exit.message);
    assert_eq!(h.resp(c, id), None, "acked an APPEND whose fsync failed");
    assert!(h.closed(c).is_some());
    assert_eq!(h.count_issued("fsync"), 3, "the fsync was retried");

    // A stopped node ignores everything.
    h.node.handle_input(h.now, Input::Accepted { conn: ConnId(99) });
    h.node.handle_input(h.now, Input::Received { conn: c, data: Bytes::from_static(b"junk") });
    h.node.handle_input(h.now, Input::Closed { conn: c, reason: ConnClosed::PeerClosed });
    h.node.handle_input(h.now, Input::Timeout);
    h.drain();
    assert!(h.after_exit.is_empty(), "{:?}", h.after_exit);
    assert_eq!(h.node.poll_timeout(), None);

    let (mut h, c) = restart(h.disk.crash());
    // The failed fsync dropped the unsynced write: the store ends at the
    // last acked block, and every acked block reads back.
    assert_eq!(h.params2(c), (BS, 2, 1));
    assert_blocks(&mut h, c, 0..2);
    assert_eq!(h.get(c, 2), None);
    assert_eq!(h.append(c, 2, 1), LbsResponse::Append(Some(3)));
}

#[test]
fn a_bad_crc_drops_the_connection_and_the_next_one_is_served() {
    let mut h = Harness::fresh();
    let c = h.connect();
    assert_eq!(h.append(c, 0, 1), LbsResponse::Append(Some(1)));
    let mut out = BytesMut::new();
    LbsRequest::Get { block: 0 }.encode(7, &mut out);
    let last = out.len() - 1;
    out[last] ^= 0x01;
    h.send_raw(c, &out);
    let reason = h.closed(c).expect("dropped");
    assert!(reason.contains("CRC"), "{reason}");
    assert_eq!(h.clients[&c].responses.len(), 1, "answered a packet with a bad CRC");
    assert_eq!(h.accepting.last(), Some(&true));
    let c = h.connect();
    assert_blocks(&mut h, c, 0..1);
    assert_eq!(h.params2(c), (BS, 1, 0));
}

#[test]
fn an_append_whose_data_is_not_count_blocks_drops_the_connection() {
    let mut h = Harness::fresh();
    let c = h.connect();
    let bad = LbsRequest::Append { count: 2, start: 0, data: blocks(0, 1) };
    let id = h.send(c, &bad);
    assert_eq!(h.resp(c, id), None);
    assert!(h.closed(c).expect("dropped").contains("APPEND"));
    assert_eq!(h.count_issued("write"), 1, "only the new store's header was written");
    let c = h.connect();
    assert_eq!(h.params2(c), (BS, 0, NO_LAST_BLOCK));
}

#[test]
fn an_unknown_request_type_drops_the_connection() {
    let mut h = Harness::fresh();
    let c = h.connect();
    let mut out = BytesMut::new();
    encode_packet(&mut out, 5, &0x0000_0130u32.to_be_bytes()); // a kvlds GET type
    h.send_raw(c, &out);
    assert!(h.closed(c).expect("dropped").contains("unknown request type"));
    // A truncated record, too.
    let c = h.connect();
    let mut out = BytesMut::new();
    encode_packet(&mut out, 6, &[0, 0, 0, request_type::GET as u8, 0, 0]);
    h.send_raw(c, &out);
    assert!(h.closed(c).expect("dropped").contains("truncated"));
    let c = h.connect();
    assert_eq!(h.params2(c), (BS, 0, NO_LAST_BLOCK));
}

#[test]
fn a_second_connection_is_refused_while_one_is_open() {
    let mut h = Harness::fresh();
    let a = h.connect();
    let b = h.connect();
    assert!(h.closed(b).is_some(), "second connection not refused");
    assert!(h.closed(a).is_none());
    assert_eq!(h.append(a, 0, 1), LbsResponse::Append(Some(1)));
    h.feed(Input::Closed { conn: a, reason: ConnClosed::PeerClosed });
    assert_eq!(h.accepting.last(), Some(&true));
    let c = h.connect();
    assert!(h.closed(c).is_none());
    assert_blocks(&mut h, c, 0..1);
}

#[test]
fn a_client_closing_mid_append_gets_nothing_and_the_next_client_continues() {
    let mut h = Harness::fresh();
    let c = h.connect();
    h.hold = true;
    let first = h.send(c, &append_req(0, 1));
    let _queued = h.send(c, &append_req(1, 1));
    h.step("write");
    h.feed(Input::Closed { conn: c, reason: ConnClosed::Failed("reset".into()) });
    assert_eq!(h.accepting.last(), Some(&false), "accepting while a batch is in flight");
    h.run();
    assert_eq!(h.accepting.last(), Some(&true));
    assert_eq!(h.resp(c, first), None);
    h.hold = false;
    let c = h.connect();
    assert_eq!(h.params2(c), (BS, 1, 0), "the batch in flight finished; the queued APPEND was dropped");
    assert_eq!(h.append(c, 1, 1), LbsResponse::Append(Some(2)));
    assert_blocks(&mut h, c, 0..2);
}

#[test]
fn read_latency_holds_get_responses_until_the_timer() {
    let latency = 5_000_000;
    let mut h = Harness::new(LbsConfig { read_latency_ns: latency, ..LbsConfig::new(BS) }, MemDisk::new());
    let c = h.connect();
    assert_eq!(h.append(c, 0, 1), LbsResponse::Append(Some(1)));
    assert_eq!(h.node.poll_timeout(), None);
    let sent_at = h.now;
    let id = h.send(c, &LbsRequest::Get { block: 0 });
    assert_eq!(h.resp(c, id), None, "GET answered before the latency");
    assert_eq!(h.node.poll_timeout(), Some(sent_at.after_ns(latency)));
    h.advance(latency - 1);
    h.feed(Input::Timeout); // early: nothing is due yet
    assert_eq!(h.resp(c, id), None);
    h.advance(1);
    assert_eq!(h.resp(c, id), Some(&LbsResponse::Get(Some(block_data(0).into()))));
    assert_eq!(h.node.poll_timeout(), None);
}

#[test]
fn short_reads_and_writes_still_give_exact_blocks() {
    let mut disk = MemDisk::new();
    disk.short_io = true;
    let mut h = Harness::new(LbsConfig::new(BS), disk);
    assert_eq!(h.accepting, vec![true]);
    let c = h.connect();
    let writes = h.count_issued("write");
    assert_eq!(h.append(c, 0, 3), LbsResponse::Append(Some(3)));
    assert!(h.count_issued("write") - writes > 1, "the short write was not continued");
    let reads = h.count_issued("read");
    assert_blocks(&mut h, c, 0..3);
    assert!(h.count_issued("read") - reads > 3, "the short reads were not continued");
    assert_eq!(h.disk.file(&file_name(0)).unwrap().data.len(), offset_of(0, 3));
}

/// The contract allows any Read to come back short, at recovery too: a short
/// read of a file header must be continued, not taken for a damaged header.
#[test]
fn recovery_copes_with_short_reads() {
    let mut h = Harness::fresh();
    let c = h.connect();
    assert_eq!(h.append(c, 0, 3), LbsResponse::Append(Some(3)));
    let mut disk = h.disk.crash();
    disk.short_io = true;
    let (mut h, c) = restart(disk);
    assert_eq!(h.params2(c), (BS, 3, 2));
    assert_blocks(&mut h, c, 0..3);
}

#[test]
fn a_new_file_that_became_visible_before_its_header_is_removed_at_restart() {
    let mut h = Harness::new(tiny_files(), MemDisk::new());
    let c = h.connect();
    assert_eq!(h.append(c, 0, 2), LbsResponse::Append(Some(2)));
    assert_eq!(h.append(c, 2, 2), LbsResponse::Append(Some(4)));
    h.hold = true;
    h.send(c, &append_req(4, 1)); // starts blocks-4
    h.step("open");
    assert_eq!(h.call(c, LbsRequest::Free { keep_from: 2 }), LbsResponse::Free);
    assert_eq!(h.held_verbs(), ["write", "remove"]);
    h.complete_verb("remove");
    h.complete_verb("fsync-dir"); // makes the empty blocks-4 durable too
    assert_eq!(h.disk.durable_names(), [file_name(2), file_name(4)]);

    let (mut h, c) = restart(h.disk.crash());
    assert!(h.issued.contains(&DiskOp::Remove { name: file_name(4) }));
    assert_eq!(h.params2(c), (BS, 4, 3));
    assert_blocks(&mut h, c, 2..4);
    assert_eq!(h.get(c, 0), None);
    assert_eq!(h.append(c, 4, 1), LbsResponse::Append(Some(5)));
    assert_blocks(&mut h, c, 4..5);
}

#[test]
fn reading_stops_at_the_pending_bound_and_resumes() {
    let mut h = Harness::fresh();
    let c = h.connect();
    assert_eq!(h.append(c, 0, 1), LbsResponse::Append(Some(1)));
    h.hold = true;
    let ids: Vec<u64> =
        (0..=PENDING_REQUESTS_MAX).map(|_| h.send(c, &LbsRequest::Get { block: 0 })).collect();
    assert_eq!(h.held.len(), PENDING_REQUESTS_MAX, "requests beyond the bound were started");
    assert_eq!(h.read_interest, [(c, false)]);
    h.complete(0);
    assert_eq!(h.held.len(), PENDING_REQUESTS_MAX, "the request waiting at the bound was not started");
    h.run();
    assert_eq!(h.read_interest.last(), Some(&(c, true)));
    for id in ids {
        assert_eq!(h.resp(c, id), Some(&LbsResponse::Get(Some(block_data(0).into()))));
    }
    assert!(h.closed(c).is_none());
}

#[test]
fn without_fsync_nothing_is_synced_and_blocks_still_read_back() {
    let cfg = LbsConfig { fsync: false, ..tiny_files() };
    let mut h = Harness::new(cfg.clone(), MemDisk::new());
    let c = h.connect();
    for start in [0, 2, 4] {
        assert_eq!(h.append(c, start, 2), LbsResponse::Append(Some(start + 2)));
    }
    assert_eq!(h.call(c, LbsRequest::Free { keep_from: 2 }), LbsResponse::Free);
    assert_eq!(h.count_issued("fsync") + h.count_issued("fsync-dir"), 0);
    assert!(h.logs.iter().any(|(_, m)| m.contains("WITHOUT fsync")));
    assert_blocks(&mut h, c, 2..6);
    // A restart of the process alone (no machine crash) loses nothing.
    let disk = std::mem::take(&mut h.disk);
    let mut h = Harness::new(cfg, disk);
    let c = h.connect();
    assert_eq!(h.params2(c), (BS, 6, 5));
    assert_blocks(&mut h, c, 2..6);
}

#[test]
fn memdisk_crash_keeps_only_durable_state() {
    let mut d = MemDisk::new();
    let op = |name: &str| DiskOp::Open { name: name.into(), create: true };
    let write = |data: &'static [u8]| DiskOp::Write { name: "f".into(), offset: 0, data: data.into() };
    d.execute(&op("f")).unwrap();
    d.execute(&write(b"abc")).unwrap();
    assert!(d.crash().names().is_empty(), "a name not yet durable survived");
    d.execute(&DiskOp::SyncDir).unwrap();
    d.execute(&DiskOp::SyncFile { name: "f".into() }).unwrap();
    d.execute(&DiskOp::Write { name: "f".into(), offset: 3, data: Bytes::from_static(b"defg") }).unwrap();
    assert_eq!(d.crash().file("f").unwrap().data, b"abc");
    assert_eq!(d.crash_keeping_unsynced_prefix("f", 2).file("f").unwrap().data, b"abcde");
    d.execute(&DiskOp::Remove { name: "f".into() }).unwrap();
    assert_eq!(d.crash().file("f").unwrap().data, b"abc", "a removal not yet durable stuck");
    d.fail_next("read", DiskErrorKind::Io);
    let read = DiskOp::Read { name: "f".into(), offset: 0, len: 1 };
    assert!(d.execute(&read).is_err());
    assert_eq!(d.execute(&read).unwrap_err().kind, DiskErrorKind::NotFound);
    assert_eq!(d.execute(&op("g")), Ok(DiskDone::Opened { len_bytes: 0 }));
}

// ----- findings of the code review, each as a test -------------------------

#[test]
fn a_torn_header_of_a_new_files_whole_first_batch_is_rewritten() {
    let mut h = Harness::new(tiny_files(), MemDisk::new());
    let c = h.connect();
    assert_eq!(h.append(c, 0, 2), LbsResponse::Append(Some(2)));
    h.hold = true;
    h.send(c, &append_req(2, 1)); // starts blocks-2: header and block 2 in one write
    h.step("open");
    h.step("write");
    // The directory entry reached the disk, and so did block 2's sectors,
    // but the header's sector was torn.
    h.disk.execute(&DiskOp::SyncDir).unwrap();
    let mut disk = h.disk.crash_keeping_unsynced_prefix(&file_name(2), offset_of(2, 3));
    disk.flip(&file_name(2), 9, 0xff);
    let (mut h, c) = restart(disk);
    assert!(h.logs.iter().any(|(_, m)| m.contains("rewriting a header")), "{:?}", h.logs);
    assert_eq!(h.params2(c), (BS, 3, 2));
    assert_blocks(&mut h, c, 0..3);
    // The mended header is durable: a power loss now keeps everything.
    let (mut h, c) = restart(h.disk.crash());
    assert_eq!(h.params2(c), (BS, 3, 2));
    assert_blocks(&mut h, c, 0..3);
}

#[test]
fn what_recovery_serves_after_a_process_crash_is_made_durable_first() {
    let mut h = Harness::fresh();
    let c = h.connect();
    assert_eq!(h.append(c, 0, 2), LbsResponse::Append(Some(2)));
    h.hold = true;
    h.send(c, &append_req(2, 1));
    h.step("write"); // in the page cache, not synced; then the process dies
    let disk = h.disk.clone();
    let (mut h, c) = restart(disk);
    let fsyncs = h.count_issued("fsync");
    assert!(fsyncs >= 1 && h.count_issued("fsync-dir") >= 1, "recovery synced nothing: {:?}", h.issued);
    assert_eq!(h.params2(c), (BS, 3, 2), "the unacknowledged but whole block 2 is kept");
    assert_blocks(&mut h, c, 0..3);
    // A power loss after that must not take back what was served.
    let (mut h, c) = restart(h.disk.crash());
    assert_eq!(h.params2(c), (BS, 3, 2));
    assert_blocks(&mut h, c, 0..3);
}

#[test]
fn pages_kept_clean_after_a_failed_fsync_are_not_served_after_restart() {
    let mut disk = MemDisk::new();
    disk.failed_fsync_keeps_pages = true;
    let mut h = Harness::new(LbsConfig::new(BS), disk);
    let c = h.connect();
    assert_eq!(h.append(c, 0, 2), LbsResponse::Append(Some(2)));
    h.disk.fail_next("fsync", DiskErrorKind::Io);
    h.send(c, &append_req(2, 1));
    assert!(h.exit.is_some(), "a failed fsync must stop lbs");
    // The page cache still holds block 2, marked clean, never written.
    assert!(h.disk.file(&file_name(0)).unwrap().data.len() >= offset_of(0, 3));
    let disk = h.disk.clone();
    let (mut h, c) = restart(disk);
    assert!(h.count_issued("drop-cache") >= 1, "{:?}", h.issued);
    assert_eq!(h.params2(c), (BS, 2, 1), "block 2 never reached the disk");
    assert_eq!(h.get(c, 2), None);
    let (mut h, c) = restart(h.disk.crash());
    assert_eq!(h.params2(c), (BS, 2, 1));
    assert_blocks(&mut h, c, 0..2);
}

#[test]
fn free_past_the_durable_end_does_not_outlive_a_dropped_connection() {
    let mut h = Harness::new(tiny_files(), MemDisk::new());
    let a = h.connect();
    assert_eq!(h.append(a, 0, 1), LbsResponse::Append(Some(1)));
    h.hold = true;
    h.send(a, &append_req(1, 1)); // being written
    h.send(a, &append_req(2, 10)); // queued
    h.send(a, &LbsRequest::Free { keep_from: 12 });
    h.feed(Input::Closed { conn: a, reason: ConnClosed::PeerClosed });
    h.run();
    h.hold = false;
    let b = h.connect();
    assert_eq!(h.params2(b), (BS, 2, 1));
    assert_eq!(h.append(b, 2, 3), LbsResponse::Append(Some(5)));
    assert_blocks(&mut h, b, 1..5);
    let (mut h, c) = restart(h.disk.crash());
    assert_blocks(&mut h, c, 1..5);
}

#[test]
fn an_append_larger_than_a_batch_is_written_in_several_and_acked_once() {
    const BIG: u32 = 131_072;
    let mut h = Harness::new(LbsConfig::new(BIG), MemDisk::new());
    let c = h.connect();
    let count = (kivaloo_nodes::lbs::BATCH_DATA_BYTES_MAX / BIG as usize) as u32 + 3;
    let data: Vec<u8> = (0..count as usize * BIG as usize).map(|i| (i / 4093) as u8).collect();
    let resp = h.call(c, LbsRequest::Append { count, start: 0, data: data.clone().into() });
    assert_eq!(resp, LbsResponse::Append(Some(count as u64)));
    assert_eq!(h.count_issued("write"), 1 + 2, "the header, then two batches");
    for b in [0u64, count as u64 - 1] {
        let want = &data[b as usize * BIG as usize..(b as usize + 1) * BIG as usize];
        assert_eq!(h.get(c, b).as_deref(), Some(want), "block {b}");
    }
}

#[test]
fn responses_made_before_a_bad_packet_are_sent_before_the_close() {
    let mut h = Harness::fresh();
    let c = h.connect();
    let id = h.next_id;
    h.clients.get_mut(&c).unwrap().kinds.insert(id, LbsRequestKind::Params2);
    let mut out = BytesMut::new();
    LbsRequest::Params2.encode(id, &mut out);
    let mut bad = BytesMut::new();
    LbsRequest::Params2.encode(id + 1, &mut bad);
    bad[3] ^= 1;
    out.extend_from_slice(&bad);
    h.feed(Input::Received { conn: c, data: out.freeze() });
    assert!(h.closed(c).is_some());
    assert!(matches!(h.resp(c, id), Some(LbsResponse::Params2 { .. })), "the answer made first was lost");
}
