//! kvlds against a minimal in-memory block store (a stand-in for lbs that
//! answers PARAMS2, GET, APPEND and FREE at once), so that the tree, the
//! cache and recovery are tested without lbs's disk path: random requests
//! against a `BTreeMap` model, pipelined, with restarts of kvlds.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use kivaloo::contract::{ConnId, Input, Instant, Node, Output};
use kivaloo::kvlds_proto::{KvldsRequest, KvldsResponse};
use kivaloo::lbs_proto::{LbsRequest, LbsResponse, NO_LAST_BLOCK};
use kivaloo::packet::PacketDecoder;
use kivaloo_nodes::kvlds::{KvldsConfig, KvldsNode};

/// The in-memory block store.
struct MemLbs {
    block_size: usize,
    blocks: BTreeMap<u64, Bytes>,
    next_block: u64,
    decoder: PacketDecoder,
    /// APPENDs received but not yet durable (acknowledged later, or lost
    /// when the test "crashes" before [`MemLbs::sync`]).
    unsynced: Vec<(u64, LbsRequest)>,
    /// GETs of these blocks are held (not answered) ...
    hold: std::collections::BTreeSet<u64>,
    /// ... here: (request id, block).
    held: Vec<(u64, u64)>,
}

impl MemLbs {
    fn new(block_size: usize) -> Self {
        MemLbs {
            block_size,
            blocks: BTreeMap::new(),
            next_block: 0,
            decoder: PacketDecoder::new(),
            unsynced: vec![],
            hold: Default::default(),
            held: vec![],
        }
    }

    /// Handles requests; returns the responses to send now.
    fn receive(&mut self, data: &[u8]) -> BytesMut {
        self.decoder.push(data);
        let mut out = BytesMut::new();
        while let Some(p) = self.decoder.next_packet().expect("kvlds sends good packets") {
            let req = LbsRequest::decode(p.record).expect("kvlds sends good requests");
            let resp = match req {
                LbsRequest::Params2 => LbsResponse::Params2 {
                    block_size: self.block_size as u32,
                    next_block: self.next_block,
                    last_block: self.blocks.keys().next_back().copied().unwrap_or(NO_LAST_BLOCK),
                },
                LbsRequest::Get { block } if self.hold.contains(&block) => {
                    self.held.push((p.id, block));
                    continue;
                }
                LbsRequest::Get { block } => LbsResponse::Get(self.blocks.get(&block).cloned()),
                LbsRequest::Free { keep_from } => {
                    self.blocks.retain(|&b, _| b >= keep_from);
                    LbsResponse::Free
                }
                LbsRequest::Append { .. } => {
                    self.unsynced.push((p.id, req));
                    continue;
                }
                LbsRequest::Params => unreachable!(),
            };
            resp.encode(p.id, &mut out);
        }
        out
    }

    /// Makes the APPENDs received durable and acknowledges them.
    fn sync(&mut self) -> BytesMut {
        let mut out = BytesMut::new();
        for (id, req) in std::mem::take(&mut self.unsynced) {
            let LbsRequest::Append { count, start, data } = req else { unreachable!() };
            let resp = if start != self.next_block {
                LbsResponse::Append(None)
            } else {
                assert_eq!(data.len(), count as usize * self.block_size);
                for i in 0..count as usize {
                    self.blocks
                        .insert(start + i as u64, data.slice(i * self.block_size..(i + 1) * self.block_size));
                }
                self.next_block = start + u64::from(count);
                LbsResponse::Append(Some(self.next_block))
            };
            resp.encode(id, &mut out);
        }
        out
    }
}

struct Harness {
    lbs: MemLbs,
    kvlds: KvldsNode,
    config: KvldsConfig,
    client: Option<ConnId>,
    next_conn: u64,
    decoder: PacketDecoder,
    responses: BTreeMap<u64, Bytes>,
    accepting: bool,
    now: u64,
    /// Why kvlds exited, if it did.
    exited: Option<String>,
    /// Whether APPENDs are made durable and answered as soon as idle.
    auto_sync: bool,
    /// The largest single Send to the client.
    biggest_client_send: usize,
}

impl Harness {
    fn new(block_size: usize, config: KvldsConfig) -> Self {
        let kvlds = KvldsNode::new(config.clone());
        let mut h = Harness {
            lbs: MemLbs::new(block_size),
            kvlds,
            config,
            client: None,
            next_conn: 1,
            decoder: PacketDecoder::new(),
            responses: BTreeMap::new(),
            accepting: false,
            now: 0,
            exited: None,
            auto_sync: true,
            biggest_client_send: 0,
        };
        h.settle();
        h.connect();
        h
    }

    /// Runs until nothing moves: outputs drained, lbs answered and synced.
    fn settle(&mut self) {
        for _ in 0..1_000_000 {
            let mut moved = false;
            while let Some(out) = self.kvlds.poll_output() {
                moved = true;
                match out {
                    Output::Send { conn, data } if conn == ConnId::UPSTREAM => {
                        let resp = self.lbs.receive(&data);
                        self.input(Input::Sent { conn, len_bytes: data.len() as u64 });
                        if !resp.is_empty() {
                            self.input(Input::Received { conn: ConnId::UPSTREAM, data: resp.freeze() });
                        }
                    }
                    Output::Send { conn, data } => {
                        assert_eq!(Some(conn), self.client);
                        self.biggest_client_send = self.biggest_client_send.max(data.len());
                        self.decoder.push(&data);
                        while let Some(p) = self.decoder.next_packet().unwrap() {
                            assert!(
                                self.responses.insert(p.id, p.record).is_none(),
                                "two answers to {}",
                                p.id
                            );
                        }
                        self.input(Input::Sent { conn, len_bytes: data.len() as u64 });
                    }
                    Output::Accepting(on) => self.accepting = on,
                    Output::Exit(r) => {
                        self.exited = Some(r.message);
                        return;
                    }
                    Output::Close { reason, .. } => panic!("kvlds dropped the client: {reason}"),
                    Output::Log { .. } | Output::ReadInterest { .. } => {}
                    Output::Disk { .. } => panic!("kvlds asked for disk I/O"),
                }
            }
            let synced = if self.auto_sync { self.lbs.sync() } else { BytesMut::new() };
            if !synced.is_empty() {
                moved = true;
                self.input(Input::Received { conn: ConnId::UPSTREAM, data: synced.freeze() });
            }
            if !moved {
                if let Some(t) = self.kvlds.poll_timeout() {
                    self.now = self.now.max(t.nanos);
                    self.input(Input::Timeout);
                    continue;
                }
                return;
            }
        }
        panic!("kvlds did not settle");
    }

    fn input(&mut self, input: Input) {
        self.kvlds.handle_input(Instant::from_nanos(self.now), input);
    }

    fn connect(&mut self) {
        assert!(self.accepting, "kvlds is not accepting");
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.client = Some(conn);
        self.decoder = PacketDecoder::new();
        self.input(Input::Accepted { conn });
        self.settle();
    }

    /// Crashes kvlds (unsynced APPENDs are lost) and starts a new one.
    fn restart(&mut self) {
        self.lbs.unsynced.clear();
        self.lbs.decoder = PacketDecoder::new();
        self.kvlds = KvldsNode::new(self.config.clone());
        self.client = None;
        self.accepting = false;
        self.exited = None;
        self.settle();
        if self.exited.is_none() {
            self.connect();
        }
    }

    /// Sends `requests` pipelined (in pieces of a few bytes), returns the
    /// answers in order.
    fn call(&mut self, requests: &[KvldsRequest]) -> Vec<KvldsResponse> {
        let mut buf = BytesMut::new();
        for (i, r) in requests.iter().enumerate() {
            r.encode(i as u64, &mut buf);
        }
        let conn = self.client.unwrap();
        let data = buf.freeze();
        for chunk in data.chunks(61) {
            self.input(Input::Received { conn, data: Bytes::copy_from_slice(chunk) });
        }
        self.settle();
        assert_eq!(self.exited, None, "kvlds exited");
        let answers: Vec<_> = (0..requests.len() as u64)
            .map(|i| {
                let record = self.responses.remove(&i).unwrap_or_else(|| panic!("no answer to request {i}"));
                KvldsResponse::decode(requests[i as usize].kind(), record).unwrap()
            })
            .collect();
        assert!(self.responses.is_empty());
        answers
    }
}

/// A deterministic generator (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn key(rng: &mut Rng, keys: u64) -> Bytes {
    let k = rng.below(keys);
    // Lengths vary with the key so pages hold uneven pairs.
    Bytes::from(format!("{k:0width$}", width = 4 + (k % 40) as usize))
}

fn value(rng: &mut Rng) -> Bytes {
    let len = rng.below(97) as usize;
    Bytes::from(vec![b'a' + rng.below(26) as u8; len])
}

/// Applies `req` to the model; the expected answer.
fn model_apply(model: &mut BTreeMap<Bytes, Bytes>, req: &KvldsRequest) -> KvldsResponse {
    match req {
        KvldsRequest::Set { key, value } => {
            model.insert(key.clone(), value.clone());
            KvldsResponse::Done(true)
        }
        KvldsRequest::Cas { key, old_value, new_value } => {
            let ok = model.get(key) == Some(old_value);
            if ok {
                model.insert(key.clone(), new_value.clone());
            }
            KvldsResponse::Done(ok)
        }
        KvldsRequest::Add { key, value } => {
            let ok = !model.contains_key(key);
            if ok {
                model.insert(key.clone(), value.clone());
            }
            KvldsResponse::Done(ok)
        }
        KvldsRequest::Modify { key, value } => {
            let ok = model.contains_key(key);
            if ok {
                model.insert(key.clone(), value.clone());
            }
            KvldsResponse::Done(ok)
        }
        KvldsRequest::Delete { key } => {
            model.remove(key);
            KvldsResponse::Done(true)
        }
        KvldsRequest::Cad { key, old_value } => {
            let ok = model.get(key) == Some(old_value);
            if ok {
                model.remove(key);
            }
            KvldsResponse::Done(ok)
        }
        KvldsRequest::Get { key } => KvldsResponse::Get(model.get(key).cloned()),
        _ => unreachable!(),
    }
}

/// Every pair, by paging through RANGE with a small budget.
fn scan_all(h: &mut Harness, budget: u32) -> Vec<(Bytes, Bytes)> {
    let mut all = Vec::new();
    let mut start = Bytes::new();
    for _ in 0..1_000_000 {
        let r = h.call(&[KvldsRequest::Range { max_bytes: budget, start: start.clone(), end: Bytes::new() }]);
        let KvldsResponse::Range { next, pairs } = &r[0] else { panic!() };
        for (k, _) in pairs {
            assert!(*k >= start && (next.is_empty() || k < next), "pair outside [start, next)");
        }
        all.extend(pairs.iter().cloned());
        if next.is_empty() {
            return all;
        }
        assert!(*next > start, "RANGE made no progress");
        start = next.clone();
    }
    panic!("RANGE paging did not end");
}

fn random_run(seed: u64, cache_pages: u64, keys: u64, rounds: usize) {
    let config =
        KvldsConfig { cache_pages_max: Some(cache_pages), check_invariants: true, ..Default::default() };
    let mut h = Harness::new(512, config);
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut model = BTreeMap::new();
    for round in 0..rounds {
        // A group of requests on distinct keys, so their order does not
        // matter to the answers.
        let group = 1 + rng.below(64) as usize;
        let mut used = std::collections::BTreeSet::new();
        let mut reqs = Vec::new();
        for _ in 0..group {
            let key = key(&mut rng, keys);
            if !used.insert(key.clone()) {
                continue;
            }
            let old = model.get(&key).cloned().unwrap_or_else(|| value(&mut rng));
            let old = if rng.below(4) == 0 { value(&mut rng) } else { old };
            reqs.push(match rng.below(10) {
                0..=2 => KvldsRequest::Set { key, value: value(&mut rng) },
                3 => KvldsRequest::Cas { key, old_value: old, new_value: value(&mut rng) },
                4 => KvldsRequest::Add { key, value: value(&mut rng) },
                5 => KvldsRequest::Modify { key, value: value(&mut rng) },
                6 | 7 => KvldsRequest::Delete { key },
                8 => KvldsRequest::Cad { key, old_value: old },
                _ => KvldsRequest::Get { key },
            });
        }
        let expected: Vec<_> = reqs.iter().map(|r| model_apply(&mut model, r)).collect();
        let got = h.call(&reqs);
        for ((r, e), g) in reqs.iter().zip(&expected).zip(&got) {
            assert_eq!(g, e, "seed {seed} round {round}: {r:?}");
        }
        if rng.below(20) == 0 {
            h.restart();
        }
        if rng.below(10) == 0 {
            let budget = [0, 1, 50, 300, 5000][rng.below(5) as usize];
            let all = scan_all(&mut h, budget);
            let want: Vec<_> = model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            assert_eq!(all, want, "seed {seed} round {round}: full scan with budget {budget}");
        }
    }
    h.restart();
    let all = scan_all(&mut h, 1000);
    let want: Vec<_> = model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    assert_eq!(all, want, "seed {seed}: after the last restart");
}

#[test]
fn random_requests_match_a_model_with_a_tiny_cache_and_restarts() {
    // KVLDS_SMOKE_SEEDS=N runs more seeds (a sweep by hand).
    let seeds = std::env::var("KVLDS_SMOKE_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    for seed in 0..seeds {
        random_run(seed, 2 + seed % 6, 300 + 100 * (seed % 12), 150);
    }
}

#[test]
fn bulk_insert_then_delete_grows_and_shrinks_the_tree() {
    let config = KvldsConfig { cache_pages_max: Some(8), check_invariants: true, ..Default::default() };
    let mut h = Harness::new(512, config);
    let n = 5000u32;
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let reqs: Vec<_> = chunk
            .iter()
            .map(|i| KvldsRequest::Set {
                key: Bytes::from(format!("key{i:06}")),
                value: Bytes::from(format!("v{i}")),
            })
            .collect();
        assert!(h.call(&reqs).iter().all(|r| *r == KvldsResponse::Done(true)));
    }
    let p = h.kvlds.probes();
    assert!(p.root_splits >= 2 && p.evictions > 0, "{p:?}");
    h.restart();
    assert_eq!(scan_all(&mut h, 2000).len(), n as usize);
    let mut rng = Rng(7);
    let mut order: Vec<u32> = (0..n).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for chunk in order.chunks(300) {
        let reqs: Vec<_> =
            chunk.iter().map(|i| KvldsRequest::Delete { key: Bytes::from(format!("key{i:06}")) }).collect();
        h.call(&reqs);
    }
    let p = h.kvlds.probes();
    assert!(p.merges > 0 && p.deroots > 0 && p.page_reads > 0, "{p:?}");
    assert!(p.merge_cascades > 0, "deleting a three-level tree never merged internal pages: {p:?}");
    assert!(p.merge_cascades < p.merges, "{p:?}");
    assert!(p.range_answers_cut_by_budget > 0, "paging by 2000 bytes was never cut: {p:?}");
    assert!(scan_all(&mut h, 100).is_empty());
    h.restart();
    assert!(scan_all(&mut h, 100).is_empty());
}

// Regression tests from a review of the node (each failed before its fix).

fn send(h: &mut Harness, reqs: &[(u64, KvldsRequest)]) {
    let mut buf = BytesMut::new();
    for (id, r) in reqs {
        r.encode(*id, &mut buf);
    }
    let conn = h.client.unwrap();
    h.input(Input::Received { conn, data: buf.freeze() });
    h.settle();
}

fn k(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

/// Found by review: the UNSENT_BYTES_MAX bound is checked against `unsent_bytes`,
/// which only grows in flush() at the end of handle_input; answers produced
/// while one input is processed are not counted.
#[test]
fn review_finding_unsent_bound_counts_answers_of_the_same_input() {
    let mut h = Harness::new(4096, KvldsConfig { check_invariants: true, ..Default::default() });
    for chunk in (0..8000u32).collect::<Vec<_>>().chunks(1000) {
        let reqs: Vec<_> = chunk
            .iter()
            .map(|i| KvldsRequest::Set {
                key: Bytes::from(format!("key{i:06}")),
                value: Bytes::from(vec![b'v'; 120]),
            })
            .collect();
        h.call(&reqs);
    }
    h.biggest_client_send = 0;
    // 64 RANGE requests of 30 bytes each: one 1920-byte read from the socket.
    let reqs: Vec<_> = (0..64u64)
        .map(|i| {
            (1000 + i, KvldsRequest::Range { max_bytes: 1 << 20, start: Bytes::new(), end: Bytes::new() })
        })
        .collect();
    send(&mut h, &reqs);
    let bound =
        kivaloo_nodes::kvlds::UNSENT_BYTES_MAX as usize + kivaloo_nodes::kvlds::RANGE_BYTES_MAX + 4096;
    assert!(
        h.biggest_client_send <= bound,
        "one Send of {} bytes from one 1920-byte input; bound {} ",
        h.biggest_client_send,
        bound
    );
}

/// A store of 512-byte blocks and a one-page cache holding six keys in two
/// leaves under a root (the last block written); returns the keys and the
/// root's block.
fn two_leaves_and_a_root() -> (Harness, Vec<Bytes>, u64) {
    let cfg = KvldsConfig { cache_pages_max: Some(1), check_invariants: true, ..Default::default() };
    let mut h = Harness::new(512, cfg);
    let v = Bytes::from(vec![b'x'; 94]);
    let keys: Vec<Bytes> = (0..6).map(|i| k(&format!("k{i:03}"))).collect();
    let reqs: Vec<_> =
        keys.iter().map(|key| KvldsRequest::Set { key: key.clone(), value: v.clone() }).collect();
    h.call(&reqs);
    let root = h.lbs.next_block - 1; // two leaves just below it
    (h, keys, root)
}

/// Found by review: a read of a client that closed stays in its page load's
/// `readers`; the FREE after a later commit may drop the block, and the
/// absent answer is then taken as "part of the tree but missing": exit.
#[test]
fn review_finding_forgotten_reader_does_not_make_a_freed_block_fatal() {
    let (mut h, keys, root) = two_leaves_and_a_root();
    h.restart(); // cache: the root only
    h.auto_sync = false;
    send(&mut h, &[(1, KvldsRequest::Set { key: keys[0].clone(), value: k("new") })]);
    assert_eq!(h.lbs.unsynced.len(), 1, "the APPEND of leaf 3 and root 4 is in flight");
    h.lbs.hold.insert(root);
    // A GET on the old committed tree (root 2, evicted by leaf 0): waits on block 2.
    send(&mut h, &[(2, KvldsRequest::Get { key: keys[5].clone() })]);
    assert_eq!(h.lbs.held.len(), 1);
    h.auto_sync = true;
    h.settle(); // commit 1: no FREE, a read waits
    assert!(h.responses.remove(&1).is_some());
    // The client goes away; its read is forgotten, its load is not.
    let conn = h.client.unwrap();
    h.input(Input::Closed { conn, reason: kivaloo::contract::ConnClosed::PeerClosed });
    h.settle();
    h.connect();
    h.responses.clear();
    // Commit 2 rewrites leaf 1: oldest reachable block 3, FREE below 3.
    h.call(&[KvldsRequest::Set { key: keys[5].clone(), value: k("new") }]);
    assert!(!h.lbs.blocks.contains_key(&root), "the old root was freed");
    // lbs answers the GET it held (FREE is advisory and may act at once).
    let (id, block) = h.lbs.held.pop().unwrap();
    let mut out = BytesMut::new();
    LbsResponse::Get(h.lbs.blocks.get(&block).cloned()).encode(id, &mut out);
    h.input(Input::Received { conn: ConnId::UPSTREAM, data: out.freeze() });
    h.settle();
    assert_eq!(h.exited, None, "kvlds exited over a page only a forgotten read wanted");
}

/// The probes of a commit in flight: a write that arrives meanwhile waits
/// for the next batch, a page evicted earlier is read back, and a read
/// that waited across the commit finishes on the old root.
#[test]
fn probes_count_what_happens_while_a_commit_is_in_flight() {
    let (mut h, keys, root) = two_leaves_and_a_root();
    let right_leaf = root - 1;
    h.restart(); // cache: the root only
    h.auto_sync = false;
    // The batch reads the left leaf, evicting the root, and sends its APPEND.
    send(&mut h, &[(1, KvldsRequest::Set { key: keys[0].clone(), value: k("new") })]);
    assert_eq!(h.lbs.unsynced.len(), 1, "the APPEND is in flight");
    let p = h.kvlds.probes();
    assert_eq!((p.reloads_during_commit, p.writes_waiting_for_next_batch), (0, 0), "{p:?}");
    // A GET on the committed tree reads the evicted root back, then waits
    // for the right leaf (held).
    h.lbs.hold.insert(right_leaf);
    send(&mut h, &[(2, KvldsRequest::Get { key: keys[5].clone() })]);
    assert_eq!(h.lbs.held.len(), 1);
    assert_eq!(h.kvlds.probes().reloads_during_commit, 1);
    send(&mut h, &[(3, KvldsRequest::Set { key: keys[1].clone(), value: k("newer") })]);
    assert_eq!(h.kvlds.probes().writes_waiting_for_next_batch, 1);
    h.auto_sync = true;
    h.settle(); // both commits land; the GET still waits
    assert!(h.responses.remove(&1).is_some() && h.responses.remove(&3).is_some());
    assert_eq!(h.kvlds.probes().reads_finished_on_old_root, 0);
    let (id, block) = h.lbs.held.pop().unwrap();
    let mut out = BytesMut::new();
    LbsResponse::Get(h.lbs.blocks.get(&block).cloned()).encode(id, &mut out);
    h.input(Input::Received { conn: ConnId::UPSTREAM, data: out.freeze() });
    h.settle();
    let answer =
        KvldsResponse::decode(kivaloo::kvlds_proto::KvldsRequestKind::Get, h.responses.remove(&2).unwrap());
    assert_eq!(answer.unwrap(), KvldsResponse::Get(Some(Bytes::from(vec![b'x'; 94]))));
    assert_eq!(h.kvlds.probes().reads_finished_on_old_root, 1);
}

/// Found by review: lbs's next block is trusted; near 2^64 the commit numbering
/// overflows and kvlds panics (debug: overflow; release: the round-trip
/// parse of the commit fails and panics).
#[test]
fn review_finding_next_block_from_lbs_near_u64_max_does_not_panic() {
    let mut h = Harness::new(512, KvldsConfig { check_invariants: true, ..Default::default() });
    h.lbs.next_block = u64::MAX;
    h.restart();
    let why = h.exited.expect("kvlds refuses impossible block numbers");
    assert!(why.contains("impossible block numbers"), "{why}");
}

/// Found by review: a child's page length in its parent's reference is trusted for
/// merge decisions; a CRC-valid page whose reference understates a child
/// makes a merge build a page larger than a block: panic in serialize.
#[test]
fn review_finding_child_ref_length_mismatch_is_corruption_not_a_panic() {
    use kivaloo_nodes::kvlds::page::{serialize, ChildRef, Page, PageBody};
    let v = Bytes::from(vec![b'x'; 94]);
    let leaf = |block: u64, first: u32| Page {
        block,
        level: 0,
        commit_blocks: 0,
        body: PageBody::Leaf {
            pairs: (first..first + 3).map(|i| (k(&format!("k{i:03}")), v.clone())).collect(),
        },
    };
    let (l0, l1) = (leaf(0, 0), leaf(1, 3));
    let root = Page {
        block: 2,
        level: 1,
        commit_blocks: 3,
        body: PageBody::Internal {
            keys: vec![k("k003")],
            children: vec![
                l0.child_ref(),
                ChildRef { block: 1, oldest_block: 1, page_len: 30 }, // really 324
            ],
        },
    };
    let mut h = Harness::new(512, KvldsConfig { check_invariants: false, ..Default::default() });
    for p in [&l0, &l1, &root] {
        h.lbs.blocks.insert(p.block, serialize(p, 512));
    }
    h.lbs.next_block = 3;
    h.restart();
    let conn = h.client.unwrap();
    let mut buf = BytesMut::new();
    KvldsRequest::Set { key: k("k000"), value: k("y") }.encode(1, &mut buf);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        h.input(Input::Received { conn, data: buf.freeze() });
        h.settle();
    }));
    assert!(r.is_ok(), "kvlds panicked on a corrupt (CRC-valid) child reference");
    let why = h.exited.expect("kvlds stops on the corrupt reference");
    assert!(why.contains("block 1"), "{why}");
}

/// A block store that does not checksum (kivaloo's own lbs) may serve a
/// torn or garbage tail: recovery passes over it to the newest complete
/// commit, and refuses to start when no commit is complete.
#[test]
fn recovery_passes_over_a_garbage_tail_and_refuses_a_store_without_a_root() {
    let config = KvldsConfig { cache_pages_max: Some(4), check_invariants: true, ..Default::default() };
    let mut h = Harness::new(512, config);
    let reqs: Vec<_> = (0..200u32)
        .map(|i| KvldsRequest::Set {
            key: Bytes::from(format!("key{i:04}")),
            value: Bytes::from(format!("{i}")),
        })
        .collect();
    h.call(&reqs);
    let want = scan_all(&mut h, 1000);
    assert_eq!(want.len(), 200);
    // A torn commit: a valid-looking first page is missing, then garbage.
    let next = h.lbs.next_block;
    h.lbs.blocks.insert(next + 1, Bytes::from(vec![0x5a; 512]));
    h.lbs.next_block = next + 2;
    h.restart();
    assert_eq!(h.exited, None);
    assert_eq!(h.kvlds.probes().recoveries_skipped_tail, 1);
    assert_eq!(scan_all(&mut h, 1000), want);
    // New commits go after the garbage, and are found again.
    h.call(&[KvldsRequest::Set { key: Bytes::from("zz"), value: Bytes::from("1") }]);
    h.restart();
    assert_eq!(scan_all(&mut h, 1000).len(), 201);
    // Nothing but garbage: refuse rather than start empty.
    let mut g = Harness::new(512, KvldsConfig::default());
    g.lbs.blocks.insert(0, Bytes::from(vec![0x5a; 512]));
    g.lbs.next_block = 1;
    g.restart();
    let why = g.exited.expect("kvlds refuses a store with blocks and no root");
    assert!(why.contains("refusing to start"), "{why}");
}
