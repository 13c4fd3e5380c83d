//! kvlds against a model: the kvlds node and an lbs node on an in-memory
//! disk, driven in-process by the `kvpair` harness (random byte splits,
//! disk operations completed in random order, a virtual clock), checked
//! request by request against a `BTreeMap` of what a client must see.
//!
//! - `model_matches_random_pipelined_workloads_with_restarts` (proptest):
//!   random SET/CAS/ADD/MODIFY/DELETE/CAD/GET/RANGE/PARAMS over a small key
//!   alphabet, pipelined in groups, with kvlds and lbs killed and restarted
//!   (process crashes and power losses), at rest and with requests in
//!   flight; tiny caches and 512-byte blocks keep the tree deep and busy;
//!   some cases delay commits (`-w`) or force them early (`-g`), so timers
//!   run too. Over all cases, every hard path counted by `KvldsProbes` must
//!   have been taken.
//! - `twenty_thousand_keys_grow_then_shrink_the_tree`: sequential inserts,
//!   full RANGE paging, random-order deletes, restarts between phases, and
//!   the probe counters that show splits, merges, evictions and reloads.
//! - `requests_right_after_recovery_are_answered_while_its_reads_are_in_flight`:
//!   requests that need pages the recovery scan read ahead and had not yet
//!   received when kvlds started accepting.
//! - Edge behaviour of PROTOCOL.md, one test each.
//!
//! How the model stays exact with pipelining: within one group of requests
//! in flight, a key that a modifying request (MR) touches is never read by
//! a GET or covered by a RANGE of the same group. MRs on one key are
//! allowed (the protocol orders them: same key, same connection), so every
//! answer is determined by applying the group in send order. When a group
//! is cut short by a crash or a closed connection, an unanswered MR may or
//! may not have taken effect: for each key the possible values are those
//! after any prefix of its MRs that includes every answered one, and the
//! first thing done after reconnecting is to GET each such key and check
//! the value is one of them.
//!
//! `mod harness_self_check` runs the same scenarios against a toy store
//! (whole-map snapshots in lbs), which proves the harness and the checks
//! can pass and exercises the lbs side while kvlds is being written.
//!
//! Replaying: the proptest seeds are fixed (`RngSeed::Fixed`), so a failure
//! reproduces as is; `KVLDS_MODEL_CASES=N` runs N cases instead of 256 (32
//! for the toy). A case's harness choices all come from its `seed`, so
//! proptest cannot shrink much (dropping an action changes every later
//! choice); running the test again replays the same failing case.

mod kvpair;
mod memdisk;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::rc::Rc;

use bytes::Bytes;
use kivaloo::contract::{ConnId, Node};
use kivaloo::kvlds_proto::{KvldsRequest, KvldsResponse};
use kivaloo::packet::encode_packet;
use kivaloo_nodes::kvlds::{KvldsConfig, KvldsNode, KvldsProbes};
use kivaloo_nodes::lbs::LbsConfig;
use kvpair::{ClientEnd, Pair, Restart};
use proptest::prelude::*;
use proptest::test_runner::{RngSeed, TestRunner};

/// lbs block size: the smallest, so that pages hold few pairs.
const BS: u32 = 512;
/// kvlds' limits at 512-byte blocks (PROTOCOL.md's golden PARAMS answer).
const KEY_LEN_MAX: usize = 64;
const VALUE_LEN_MAX: usize = 96;
/// The most requests one pipelined group has in flight.
const GROUP_MAX: usize = 64;
/// kvlds' bound on one connection's pending requests.
const PENDING_REQUESTS_MAX: usize = 4096;

/// What a client must see: key -> value.
type Model = BTreeMap<Bytes, Bytes>;

// ===========================================================================
// The node under test

/// What the tests ask of the kvlds-side node beyond the contract.
trait UnderTest: Node + 'static {
    /// Checks the node's own bounds at a quiet moment.
    fn check_quiet(&self) {}
}

impl UnderTest for KvldsNode {
    fn check_quiet(&self) {
        let max = self.cache_pages_max();
        assert!(max > 0, "cache bound unknown while serving");
        assert!(self.cache_pages() <= max, "{} clean pages cached, bound {max}", self.cache_pages());
    }
}

/// lbs as every pair here uses it: 512-byte blocks and small files, so that
/// FREE can remove old files and the in-memory disk's fsyncs (which copy
/// the newest file) stay cheap.
fn lbs_config(file_len_min_bytes: u64) -> LbsConfig {
    LbsConfig { file_len_min_bytes, ..LbsConfig::new(BS) }
}

/// The real kvlds with a cache of `cache_pages` pages, its invariants
/// checked after every commit.
fn kvlds_config(cache_pages: u64) -> KvldsConfig {
    KvldsConfig { cache_pages_max: Some(cache_pages), check_invariants: true, ..KvldsConfig::default() }
}

/// A pair with the real kvlds as `config` says.
fn kvlds_pair_with(seed: u64, config: KvldsConfig, file_len_min_bytes: u64) -> Pair<KvldsNode> {
    Pair::new(seed, lbs_config(file_len_min_bytes), move || KvldsNode::new(config.clone()))
}

/// A pair with the real kvlds: a cache of `cache_pages` pages.
fn kvlds_pair(seed: u64, cache_pages: u64, file_len_min_bytes: u64) -> Pair<KvldsNode> {
    kvlds_pair_with(seed, kvlds_config(cache_pages), file_len_min_bytes)
}

// ===========================================================================
// Requests, keys and values

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn set(key: &Bytes, value: &Bytes) -> KvldsRequest {
    KvldsRequest::Set { key: key.clone(), value: value.clone() }
}

fn get(key: &Bytes) -> KvldsRequest {
    KvldsRequest::Get { key: key.clone() }
}

fn range(max_bytes: u32, start: &Bytes, end: &Bytes) -> KvldsRequest {
    KvldsRequest::Range { max_bytes, start: start.clone(), end: end.clone() }
}

/// Key number `i` of the workload's alphabet. Lengths 0..=64; keys of one
/// length differ in their last byte and share long prefixes with keys of
/// other lengths, so separators and prefix handling get work.
fn key_of(i: u8) -> Bytes {
    let i = i as usize;
    let bytes: Vec<u8> = match i {
        0 => Vec::new(),
        1 => vec![0],
        2 => vec![0xff; KEY_LEN_MAX],
        3 => vec![0; KEY_LEN_MAX],
        _ => {
            let len = 1 + (i * 37) % KEY_LEN_MAX;
            let mut k = vec![b'k'; len];
            k[0] = b'a' + (i % 3) as u8;
            k[len - 1] = i as u8;
            k
        }
    };
    Bytes::from(bytes)
}

/// A value, described by its length (0..=96) and a fill pattern.
#[derive(Debug, Clone, Copy)]
struct Val {
    len: u8,
    fill: u8,
}

fn value_of(v: Val) -> Bytes {
    let len = v.len as usize % (VALUE_LEN_MAX + 1);
    (0..len).map(|j| v.fill.wrapping_add((j as u8).wrapping_mul(31))).collect::<Vec<u8>>().into()
}

/// The old value a CAS or CAD names.
#[derive(Debug, Clone, Copy)]
enum Old {
    /// The key's value when the request is sent (this value if absent), so
    /// that the condition holds.
    Current(Val),
    /// This value (the condition almost never holds).
    Other(Val),
}

/// One request of the workload; keys are alphabet numbers, reduced modulo
/// the case's alphabet size.
#[derive(Debug, Clone)]
enum Op {
    Set {
        key: u8,
        value: Val,
    },
    Cas {
        key: u8,
        old: Old,
        new: Val,
    },
    Add {
        key: u8,
        value: Val,
    },
    Modify {
        key: u8,
        value: Val,
    },
    Delete {
        key: u8,
    },
    Cad {
        key: u8,
        old: Old,
    },
    Get {
        key: u8,
    },
    /// `None` keys are the empty key (for `end`: past the last key).
    Range {
        start: Option<u8>,
        end: Option<u8>,
        max_bytes: u32,
    },
    Params,
}

/// One step of a case.
#[derive(Debug, Clone)]
enum Action {
    /// Add a request to the group being built (a conflicting request, or a
    /// full group, first waits for the group's answers).
    Op(Op),
    /// Wait for every answer of the group.
    Flush,
    /// Restart as `how`: with `steps: None` once the group is answered;
    /// otherwise after `steps` random steps with the group in flight.
    Crash { how: Restart, steps: Option<u16> },
    /// The client closes its connection after `steps` random steps with the
    /// group in flight, and a new one connects.
    Reconnect { steps: u16 },
}

/// One generated case.
#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    cache_pages: u64,
    key_space: u8,
    file_len_min_bytes: u64,
    /// kvlds' `-w` and `-g`: batches wait for a timer, or start at once.
    commit_delay_ns: u64,
    commit_forced_requests: u64,
    actions: Vec<Action>,
}

fn val() -> impl Strategy<Value = Val> {
    (0u8..=VALUE_LEN_MAX as u8, any::<u8>()).prop_map(|(len, fill)| Val { len, fill })
}

fn old() -> impl Strategy<Value = Old> {
    prop_oneof![3 => val().prop_map(Old::Current), 1 => val().prop_map(Old::Other)]
}

fn budget() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(1), 2u32..600, 600u32..5000, Just(u32::MAX)]
}

fn op() -> impl Strategy<Value = Op> {
    let key = any::<u8>;
    prop_oneof![
        20 => (key(), val()).prop_map(|(key, value)| Op::Set { key, value }),
        8 => (key(), old(), val()).prop_map(|(key, old, new)| Op::Cas { key, old, new }),
        8 => (key(), val()).prop_map(|(key, value)| Op::Add { key, value }),
        8 => (key(), val()).prop_map(|(key, value)| Op::Modify { key, value }),
        10 => key().prop_map(|key| Op::Delete { key }),
        6 => (key(), old()).prop_map(|(key, old)| Op::Cad { key, old }),
        15 => key().prop_map(|key| Op::Get { key }),
        8 => (proptest::option::of(key()), proptest::option::of(key()), budget())
            .prop_map(|(start, end, max_bytes)| Op::Range { start, end, max_bytes }),
        1 => Just(Op::Params),
    ]
}

fn restart_kind() -> impl Strategy<Value = Restart> {
    prop_oneof![
        Just(Restart::Kvlds),
        Just(Restart::Both),
        Just(Restart::PowerLoss),
        Just(Restart::PowerLossTorn)
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        90 => op().prop_map(Action::Op),
        7 => Just(Action::Flush),
        2 => (restart_kind(), proptest::option::of(0u16..400))
            .prop_map(|(how, steps)| Action::Crash { how, steps }),
        1 => (0u16..400).prop_map(|steps| Action::Reconnect { steps }),
    ]
}

/// Cases of up to `actions_max` actions over alphabets of `key_spaces`.
fn case(actions_max: usize, key_spaces: &'static [u8]) -> impl Strategy<Value = Case> {
    (
        any::<u64>(),
        2u64..=16,
        proptest::sample::select(key_spaces),
        prop_oneof![Just(1u64), Just(64 << 10), Just(1 << 20)],
        prop_oneof![2 => Just(0u64), 1 => Just(20_000), 1 => Just(5_000_000)],
        prop_oneof![3 => Just(4096u64), 1 => 1u64..8],
        proptest::collection::vec(action(), 1..actions_max),
    )
        .prop_map(
            |(
                seed,
                cache_pages,
                key_space,
                file_len_min_bytes,
                commit_delay_ns,
                commit_forced_requests,
                actions,
            )| {
                Case {
                    seed,
                    cache_pages,
                    key_space,
                    file_len_min_bytes,
                    commit_delay_ns,
                    commit_forced_requests,
                    actions,
                }
            },
        )
}

/// Cases to run: `KVLDS_MODEL_CASES` or `default`.
fn cases(default: u32) -> u32 {
    std::env::var("KVLDS_MODEL_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn proptest_config(cases: u32, seed: u64) -> ProptestConfig {
    ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        // The seed is fixed: a failure replays as is, without a file in the tree.
        failure_persistence: None,
        max_shrink_time: 120_000,
        ..ProptestConfig::default()
    }
}

// ===========================================================================
// Checking answers

/// Checks a RANGE answer against `model` (which must hold the range's
/// keys as they were when the request was served). The rules:
///
/// - `start >= end` (end not empty): no pairs, `next == end`;
/// - the pairs are exactly the model's pairs in `[start, next)` (an empty
///   `next` is past the last key) that are also below `end`, in order:
///   nothing outside the range, nothing missed, nothing at or after `next`;
/// - at least one pair if the range holds any; an answer with no pairs
///   covers the whole range (`next` empty or at or after `end`);
/// - budget: the pairs before the last one fit in `max_bytes` (counting
///   each pair as its two length bytes plus key and value), so the answer
///   is "about" the budget and may hold one pair even if larger.
fn check_range(
    model: &Model,
    start: &Bytes,
    end: &Bytes,
    max_bytes: u32,
    resp: &KvldsResponse,
) -> Result<(), String> {
    let KvldsResponse::Range { next, pairs } = resp else {
        return Err(format!("not a RANGE answer: {resp:?}"));
    };
    let below_end = |k: &Bytes| end.is_empty() || k < end;
    if !end.is_empty() && start >= end {
        if !pairs.is_empty() || next != end {
            return Err(format!(
                "start >= end must give no pairs and next = end; got {} pairs, next {next:?}",
                pairs.len()
            ));
        }
        return Ok(());
    }
    let in_range: Vec<(Bytes, Bytes)> = model
        .range::<Bytes, _>((Bound::Included(start), Bound::Unbounded))
        .take_while(|(k, _)| below_end(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let covered: Vec<(Bytes, Bytes)> =
        in_range.iter().filter(|(k, _)| next.is_empty() || k < next).cloned().collect();
    if *pairs != covered {
        return Err(format!(
            "pairs are not the model's pairs in [start, next): got keys {:?}, want {:?} (next {next:?})",
            pairs.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            covered.iter().map(|(k, _)| k).collect::<Vec<_>>()
        ));
    }
    if pairs.is_empty() {
        if !in_range.is_empty() {
            return Err(format!("no pairs although the range holds {} (next {next:?})", in_range.len()));
        }
        if !(next.is_empty() || (!end.is_empty() && next >= end)) {
            return Err(format!("no pairs, and next {next:?} does not cover the range up to {end:?}"));
        }
    }
    let sizes: Vec<u64> = pairs.iter().map(|(k, v)| 2 + k.len() as u64 + v.len() as u64).collect();
    let before_last: u64 = sizes.iter().rev().skip(1).sum();
    if before_last > max_bytes as u64 {
        return Err(format!(
            "{} pairs of {} bytes in all for a budget of {max_bytes}",
            pairs.len(),
            sizes.iter().sum::<u64>()
        ));
    }
    Ok(())
}

/// Pages through `[start, end)` with RANGE requests of `max_bytes` each,
/// checking every page against `model`, and checks that the pages together
/// return the model's pairs in the range exactly once, in order.
fn scan<K: UnderTest>(
    p: &mut Pair<K>,
    conn: ConnId,
    model: &Model,
    start: &Bytes,
    end: &Bytes,
    max_bytes: u32,
) {
    let want: Vec<(Bytes, Bytes)> = if !end.is_empty() && start >= end {
        Vec::new()
    } else {
        model
            .range::<Bytes, _>((Bound::Included(start), Bound::Unbounded))
            .take_while(|(k, _)| end.is_empty() || *k < end)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let mut got: Vec<(Bytes, Bytes)> = Vec::new();
    let mut from = start.clone();
    for page in 0.. {
        if page > want.len() + 1 {
            p.fail(&format!("paging [{start:?}, {end:?}) did not end after {page} pages"));
        }
        let resp = p.call(conn, &range(max_bytes, &from, end));
        if let Err(e) = check_range(model, &from, end, max_bytes, &resp) {
            p.fail(&format!("RANGE page {page} from {from:?} to {end:?}, budget {max_bytes}: {e}"));
        }
        let KvldsResponse::Range { next, pairs } = resp else { unreachable!() };
        got.extend(pairs);
        if next.is_empty() || (!end.is_empty() && next >= *end) {
            break;
        }
        from = next;
    }
    if got != want {
        p.fail(&format!(
            "paged RANGE returned {} pairs, the model has {} in the range",
            got.len(),
            want.len()
        ));
    }
}

/// GETs `keys` pipelined in groups and checks each answer against `model`.
fn check_gets<K: UnderTest>(p: &mut Pair<K>, conn: ConnId, model: &Model, keys: &[Bytes]) {
    for group in keys.chunks(GROUP_MAX) {
        let ids: Vec<u64> = group.iter().map(|k| p.send(conn, &get(k))).collect();
        p.settle();
        for (k, id) in group.iter().zip(ids) {
            let got = p.take_response(conn, id);
            let want = KvldsResponse::Get(model.get(k).cloned());
            if got.as_ref() != Some(&want) {
                p.fail(&format!("GET {k:?}: got {got:?}, want {want:?}"));
            }
        }
    }
}

/// Sends one request per item of `reqs`, pipelined in groups, and checks
/// that each is answered `Done(true)`.
fn all_done<K: UnderTest>(p: &mut Pair<K>, conn: ConnId, reqs: &[KvldsRequest]) {
    for group in reqs.chunks(GROUP_MAX) {
        let ids: Vec<u64> = group.iter().map(|r| p.send(conn, r)).collect();
        p.settle();
        for (r, id) in group.iter().zip(ids) {
            let got = p.take_response(conn, id);
            if got != Some(KvldsResponse::Done(true)) {
                p.fail(&format!("{}: got {got:?}, want Done(true)", kvpair::short(r)));
            }
        }
    }
}

// ===========================================================================
// The model runner

/// What an answer must be.
#[derive(Debug)]
enum Expect {
    Done(bool),
    Get(Option<Bytes>),
    /// Checked with [`check_range`] against the group's model.
    Range,
    Params,
}

/// A request of the group in flight.
#[derive(Debug)]
struct InFlight {
    id: u64,
    req: KvldsRequest,
    expect: Expect,
}

/// The MRs of one group on one key, in send order.
#[derive(Debug)]
struct KeyHistory {
    ids: Vec<u64>,
    /// `values[0]` before the group, `values[i]` after its `i`-th MR.
    values: Vec<Option<Bytes>>,
}

/// The group of requests in flight and what they do to the model.
#[derive(Debug, Default)]
struct Group {
    sent: Vec<InFlight>,
    mrs: BTreeMap<Bytes, KeyHistory>,
    /// Keys read by GETs of the group.
    reads: BTreeSet<Bytes>,
    /// `[start, end)` of the group's RANGEs (an empty end is unbounded).
    ranges: Vec<(Bytes, Bytes)>,
}

impl Group {
    fn in_ranges(&self, key: &Bytes) -> bool {
        self.ranges.iter().any(|(s, e)| key >= s && (e.is_empty() || key < e))
    }

    fn mr_in(&self, start: &Bytes, end: &Bytes) -> bool {
        self.mrs
            .range::<Bytes, _>((Bound::Included(start), Bound::Unbounded))
            .next()
            .is_some_and(|(k, _)| end.is_empty() || k < end)
    }
}

/// One case being run: the pair, the client connection, the model.
struct ModelRun<K: UnderTest> {
    p: Pair<K>,
    conn: ConnId,
    /// The model as of the start of the group in flight.
    model: Model,
    /// The model after the group in flight, applied in send order.
    after: Model,
    group: Group,
    key_space: u8,
}

impl<K: UnderTest> ModelRun<K> {
    fn new(mut p: Pair<K>, key_space: u8) -> Self {
        let conn = p.connect();
        ModelRun { p, conn, model: Model::new(), after: Model::new(), group: Group::default(), key_space }
    }

    fn key(&self, i: u8) -> Bytes {
        key_of(i % self.key_space)
    }

    fn old_value(&self, key: &Bytes, old: Old) -> Bytes {
        match old {
            Old::Current(v) => self.after.get(key).cloned().unwrap_or_else(|| value_of(v)),
            Old::Other(v) => value_of(v),
        }
    }

    fn run(&mut self, actions: &[Action]) {
        for action in actions {
            match action {
                Action::Op(op) => self.push(op),
                Action::Flush => self.flush(),
                Action::Crash { how, steps: None } => {
                    self.flush();
                    self.p.restart(*how);
                    self.conn = self.p.connect();
                    self.read_back(&BTreeSet::new());
                }
                Action::Crash { how, steps: Some(n) } => {
                    self.p.run_steps(*n as u64);
                    self.cut_short(true, |p| p.restart(*how));
                }
                Action::Reconnect { steps } => {
                    self.p.run_steps(*steps as u64);
                    let conn = self.conn;
                    self.cut_short(false, |p| {
                        p.close_client(conn);
                        // Whatever the closed connection's requests do, they do it now.
                        p.run_idle();
                    });
                }
            }
        }
        self.flush();
        self.check_everything();
        let how = if self.p.rng.chance(50) { Restart::PowerLoss } else { Restart::Both };
        self.p.restart(how);
        self.conn = self.p.connect();
        self.read_back(&BTreeSet::new());
        self.check_everything();
    }

    /// Right after a restart: GETs of every key of the alphabet but the
    /// `uncertain` ones, all sent at once; half the time the disk stalls
    /// until they have all arrived, so that they meet the last reads of
    /// kvlds' recovery in flight. Checks them against `after` (which, for
    /// the keys asked, is also the model before the group in flight).
    fn read_back(&mut self, uncertain: &BTreeSet<Bytes>) {
        let keys: Vec<Bytes> = (0..self.key_space).map(key_of).filter(|k| !uncertain.contains(k)).collect();
        let stall = self.p.rng.chance(50);
        self.p.disk_frozen = stall;
        let ids: Vec<u64> = keys.iter().map(|k| self.p.send(self.conn, &get(k))).collect();
        if stall {
            self.p.run_idle();
            self.p.disk_frozen = false;
        }
        self.p.settle();
        for (k, id) in keys.iter().zip(ids) {
            let got = self.p.take_response(self.conn, id);
            let want = KvldsResponse::Get(self.after.get(k).cloned());
            if got.as_ref() != Some(&want) {
                self.p.fail(&format!("GET {k:?} right after a restart: got {got:?}, want {want:?}"));
            }
        }
    }

    /// Adds `op` to the group (after waiting for the group if `op` conflicts
    /// with it or it is full) and sends it.
    fn push(&mut self, op: &Op) {
        let conflict = match op {
            Op::Set { key, .. }
            | Op::Cas { key, .. }
            | Op::Add { key, .. }
            | Op::Modify { key, .. }
            | Op::Delete { key }
            | Op::Cad { key, .. } => {
                let k = self.key(*key);
                self.group.reads.contains(&k) || self.group.in_ranges(&k)
            }
            Op::Get { key } => self.group.mrs.contains_key(&self.key(*key)),
            Op::Range { start, end, .. } => {
                let start = start.map(|i| self.key(i)).unwrap_or_default();
                let end = end.map(|i| self.key(i)).unwrap_or_default();
                self.group.mr_in(&start, &end)
            }
            Op::Params => false,
        };
        if conflict || self.group.sent.len() >= GROUP_MAX {
            self.flush();
        }
        let (req, expect) = self.apply(op);
        let id = self.p.send(self.conn, &req);
        if req.is_modifying() {
            let key = match &req {
                KvldsRequest::Set { key, .. }
                | KvldsRequest::Cas { key, .. }
                | KvldsRequest::Add { key, .. }
                | KvldsRequest::Modify { key, .. }
                | KvldsRequest::Delete { key }
                | KvldsRequest::Cad { key, .. } => key.clone(),
                _ => unreachable!(),
            };
            let before = self.model.get(&key).cloned();
            let history = self
                .group
                .mrs
                .entry(key.clone())
                .or_insert(KeyHistory { ids: Vec::new(), values: vec![before] });
            history.ids.push(id);
            history.values.push(self.after.get(&key).cloned());
        }
        self.group.sent.push(InFlight { id, req, expect });
    }

    /// The request for `op` and its expected answer; applies it to `after`.
    fn apply(&mut self, op: &Op) -> (KvldsRequest, Expect) {
        match *op {
            Op::Set { key, value } => {
                let (key, value) = (self.key(key), value_of(value));
                self.after.insert(key.clone(), value.clone());
                (KvldsRequest::Set { key, value }, Expect::Done(true))
            }
            Op::Cas { key, old, new } => {
                let key = self.key(key);
                let (old_value, new_value) = (self.old_value(&key, old), value_of(new));
                let holds = self.after.get(&key) == Some(&old_value);
                if holds {
                    self.after.insert(key.clone(), new_value.clone());
                }
                (KvldsRequest::Cas { key, old_value, new_value }, Expect::Done(holds))
            }
            Op::Add { key, value } => {
                let (key, value) = (self.key(key), value_of(value));
                let holds = !self.after.contains_key(&key);
                if holds {
                    self.after.insert(key.clone(), value.clone());
                }
                (KvldsRequest::Add { key, value }, Expect::Done(holds))
            }
            Op::Modify { key, value } => {
                let (key, value) = (self.key(key), value_of(value));
                let holds = self.after.contains_key(&key);
                if holds {
                    self.after.insert(key.clone(), value.clone());
                }
                (KvldsRequest::Modify { key, value }, Expect::Done(holds))
            }
            Op::Delete { key } => {
                let key = self.key(key);
                self.after.remove(&key);
                (KvldsRequest::Delete { key }, Expect::Done(true))
            }
            Op::Cad { key, old } => {
                let key = self.key(key);
                let old_value = self.old_value(&key, old);
                let holds = self.after.get(&key) == Some(&old_value);
                if holds {
                    self.after.remove(&key);
                }
                (KvldsRequest::Cad { key, old_value }, Expect::Done(holds))
            }
            Op::Get { key } => {
                let key = self.key(key);
                self.group.reads.insert(key.clone());
                let value = self.after.get(&key).cloned();
                (KvldsRequest::Get { key }, Expect::Get(value))
            }
            Op::Range { start, end, max_bytes } => {
                let start = start.map(|i| self.key(i)).unwrap_or_default();
                let end = end.map(|i| self.key(i)).unwrap_or_default();
                self.group.ranges.push((start.clone(), end.clone()));
                (KvldsRequest::Range { max_bytes, start, end }, Expect::Range)
            }
            Op::Params => (KvldsRequest::Params, Expect::Params),
        }
    }

    /// Checks the answer to one request of the group.
    fn check(&self, f: &InFlight, resp: &KvldsResponse) {
        let ok = match (&f.expect, resp) {
            (Expect::Done(want), KvldsResponse::Done(got)) => want == got,
            (Expect::Get(want), KvldsResponse::Get(got)) => want == got,
            (Expect::Params, KvldsResponse::Params { max_key_len, max_value_len }) => {
                (*max_key_len, *max_value_len) == (KEY_LEN_MAX as u32, VALUE_LEN_MAX as u32)
            }
            (Expect::Range, resp) => {
                let KvldsRequest::Range { max_bytes, start, end } = &f.req else { unreachable!() };
                match check_range(&self.after, start, end, *max_bytes, resp) {
                    Ok(()) => true,
                    Err(e) => self.p.fail(&format!("{}: {e}", kvpair::short(&f.req))),
                }
            }
            _ => false,
        };
        if !ok {
            self.p.fail(&format!("{}: got {resp:?}, want {:?}", kvpair::short(&f.req), f.expect));
        }
    }

    /// Waits for every answer of the group and checks them.
    fn flush(&mut self) {
        if self.group.sent.is_empty() {
            return;
        }
        self.p.settle();
        let group = std::mem::take(&mut self.group);
        for f in &group.sent {
            match self.p.take_response(self.conn, f.id) {
                Some(resp) => self.check(f, &resp),
                None => self.p.fail(&format!("{}: no answer", kvpair::short(&f.req))),
            }
        }
        self.model = self.after.clone();
        self.p.kvlds().check_quiet();
    }

    /// Ends the group in flight with `end` (a restart if `restarts`, or the
    /// client closing): checks the answers that came, reconnects, and
    /// settles the model of every key an unanswered MR may have changed by
    /// reading it.
    fn cut_short(&mut self, restarts: bool, end: impl FnOnce(&mut Pair<K>)) {
        let group = std::mem::take(&mut self.group);
        let mut answered = BTreeSet::new();
        for f in &group.sent {
            if let Some(resp) = self.p.take_response(self.conn, f.id) {
                self.check(f, &resp);
                answered.insert(f.id);
            }
        }
        end(&mut self.p);
        self.conn = self.p.connect();
        if restarts {
            let uncertain: BTreeSet<Bytes> = group.mrs.keys().cloned().collect();
            self.read_back(&uncertain);
        }
        let mut model = self.after.clone();
        for (key, history) in &group.mrs {
            // Every MR up to the last answered one took effect; any later
            // prefix may have.
            let done = history.ids.iter().rposition(|id| answered.contains(id)).map_or(0, |i| i + 1);
            let possible = &history.values[done..];
            let got = match self.p.call(self.conn, &get(key)) {
                KvldsResponse::Get(v) => v,
                other => self.p.fail(&format!("GET answered {other:?}")),
            };
            if !possible.contains(&got) {
                self.p.fail(&format!(
                    "after the group was cut short, {key:?} is {got:?}; possible values (after {done} of \
                     {} MRs on it, answered or not): {possible:?}",
                    history.ids.len()
                ));
            }
            match got {
                Some(v) => model.insert(key.clone(), v),
                None => model.remove(key),
            };
        }
        self.model = model.clone();
        self.after = model;
    }

    /// GETs every key of the alphabet and pages through the whole store.
    fn check_everything(&mut self) {
        let keys: Vec<Bytes> = (0..self.key_space).map(key_of).collect();
        let model = self.model.clone();
        check_gets(&mut self.p, self.conn, &model, &keys);
        let budget = [0, 1, 300, 4096, u32::MAX][self.p.rng.below(5) as usize];
        scan(&mut self.p, self.conn, &model, &Bytes::new(), &Bytes::new(), budget);
        let (a, z) = (
            key_of(self.p.rng.below(self.key_space as u64) as u8),
            key_of(self.p.rng.below(self.key_space as u64) as u8),
        );
        scan(&mut self.p, self.conn, &model, &a, &z, 200);
        self.p.kvlds().check_quiet();
    }
}

/// Runs `case` on `p`; returns the pair as the case left it.
fn run_case<K: UnderTest>(p: Pair<K>, case: &Case) -> Pair<K> {
    let mut run = ModelRun::new(p, case.key_space);
    run.run(&case.actions);
    run.p
}

/// Adds `more` to `total`, counter by counter.
fn add_probes(total: &mut KvldsProbes, more: KvldsProbes) {
    total.commits += more.commits;
    total.empty_batches += more.empty_batches;
    total.splits += more.splits;
    total.root_splits += more.root_splits;
    total.merges += more.merges;
    total.merge_cascades += more.merge_cascades;
    total.deroots += more.deroots;
    total.evictions += more.evictions;
    total.page_reads += more.page_reads;
    total.waits_for_pages += more.waits_for_pages;
    total.reloads_during_commit += more.reloads_during_commit;
    total.writes_waiting_for_next_batch += more.writes_waiting_for_next_batch;
    total.batches_on_unsynced_commit += more.batches_on_unsynced_commit;
    total.answers_held_for_commit_below += more.answers_held_for_commit_below;
    total.reads_finished_on_old_root += more.reads_finished_on_old_root;
    total.range_answers_cut_by_budget += more.range_answers_cut_by_budget;
    total.recoveries_empty += more.recoveries_empty;
    total.recoveries_found_root += more.recoveries_found_root;
    total.recoveries_skipped_tail += more.recoveries_skipped_tail;
    total.frees += more.frees;
}

/// Random pipelined workloads with restarts match the model; over all
/// cases, every hard path of the tree has been taken (a workload too easy
/// to find bugs fails here rather than passing quietly).
#[test]
fn model_matches_random_pipelined_workloads_with_restarts() {
    let totals = Rc::new(RefCell::new(KvldsProbes::default()));
    let mut runner = TestRunner::new(proptest_config(cases(256), 0x6b76_6c64_735f_6d6f));
    let result = runner.run(&case(600, &[6, 40, 200]), |case| {
        let config = KvldsConfig {
            commit_delay_ns: case.commit_delay_ns,
            commit_forced_requests: case.commit_forced_requests,
            ..kvlds_config(case.cache_pages)
        };
        let mut p = kvlds_pair_with(case.seed, config, case.file_len_min_bytes);
        let sum = totals.clone();
        p.on_retire(move |node: &KvldsNode| add_probes(&mut sum.borrow_mut(), node.probes()));
        let p = run_case(p, &case);
        add_probes(&mut totals.borrow_mut(), p.kvlds().probes());
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let t = *totals.borrow();
    eprintln!("kvlds probes over all cases: {t:?}");
    let paths = [
        ("commits", t.commits),
        ("empty batches", t.empty_batches),
        ("splits", t.splits),
        ("root splits", t.root_splits),
        ("merges", t.merges),
        ("deroots", t.deroots),
        ("evictions", t.evictions),
        ("page reads", t.page_reads),
        ("waits for pages", t.waits_for_pages),
        ("recoveries of an empty store", t.recoveries_empty),
        ("recoveries that found a root", t.recoveries_found_root),
        ("FREEs", t.frees),
    ];
    for (what, count) in paths {
        assert!(count > 0, "no {what} over all cases: {t:?}");
    }
}

// ===========================================================================
// A large store that grows, is read, and shrinks

/// Which phase [`grow_then_shrink`] has reached, for the caller's probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Every key inserted (one kvlds life).
    Inserted,
    /// Just recovered after a power loss.
    Recovered,
    /// Half the keys deleted (the same life as `Recovered`).
    HalfDeleted,
    /// Every key deleted (a life started at `HalfDeleted`).
    AllDeleted,
}

fn big_key(i: usize) -> Bytes {
    b(&format!("key{i:08}"))
}

fn big_value(i: usize) -> Bytes {
    b(&format!("v{i}-{}", "x".repeat(i % 29)))
}

/// Inserts `n` keys in order, pages through them, restarts, deletes them
/// all in random order with a restart halfway, and checks GETs and RANGEs
/// along the way; `probe` is called at the end of each [`Phase`].
fn grow_then_shrink<K: UnderTest>(mut p: Pair<K>, n: usize, probe: &mut dyn FnMut(Phase, &K)) {
    let mut model = Model::new();
    let mut conn = p.connect();
    let sample = |p: &mut Pair<K>, model: &Model, conn: ConnId, upto: usize| {
        let mut keys: Vec<Bytes> = (0..16).map(|_| big_key(p.rng.below(upto as u64) as usize)).collect();
        keys.push(big_key(n + 1));
        check_gets(p, conn, model, &keys);
        p.kvlds().check_quiet();
    };
    // Ten rounds each way, with checks after each.
    let round = n.div_ceil(10);
    for start in (0..n).step_by(round) {
        let end = (start + round).min(n);
        let reqs: Vec<KvldsRequest> = (start..end).map(|i| set(&big_key(i), &big_value(i))).collect();
        all_done(&mut p, conn, &reqs);
        for i in start..end {
            model.insert(big_key(i), big_value(i));
        }
        sample(&mut p, &model, conn, end);
    }
    probe(Phase::Inserted, p.kvlds());
    scan(&mut p, conn, &model, &Bytes::new(), &Bytes::new(), 4096);

    p.restart(Restart::PowerLoss);
    conn = p.connect();
    sample(&mut p, &model, conn, n);
    scan(&mut p, conn, &model, &Bytes::new(), &Bytes::new(), 4096);
    scan(&mut p, conn, &model, &big_key(n / 3), &big_key(n / 3 + 100), 0);
    probe(Phase::Recovered, p.kvlds());

    let mut order: Vec<usize> = (0..n).collect();
    p.rng.shuffle(&mut order);
    for (done, chunk) in order.chunks(round).enumerate() {
        let reqs: Vec<KvldsRequest> =
            chunk.iter().map(|&i| KvldsRequest::Delete { key: big_key(i) }).collect();
        all_done(&mut p, conn, &reqs);
        for &i in chunk {
            model.remove(&big_key(i));
        }
        let deleted: Vec<Bytes> = chunk.iter().take(8).map(|&i| big_key(i)).collect();
        check_gets(&mut p, conn, &model, &deleted);
        if !model.is_empty() {
            sample(&mut p, &model, conn, n);
            let remaining: Vec<Bytes> = model.keys().step_by((model.len() / 8).max(1)).cloned().collect();
            check_gets(&mut p, conn, &model, &remaining);
        }
        // Halfway (rounds are tenths): a new kvlds on the same lbs.
        if done == 4 {
            probe(Phase::HalfDeleted, p.kvlds());
            p.restart(Restart::Kvlds);
            conn = p.connect();
        }
    }
    assert!(model.is_empty());
    scan(&mut p, conn, &model, &Bytes::new(), &Bytes::new(), 4096);
    probe(Phase::AllDeleted, p.kvlds());
    p.restart(Restart::Both);
    conn = p.connect();
    scan(&mut p, conn, &model, &Bytes::new(), &Bytes::new(), 0);
    // The empty tree grows again.
    all_done(&mut p, conn, &[set(&big_key(7), &big_value(7))]);
    model.insert(big_key(7), big_value(7));
    scan(&mut p, conn, &model, &Bytes::new(), &Bytes::new(), 0);
}

#[test]
fn twenty_thousand_keys_grow_then_shrink_the_tree() {
    const CACHE_PAGES: u64 = 8;
    let p = kvlds_pair(20_000, CACHE_PAGES, 1 << 20);
    let mut merges = 0;
    grow_then_shrink(p, 20_000, &mut |phase, node: &KvldsNode| {
        let pr: KvldsProbes = node.probes();
        assert_eq!(node.cache_pages_max(), CACHE_PAGES as usize, "{phase:?}");
        match phase {
            Phase::Inserted => {
                assert!(pr.commits > 0 && pr.splits > 0, "{phase:?}: {pr:?}");
                assert!(pr.root_splits >= 2, "{phase:?}: the tree did not grow two levels: {pr:?}");
                assert!(pr.evictions > 0, "{phase:?}: nothing evicted from 8 pages: {pr:?}");
                assert!(pr.page_reads > 0, "{phase:?}: evicted pages never read back: {pr:?}");
                assert_eq!(pr.recoveries_empty, 1, "{phase:?}: {pr:?}");
            }
            Phase::Recovered => {
                assert_eq!((pr.recoveries_found_root, pr.recoveries_empty), (1, 0), "{phase:?}: {pr:?}");
                assert!(pr.page_reads > 0, "{phase:?}: {pr:?}");
            }
            Phase::HalfDeleted => merges += pr.merges,
            Phase::AllDeleted => {
                merges += pr.merges;
                assert!(merges > 0, "{phase:?}: no merges while deleting everything: {pr:?}");
                assert!(pr.deroots > 0, "{phase:?}: the tree never shrank a level: {pr:?}");
                assert!(pr.waits_for_pages > 0, "{phase:?}: {pr:?}");
                assert_eq!(pr.recoveries_found_root, 1, "{phase:?}: {pr:?}");
            }
        }
    });
}

// ===========================================================================
// Edge behaviour (PROTOCOL.md), as scenarios generic over the node

fn unwrap_range(resp: KvldsResponse) -> (Bytes, Vec<(Bytes, Bytes)>) {
    match resp {
        KvldsResponse::Range { next, pairs } => (next, pairs),
        other => panic!("not a RANGE answer: {other:?}"),
    }
}

/// Stores `pairs` and returns the model of them.
fn store<K: UnderTest>(p: &mut Pair<K>, conn: ConnId, pairs: &[(&str, &str)]) -> Model {
    let reqs: Vec<KvldsRequest> = pairs.iter().map(|(k, v)| set(&b(k), &b(v))).collect();
    all_done(p, conn, &reqs);
    pairs.iter().map(|(k, v)| (b(k), b(v))).collect()
}

fn range_budget_0_or_1_returns_the_first_pair<K: UnderTest>(mut p: Pair<K>) {
    let c = p.connect();
    let model = store(&mut p, c, &[("a", "1"), ("b", "2"), ("c", "3")]);
    for budget in [0, 1] {
        for (start, first, after) in [("", "a", "b"), ("a", "a", "b"), ("a\0", "b", "c"), ("b", "b", "c")] {
            let (start, first, after) = (b(start), b(first), b(after));
            let resp = p.call(c, &range(budget, &start, &Bytes::new()));
            check_range(&model, &start, &Bytes::new(), budget, &resp).unwrap();
            let (next, pairs) = unwrap_range(resp);
            assert_eq!(pairs, [(first.clone(), model[&first].clone())], "budget {budget} from {start:?}");
            assert!(next > first && next <= after, "budget {budget} from {start:?}: next {next:?}");
        }
        // The last pair: nothing after it to hold back.
        let resp = p.call(c, &range(budget, &b("c"), &Bytes::new()));
        check_range(&model, &b("c"), &Bytes::new(), budget, &resp).unwrap();
        // A bounded range, too.
        let resp = p.call(c, &range(budget, &b("a"), &b("c")));
        check_range(&model, &b("a"), &b("c"), budget, &resp).unwrap();
        assert_eq!(unwrap_range(resp).1.len(), 1);
    }
    scan(&mut p, c, &model, &Bytes::new(), &Bytes::new(), 0);
    scan(&mut p, c, &model, &b("a"), &b("c"), 1);
}

fn range_start_at_or_after_end_returns_nothing_and_next_is_end<K: UnderTest>(mut p: Pair<K>) {
    let c = p.connect();
    let model = store(&mut p, c, &[("a", "1"), ("b", "2"), ("c", "3")]);
    for (start, end) in [("b", "b"), ("c", "a"), ("zz", "b"), ("b", "a\0"), ("a\0", "a")] {
        for budget in [0, 1000, u32::MAX] {
            let (start, end) = (b(start), b(end));
            let resp = p.call(c, &range(budget, &start, &end));
            assert_eq!(
                resp,
                KvldsResponse::Range { next: end.clone(), pairs: vec![] },
                "[{start:?}, {end:?})"
            );
        }
    }
    // An empty range between stored keys is covered in one answer.
    let resp = p.call(c, &range(1000, &b("a\0"), &b("b")));
    check_range(&model, &b("a\0"), &b("b"), 1000, &resp).unwrap();
    // End is exclusive: [a, c) does not return c (kivaloo's off-by-one is not followed).
    scan(&mut p, c, &model, &b("a"), &b("c"), u32::MAX);
}

fn get_of_an_over_long_key_answers_absent<K: UnderTest>(mut p: Pair<K>) {
    let c = p.connect();
    let (longest_key, longest_value) =
        (Bytes::from(vec![7u8; KEY_LEN_MAX]), Bytes::from(vec![9u8; VALUE_LEN_MAX]));
    assert_eq!(p.call(c, &set(&longest_key, &longest_value)), KvldsResponse::Done(true));
    for len in [KEY_LEN_MAX + 1, 200, 255] {
        assert_eq!(p.call(c, &get(&Bytes::from(vec![7u8; len]))), KvldsResponse::Get(None), "{len}-byte key");
    }
    assert!(p.client(c).is_open());
    assert_eq!(p.call(c, &get(&longest_key)), KvldsResponse::Get(Some(longest_value)));
}

/// Runs until `conn` has been closed by kvlds; returns the reason.
fn dropped<K: UnderTest>(p: &mut Pair<K>, conn: ConnId) -> String {
    p.run_until("kvlds to drop the connection", |p| !p.client(conn).is_open());
    match &p.client(conn).end {
        Some(ClientEnd::ByNode(reason)) => reason.clone(),
        other => p.fail(&format!("{conn} ended as {other:?}, not closed by kvlds")),
    }
}

fn an_over_long_set_key_or_value_drops_the_connection<K: UnderTest>(mut p: Pair<K>) {
    let c = p.connect();
    let model = store(&mut p, c, &[("a", "1")]);
    let k = b("k");
    let bad = [
        set(&Bytes::from(vec![1u8; KEY_LEN_MAX + 1]), &b("v")),
        set(&k, &Bytes::from(vec![2u8; VALUE_LEN_MAX + 1])),
        set(&Bytes::from(vec![3u8; 255]), &Bytes::from(vec![4u8; 255])),
    ];
    let mut conn = c;
    for req in bad {
        let id = p.send(conn, &req);
        let reason = dropped(&mut p, conn);
        assert!(!reason.is_empty());
        assert_eq!(p.response(conn, id), None, "{}: answered and dropped", kvpair::short(&req));
        conn = p.connect();
        check_gets(&mut p, conn, &model, &[b("a"), k.clone()]);
    }
    assert_eq!(p.call(conn, &set(&k, &b("fine"))), KvldsResponse::Done(true));
}

fn a_malformed_request_drops_the_connection<K: UnderTest>(mut p: Pair<K>) {
    let c = p.connect();
    let model = store(&mut p, c, &[("a", "1")]);
    let packet = |record: &[u8]| {
        let mut out = bytes::BytesMut::new();
        encode_packet(&mut out, 77, record);
        out.to_vec()
    };
    let mut trailing = bytes::BytesMut::new();
    get(&b("a")).encode(78, &mut trailing);
    let mut bad_crc = trailing.to_vec();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0x40;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("an unknown request type", packet(&0xdead_beef_u32.to_be_bytes())),
        ("an lbs GET", packet(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])),
        ("an lbs PARAMS2", packet(&[0, 0, 0, 4])),
        ("a truncated SET", packet(&[0, 0, 1, 0x10, 5, b'a', b'b'])),
        ("a GET with a byte left over", packet(&[0, 0, 1, 0x30, 1, b'a', 0])),
        ("a record shorter than a type", packet(&[0, 1])),
        ("a bad CRC", bad_crc),
    ];
    let mut conn = c;
    for (what, bytes) in cases {
        p.send_raw(conn, &bytes);
        let reason = dropped(&mut p, conn);
        assert!(!reason.is_empty(), "{what}");
        conn = p.connect();
        check_gets(&mut p, conn, &model, &[b("a")]);
    }
}

fn params_answer_64_and_96<K: UnderTest>(mut p: Pair<K>) {
    let c = p.connect();
    let want = KvldsResponse::Params { max_key_len: KEY_LEN_MAX as u32, max_value_len: VALUE_LEN_MAX as u32 };
    assert_eq!(p.call(c, &KvldsRequest::Params), want);
    p.restart(Restart::Both);
    let c = p.connect();
    assert_eq!(p.call(c, &KvldsRequest::Params), want);
}

fn a_client_closing_with_hundreds_pending_is_followed_by_one_served<K: UnderTest>(mut p: Pair<K>) {
    let c = p.connect();
    let before: Vec<(Bytes, Bytes)> =
        (0..200).map(|i| (b(&format!("old{i:04}")), b(&format!("o{i}")))).collect();
    let reqs: Vec<KvldsRequest> = before.iter().map(|(k, v)| set(k, v)).collect();
    all_done(&mut p, c, &reqs);
    let mut model: Model = before.into_iter().collect();

    // Hundreds of requests of every kind held up behind a stalled disk.
    p.disk_frozen = true;
    let new_value = |i: usize| b(&format!("n{i}"));
    for i in 0..300 {
        p.send(c, &set(&b(&format!("new{i:04}")), &new_value(i)));
        if i % 3 == 0 {
            p.send(c, &get(&b(&format!("old{:04}", i % 200))));
        }
        if i % 50 == 0 {
            p.send(c, &range(100, &b("old"), &b("p")));
        }
    }
    p.run_idle();
    assert!(p.client(c).outstanding() >= 300, "the stalled disk did not hold the SETs up");
    p.close_client(c);
    p.disk_frozen = false;
    p.run_idle();
    assert!(p.kvlds_accepting(), "not accepting once the closed connection's work is done");
    let c = p.connect();
    // Each new key was stored or not; the old ones are intact.
    let mut keys: Vec<Bytes> = model.keys().cloned().collect();
    for i in 0..300 {
        let key = b(&format!("new{i:04}"));
        match p.call(c, &get(&key)) {
            KvldsResponse::Get(Some(v)) => {
                assert_eq!(v, new_value(i), "{key:?}");
                model.insert(key.clone(), v);
            }
            KvldsResponse::Get(None) => {}
            other => panic!("GET answered {other:?}"),
        }
        keys.push(key);
    }
    check_gets(&mut p, c, &model, &keys);
    assert_eq!(p.call(c, &set(&b("after"), &b("1"))), KvldsResponse::Done(true));
    model.insert(b("after"), b("1"));
    p.restart(Restart::PowerLoss);
    let c = p.connect();
    check_gets(&mut p, c, &model, &keys);
    scan(&mut p, c, &model, &Bytes::new(), &Bytes::new(), 2000);
}

fn a_client_that_does_not_read_is_stopped_at_the_pending_bound<K: UnderTest>(mut p: Pair<K>) {
    const REQUESTS: usize = 10_000;
    let c = p.connect();
    p.client_mut(c).reading = false;
    p.disk_frozen = true;
    let key = |i: usize| b(&format!("bound{i:05}"));
    for i in 0..REQUESTS {
        p.send(c, &set(&key(i), &b("v")));
    }
    p.run_idle();
    assert!(
        p.read_interest.contains(&(c, false)),
        "kvlds kept reading a connection with {} requests pending",
        p.client(c).outstanding()
    );
    assert!(p.client(c).bytes_queued() > 0, "every request was read although kvlds stopped reading");
    let per_request = {
        let mut out = bytes::BytesMut::new();
        set(&key(0), &b("v")).encode(0, &mut out);
        out.len() as u64
    };
    let read = p.client(c).bytes_delivered / per_request;
    assert!(
        read <= (PENDING_REQUESTS_MAX + kvpair::CHUNK_BYTES_MAX / per_request as usize + 1) as u64,
        "kvlds read {read} requests with at most {PENDING_REQUESTS_MAX} pending"
    );
    // The disk and the client resume: everything is answered.
    p.disk_frozen = false;
    p.client_mut(c).reading = true;
    p.settle();
    assert_eq!(p.read_interest.last(), Some(&(c, true)));
    assert_eq!(p.client(c).bytes_queued(), 0);
    let model: Model = (0..REQUESTS).map(|i| (key(i), b("v"))).collect();
    let sample: Vec<Bytes> = (0..REQUESTS).step_by(97).map(key).collect();
    check_gets(&mut p, c, &model, &sample);
    scan(&mut p, c, &model, &Bytes::new(), &Bytes::new(), 8192);
}

/// Requests sent the moment a restarted kvlds accepts, while the rest of
/// its recovery scan's reads are still on their way, are answered. Before
/// each restart, single-SET commits on keys spread over the tree leave a
/// small newest commit (found quickly) above live leaves of earlier ones
/// (which the scan reads ahead, and which the requests need); a stalled
/// disk keeps the scan's reads in flight until the requests have arrived.
fn requests_right_after_recovery_are_answered<K: UnderTest>(mut p: Pair<K>) {
    let mut c = p.connect();
    let mut model: Model = (0..600).map(|i| (big_key(i), big_value(i))).collect();
    let reqs: Vec<KvldsRequest> = model.iter().map(|(k, v)| set(k, v)).collect();
    all_done(&mut p, c, &reqs);
    let keys: Vec<Bytes> = model.keys().cloned().collect();
    for (round, how) in
        [Restart::Kvlds, Restart::Both, Restart::PowerLoss, Restart::Kvlds].into_iter().enumerate()
    {
        for i in 0..12 {
            let k = keys[(i * 50 + round * 7) % keys.len()].clone();
            let v = b(&format!("r{round}-{i}"));
            model.insert(k.clone(), v.clone());
            all_done(&mut p, c, &[set(&k, &v)]);
        }
        p.restart(how);
        c = p.connect();
        p.disk_frozen = true;
        let ids: Vec<u64> = keys.iter().map(|k| p.send(c, &get(k))).collect();
        let range_id = p.send(c, &range(u32::MAX, &Bytes::new(), &Bytes::new()));
        let k = keys[p.rng.below(keys.len() as u64) as usize].clone();
        let set_id = p.send(c, &set(&k, &model[&k]));
        p.run_idle();
        p.disk_frozen = false;
        p.settle();
        for (k, id) in keys.iter().zip(ids) {
            assert_eq!(p.take_response(c, id), Some(KvldsResponse::Get(model.get(k).cloned())), "{k:?}");
        }
        let resp = p.take_response(c, range_id).expect("RANGE answered");
        check_range(&model, &Bytes::new(), &Bytes::new(), u32::MAX, &resp).unwrap();
        assert_eq!(p.take_response(c, set_id), Some(KvldsResponse::Done(true)));
    }
}

/// A kvlds pair for the edge tests: a small cache, default lbs files.
fn edge_pair(seed: u64) -> Pair<KvldsNode> {
    kvlds_pair(seed, 4, 1 << 20)
}

#[test]
fn requests_right_after_recovery_are_answered_while_its_reads_are_in_flight() {
    for seed in 0..8 {
        requests_right_after_recovery_are_answered(kvlds_pair(100 + seed, 16, 1 << 20));
    }
}

#[test]
fn range_with_a_budget_of_0_or_1_returns_the_first_pair() {
    range_budget_0_or_1_returns_the_first_pair(edge_pair(1));
}

#[test]
fn range_with_start_at_or_after_end_returns_nothing_and_next_is_end() {
    range_start_at_or_after_end_returns_nothing_and_next_is_end(edge_pair(2));
}

#[test]
fn get_of_an_over_long_key_answers_absent_and_keeps_the_connection() {
    get_of_an_over_long_key_answers_absent(edge_pair(3));
}

#[test]
fn an_over_long_set_key_or_value_drops_the_connection_and_the_next_is_served() {
    an_over_long_set_key_or_value_drops_the_connection(edge_pair(4));
}

#[test]
fn a_malformed_request_drops_the_connection_and_the_next_is_served() {
    a_malformed_request_drops_the_connection(edge_pair(5));
}

#[test]
fn params_reports_64_and_96_at_512_byte_blocks() {
    params_answer_64_and_96(edge_pair(6));
}

#[test]
fn a_client_closing_with_hundreds_pending_is_followed_by_one_served_at_once() {
    a_client_closing_with_hundreds_pending_is_followed_by_one_served(edge_pair(7));
}

#[test]
fn a_client_that_does_not_read_is_stopped_at_the_pending_request_bound() {
    a_client_that_does_not_read_is_stopped_at_the_pending_bound(edge_pair(8));
}

// ===========================================================================
// The harness checked against a toy store

/// The same scenarios against [`toy::ToyKvlds`]: they must pass, which
/// shows that the harness, the model and the checks are sound and that the
/// lbs side of the pair works, independently of kvlds.
mod harness_self_check {
    use super::*;
    use toy::ToyKvlds;

    fn toy_pair(seed: u64) -> Pair<ToyKvlds> {
        Pair::new(seed, lbs_config(64 << 10), ToyKvlds::new)
    }

    impl UnderTest for ToyKvlds {}

    proptest! {
        #![proptest_config(proptest_config(cases(32), 0x746f_795f_6d6f_6465))]

        /// The toy keeps the whole map in every commit: short cases, small alphabets.
        #[test]
        fn toy_matches_the_model(case in case(200, &[6, 24])) {
            run_case(toy_pair(case.seed), &case);
        }
    }

    #[test]
    fn toy_grows_and_shrinks() {
        grow_then_shrink(toy_pair(11), 1200, &mut |_, _| {});
    }

    #[test]
    fn toy_requests_right_after_recovery() {
        requests_right_after_recovery_are_answered(toy_pair(10));
    }

    #[test]
    fn toy_range_budget() {
        range_budget_0_or_1_returns_the_first_pair(toy_pair(1));
    }

    #[test]
    fn toy_range_start_after_end() {
        range_start_at_or_after_end_returns_nothing_and_next_is_end(toy_pair(2));
    }

    #[test]
    fn toy_over_long_get() {
        get_of_an_over_long_key_answers_absent(toy_pair(3));
    }

    #[test]
    fn toy_over_long_set() {
        an_over_long_set_key_or_value_drops_the_connection(toy_pair(4));
    }

    #[test]
    fn toy_malformed() {
        a_malformed_request_drops_the_connection(toy_pair(5));
    }

    #[test]
    fn toy_params() {
        params_answer_64_and_96(toy_pair(6));
    }

    #[test]
    fn toy_close_with_pending() {
        a_client_closing_with_hundreds_pending_is_followed_by_one_served(toy_pair(7));
    }

    #[test]
    fn toy_pending_bound() {
        a_client_that_does_not_read_is_stopped_at_the_pending_bound(toy_pair(8));
    }

    /// The checks can fail: a toy that answers SETs before they are durable
    /// is caught by a power loss that takes the SET's snapshot with it.
    #[test]
    fn a_store_that_acks_before_durable_is_caught() {
        let p = Pair::new(9, lbs_config(64 << 10), ToyKvlds::acking_early);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut run = ModelRun::new(p, 6);
            run.p.disk_frozen = true; // the snapshot holding the SET is never written
            run.push(&Op::Set { key: 4, value: Val { len: 5, fill: 1 } });
            run.flush(); // answered, early
            run.p.disk_frozen = false;
            run.p.restart(Restart::PowerLoss);
            run.conn = run.p.connect();
            run.check_everything();
        }));
        let message = match caught {
            Ok(()) => panic!("a SET acknowledged and then lost went unnoticed"),
            Err(payload) => payload.downcast_ref::<String>().cloned().unwrap_or_default(),
        };
        assert!(message.starts_with("GET ") && message.contains("want Get(Some("), "{message}");
    }
}

/// A toy kvlds for checking the harness: the whole map in memory, written
/// to lbs as one snapshot (one APPEND of as many blocks as it takes) per
/// commit, recovered by reading the newest snapshot. MRs are applied to a
/// working map in order and answered once their snapshot is durable; GET
/// and RANGE read the last durable map. It accepts the next connection only
/// once the previous one's requests are done, and stops reading a
/// connection with 4096 MRs pending.
mod toy {
    use std::collections::{BTreeMap, VecDeque};
    use std::ops::Bound;

    use bytes::{BufMut, Bytes, BytesMut};
    use kivaloo::contract::{ConnId, ExitReason, Input, Instant, Node, Output};
    use kivaloo::kvlds_proto::{KvldsRequest, KvldsResponse};
    use kivaloo::lbs_proto::{LbsRequest, LbsRequestKind, LbsResponse, NO_LAST_BLOCK};
    use kivaloo::packet::{Packet, PacketDecoder};

    use super::{KEY_LEN_MAX, PENDING_REQUESTS_MAX, VALUE_LEN_MAX};

    /// Block header: snapshot's first block (8), block count (4), index (4),
    /// payload length (2).
    const HEADER: usize = 18;

    type Map = BTreeMap<Bytes, Bytes>;
    type Answer = (ConnId, u64, KvldsResponse);

    enum Phase {
        Start,
        Recovering { blocks: Vec<Option<Bytes>> },
        Serving,
        Stopped,
    }

    pub struct ToyKvlds {
        phase: Phase,
        out: VecDeque<Output>,
        upstream: PacketDecoder,
        calls: BTreeMap<u64, (LbsRequestKind, Option<usize>)>,
        next_call: u64,
        block_size: usize,
        next_block: u64,
        durable: Map,
        working: Map,
        /// Answers to MRs applied to `working`, waiting for a commit.
        waiting: Vec<Answer>,
        /// The commit in flight: its snapshot and the answers it releases.
        committing: Option<(Map, Vec<Answer>)>,
        client: Option<(ConnId, PacketDecoder)>,
        client_reading: bool,
        accepting: bool,
        /// A bug on purpose: answer MRs before they are durable.
        ack_early: bool,
    }

    impl ToyKvlds {
        /// A toy that answers MRs before they are durable (a bug on purpose).
        pub fn acking_early() -> Self {
            ToyKvlds { ack_early: true, ..ToyKvlds::new() }
        }

        pub fn new() -> Self {
            ToyKvlds {
                phase: Phase::Start,
                out: VecDeque::new(),
                upstream: PacketDecoder::new(),
                calls: BTreeMap::new(),
                next_call: 1,
                block_size: 0,
                next_block: 0,
                durable: Map::new(),
                working: Map::new(),
                waiting: Vec::new(),
                committing: None,
                client: None,
                client_reading: true,
                accepting: false,
                ack_early: false,
            }
        }

        fn call(&mut self, req: LbsRequest, part: Option<usize>) {
            let id = self.next_call;
            self.next_call += 1;
            self.calls.insert(id, (req.kind(), part));
            let mut out = BytesMut::new();
            req.encode(id, &mut out);
            self.out.push_back(Output::Send { conn: ConnId::UPSTREAM, data: out.freeze() });
        }

        fn stop(&mut self, message: String) {
            self.phase = Phase::Stopped;
            self.out.push_back(Output::Exit(ExitReason { failure: true, message }));
        }

        fn answer(&mut self, conn: ConnId, id: u64, resp: &KvldsResponse) {
            if self.client.as_ref().is_some_and(|(c, _)| *c == conn) {
                let mut out = BytesMut::new();
                resp.encode(id, &mut out);
                self.out.push_back(Output::Send { conn, data: out.freeze() });
            }
        }

        fn pending(&self) -> usize {
            let Some((conn, _)) = &self.client else { return 0 };
            let committing = self.committing.as_ref().map_or(&[][..], |(_, a)| &a[..]);
            self.waiting.iter().chain(committing).filter(|(c, _, _)| c == conn).count()
        }

        fn maybe_accept(&mut self) {
            let idle = self.waiting.is_empty() && self.committing.is_none();
            if matches!(self.phase, Phase::Serving) && self.client.is_none() && idle && !self.accepting {
                self.accepting = true;
                self.out.push_back(Output::Accepting(true));
            }
        }

        fn close_client(&mut self, reason: String) {
            if let Some((conn, _)) = self.client.take() {
                self.out.push_back(Output::Close { conn, reason });
            }
            self.maybe_accept();
        }

        /// Handles the client's buffered requests while under the bound.
        fn serve(&mut self) {
            loop {
                let Some((conn, _)) = &self.client else { return };
                let conn = *conn;
                if self.pending() >= PENDING_REQUESTS_MAX {
                    if self.client_reading {
                        self.client_reading = false;
                        self.out.push_back(Output::ReadInterest { conn, enabled: false });
                    }
                    return;
                }
                if !self.client_reading {
                    self.client_reading = true;
                    self.out.push_back(Output::ReadInterest { conn, enabled: true });
                }
                let next = self.client.as_mut().expect("client").1.next_packet();
                match next {
                    Ok(Some(packet)) => self.request(conn, packet),
                    Ok(None) => return,
                    Err(e) => return self.close_client(format!("bad packet: {e}")),
                }
            }
        }

        fn request(&mut self, conn: ConnId, packet: Packet) {
            let req = match KvldsRequest::decode(packet.record) {
                Ok(req) => req,
                Err(e) => return self.close_client(format!("bad request: {e}")),
            };
            let id = packet.id;
            let too_long = |k: &Bytes| k.len() > KEY_LEN_MAX;
            let too_long_value = |v: &Bytes| v.len() > VALUE_LEN_MAX;
            let w = &mut self.working;
            let done = match req {
                KvldsRequest::Params => {
                    let resp = KvldsResponse::Params {
                        max_key_len: KEY_LEN_MAX as u32,
                        max_value_len: VALUE_LEN_MAX as u32,
                    };
                    return self.answer(conn, id, &resp);
                }
                KvldsRequest::Get { key } => {
                    let value = if too_long(&key) { None } else { self.durable.get(&key).cloned() };
                    return self.answer(conn, id, &KvldsResponse::Get(value));
                }
                KvldsRequest::Range { max_bytes, start, end } => {
                    let resp = range(&self.durable, max_bytes, start, end);
                    return self.answer(conn, id, &resp);
                }
                KvldsRequest::Set { key, value } if !too_long(&key) && !too_long_value(&value) => {
                    w.insert(key, value);
                    true
                }
                KvldsRequest::Cas { key, old_value, new_value }
                    if !too_long(&key) && !too_long_value(&old_value) && !too_long_value(&new_value) =>
                {
                    let holds = w.get(&key) == Some(&old_value);
                    if holds {
                        w.insert(key, new_value);
                    }
                    holds
                }
                KvldsRequest::Add { key, value } if !too_long(&key) && !too_long_value(&value) => {
                    let holds = !w.contains_key(&key);
                    if holds {
                        w.insert(key, value);
                    }
                    holds
                }
                KvldsRequest::Modify { key, value } if !too_long(&key) && !too_long_value(&value) => {
                    let holds = w.contains_key(&key);
                    if holds {
                        w.insert(key, value);
                    }
                    holds
                }
                KvldsRequest::Delete { key } if !too_long(&key) => {
                    w.remove(&key);
                    true
                }
                KvldsRequest::Cad { key, old_value } if !too_long(&key) && !too_long_value(&old_value) => {
                    let holds = w.get(&key) == Some(&old_value);
                    if holds {
                        w.remove(&key);
                    }
                    holds
                }
                _ => return self.close_client("a key or value over the limits".into()),
            };
            if self.ack_early {
                self.answer(conn, id, &KvldsResponse::Done(done));
            } else {
                self.waiting.push((conn, id, KvldsResponse::Done(done)));
            }
            self.commit();
        }

        /// Starts writing a snapshot if MRs wait and none is in flight.
        fn commit(&mut self) {
            if self.committing.is_some() || !matches!(self.phase, Phase::Serving) {
                return;
            }
            if self.waiting.is_empty() && (!self.ack_early || self.working == self.durable) {
                return;
            }
            let snapshot = self.working.clone();
            let mut payload = BytesMut::new();
            for (k, v) in &snapshot {
                payload.put_u8(k.len() as u8);
                payload.put_slice(k);
                payload.put_u8(v.len() as u8);
                payload.put_slice(v);
            }
            let per_block = self.block_size - HEADER;
            let count = payload.len().div_ceil(per_block).max(1);
            let mut data = BytesMut::with_capacity(count * self.block_size);
            for i in 0..count {
                let part =
                    &payload[(i * per_block).min(payload.len())..((i + 1) * per_block).min(payload.len())];
                data.put_u64(self.next_block);
                data.put_u32(count as u32);
                data.put_u32(i as u32);
                data.put_u16(part.len() as u16);
                data.put_slice(part);
                data.resize((i + 1) * self.block_size, 0);
            }
            let start = self.next_block;
            self.committing = Some((snapshot, std::mem::take(&mut self.waiting)));
            self.call(LbsRequest::Append { count: count as u32, start, data: data.freeze() }, None);
        }

        fn upstream(&mut self, packet: Packet) {
            let Some((kind, part)) = self.calls.remove(&packet.id) else {
                return self.stop(format!("lbs answered unknown request {}", packet.id));
            };
            let resp = match LbsResponse::decode(kind, packet.record) {
                Ok(r) => r,
                Err(e) => return self.stop(format!("bad lbs answer: {e}")),
            };
            match resp {
                LbsResponse::Params2 { block_size, next_block, last_block } => {
                    self.block_size = block_size as usize;
                    self.next_block = next_block;
                    if last_block == NO_LAST_BLOCK {
                        self.phase = Phase::Serving;
                        self.maybe_accept();
                    } else {
                        self.call(LbsRequest::Get { block: last_block }, None);
                    }
                }
                LbsResponse::Get(None) => self.stop("a snapshot block is missing".into()),
                LbsResponse::Get(Some(block)) => {
                    let first = u64::from_be_bytes(block[0..8].try_into().unwrap());
                    let count = u32::from_be_bytes(block[8..12].try_into().unwrap()) as usize;
                    match part {
                        None => {
                            self.phase = Phase::Recovering { blocks: vec![None; count] };
                            for i in 0..count {
                                self.call(LbsRequest::Get { block: first + i as u64 }, Some(i));
                            }
                        }
                        Some(i) => {
                            let Phase::Recovering { blocks } = &mut self.phase else { unreachable!() };
                            blocks[i] = Some(block);
                            if blocks.iter().all(|b| b.is_some()) {
                                let mut payload = Vec::new();
                                for b in blocks.iter().flatten() {
                                    let len = u16::from_be_bytes([b[16], b[17]]) as usize;
                                    payload.extend_from_slice(&b[HEADER..HEADER + len]);
                                }
                                let mut map = Map::new();
                                let mut at = 0;
                                while at < payload.len() {
                                    let kl = payload[at] as usize;
                                    let k = Bytes::copy_from_slice(&payload[at + 1..at + 1 + kl]);
                                    at += 1 + kl;
                                    let vl = payload[at] as usize;
                                    let v = Bytes::copy_from_slice(&payload[at + 1..at + 1 + vl]);
                                    at += 1 + vl;
                                    map.insert(k, v);
                                }
                                self.durable = map.clone();
                                self.working = map;
                                self.phase = Phase::Serving;
                                self.maybe_accept();
                            }
                        }
                    }
                }
                LbsResponse::Append(Some(next)) => {
                    self.next_block = next;
                    let (snapshot, answers) = self.committing.take().expect("a commit in flight");
                    self.durable = snapshot;
                    for (conn, id, resp) in answers {
                        self.answer(conn, id, &resp);
                    }
                    self.commit();
                    self.serve();
                    self.maybe_accept();
                }
                other => self.stop(format!("unexpected lbs answer {other:?}")),
            }
        }
    }

    /// A RANGE answer from `map`.
    fn range(map: &Map, max_bytes: u32, start: Bytes, end: Bytes) -> KvldsResponse {
        if !end.is_empty() && start >= end {
            return KvldsResponse::Range { next: end, pairs: Vec::new() };
        }
        let (mut pairs, mut size, mut next) = (Vec::new(), 0u64, end.clone());
        for (k, v) in map.range::<Bytes, _>((Bound::Included(&start), Bound::Unbounded)) {
            if !end.is_empty() && *k >= end {
                break;
            }
            let len = 2 + k.len() as u64 + v.len() as u64;
            if !pairs.is_empty() && size + len > max_bytes as u64 {
                next = k.clone();
                break;
            }
            size += len;
            pairs.push((k.clone(), v.clone()));
        }
        KvldsResponse::Range { next, pairs }
    }

    impl Node for ToyKvlds {
        fn handle_input(&mut self, _now: Instant, input: Input) {
            if matches!(self.phase, Phase::Stopped) {
                return;
            }
            match input {
                Input::Received { conn: ConnId::UPSTREAM, data } => {
                    self.upstream.push(&data);
                    loop {
                        match self.upstream.next_packet() {
                            Ok(Some(p)) => self.upstream(p),
                            Ok(None) => break,
                            Err(e) => return self.stop(format!("bad packet from lbs: {e}")),
                        }
                    }
                }
                Input::Received { conn, data } => {
                    if let Some((c, decoder)) = &mut self.client {
                        if *c == conn {
                            decoder.push(&data);
                            self.serve();
                        }
                    }
                }
                Input::Accepted { conn } => {
                    if !self.accepting {
                        self.out.push_back(Output::Close { conn, reason: "busy".into() });
                        return;
                    }
                    self.accepting = false;
                    self.client = Some((conn, PacketDecoder::new()));
                    self.client_reading = true;
                    self.out.push_back(Output::Accepting(false));
                }
                Input::Closed { conn: ConnId::UPSTREAM, .. } => self.stop("lbs went away".into()),
                Input::Closed { conn, .. } => {
                    if self.client.as_ref().is_some_and(|(c, _)| *c == conn) {
                        self.client = None;
                        self.maybe_accept();
                    }
                }
                Input::Sent { .. } | Input::Timeout => {}
                Input::Disk { .. } => self.stop("the toy has no disk".into()),
            }
        }

        fn poll_output(&mut self) -> Option<Output> {
            if matches!(self.phase, Phase::Start) {
                self.phase = Phase::Recovering { blocks: Vec::new() };
                self.call(LbsRequest::Params2, None);
            }
            self.out.pop_front()
        }

        fn poll_timeout(&self) -> Option<Instant> {
            None
        }
    }
}

// ===========================================================================
// Cleaning

/// A store written and then left alone: cleaning moves the oldest leaves
/// until the log is within its threshold of the tree, then stops (no timer
/// set), rather than cleaning for ever the garbage its own commits make
/// (a review found one leaf per commit doing exactly that). Virtual time
/// jumps from one timer to the next; the cost ratio only scales time when
/// no client writes, so a high one keeps the run within the harness's hour.
#[test]
fn cleaning_a_store_no_one_writes_settles_near_the_trees_size_and_stops() {
    // (The last two with a cache smaller than the tree: some of the leaves
    // to clean have to be read, and a review found such a store moving a
    // few leaves at a time for ever.)
    for (seed, storage_io_cost_ratio, keys, cache_pages) in
        [(1, 1e5, 400, 512), (2, 1e7, 1500, 512), (3, 1e9, 3000, 64), (3, 1e9, 3000, 32), (6, 1e7, 6000, 64)]
    {
        let config = KvldsConfig { storage_io_cost_ratio, ..kvlds_config(cache_pages) };
        let rec = kivaloo_nodes::lbs::layout::record_len(BS);
        let mut pair = kvlds_pair_with(seed, config, 32 * rec);
        let c = pair.connect();
        // Every key once, then small commits overwriting a tenth of them:
        // the other leaves stay at the old end of the log, under garbage.
        let mut rng = kvpair::Rng::new(seed);
        let set = |pair: &mut Pair<KvldsNode>, k: u64, round: u64, len: u64| {
            let value = Bytes::from(format!("{round}:{k}:{}", "v".repeat(len as usize)));
            pair.send(c, &KvldsRequest::Set { key: Bytes::from(format!("key {k:06}")), value });
        };
        for k in 0..keys {
            set(&mut pair, k, 0, rng.below(60));
        }
        pair.settle();
        for round in 1..200 {
            for _ in 0..8 {
                let k = rng.below(keys / 10);
                set(&mut pair, k, round, rng.below(60));
            }
            pair.settle();
        }
        pair.run_until("cleaning to settle", |p| p.kvlds().poll_timeout().is_none());
        let node = pair.kvlds();
        let (n, log) = (node.tree_pages().expect("counted"), node.log_blocks());
        let probes = node.probes();
        assert!(probes.leaves_cleaned > 0, "seed {seed}: nothing was cleaned ({probes:?})");
        // Within the threshold (9/8 of the tree and 64 blocks) and as much
        // again (where a cache smaller than the tree stops), and the last
        // commit of cleaning alone (at most 256 leaves, their parents and
        // the root).
        let bound = n + 2 * (n / 8 + 64) + 2 * 256 + 1;
        assert!(log <= bound, "seed {seed}: the log spans {log} blocks for a tree of {n} pages ({probes:?})");
        // Every key still reads back.
        for k in 0..keys {
            let key = Bytes::from(format!("key {k:06}"));
            assert!(matches!(pair.call(c, &KvldsRequest::Get { key }), KvldsResponse::Get(Some(_))));
        }
    }
}
