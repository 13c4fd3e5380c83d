//! The kvlds clients and their oracle. One or more clients (each one
//! connection at a time, numbered by the world's slots; several only
//! through a mux) pipeline random requests (SET, CAS, ADD, MODIFY, DELETE,
//! CAD, GET, RANGE, now and then PARAMS) over one small key space drawn per
//! seed, in phases that grow the tree, shrink it (deletes: merges,
//! deroots) or mix, reconnecting after every crash or reset. Each client
//! picks its own request IDs from 1, so that IDs repeat across
//! connections (a mux must tell them apart). Every request is recorded in
//! one history with its virtual invocation and completion times, its
//! connection and its place in that connection's order; a request whose
//! connection broke before its response is indeterminate (it may or may
//! not have taken effect).
//!
//! After faults stop, a liveness phase: every client (re)connects and has
//! one fresh GET answered, and nothing stays pending.
//!
//! Checked as responses arrive:
//! - every response decodes as the answer to its request (PROTOCOL.md);
//! - PARAMS reports the limits for the block size;
//! - RANGE is well formed: keys in `[start, end)`, strictly increasing,
//!   all but the last pair within the byte budget, `next` past the last
//!   key and past `start` (progress), not past `end`; `start >= end`
//!   gives no pairs and `next = end`;
//! - honesty: no GET or RANGE returns a key or value that was never sent
//!   for that key.
//!
//! At the end (after a last crash of every component and a restart, the
//! client reads every key back with GET and pages through everything with
//! RANGE) the whole history must be linearizable from an empty store
//! (`linearizability::check`): consistency and durability at once, since
//! an acknowledged change that was lost makes the read-back contradict it.
//!
//! When the disk was damaged (bit rot, misdirected writes), acknowledged
//! data may be lost or reported missing: the history is then checked up to
//! the first damage only (requests in flight at that instant become
//! indeterminate), and honesty over the whole run.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::{Bytes, BytesMut};
use kivaloo::kvlds_proto::{KvldsRequest, KvldsRequestKind, KvldsResponse};
use kivaloo::packet::Packet;

use crate::linearizability::{self, Call, History, KvOp, KvResult, RangeCall};
use crate::rng::Stream;

/// Calls on one key in flight at once: bounds the linearizability search.
pub const IN_FLIGHT_PER_KEY_MAX: u32 = 4;
/// RANGE requests in flight at once.
pub const RANGES_IN_FLIGHT_MAX: u32 = 2;
/// RANGE requests in flight at once with big RANGEs (`big_ranges`): enough
/// for one client's reservations to pass the mux's 4 MiB bound.
pub const BIG_RANGES_IN_FLIGHT_MAX: u32 = 6;
/// The byte budget of every big RANGE (kvlds's cap).
pub const BIG_RANGE_BYTES: u32 = 1 << 20;
/// Values remembered per key as CAS and CAD comparands.
const RECENT_VALUES_MAX: usize = 4;

/// kvlds's default longest key and value for a block size (DESIGN.md:
/// 512+: 64/96, 1024+: 128/192, 2048+: 255/255).
pub fn limits_for_block_size(block_size: u32) -> (u32, u32) {
    match block_size {
        0..=1023 => (64, 96),
        1024..=2047 => (128, 192),
        _ => (255, 255),
    }
}

/// A call as the client records it (converted to the checker's types when
/// checked).
#[derive(Debug, Clone)]
enum Op {
    Set(Bytes),
    Cas { old: Bytes, new: Bytes },
    Add(Bytes),
    Modify(Bytes),
    Delete,
    Cad(Bytes),
    Get,
}

impl Op {
    fn is_modifying(&self) -> bool {
        !matches!(self, Op::Get)
    }

    fn to_checker(&self) -> KvOp {
        match self.clone() {
            Op::Set(value) => KvOp::Set { value },
            Op::Cas { old, new } => KvOp::Cas { old, new },
            Op::Add(value) => KvOp::Add { value },
            Op::Modify(value) => KvOp::Modify { value },
            Op::Delete => KvOp::Delete,
            Op::Cad(old) => KvOp::Cad { old },
            Op::Get => KvOp::Get,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Op::Set(_) => "SET",
            Op::Cas { .. } => "CAS",
            Op::Add(_) => "ADD",
            Op::Modify(_) => "MODIFY",
            Op::Delete => "DELETE",
            Op::Cad(_) => "CAD",
            Op::Get => "GET",
        }
    }
}

#[derive(Debug, Clone)]
enum Outcome {
    Done(bool),
    Value(Option<Bytes>),
}

#[derive(Debug, Clone)]
struct CallRecord {
    conn: u64,
    seq: u64,
    key: Bytes,
    op: Op,
    invoked_ns: u64,
    completed: Option<(u64, Outcome)>,
}

#[derive(Debug, Clone)]
struct RangeRecord {
    conn: u64,
    seq: u64,
    start: Bytes,
    end: Bytes,
    invoked_ns: u64,
    completed_ns: u64,
    pairs: Vec<(Bytes, Bytes)>,
    next: Bytes,
}

/// A request awaiting its response on the current connection.
#[derive(Debug)]
enum Pending {
    Call { key_index: usize, seq: u64, op: Op, invoked_ns: u64 },
    Range { seq: u64, start: Bytes, end: Bytes, max_bytes: u32, invoked_ns: u64, paging: bool },
    Params,
}

/// What a phase of the workload favours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Mostly inserts: splits, root splits.
    Grow,
    /// Mostly deletes: merges, deroots.
    Shrink,
    /// A bit of everything.
    Mixed,
    /// SETs of the fixed key set, a few GETs: the steady update load of
    /// the space oracle (the only mode when the workload asks for it).
    Update,
}

#[derive(Debug, Clone, Copy)]
enum Pick {
    Set,
    Cas,
    Add,
    Modify,
    Delete,
    Cad,
    Get,
    Range,
    Params,
}

/// Weights (out of 100) of each request in each mode.
fn weights(mode: Mode) -> [(Pick, u64); 9] {
    use Pick::*;
    match mode {
        Mode::Grow => [
            (Set, 30),
            (Add, 12),
            (Modify, 6),
            (Cas, 8),
            (Delete, 4),
            (Cad, 3),
            (Get, 22),
            (Range, 13),
            (Params, 2),
        ],
        Mode::Shrink => [
            (Set, 5),
            (Add, 3),
            (Modify, 3),
            (Cas, 4),
            (Delete, 35),
            (Cad, 15),
            (Get, 20),
            (Range, 13),
            (Params, 2),
        ],
        Mode::Update => [
            (Set, 90),
            (Add, 0),
            (Modify, 0),
            (Cas, 0),
            (Delete, 0),
            (Cad, 0),
            (Get, 10),
            (Range, 0),
            (Params, 0),
        ],
        Mode::Mixed => [
            (Set, 18),
            (Add, 8),
            (Modify, 8),
            (Cas, 10),
            (Delete, 14),
            (Cad, 8),
            (Get, 20),
            (Range, 12),
            (Params, 2),
        ],
    }
}

/// The full read-back's paging through every key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Paging {
    /// The next page starts at this key.
    From(Bytes),
    /// A page is in flight.
    InFlight,
    Done,
}

/// Counts for reports and coverage.
#[derive(Debug, Clone, Default)]
pub struct KvldsStats {
    /// Workload requests sent (not the final read-back).
    pub requests: u64,
    pub responses: u64,
    /// Modifying requests answered.
    pub acked: u64,
    /// CAS, ADD, MODIFY and CAD answered "not done".
    pub conditions_failed: u64,
    /// Modifying requests left without a response (indeterminate).
    pub indeterminate: u64,
    pub connections: u64,
    pub range_pairs: u64,
}

/// Whether a client has shown the store serves it in the liveness phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// Not in the liveness phase.
    Off,
    /// It must send a fresh request.
    Needed,
    /// Its fresh request (this id) is in flight.
    Sent(u64),
    /// Answered.
    Done,
}

/// One client: its current connection and what waits on it.
#[derive(Debug)]
struct Slot {
    connected: bool,
    /// The current connection's number in the history (unique in the run).
    conn: u64,
    /// The next request's place in the connection's order.
    seq: u64,
    /// The next request ID (from 1 on each connection).
    next_id: u64,
    pending: BTreeMap<u64, Pending>,
    probe: Probe,
}

/// The clients, their history, and the oracle.
pub struct KvldsClient {
    key_len_max: u32,
    value_len_max: u32,
    in_flight_max: u64,
    budget: u64,
    keys: Vec<Bytes>,
    key_index: BTreeMap<Bytes, usize>,
    /// Calls in flight per key.
    per_key: Vec<u32>,
    /// Values recently sent or read per key (CAS and CAD comparands).
    recent: Vec<VecDeque<Bytes>>,
    /// Every value ever sent for each key (honesty).
    written: Vec<BTreeSet<Bytes>>,
    ranges_in_flight: u32,
    ranges_in_flight_max: u32,
    /// Every RANGE asks for [`BIG_RANGE_BYTES`].
    big_ranges: bool,
    slots: Vec<Slot>,
    /// Connections opened so far (the last one's number).
    conns_opened: u64,
    /// Per connection, after when none of its requests can take effect.
    effects_end_ns: BTreeMap<u64, u64>,
    calls: Vec<CallRecord>,
    ranges: Vec<RangeRecord>,
    mode: Mode,
    mode_left: u64,
    verifying: bool,
    verify_keys: Vec<usize>,
    paging: Paging,
    verified: bool,
    liveness: bool,
    /// Ids of the requests sent since `take_issued`.
    issued: Vec<u64>,
    /// Keep a readable note of each response (for the trace).
    keep_notes: bool,
    /// The last response, readable, when notes are kept.
    response_note: Option<String>,
    pub stats: KvldsStats,
}

/// A short readable form of a key or value.
fn show(b: &[u8]) -> String {
    let hex: String = b.iter().take(6).map(|x| format!("{x:02x}")).collect();
    if b.len() > 6 {
        format!("{hex}..({})", b.len())
    } else if b.is_empty() {
        "\"\"".into()
    } else {
        hex
    }
}

impl KvldsClient {
    /// `clients` clients of a store of `block_size`-byte blocks that
    /// issue `budget` requests between them, each at most `in_flight_max`
    /// at once, over `keys` distinct keys drawn from `rng`.
    pub fn new(
        block_size: u32,
        clients: usize,
        in_flight_max: u64,
        budget: u64,
        keys: u64,
        rng: &mut Stream,
    ) -> KvldsClient {
        let (key_len_max, value_len_max) = limits_for_block_size(block_size);
        let mut set = BTreeSet::new();
        let mut attempts = 0;
        while (set.len() as u64) < keys && attempts < keys * 100 {
            attempts += 1;
            set.insert(random_bytes(rng, key_len_max));
        }
        let keys: Vec<Bytes> = set.into_iter().collect();
        let key_index = keys.iter().enumerate().map(|(i, k)| (k.clone(), i)).collect();
        let n = keys.len();
        KvldsClient {
            key_len_max,
            value_len_max,
            in_flight_max,
            budget,
            keys,
            key_index,
            per_key: vec![0; n],
            recent: vec![VecDeque::new(); n],
            written: vec![BTreeSet::new(); n],
            ranges_in_flight: 0,
            ranges_in_flight_max: RANGES_IN_FLIGHT_MAX,
            big_ranges: false,
            slots: (0..clients.max(1))
                .map(|_| Slot {
                    connected: false,
                    conn: 0,
                    seq: 0,
                    next_id: 1,
                    pending: BTreeMap::new(),
                    probe: Probe::Off,
                })
                .collect(),
            conns_opened: 0,
            effects_end_ns: BTreeMap::new(),
            calls: Vec::new(),
            ranges: Vec::new(),
            mode: Mode::Grow,
            mode_left: 0,
            verifying: false,
            verify_keys: Vec::new(),
            paging: Paging::Done,
            verified: false,
            liveness: false,
            issued: Vec::new(),
            keep_notes: false,
            response_note: None,
            stats: KvldsStats::default(),
        }
    }

    /// Keep a readable note of each response, for the trace.
    pub fn keep_notes(&mut self) {
        self.keep_notes = true;
    }

    /// The ids of the requests sent since the last call, in order.
    pub fn take_issued(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.issued)
    }

    /// The last response, readable (when notes are kept).
    pub fn take_response_note(&mut self) -> Option<String> {
        self.response_note.take()
    }

    /// How many clients there are.
    pub fn clients(&self) -> usize {
        self.slots.len()
    }

    /// Whether client `slot` is connected.
    pub fn connected(&self, slot: usize) -> bool {
        self.slots[slot].connected
    }

    /// Client `slot`'s pending request `id`, readable.
    pub fn describe_request(&self, slot: usize, id: u64) -> String {
        let s = &self.slots[slot];
        let what = match s.pending.get(&id) {
            None => "(no longer pending)".to_string(),
            Some(Pending::Params) => "PARAMS".into(),
            Some(Pending::Range { start, end, max_bytes, paging, .. }) => format!(
                "RANGE [{}, {}) {max_bytes} bytes{}",
                show(start),
                show(end),
                if *paging { " (read-back)" } else { "" }
            ),
            Some(Pending::Call { key_index, op, .. }) => {
                let key = show(&self.keys[*key_index]);
                match op {
                    Op::Set(v) => format!("SET {key} = {}", show(v)),
                    Op::Cas { old, new } => format!("CAS {key} {} -> {}", show(old), show(new)),
                    Op::Add(v) => format!("ADD {key} = {}", show(v)),
                    Op::Modify(v) => format!("MODIFY {key} = {}", show(v)),
                    Op::Delete => format!("DELETE {key}"),
                    Op::Cad(old) => format!("CAD {key} if {}", show(old)),
                    Op::Get => format!("GET {key}"),
                }
            }
        };
        let seq = match s.pending.get(&id) {
            Some(Pending::Call { seq, .. } | Pending::Range { seq, .. }) => format!(" seq {seq}"),
            _ => String::new(),
        };
        format!("request {id:#x} [client {slot}, connection {}{seq}]: {what}", s.conn)
    }

    /// Whether the workload budget is spent and nothing is pending.
    pub fn workload_done(&self) -> bool {
        self.stats.requests >= self.budget && self.in_flight() == 0
    }

    /// Whether the final read-back is complete.
    pub fn verified(&self) -> bool {
        self.verified
    }

    /// Requests in flight, over every client.
    pub fn in_flight(&self) -> usize {
        self.slots.iter().map(|s| s.pending.len()).sum()
    }

    /// Starts the final read-back (after faults stop) on client 0's next
    /// connection; the other clients stay idle.
    pub fn start_verify(&mut self) {
        self.verifying = true;
        self.liveness = false;
    }

    /// Faults stopped: the workload stops, and every client must
    /// (re)connect, see what it has pending answered, and have one fresh
    /// GET answered.
    pub fn start_liveness(&mut self) {
        self.liveness = true;
        for s in &mut self.slots {
            s.probe = Probe::Needed;
        }
    }

    /// Whether every client has been served since faults stopped and
    /// nothing is pending.
    pub fn liveness_done(&self) -> bool {
        self.slots.iter().all(|s| s.probe == Probe::Done && s.pending.is_empty())
    }

    /// Whether client `slot` has had its fresh GET answered and waits for
    /// nothing (it may then make room for the others at a mux's limit).
    pub fn liveness_done_for(&self, slot: usize) -> bool {
        let s = &self.slots[slot];
        s.probe == Probe::Done && s.pending.is_empty()
    }

    /// What keeps the liveness phase from ending, readable.
    pub fn liveness_state(&self) -> String {
        let parts: Vec<String> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.probe != Probe::Done || !s.pending.is_empty())
            .map(|(i, s)| {
                format!(
                    "client {i}: {}, fresh GET {:?}, {} pending",
                    if s.connected { "connected" } else { "not connected" },
                    s.probe,
                    s.pending.len()
                )
            })
            .collect();
        parts.join("; ")
    }

    /// Every component was crashed (lbs by a power loss) at `now_ns`: no
    /// request sent on a connection so far can take effect later. The
    /// checker is told so, which makes an unanswered write unable to
    /// "arrive" after later acknowledged ones (it would hide a lost update
    /// that fell back to its value).
    pub fn effects_end_now(&mut self, now_ns: u64) {
        for conn in 0..=self.conns_opened {
            self.effects_end_ns.entry(conn).or_insert(now_ns);
        }
    }

    /// When the oldest request still waiting for its answer was sent.
    ///
    /// A slot's pending requests all belong to its current connection (a
    /// disconnection takes them), whose IDs grow with the time they are
    /// sent: the first one with a time is the slot's oldest. (The run loop
    /// asks after every event: this is one of the simulator's hot paths.)
    pub fn oldest_pending_ns(&self) -> Option<u64> {
        self.slots
            .iter()
            .filter_map(|s| {
                s.pending.values().find_map(|p| match p {
                    Pending::Call { invoked_ns, .. } | Pending::Range { invoked_ns, .. } => Some(*invoked_ns),
                    Pending::Params => None,
                })
            })
            .min()
    }

    /// Client `slot` has a new connection (a new number; requests are
    /// ordered afresh, and IDs start again from 1).
    pub fn on_connected(&mut self, slot: usize) {
        self.stats.connections += 1;
        self.conns_opened += 1;
        let s = &mut self.slots[slot];
        s.connected = true;
        s.conn = self.conns_opened;
        s.seq = 0;
        s.next_id = 1;
        if self.verifying && slot == 0 {
            self.verify_keys = (0..self.keys.len()).rev().collect();
            self.paging = Paging::From(Bytes::new());
        }
    }

    /// Client `slot`'s connection is gone: modifying requests without a
    /// response are indeterminate; reads without one are dropped (they
    /// changed nothing).
    pub fn on_disconnected(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        s.connected = false;
        if let Probe::Sent(_) = s.probe {
            s.probe = Probe::Needed;
        }
        let conn = s.conn;
        for (_, p) in std::mem::take(&mut s.pending) {
            match p {
                Pending::Call { key_index, seq, op, invoked_ns } => {
                    self.per_key[key_index] -= 1;
                    if op.is_modifying() {
                        self.stats.indeterminate += 1;
                        let key = self.keys[key_index].clone();
                        self.calls.push(CallRecord { conn, seq, key, op, invoked_ns, completed: None });
                    }
                }
                Pending::Range { .. } => self.ranges_in_flight -= 1,
                Pending::Params => {}
            }
        }
        if self.verifying && slot == 0 {
            self.verify_keys.clear();
            self.paging = Paging::Done;
        }
    }

    fn send(&mut self, slot: usize, p: Pending, req: KvldsRequest, out: &mut BytesMut) -> u64 {
        let s = &mut self.slots[slot];
        let id = s.next_id;
        s.next_id += 1;
        s.seq += 1;
        req.encode(id, out);
        self.issued.push(id);
        s.pending.insert(id, p);
        id
    }

    fn send_call(&mut self, slot: usize, key_index: usize, op: Op, now_ns: u64, out: &mut BytesMut) -> u64 {
        let key = self.keys[key_index].clone();
        let req = match &op {
            Op::Set(value) => KvldsRequest::Set { key, value: value.clone() },
            Op::Cas { old, new } => KvldsRequest::Cas { key, old_value: old.clone(), new_value: new.clone() },
            Op::Add(value) => KvldsRequest::Add { key, value: value.clone() },
            Op::Modify(value) => KvldsRequest::Modify { key, value: value.clone() },
            Op::Delete => KvldsRequest::Delete { key },
            Op::Cad(old) => KvldsRequest::Cad { key, old_value: old.clone() },
            Op::Get => KvldsRequest::Get { key },
        };
        self.per_key[key_index] += 1;
        let seq = self.slots[slot].seq;
        self.send(slot, Pending::Call { key_index, seq, op, invoked_ns: now_ns }, req, out)
    }

    #[allow(clippy::too_many_arguments)]
    fn send_range(
        &mut self,
        slot: usize,
        start: Bytes,
        end: Bytes,
        max_bytes: u32,
        paging: bool,
        now_ns: u64,
        out: &mut BytesMut,
    ) {
        self.ranges_in_flight += 1;
        let seq = self.slots[slot].seq;
        let req = KvldsRequest::Range { max_bytes, start: start.clone(), end: end.clone() };
        self.send(slot, Pending::Range { seq, start, end, max_bytes, invoked_ns: now_ns, paging }, req, out);
    }

    /// Issues what client `slot` wants to send now into `out`.
    pub fn issue(&mut self, slot: usize, rng: &mut Stream, now_ns: u64, out: &mut BytesMut) {
        if !self.slots[slot].connected {
            return;
        }
        if self.verifying {
            if slot == 0 {
                self.issue_verify(rng, now_ns, out);
            }
            return;
        }
        if self.liveness {
            if self.slots[slot].probe == Probe::Needed {
                // A GET of any key, whatever is in flight on it.
                let k = rng.below(self.keys.len() as u64) as usize;
                let id = self.send_call(slot, k, Op::Get, now_ns, out);
                self.slots[slot].probe = Probe::Sent(id);
            }
            return;
        }
        while (self.slots[slot].pending.len() as u64) < self.in_flight_max
            && self.stats.requests < self.budget
        {
            if !self.issue_one(slot, rng, now_ns, out) {
                break;
            }
        }
    }

    /// The final read-back: one RANGE paging through everything (one page
    /// at a time) and a GET of every key.
    fn issue_verify(&mut self, rng: &mut Stream, now_ns: u64, out: &mut BytesMut) {
        if let Paging::From(start) = self.paging.clone() {
            self.paging = Paging::InFlight;
            let max_bytes = range_budget(rng);
            self.send_range(0, start, Bytes::new(), max_bytes, true, now_ns, out);
        }
        while (self.slots[0].pending.len() as u64) < self.in_flight_max {
            let Some(&k) = self.verify_keys.last() else { break };
            if self.per_key[k] >= IN_FLIGHT_PER_KEY_MAX {
                break;
            }
            self.verify_keys.pop();
            self.send_call(0, k, Op::Get, now_ns, out);
        }
        if self.verify_keys.is_empty() && self.paging == Paging::Done && self.slots[0].pending.is_empty() {
            self.verified = true;
        }
    }

    /// Workload requests to send before the final check.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Makes the workload steady updates of the key set (SETs and a few
    /// GETs) from the start.
    pub fn updates_only(&mut self) {
        self.mode = Mode::Update;
    }

    /// Makes every RANGE ask for 1 MiB, with up to
    /// [`BIG_RANGES_IN_FLIGHT_MAX`] in flight: the load that fills a
    /// mux's reservations for one client (its backpressure).
    pub fn big_ranges(&mut self) {
        self.big_ranges = true;
        self.ranges_in_flight_max = BIG_RANGES_IN_FLIGHT_MAX;
    }

    /// Issues one workload request; false if none can go now (its key has
    /// too many calls in flight, or too many RANGEs are).
    fn issue_one(&mut self, slot: usize, rng: &mut Stream, now_ns: u64, out: &mut BytesMut) -> bool {
        if self.mode_left == 0 && self.mode != Mode::Update {
            if self.stats.requests > 0 {
                self.mode = [Mode::Grow, Mode::Shrink, Mode::Mixed][rng.below(3) as usize];
            }
            self.mode_left = rng.range(50, 400);
        }
        let mut roll = rng.below(100);
        let mut pick = Pick::Get;
        for (p, w) in weights(self.mode) {
            if roll < w {
                pick = p;
                break;
            }
            roll -= w;
        }
        match pick {
            Pick::Params => {
                self.send(slot, Pending::Params, KvldsRequest::Params, out);
            }
            Pick::Range => {
                if self.ranges_in_flight >= self.ranges_in_flight_max {
                    return false;
                }
                let start = self.range_bound(rng);
                let end = self.range_bound(rng);
                let max_bytes = if self.big_ranges { BIG_RANGE_BYTES } else { range_budget(rng) };
                self.send_range(slot, start, end, max_bytes, false, now_ns, out);
            }
            keyed => {
                let Some(k) = self.pick_key(rng) else { return false };
                let op = match keyed {
                    Pick::Set => Op::Set(self.new_value(rng, k)),
                    Pick::Cas => {
                        let old = self.comparand(rng, k);
                        Op::Cas { old, new: self.new_value(rng, k) }
                    }
                    Pick::Add => Op::Add(self.new_value(rng, k)),
                    Pick::Modify => Op::Modify(self.new_value(rng, k)),
                    Pick::Delete => Op::Delete,
                    Pick::Cad => Op::Cad(self.comparand(rng, k)),
                    _ => Op::Get,
                };
                self.send_call(slot, k, op, now_ns, out);
            }
        }
        self.mode_left = self.mode_left.saturating_sub(1);
        self.stats.requests += 1;
        true
    }

    /// A key with room for another call in flight, if one is found soon.
    fn pick_key(&mut self, rng: &mut Stream) -> Option<usize> {
        (0..4)
            .map(|_| rng.below(self.keys.len() as u64) as usize)
            .find(|k| self.per_key[*k] < IN_FLIGHT_PER_KEY_MAX)
    }

    /// A fresh value for key `k`, remembered as sent.
    fn new_value(&mut self, rng: &mut Stream, k: usize) -> Bytes {
        let v = random_bytes(rng, self.value_len_max);
        self.written[k].insert(v.clone());
        self.remember(k, v.clone());
        v
    }

    fn remember(&mut self, k: usize, v: Bytes) {
        let recent = &mut self.recent[k];
        if !recent.contains(&v) {
            recent.push_back(v);
            if recent.len() > RECENT_VALUES_MAX {
                recent.pop_front();
            }
        }
    }

    /// A CAS or CAD comparand: mostly a value recently sent or read for
    /// the key (so that some succeed), else a random one.
    fn comparand(&mut self, rng: &mut Stream, k: usize) -> Bytes {
        let recent = &self.recent[k];
        if !recent.is_empty() && rng.chance(0.75) {
            recent[rng.below(recent.len() as u64) as usize].clone()
        } else {
            random_bytes(rng, self.value_len_max)
        }
    }

    /// A RANGE bound: empty (the very start, or past the end), a key of
    /// the key space, or any key.
    fn range_bound(&mut self, rng: &mut Stream) -> Bytes {
        match rng.below(10) {
            0..=2 => Bytes::new(),
            3..=7 => self.keys[rng.below(self.keys.len() as u64) as usize].clone(),
            _ => random_bytes(rng, self.key_len_max),
        }
    }

    /// Checks one response and records it.
    ///
    /// # Errors
    /// What the oracle caught.
    pub fn on_packet(&mut self, slot: usize, packet: Packet, now_ns: u64) -> Result<(), String> {
        let s = &mut self.slots[slot];
        let Some(p) = s.pending.remove(&packet.id) else {
            return Err(format!(
                "client {slot} got a response to request {:#x}, which it has not pending",
                packet.id
            ));
        };
        if s.probe == Probe::Sent(packet.id) {
            s.probe = Probe::Done;
        }
        let conn = s.conn;
        self.stats.responses += 1;
        let kind = match &p {
            Pending::Params => KvldsRequestKind::Params,
            Pending::Range { .. } => KvldsRequestKind::Range,
            Pending::Call { op, .. } => match op {
                Op::Set(_) => KvldsRequestKind::Set,
                Op::Cas { .. } => KvldsRequestKind::Cas,
                Op::Add(_) => KvldsRequestKind::Add,
                Op::Modify(_) => KvldsRequestKind::Modify,
                Op::Delete => KvldsRequestKind::Delete,
                Op::Cad(_) => KvldsRequestKind::Cad,
                Op::Get => KvldsRequestKind::Get,
            },
        };
        let resp = KvldsResponse::decode(kind, packet.record)
            .map_err(|e| format!("malformed response to {kind:?} {:#x}: {e}", packet.id))?;
        if self.keep_notes {
            self.response_note = Some(describe_response(&resp));
        }
        match (p, resp) {
            (Pending::Params, KvldsResponse::Params { max_key_len, max_value_len }) => {
                if (max_key_len, max_value_len) != (self.key_len_max, self.value_len_max) {
                    return Err(format!(
                        "PARAMS answered max key {max_key_len}, max value {max_value_len}; expected {}, {}",
                        self.key_len_max, self.value_len_max
                    ));
                }
            }
            (Pending::Call { key_index, seq, op, invoked_ns }, resp) => {
                self.per_key[key_index] -= 1;
                let key = self.keys[key_index].clone();
                let outcome = match (&op, resp) {
                    (Op::Get, KvldsResponse::Get(value)) => {
                        if let Some(v) = &value {
                            if !self.written[key_index].contains(v) {
                                return Err(format!(
                                    "honesty: GET {} returned {}, never written to that key",
                                    show(&key),
                                    show(v)
                                ));
                            }
                            self.remember(key_index, v.clone());
                        }
                        Outcome::Value(value)
                    }
                    (Op::Get, r) => return Err(format!("GET answered {r:?}")),
                    (_, KvldsResponse::Done(done)) => {
                        self.stats.acked += 1;
                        self.stats.conditions_failed += u64::from(!done);
                        Outcome::Done(done)
                    }
                    (op, r) => return Err(format!("{} answered {r:?}", op.name())),
                };
                self.calls.push(CallRecord {
                    conn,
                    seq,
                    key,
                    op,
                    invoked_ns,
                    completed: Some((now_ns, outcome)),
                });
            }
            (
                Pending::Range { seq, start, end, max_bytes, invoked_ns, paging },
                KvldsResponse::Range { next, pairs },
            ) => {
                self.ranges_in_flight -= 1;
                self.check_range(&start, &end, max_bytes, &pairs, &next)?;
                self.stats.range_pairs += pairs.len() as u64;
                if paging {
                    self.paging = if next.is_empty() { Paging::Done } else { Paging::From(next.clone()) };
                }
                self.ranges.push(RangeRecord {
                    conn,
                    seq,
                    start,
                    end,
                    invoked_ns,
                    completed_ns: now_ns,
                    pairs,
                    next,
                });
            }
            (p, r) => return Err(format!("{p:?} answered {r:?}")),
        }
        Ok(())
    }

    /// A RANGE response is well formed and honest (see the module doc).
    fn check_range(
        &self,
        start: &Bytes,
        end: &Bytes,
        max_bytes: u32,
        pairs: &[(Bytes, Bytes)],
        next: &Bytes,
    ) -> Result<(), String> {
        let what = || format!("RANGE [{}, {}) of {max_bytes} bytes", show(start), show(end));
        let end_inf = end.is_empty();
        if !end_inf && start >= end {
            if !pairs.is_empty() || next != end {
                return Err(format!(
                    "{} (start >= end) answered {} pairs and next {}, not none and next = end",
                    what(),
                    pairs.len(),
                    show(next)
                ));
            }
            return Ok(());
        }
        let mut prev: Option<&Bytes> = None;
        for (k, v) in pairs {
            if k < start || (!end_inf && k >= end) {
                return Err(format!("{} returned key {}, outside the range", what(), show(k)));
            }
            if prev.is_some_and(|p| p >= k) {
                return Err(format!(
                    "{} returned keys out of order ({} after {})",
                    what(),
                    show(k),
                    show(prev.unwrap())
                ));
            }
            prev = Some(k);
            let honest = self.key_index.get(k).is_some_and(|&i| self.written[i].contains(v));
            if !honest {
                return Err(format!(
                    "honesty: {} returned {} = {}, never written to that key",
                    what(),
                    show(k),
                    show(v)
                ));
            }
        }
        let before_last: u64 = pairs.iter().rev().skip(1).map(|(k, v)| (k.len() + v.len()) as u64).sum();
        if before_last > max_bytes as u64 {
            return Err(format!(
                "{} returned {} pairs, {before_last} bytes before the last one: over the budget",
                what(),
                pairs.len()
            ));
        }
        if !next.is_empty() {
            if next <= start || prev.is_some_and(|p| next <= p) {
                return Err(format!(
                    "{} answered next {}, not past the start and the last key",
                    what(),
                    show(next)
                ));
            }
            if !end_inf && next > end {
                return Err(format!("{} answered next {}, past the end", what(), show(next)));
            }
        }
        Ok(())
    }

    /// The history in the checker's terms; with `cut_ns`, only what the
    /// store did before that instant: calls invoked later are left out,
    /// modifying calls still in flight at it become indeterminate, reads
    /// still in flight are left out.
    fn history(&self, cut_ns: Option<u64>) -> History {
        let mut h = History::default();
        for c in &self.calls {
            let completed = match (cut_ns, &c.completed) {
                (Some(t), _) if c.invoked_ns >= t => continue,
                (Some(t), Some((done_ns, _))) if *done_ns >= t => {
                    if !c.op.is_modifying() {
                        continue;
                    }
                    None
                }
                (_, completed) => completed.clone(),
            };
            h.calls.push(Call {
                conn: c.conn,
                seq: c.seq,
                key: c.key.clone(),
                op: c.op.to_checker(),
                invoked_ns: c.invoked_ns,
                completed: completed.map(|(ns, o)| {
                    (
                        ns,
                        match o {
                            Outcome::Done(b) => KvResult::Done(b),
                            Outcome::Value(v) => KvResult::Value(v),
                        },
                    )
                }),
            });
        }
        for r in self.ranges.iter().filter(|r| cut_ns.is_none_or(|t| r.completed_ns < t)) {
            h.ranges.push(RangeCall {
                conn: r.conn,
                seq: r.seq,
                start: r.start.clone(),
                end: r.end.clone(),
                invoked_ns: r.invoked_ns,
                completed_ns: r.completed_ns,
                pairs: r.pairs.clone(),
                next: r.next.clone(),
            });
        }
        h
    }

    /// The end-of-run oracle: the history (up to `damage_ns`, the first
    /// damage to the disk, if any) is linearizable from an empty store.
    ///
    /// # Errors
    /// The checker's explanation of the violation.
    pub fn final_check(&self, damage_ns: Option<u64>) -> Result<(), String> {
        let history = self.history(damage_ns);
        let options = linearizability::CheckOptions {
            effects_end_ns: self.effects_end_ns.clone(),
            ..linearizability::CheckOptions::default()
        };
        linearizability::check_with(&history, &BTreeMap::new(), &options).map(|_| ()).map_err(|v| {
            match damage_ns {
                Some(t) => format!("in the history before the disk was damaged (at {t} ns): {v}"),
                None => v.to_string(),
            }
        })
    }
}

/// Random bytes, 0..=`len_max` of them: empty or the longest a tenth of
/// the time each.
fn random_bytes(rng: &mut Stream, len_max: u32) -> Bytes {
    let len = match rng.below(10) {
        0 => 0,
        1 => len_max,
        _ => rng.below(u64::from(len_max) + 1) as u32,
    };
    let mut v = vec![0; len as usize];
    rng.fill(&mut v);
    Bytes::from(v)
}

/// A RANGE byte budget: 0, 1, small, a few pages, or large.
fn range_budget(rng: &mut Stream) -> u32 {
    match rng.below(10) {
        0 => 0,
        1 => 1,
        2..=5 => rng.range(2, 600) as u32,
        6..=8 => rng.range(600, 8192) as u32,
        _ => 1 << 20,
    }
}

fn describe_response(resp: &KvldsResponse) -> String {
    match resp {
        KvldsResponse::Params { max_key_len, max_value_len } => {
            format!("max key {max_key_len}, value {max_value_len}")
        }
        KvldsResponse::Done(true) => "done".into(),
        KvldsResponse::Done(false) => "not done".into(),
        KvldsResponse::Get(Some(v)) => format!("value {}", show(v)),
        KvldsResponse::Get(None) => "absent".into(),
        KvldsResponse::Range { next, pairs } => format!("{} pairs, next {}", pairs.len(), show(next)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Concern;

    fn respond(client: &mut KvldsClient, id: u64, resp: KvldsResponse, now_ns: u64) -> Result<(), String> {
        let mut out = BytesMut::new();
        resp.encode(id, &mut out);
        let mut d = kivaloo::packet::PacketDecoder::new();
        d.push(&out);
        client.on_packet(0, d.next_packet().unwrap().unwrap(), now_ns)
    }

    fn pending_ranges(client: &KvldsClient) -> Vec<u64> {
        client.slots[0]
            .pending
            .iter()
            .filter(|(_, p)| matches!(p, Pending::Range { .. }))
            .map(|(id, _)| *id)
            .collect()
    }

    #[test]
    fn keys_and_values_respect_the_block_size_limits() {
        let mut rng = Stream::new(1, Concern::Workload);
        for (block_size, key_max, value_max) in [(512, 64, 96), (1024, 128, 192), (2048, 255, 255)] {
            let mut c = KvldsClient::new(block_size, 1, 64, 2000, 200, &mut rng);
            assert_eq!(c.keys.len(), 200);
            assert!(c.keys.iter().all(|k| k.len() <= key_max));
            c.on_connected(0);
            let mut out = BytesMut::new();
            while c.stats.requests < 2000 {
                c.issue(0, &mut rng, 0, &mut out);
                c.on_disconnected(0);
                c.on_connected(0);
            }
            assert!(c.written.iter().flatten().all(|v| v.len() <= value_max));
            assert!(c.per_key.iter().all(|n| *n == 0));
        }
    }

    #[test]
    fn range_answers_are_checked() {
        let mut rng = Stream::new(2, Concern::Workload);
        let mut c = KvldsClient::new(512, 1, 1, 10, 8, &mut rng);
        c.on_connected(0);
        let k = c.keys[3].clone();
        let v = c.new_value(&mut rng, 3);
        let mut out = BytesMut::new();
        // A RANGE over everything that returns a value never written fails.
        c.send_range(0, Bytes::new(), Bytes::new(), 100, false, 0, &mut out);
        let id = pending_ranges(&c)[0];
        let forged =
            KvldsResponse::Range { next: Bytes::new(), pairs: vec![(k.clone(), Bytes::from_static(b"zz"))] };
        assert!(respond(&mut c, id, forged, 1).unwrap_err().contains("honesty"));
        // No progress fails.
        c.send_range(0, k.clone(), Bytes::new(), 100, false, 0, &mut out);
        let id = pending_ranges(&c)[0];
        let stuck = KvldsResponse::Range { next: k.clone(), pairs: vec![] };
        assert!(respond(&mut c, id, stuck, 1).unwrap_err().contains("not past"));
        // An honest, well-formed answer passes and is recorded.
        c.send_range(0, Bytes::new(), Bytes::new(), 0, false, 0, &mut out);
        let id = pending_ranges(&c)[0];
        let good = KvldsResponse::Range { next: Bytes::new(), pairs: vec![(k, v)] };
        respond(&mut c, id, good, 1).unwrap();
        assert_eq!(c.ranges.len(), 1);
    }

    #[test]
    fn a_cut_history_keeps_only_what_happened_before_the_cut() {
        let mut rng = Stream::new(3, Concern::Workload);
        let mut c = KvldsClient::new(512, 1, 8, 10, 8, &mut rng);
        c.on_connected(0);
        let mut out = BytesMut::new();
        let v = c.new_value(&mut rng, 0);
        c.send_call(0, 0, Op::Set(v), 10, &mut out); // answered after the cut: indeterminate
        c.send_call(0, 1, Op::Get, 10, &mut out); // answered after the cut: left out
        c.send_call(0, 2, Op::Delete, 10, &mut out); // answered before: kept
        let ids: Vec<u64> = c.slots[0].pending.keys().copied().collect();
        respond(&mut c, ids[2], KvldsResponse::Done(true), 20).unwrap();
        respond(&mut c, ids[0], KvldsResponse::Done(true), 40).unwrap();
        respond(&mut c, ids[1], KvldsResponse::Get(None), 40).unwrap();
        c.send_call(0, 3, Op::Delete, 50, &mut out); // invoked after: left out
        let id = *c.slots[0].pending.keys().next().unwrap();
        respond(&mut c, id, KvldsResponse::Done(true), 60).unwrap();
        let h = c.history(Some(30));
        assert_eq!(h.calls.len(), 2);
        assert!(h.calls.iter().any(|call| call.key == c.keys[2] && call.completed.is_some()));
        assert!(h.calls.iter().any(|call| call.key == c.keys[0] && call.completed.is_none()));
        assert_eq!(c.history(None).calls.len(), 4);
    }
}
