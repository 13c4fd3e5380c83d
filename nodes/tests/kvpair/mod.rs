//! An in-process kvlds + lbs pair (quinn's `Pair`): a kvlds-side node, an
//! [`LbsNode`] on a [`MemDisk`], and the clients of the kvlds-side node,
//! with every byte moved between them by this driver on a virtual clock.
//! No sockets, no threads, no files; every choice (how bytes are split,
//! which disk operation completes next, how far the clock moves) comes
//! from one seeded [`Rng`], so a run is reproduced by its seed.
//!
//! The wiring, as the real daemons are wired:
//!
//! ```text
//!  clients  --ConnId(1..)-->  kvlds  --ConnId::UPSTREAM-->  lbs  --DiskOp-->  MemDisk
//! ```
//!
//! - lbs is started first and run until it emits `Accepting(true)`; it is
//!   then given `Input::Accepted` for an lbs-side connection (`LBS_CONN_*`),
//!   and only then is the kvlds-side node built, its upstream already open
//!   (as `ConnId::UPSTREAM` promises).
//! - kvlds' `Output::Send { conn: UPSTREAM }` goes to lbs as
//!   `Input::Received` on the lbs-side connection, and lbs' sends on it come
//!   back to kvlds as `Input::Received { conn: UPSTREAM }`.
//! - Every connection direction is a pipe of bytes delivered in random
//!   splits, only while the receiver wants to read (`Output::ReadInterest`).
//!   When a piece is delivered, the sender is told `Input::Sent` for it:
//!   a send counts as transmitted once the peer has it (a socket buffer of
//!   size zero). A client that does not read (`Client::reading == false`)
//!   therefore leaves kvlds' sends untransmitted.
//! - lbs' disk operations are executed by the [`MemDisk`] in random order
//!   (the contract lets outstanding operations complete in any order), one
//!   per step, unless a test freezes the disk (`disk_frozen`).
//! - Timers: a node's `Input::Timeout` is given once the clock reaches its
//!   `poll_timeout()`. The clock moves a little at every step, and jumps to
//!   the next timer when nothing else can happen and the test still waits
//!   for something.
//!
//! Anything the contract forbids or the tests never expect makes the
//! harness panic at once with a description of the whole pair: an `Exit`
//! of either node, a kvlds disk operation, a send on a closed connection,
//! a malformed packet from kvlds, an answer to a request never sent, and a
//! run that does not reach its goal within [`STEPS_PER_RUN_MAX`] steps or
//! [`RUN_VIRTUAL_NS_MAX`] of virtual time (no silent hang).

// Shared scaffolding: not every test binary uses every helper.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};

use bytes::{Bytes, BytesMut};
use kivaloo::contract::{ConnClosed, ConnId, DiskOp, DiskOpId, Input, Instant, Node, Output};
use kivaloo::kvlds_proto::{KvldsRequest, KvldsRequestKind, KvldsResponse};
use kivaloo::packet::PacketDecoder;
use kivaloo_nodes::lbs::{LbsConfig, LbsNode};

use super::memdisk::MemDisk;

/// Steps one `run_*` call may take before the harness declares a livelock.
pub const STEPS_PER_RUN_MAX: u64 = 5_000_000;
/// Virtual time one `run_*` call may let pass before the harness declares
/// that the pair is stuck behind timers that lead nowhere (one hour).
pub const RUN_VIRTUAL_NS_MAX: u64 = 3_600_000_000_000;
/// The largest piece of a byte stream delivered in one `Input::Received`.
pub const CHUNK_BYTES_MAX: usize = 16 << 10;
/// The clock moves forward by less than this at every step.
pub const STEP_NS_MAX: u64 = 2_000;
/// Log lines kept for failure reports.
pub const LOGS_KEPT: usize = 200;
/// lbs-side connection numbers (one per kvlds life) start here, far from
/// the client numbers.
pub const LBS_CONN_FIRST: u64 = 1 << 40;

/// xorshift64*: the harness' (and the tests') deterministic generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value, zero included).
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// How a restart happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// The kvlds process dies: lbs sees its connection close, finishes what
    /// it was doing, and accepts the new kvlds.
    Kvlds,
    /// Both processes die; the disk keeps everything written (page cache
    /// included), as after `kill -9` of both daemons.
    Both,
    /// Power loss: both die and the disk keeps only what was synced.
    PowerLoss,
    /// Power loss that also keeps any mix of unsynced sectors (new, old or
    /// garbage) and of unsynced directory changes
    /// ([`MemDisk::crash_random`]).
    PowerLossTorn,
}

/// How a client connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEnd {
    /// kvlds closed it (`Output::Close`), with this reason.
    ByNode(String),
    /// The client closed it (kvlds was given `Input::Closed`).
    ByClient,
    /// kvlds died (a restart) while it was open.
    Lost,
}

/// The client side of one connection to the kvlds-side node.
#[derive(Debug)]
pub struct Client {
    /// Request bytes not yet delivered to kvlds.
    to_node: BytesMut,
    /// Bytes kvlds sent that the client has not read yet.
    to_client: BytesMut,
    decoder: PacketDecoder,
    /// kvlds' read interest (`Output::ReadInterest`): no bytes are delivered
    /// to kvlds while it is false.
    pub read_enabled: bool,
    /// Whether the client reads what kvlds sends. A test sets it to false to
    /// play a client that never reads.
    pub reading: bool,
    /// How the connection ended, once it has.
    pub end: Option<ClientEnd>,
    /// Requests sent and not answered: request ID -> kind.
    outstanding: BTreeMap<u64, KvldsRequestKind>,
    /// Answers received and not yet taken by the test.
    responses: BTreeMap<u64, KvldsResponse>,
    /// Request bytes delivered to kvlds so far.
    pub bytes_delivered: u64,
}

impl Client {
    fn new() -> Client {
        Client {
            to_node: BytesMut::new(),
            to_client: BytesMut::new(),
            decoder: PacketDecoder::new(),
            read_enabled: true,
            reading: true,
            end: None,
            outstanding: BTreeMap::new(),
            responses: BTreeMap::new(),
            bytes_delivered: 0,
        }
    }

    /// Request bytes written by the client that kvlds has not taken yet.
    pub fn bytes_queued(&self) -> usize {
        self.to_node.len()
    }

    /// Requests sent and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    /// Whether the connection is open.
    pub fn is_open(&self) -> bool {
        self.end.is_none()
    }
}

/// Something that can happen in one step.
#[derive(Debug, Clone, Copy)]
enum Event {
    /// Deliver a piece of kvlds' upstream bytes to lbs.
    ToLbs,
    /// Deliver a piece of lbs' bytes to kvlds (on `UPSTREAM`).
    ToKvldsUpstream,
    /// Deliver a piece of a client's request bytes to kvlds.
    ToKvlds(ConnId),
    /// Let a client read a piece of kvlds' bytes.
    ToClient(ConnId),
    /// Complete one of lbs' outstanding disk operations.
    Disk,
    /// Give `Input::Timeout` to a node whose timer is due.
    Timer,
}

/// Called with a kvlds-side node that a restart is about to drop.
type RetireHook<K> = Box<dyn FnMut(&K)>;

/// The pair: a kvlds-side node `K` (the real `KvldsNode`, or a stand-in
/// for checking the harness itself), an lbs node, its disk, and clients.
pub struct Pair<K: Node> {
    /// The virtual clock.
    pub now: Instant,
    /// Every random choice of the harness; tests may draw from it too.
    pub rng: Rng,
    /// The kvlds-side node (`None` only inside a restart).
    kvlds: Option<K>,
    make_kvlds: Box<dyn FnMut() -> K>,
    /// Called with each kvlds-side node about to be dropped at a restart.
    retire_hook: Option<RetireHook<K>>,
    kvlds_accepting: bool,
    /// kvlds' read interest on `UPSTREAM`.
    kvlds_upstream_reading: bool,
    /// Lives of the kvlds-side node so far (1 for the first).
    pub kvlds_lives: u32,
    /// The lbs node.
    pub lbs: LbsNode,
    lbs_config: LbsConfig,
    /// lbs' connection from the current kvlds.
    lbs_conn: ConnId,
    next_lbs_conn: u64,
    lbs_accepting: bool,
    /// lbs' read interest on its connection from kvlds.
    lbs_reading: bool,
    /// Lives of the lbs node so far.
    pub lbs_lives: u32,
    /// lbs' directory.
    pub disk: MemDisk,
    /// lbs' disk operations not yet completed.
    disk_ops: Vec<(DiskOpId, DiskOp)>,
    /// While true, no disk operation completes (a stalled disk).
    pub disk_frozen: bool,
    /// Bytes kvlds sent upstream, not yet delivered to lbs.
    to_lbs: BytesMut,
    /// Bytes lbs sent to kvlds, not yet delivered.
    to_kvlds_upstream: BytesMut,
    clients: BTreeMap<ConnId, Client>,
    next_client: u64,
    next_request_id: u64,
    /// Every `Output::ReadInterest` kvlds gave for a client connection.
    pub read_interest: Vec<(ConnId, bool)>,
    /// The last [`LOGS_KEPT`] log lines of both nodes, prefixed by node.
    pub logs: VecDeque<String>,
    /// Steps taken over the whole run.
    pub steps_total: u64,
}

impl<K: Node> Pair<K> {
    /// A pair on a new, empty store: lbs with `lbs_config` recovers (creates
    /// the store), then the kvlds-side node is built by `make_kvlds` with
    /// its upstream open. The same `make_kvlds` builds it again at every
    /// restart. kvlds has not necessarily finished its own recovery on
    /// return; [`Pair::connect`] waits for it.
    pub fn new(seed: u64, lbs_config: LbsConfig, make_kvlds: impl FnMut() -> K + 'static) -> Pair<K> {
        let mut pair = Pair {
            now: Instant::from_nanos(1_000_000),
            rng: Rng::new(seed),
            kvlds: None,
            make_kvlds: Box::new(make_kvlds),
            retire_hook: None,
            kvlds_accepting: false,
            kvlds_upstream_reading: true,
            kvlds_lives: 0,
            lbs: LbsNode::new(lbs_config.clone()),
            lbs_config,
            lbs_conn: ConnId(LBS_CONN_FIRST),
            next_lbs_conn: LBS_CONN_FIRST,
            lbs_accepting: false,
            lbs_reading: true,
            lbs_lives: 1,
            disk: MemDisk::new(),
            disk_ops: Vec::new(),
            disk_frozen: false,
            to_lbs: BytesMut::new(),
            to_kvlds_upstream: BytesMut::new(),
            clients: BTreeMap::new(),
            next_client: 1,
            next_request_id: 0x0123_4567_0000_0000,
            read_interest: Vec::new(),
            logs: VecDeque::new(),
            steps_total: 0,
        };
        pair.drain_lbs();
        pair.start_kvlds();
        pair
    }

    // ----- access --------------------------------------------------------

    /// The kvlds-side node.
    pub fn kvlds(&self) -> &K {
        self.kvlds.as_ref().expect("kvlds is running")
    }

    /// Calls `hook` with every kvlds-side node a restart is about to drop
    /// (to sum its counters, say).
    pub fn on_retire(&mut self, hook: impl FnMut(&K) + 'static) {
        self.retire_hook = Some(Box::new(hook));
    }

    /// Whether kvlds' last `Output::Accepting` was `true`.
    pub fn kvlds_accepting(&self) -> bool {
        self.kvlds_accepting
    }

    /// The client of `conn`.
    pub fn client(&self, conn: ConnId) -> &Client {
        self.clients.get(&conn).unwrap_or_else(|| panic!("{conn}: no such client"))
    }

    /// The client of `conn`, to change what it does (`reading`).
    pub fn client_mut(&mut self, conn: ConnId) -> &mut Client {
        self.clients.get_mut(&conn).unwrap_or_else(|| panic!("{conn}: no such client"))
    }

    /// The answer to request `id` on `conn`, if it has come (not taken).
    pub fn response(&self, conn: ConnId, id: u64) -> Option<&KvldsResponse> {
        self.client(conn).responses.get(&id)
    }

    /// Takes the answer to request `id` on `conn`, if it has come.
    pub fn take_response(&mut self, conn: ConnId, id: u64) -> Option<KvldsResponse> {
        self.client_mut(conn).responses.remove(&id)
    }

    /// Verbs of lbs' disk operations not yet completed.
    pub fn disk_ops_pending(&self) -> Vec<&'static str> {
        self.disk_ops.iter().map(|(_, op)| op.verb()).collect()
    }

    // ----- clients -------------------------------------------------------

    /// Opens a client connection, once kvlds accepts one (running the pair
    /// until it does). Returns the connection's id.
    pub fn connect(&mut self) -> ConnId {
        self.run_until("kvlds to accept a connection", |p| p.kvlds_accepting);
        let conn = ConnId(self.next_client);
        self.next_client += 1;
        self.clients.insert(conn, Client::new());
        self.feed_kvlds(Input::Accepted { conn });
        conn
    }

    /// Writes request `req` on `conn` (delivered by later steps); returns
    /// its request ID.
    pub fn send(&mut self, conn: ConnId, req: &KvldsRequest) -> u64 {
        let id = self.next_request_id;
        self.next_request_id += 1;
        let client = self.client_mut(conn);
        assert!(client.is_open(), "{conn}: sending on a closed connection ({:?})", client.end);
        req.encode(id, &mut client.to_node);
        client.outstanding.insert(id, req.kind());
        id
    }

    /// Writes raw bytes on `conn` (malformed requests); no answer is
    /// expected for them.
    pub fn send_raw(&mut self, conn: ConnId, bytes: &[u8]) {
        let client = self.client_mut(conn);
        assert!(client.is_open(), "{conn}: sending on a closed connection ({:?})", client.end);
        client.to_node.extend_from_slice(bytes);
    }

    /// Sends `req` on `conn` and runs until its answer comes.
    ///
    /// # Panics
    /// If the connection ends first, or the pair gets stuck.
    pub fn call(&mut self, conn: ConnId, req: &KvldsRequest) -> KvldsResponse {
        let id = self.send(conn, req);
        self.run_until("an answer", |p| {
            let c = p.client(conn);
            c.responses.contains_key(&id) || !c.is_open()
        });
        match self.take_response(conn, id) {
            Some(resp) => resp,
            None => {
                let end = self.client(conn).end.clone();
                self.fail(&format!("{conn}: no answer to {}; the connection ended: {end:?}", short(req)))
            }
        }
    }

    /// The client closes `conn` (kvlds is given `Input::Closed`). Requests
    /// not yet delivered are dropped; answers not yet read are lost.
    pub fn close_client(&mut self, conn: ConnId) {
        let client = self.client_mut(conn);
        assert!(client.is_open(), "{conn}: already closed ({:?})", client.end);
        client.end = Some(ClientEnd::ByClient);
        client.to_node.clear();
        client.to_client.clear();
        self.feed_kvlds(Input::Closed { conn, reason: ConnClosed::PeerClosed });
    }

    /// Whether every open, reading client has all its answers.
    pub fn all_answered(&self) -> bool {
        self.clients.values().all(|c| !c.is_open() || !c.reading || c.outstanding.is_empty())
    }

    // ----- running ------------------------------------------------------

    /// Runs until `done` holds. When nothing can happen but timers, the
    /// clock jumps to the next one.
    ///
    /// # Panics
    /// If nothing at all can happen (no bytes to move, no disk operation, no
    /// timer) while `done` does not hold, after [`STEPS_PER_RUN_MAX`] steps,
    /// or after [`RUN_VIRTUAL_NS_MAX`] of virtual time: the pair is stuck.
    pub fn run_until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        let started = self.now;
        for _ in 0..STEPS_PER_RUN_MAX {
            if done(self) {
                return;
            }
            if self.step() {
                continue;
            }
            match self.next_timer() {
                Some(at) => {
                    self.now = self.now.max(at);
                    self.fire_due_timers();
                }
                None => self.fail(&format!(
                    "stuck waiting for {what}: no bytes can move, no disk operation can complete, no timer is set"
                )),
            }
            if self.now.ns_since(started) > RUN_VIRTUAL_NS_MAX {
                self.fail(&format!("waited over an hour of virtual time for {what}: timers lead nowhere"));
            }
        }
        self.fail(&format!("no {what} after {STEPS_PER_RUN_MAX} steps (a livelock?)"));
    }

    /// Runs until every open, reading client has all its answers.
    pub fn settle(&mut self) {
        self.run_until("every answer", |p| p.all_answered());
    }

    /// Runs until nothing can happen without the clock jumping to a timer
    /// (quiescence). Timers already due still fire.
    pub fn run_idle(&mut self) {
        for _ in 0..STEPS_PER_RUN_MAX {
            if !self.step() {
                return;
            }
        }
        self.fail(&format!("not idle after {STEPS_PER_RUN_MAX} steps (a livelock?)"));
    }

    /// Takes up to `n` steps (fewer if the pair becomes idle first).
    pub fn run_steps(&mut self, n: u64) {
        for _ in 0..n {
            if !self.step() {
                return;
            }
        }
    }

    /// Takes one random step; false if nothing can happen without the clock
    /// jumping forward.
    pub fn step(&mut self) -> bool {
        let events = self.events();
        if events.is_empty() {
            return false;
        }
        self.steps_total += 1;
        self.now = self.now.after_ns(self.rng.below(STEP_NS_MAX));
        let event = events[self.rng.below(events.len() as u64) as usize];
        match event {
            Event::ToLbs => {
                let data = self.take_piece(Pipe::Lbs);
                let len = data.len() as u64;
                self.feed_lbs(Input::Received { conn: self.lbs_conn, data });
                self.feed_kvlds(Input::Sent { conn: ConnId::UPSTREAM, len_bytes: len });
            }
            Event::ToKvldsUpstream => {
                let data = self.take_piece(Pipe::KvldsUpstream);
                let len = data.len() as u64;
                self.feed_kvlds(Input::Received { conn: ConnId::UPSTREAM, data });
                self.feed_lbs(Input::Sent { conn: self.lbs_conn, len_bytes: len });
            }
            Event::ToKvlds(conn) => {
                let data = self.take_piece(Pipe::Kvlds(conn));
                self.client_mut(conn).bytes_delivered += data.len() as u64;
                self.feed_kvlds(Input::Received { conn, data });
            }
            Event::ToClient(conn) => {
                let data = self.take_piece(Pipe::Client(conn));
                let len = data.len() as u64;
                if let Err(e) = self.client_reads(conn, &data) {
                    self.fail(&e);
                }
                self.feed_kvlds(Input::Sent { conn, len_bytes: len });
            }
            Event::Disk => {
                let i = self.rng.below(self.disk_ops.len() as u64) as usize;
                let (id, op) = self.disk_ops.swap_remove(i);
                let result = self.disk.execute(&op);
                self.feed_lbs(Input::Disk { id, result });
            }
            Event::Timer => self.fire_due_timers(),
        }
        true
    }

    /// What can happen now.
    fn events(&self) -> Vec<Event> {
        let mut events = Vec::new();
        if self.kvlds.is_some() {
            if !self.to_lbs.is_empty() && self.lbs_reading {
                events.push(Event::ToLbs);
            }
            if !self.to_kvlds_upstream.is_empty() && self.kvlds_upstream_reading {
                events.push(Event::ToKvldsUpstream);
            }
            for (&conn, c) in &self.clients {
                if c.is_open() && c.read_enabled && !c.to_node.is_empty() {
                    events.push(Event::ToKvlds(conn));
                }
                if c.is_open() && c.reading && !c.to_client.is_empty() {
                    events.push(Event::ToClient(conn));
                }
            }
        }
        if !self.disk_ops.is_empty() && !self.disk_frozen {
            events.push(Event::Disk);
        }
        if self.next_timer().is_some_and(|at| at <= self.now) {
            events.push(Event::Timer);
        }
        events
    }

    /// The earliest timer of either node.
    fn next_timer(&self) -> Option<Instant> {
        let kvlds = self.kvlds.as_ref().and_then(|k| k.poll_timeout());
        match (kvlds, self.lbs.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Gives `Input::Timeout` to each node whose timer is due.
    fn fire_due_timers(&mut self) {
        if self.kvlds.as_ref().and_then(|k| k.poll_timeout()).is_some_and(|at| at <= self.now) {
            self.feed_kvlds(Input::Timeout);
        }
        if self.lbs.poll_timeout().is_some_and(|at| at <= self.now) {
            self.feed_lbs(Input::Timeout);
        }
    }

    /// Takes a random-length piece off the front of a pipe: one byte, a few,
    /// any prefix, or all of it (at most [`CHUNK_BYTES_MAX`]).
    fn take_piece(&mut self, pipe: Pipe) -> Bytes {
        let choice = self.rng.below(8);
        let pick = self.rng.next_u64();
        let buf = match pipe {
            Pipe::Lbs => &mut self.to_lbs,
            Pipe::KvldsUpstream => &mut self.to_kvlds_upstream,
            Pipe::Kvlds(conn) => &mut self.clients.get_mut(&conn).expect("client").to_node,
            Pipe::Client(conn) => &mut self.clients.get_mut(&conn).expect("client").to_client,
        };
        let available = buf.len();
        let len = match choice {
            0 => 1,
            1 | 2 => 1 + (pick % 16) as usize,
            3 | 4 => 1 + (pick % available as u64) as usize,
            _ => available,
        };
        buf.split_to(len.min(available).min(CHUNK_BYTES_MAX)).freeze()
    }

    /// The client of `conn` reads `data`: decodes whole packets and files
    /// each answer under its request.
    fn client_reads(&mut self, conn: ConnId, data: &[u8]) -> Result<(), String> {
        let client = self.clients.get_mut(&conn).expect("client");
        client.decoder.push(data);
        loop {
            let packet = match client.decoder.next_packet() {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("{conn}: kvlds sent a malformed packet: {e}")),
            };
            let Some(kind) = client.outstanding.remove(&packet.id) else {
                return Err(format!(
                    "{conn}: kvlds answered request {:#x}, which is not outstanding",
                    packet.id
                ));
            };
            let resp = KvldsResponse::decode(kind, packet.record)
                .map_err(|e| format!("{conn}: bad answer to {kind:?} request {:#x}: {e}", packet.id))?;
            client.responses.insert(packet.id, resp);
        }
    }

    // ----- restarts -------------------------------------------------------

    /// Kills and restarts nodes as `how` says, then builds a new kvlds-side
    /// node (which recovers from lbs). Every open client connection is
    /// lost; its unanswered requests stay unanswered. The disk must not be
    /// frozen.
    pub fn restart(&mut self, how: Restart) {
        assert!(!self.disk_frozen, "restart with a frozen disk");
        if let (Some(hook), Some(node)) = (&mut self.retire_hook, &self.kvlds) {
            hook(node);
        }
        self.kvlds = None;
        self.kvlds_accepting = false;
        for client in self.clients.values_mut() {
            if client.is_open() {
                client.end = Some(ClientEnd::Lost);
            }
            client.to_node.clear();
            client.to_client.clear();
        }
        self.to_lbs.clear();
        self.to_kvlds_upstream.clear();
        match how {
            Restart::Kvlds => {
                let conn = self.lbs_conn;
                self.feed_lbs(Input::Closed { conn, reason: ConnClosed::PeerClosed });
            }
            Restart::Both | Restart::PowerLoss | Restart::PowerLossTorn => {
                self.disk_ops.clear();
                match how {
                    Restart::PowerLoss => self.disk = self.disk.crash(),
                    Restart::PowerLossTorn => {
                        let mut rng = Rng::new(self.rng.next_u64());
                        self.disk = self.disk.crash_random(&mut |n| rng.below(n));
                    }
                    _ => {}
                }
                self.lbs = LbsNode::new(self.lbs_config.clone());
                self.lbs_lives += 1;
                self.lbs_accepting = false;
                self.drain_lbs();
            }
        }
        self.start_kvlds();
    }

    /// Runs lbs alone until it accepts, connects it to a new kvlds-side
    /// node and drains that node's first outputs (its recovery starts).
    fn start_kvlds(&mut self) {
        assert!(self.kvlds.is_none());
        for _ in 0..STEPS_PER_RUN_MAX {
            if self.lbs_accepting {
                break;
            }
            if !self.disk_ops.is_empty() && !self.disk_frozen {
                let i = self.rng.below(self.disk_ops.len() as u64) as usize;
                let (id, op) = self.disk_ops.swap_remove(i);
                let result = self.disk.execute(&op);
                self.feed_lbs(Input::Disk { id, result });
            } else if let Some(at) = self.lbs.poll_timeout() {
                self.now = self.now.max(at);
                self.feed_lbs(Input::Timeout);
            } else {
                self.fail("lbs does not accept a connection and has nothing left to do");
            }
        }
        if !self.lbs_accepting {
            self.fail("lbs never accepted a connection");
        }
        self.lbs_conn = ConnId(self.next_lbs_conn);
        self.next_lbs_conn += 1;
        self.lbs_reading = true;
        self.kvlds_upstream_reading = true;
        self.feed_lbs(Input::Accepted { conn: self.lbs_conn });
        self.kvlds = Some((self.make_kvlds)());
        self.kvlds_lives += 1;
        self.drain_kvlds();
    }

    // ----- feeding and routing ------------------------------------------

    /// Gives `input` to kvlds and routes its outputs.
    fn feed_kvlds(&mut self, input: Input) {
        let now = self.now;
        self.kvlds.as_mut().expect("kvlds is running").handle_input(now, input);
        self.drain_kvlds();
    }

    /// Gives `input` to lbs and routes its outputs.
    fn feed_lbs(&mut self, input: Input) {
        self.lbs.handle_input(self.now, input);
        self.drain_lbs();
    }

    fn drain_kvlds(&mut self) {
        while let Some(out) = self.kvlds.as_mut().expect("kvlds is running").poll_output() {
            if let Err(e) = self.route_kvlds(out) {
                self.fail(&format!("kvlds: {e}"));
            }
        }
    }

    fn route_kvlds(&mut self, out: Output) -> Result<(), String> {
        match out {
            Output::Send { conn: ConnId::UPSTREAM, data } => self.to_lbs.extend_from_slice(&data),
            Output::Send { conn, data } => {
                let client = self.clients.get_mut(&conn).ok_or(format!("send on unknown {conn}"))?;
                if let Some(end) = &client.end {
                    return Err(format!("send on {conn}, which has ended ({end:?})"));
                }
                client.to_client.extend_from_slice(&data);
            }
            Output::Close { conn: ConnId::UPSTREAM, reason } => {
                return Err(format!("closed its upstream connection to lbs: {reason}"))
            }
            Output::Close { conn, reason } => {
                let client = self.clients.get_mut(&conn).ok_or(format!("close of unknown {conn}"))?;
                if let Some(end) = &client.end {
                    return Err(format!("close of {conn}, which has ended ({end:?})"));
                }
                // What was sent before the close is flushed to the client.
                let rest = std::mem::take(&mut client.to_client);
                client.end = Some(ClientEnd::ByNode(reason));
                client.to_node.clear();
                self.client_reads(conn, &rest)?;
            }
            Output::ReadInterest { conn: ConnId::UPSTREAM, enabled } => self.kvlds_upstream_reading = enabled,
            Output::ReadInterest { conn, enabled } => {
                let client = self.clients.get_mut(&conn).ok_or(format!("read interest on unknown {conn}"))?;
                client.read_enabled = enabled;
                self.read_interest.push((conn, enabled));
            }
            Output::Accepting(on) => self.kvlds_accepting = on,
            Output::Disk { op, .. } => {
                return Err(format!("asked for a disk operation ({op:?}); it has no disk"))
            }
            Output::Log { level, message } => {
                self.log(format!("kvlds#{} {level:?}: {message}", self.kvlds_lives))
            }
            Output::Exit(reason) => return Err(format!("exited: {reason:?}")),
        }
        Ok(())
    }

    fn drain_lbs(&mut self) {
        while let Some(out) = self.lbs.poll_output() {
            if let Err(e) = self.route_lbs(out) {
                self.fail(&format!("lbs: {e}"));
            }
        }
    }

    fn route_lbs(&mut self, out: Output) -> Result<(), String> {
        match out {
            Output::Send { conn, data } if conn == self.lbs_conn && self.kvlds.is_some() => {
                self.to_kvlds_upstream.extend_from_slice(&data)
            }
            Output::Send { conn, .. } => return Err(format!("send on {conn}, which is not open")),
            Output::Close { conn, reason } => {
                return Err(format!("closed {conn} (kvlds' upstream): {reason}"))
            }
            Output::ReadInterest { conn, enabled } if conn == self.lbs_conn => self.lbs_reading = enabled,
            Output::ReadInterest { conn, .. } => return Err(format!("read interest on unknown {conn}")),
            Output::Accepting(on) => self.lbs_accepting = on,
            Output::Disk { id, op } => self.disk_ops.push((id, op)),
            Output::Log { level, message } => {
                self.log(format!("lbs#{} {level:?}: {message}", self.lbs_lives))
            }
            Output::Exit(reason) => return Err(format!("exited: {reason:?}")),
        }
        Ok(())
    }

    fn log(&mut self, line: String) {
        if self.logs.len() == LOGS_KEPT {
            self.logs.pop_front();
        }
        self.logs.push_back(line);
    }

    // ----- failure reports ----------------------------------------------

    /// The state of the whole pair, for failure messages.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "pair at t={}ns after {} steps; kvlds life {} ({}), accepting {}, reading upstream {}; \
             lbs life {}, accepting {}, reading {}; bytes to lbs {}, to kvlds {}; \
             disk ops pending {:?}{}; timers kvlds {:?} lbs {:?}\n",
            self.now.nanos,
            self.steps_total,
            self.kvlds_lives,
            if self.kvlds.is_some() { "running" } else { "dead" },
            self.kvlds_accepting,
            self.kvlds_upstream_reading,
            self.lbs_lives,
            self.lbs_accepting,
            self.lbs_reading,
            self.to_lbs.len(),
            self.to_kvlds_upstream.len(),
            self.disk_ops_pending(),
            if self.disk_frozen { " (frozen)" } else { "" },
            self.kvlds.as_ref().and_then(|k| k.poll_timeout()).map(|t| t.nanos),
            self.lbs.poll_timeout().map(|t| t.nanos),
        );
        for (conn, c) in &self.clients {
            if c.is_open() || !c.outstanding.is_empty() {
                s += &format!(
                    "  client {conn}: end {:?}, outstanding {}, unanswered ids {:x?}, bytes to kvlds {}, \
                     bytes to client {}, kvlds reading {}, client reading {}\n",
                    c.end,
                    c.outstanding.len(),
                    c.outstanding.keys().take(4).collect::<Vec<_>>(),
                    c.to_node.len(),
                    c.to_client.len(),
                    c.read_enabled,
                    c.reading,
                );
            }
        }
        s += "  last log lines:\n";
        for line in self.logs.iter().rev().take(30).collect::<Vec<_>>().into_iter().rev() {
            s += &format!("    {line}\n");
        }
        s
    }

    /// Panics with `what` and the state of the pair.
    #[track_caller]
    pub fn fail(&self, what: &str) -> ! {
        panic!("{what}\n{}", self.describe())
    }
}

/// One direction of one connection, named by its receiver.
#[derive(Debug, Clone, Copy)]
enum Pipe {
    /// kvlds' upstream bytes, into lbs.
    Lbs,
    /// lbs' bytes, into kvlds' upstream.
    KvldsUpstream,
    /// A client's requests, into kvlds.
    Kvlds(ConnId),
    /// kvlds' answers, into a client.
    Client(ConnId),
}

/// A request described without its (possibly long) bytes, for messages.
pub fn short(req: &KvldsRequest) -> String {
    let s = format!("{req:?}");
    if s.chars().count() > 300 {
        format!("{}...", s.chars().take(300).collect::<String>())
    } else {
        s
    }
}
