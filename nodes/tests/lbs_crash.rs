//! Seeded crash testing of the lbs node against the in-memory disk: random
//! pipelined APPENDs, GETs and FREEs; power losses at random moments that
//! keep any mix of unsynced sectors (new, old or garbage) and directory
//! entries; process crashes that keep the page cache; injected fsync
//! failures that drop the dirty pages or keep them cached but unwritten.
//! After every restart:
//!
//! - the store comes up (nothing acknowledged was damaged: this test does
//!   no bit rot, so refusing to start would be a bug);
//! - the next block number never goes below one a client has seen (in an
//!   APPEND acknowledgement or a PARAMS2 answer);
//! - every acknowledged block, and every block a GET has returned, that was
//!   not freed reads back exactly (what lbs serves must be durable);
//! - a GET never returns bytes other than the last ones sent for that
//!   block number;
//! - nothing is acknowledged after a failed fsync.
//!
//! This is a preview of what the simulator (sim/) does at scale; a failing
//! seed is printed so that it can be replayed alone.

mod memdisk;

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use kivaloo::contract::{ConnId, DiskErrorKind, Input, Instant, Node, Output};
use kivaloo::lbs_proto::{LbsRequest, LbsRequestKind, LbsResponse};
use kivaloo::packet::PacketDecoder;
use kivaloo_nodes::lbs::{LbsConfig, LbsNode};
use memdisk::MemDisk;

const BS: u32 = 512;
/// Seeds run by `cargo test`; `LBS_CRASH_SEEDS=N` runs more.
const SEEDS: u64 = 3000;

/// xorshift64*: a small deterministic generator for the workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// How often the hard paths were reached, over a sweep.
#[derive(Default, Debug)]
struct Coverage {
    torn_tails_cut: u64,
    torn_headers_rewritten: u64,
    process_crashes: u64,
    power_losses: u64,
    torn_new_files_removed: u64,
    fsync_failures: u64,
    freed_files_removed: u64,
    acked_blocks_checked: u64,
}

/// What the client knows.
#[derive(Default)]
struct Model {
    /// Content of every acknowledged block.
    acked: BTreeMap<u64, Vec<u8>>,
    /// The last content sent for each block number (acknowledged or not).
    last_sent: BTreeMap<u64, Vec<u8>>,
    acked_end: u64,
    /// Blocks a GET returned: from then on they must stay.
    seen: BTreeMap<u64, Vec<u8>>,
    /// The largest next block number a client has been told.
    next_seen: u64,
    /// Blocks below this may have been freed.
    freed_below: u64,
}

enum Pending {
    Append {
        start: u64,
        count: u64,
    },
    /// `must_exist` if the block was acknowledged and not freed when asked.
    Get {
        block: u64,
        must_exist: bool,
    },
    Free,
    Params2,
}

struct Life {
    node: LbsNode,
    queue: std::collections::VecDeque<(kivaloo::DiskOpId, kivaloo::DiskOp)>,
    decoder: PacketDecoder,
    pending: BTreeMap<u64, Pending>,
    exited: Option<String>,
    closed: Option<String>,
    accepting: bool,
    params2: Option<(u64, u64)>,
    logs: Vec<String>,
}

const CONN: ConnId = ConnId(1);

fn block_content(block: u64, generation: u64) -> Vec<u8> {
    (0..BS as u64)
        .map(|i| (block ^ generation.wrapping_mul(0x9E37)).wrapping_add(i).wrapping_mul(131) as u8)
        .collect()
}

impl Model {
    /// Whether `block` must read back: acknowledged or already returned,
    /// and not freed.
    fn must_exist(&self, block: u64) -> bool {
        (self.acked.contains_key(&block) || self.seen.contains_key(&block)) && block >= self.freed_below
    }
}

impl Life {
    fn start(cfg: &LbsConfig) -> Life {
        Life {
            node: LbsNode::new(cfg.clone()),
            queue: Default::default(),
            decoder: PacketDecoder::new(),
            pending: BTreeMap::new(),
            exited: None,
            closed: None,
            accepting: false,
            params2: None,
            logs: Vec::new(),
        }
    }

    fn drain(&mut self, model: &mut Model, seed: u64) {
        while let Some(out) = self.node.poll_output() {
            match out {
                Output::Disk { id, op } => self.queue.push_back((id, op)),
                Output::Send { data, .. } => {
                    self.decoder.push(&data);
                    while let Some(p) = self.decoder.next_packet().expect("valid packets") {
                        let pending = self.pending.remove(&p.id).expect("response to a pending request");
                        self.check_response(pending, p.record, model, seed);
                    }
                }
                Output::Exit(r) => self.exited = Some(r.message),
                Output::Close { reason, .. } => self.closed = Some(reason),
                Output::Accepting(on) => self.accepting = on,
                Output::Log { message, .. } => self.logs.push(message),
                Output::ReadInterest { .. } => {}
            }
        }
    }

    fn check_response(&mut self, pending: Pending, record: Bytes, model: &mut Model, seed: u64) {
        match pending {
            Pending::Append { start, count } => {
                let r = LbsResponse::decode(LbsRequestKind::Append, record).unwrap();
                assert_eq!(r, LbsResponse::Append(Some(start + count)), "seed {seed}: APPEND at {start}");
                for b in start..start + count {
                    model.acked.insert(b, model.last_sent[&b].clone());
                }
                model.acked_end = model.acked_end.max(start + count);
                model.next_seen = model.next_seen.max(start + count);
            }
            Pending::Get { block, must_exist } => {
                match LbsResponse::decode(LbsRequestKind::Get, record).unwrap() {
                    LbsResponse::Get(Some(data)) => {
                        let expected = model.last_sent.get(&block);
                        assert_eq!(
                            Some(&data[..]),
                            expected.map(|v| &v[..]),
                            "seed {seed}: GET {block} returned bytes never sent for it"
                        );
                        model.seen.insert(block, data.to_vec());
                    }
                    LbsResponse::Get(None) => {
                        assert!(!must_exist, "seed {seed}: acknowledged block {block} is missing")
                    }
                    other => panic!("{other:?}"),
                }
            }
            Pending::Free => {
                assert_eq!(LbsResponse::decode(LbsRequestKind::Free, record).unwrap(), LbsResponse::Free)
            }
            Pending::Params2 => match LbsResponse::decode(LbsRequestKind::Params2, record).unwrap() {
                LbsResponse::Params2 { block_size, next_block, last_block } => {
                    assert_eq!(block_size, BS);
                    assert!(
                        next_block >= model.next_seen,
                        "seed {seed}: next block {next_block} went below {} (seen before)",
                        model.next_seen
                    );
                    model.next_seen = next_block;
                    self.params2 = Some((next_block, last_block));
                }
                other => panic!("{other:?}"),
            },
        }
    }

    fn request(&mut self, id: u64, req: LbsRequest, pending: Pending, model: &mut Model, seed: u64) {
        let mut out = BytesMut::new();
        req.encode(id, &mut out);
        self.pending.insert(id, pending);
        self.node.handle_input(Instant::default(), Input::Received { conn: CONN, data: out.freeze() });
        self.drain(model, seed);
    }

    /// Completes up to `n` queued disk operations in order.
    fn run_disk(&mut self, disk: &mut MemDisk, n: usize, model: &mut Model, seed: u64) {
        for _ in 0..n {
            let Some((id, op)) = self.queue.pop_front() else { return };
            let result = disk.execute(&op);
            self.node.handle_input(Instant::default(), Input::Disk { id, result });
            self.drain(model, seed);
        }
    }
}

fn run_seed(seed: u64, cov: &mut Coverage) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    // Tiny files so that rollover and FREE's file removal happen often.
    let cfg = LbsConfig { file_len_min_bytes: (BS as u64 + 32) * (1 + rng.below(8)), ..LbsConfig::new(BS) };
    let mut disk = MemDisk::new();
    disk.failed_fsync_keeps_pages = rng.chance(50);
    let mut model = Model::default();
    let mut generation = 0u64;
    let mut next_id = 1u64;
    for life_no in 0..6 {
        let mut life = Life::start(&cfg);
        life.drain(&mut model, seed);
        life.run_disk(&mut disk, usize::MAX, &mut model, seed);
        assert!(life.exited.is_none(), "seed {seed} life {life_no}: refused to start: {:?}", life.exited);
        assert!(life.accepting, "seed {seed}: not accepting after recovery");
        life.node.handle_input(Instant::default(), Input::Accepted { conn: CONN });
        life.drain(&mut model, seed);

        // What survived.
        life.request(next_id, LbsRequest::Params2, Pending::Params2, &mut model, seed);
        next_id += 1;
        let (next, _) = life.params2.expect("PARAMS2 answered at once");
        assert!(
            next >= model.acked_end,
            "seed {seed}: next block {next} < acknowledged end {}",
            model.acked_end
        );
        for block in 0..next {
            let must_exist = model.must_exist(block);
            cov.acked_blocks_checked += must_exist as u64;
            life.request(
                next_id,
                LbsRequest::Get { block },
                Pending::Get { block, must_exist },
                &mut model,
                seed,
            );
            next_id += 1;
        }
        life.run_disk(&mut disk, usize::MAX, &mut model, seed);
        assert!(life.pending.is_empty(), "seed {seed}: GETs unanswered after recovery");
        // Blocks numbered at or past `next` are no longer what was sent:
        // they may be sent again with other bytes.
        let mut append_at = next;
        model.last_sent.retain(|b, _| *b < next);
        model.seen.retain(|b, _| *b < next);

        // A workload, with a crash (or an fsync failure) somewhere in it.
        let steps = 5 + rng.below(60);
        let fail_fsync_at = if rng.chance(25) { Some(rng.below(steps)) } else { None };
        for step in 0..steps {
            if fail_fsync_at == Some(step) {
                disk.fail_next("fsync", DiskErrorKind::Io);
            }
            match rng.below(10) {
                0..=4 => {
                    let count = 1 + rng.below(4);
                    generation += 1;
                    let mut data = Vec::new();
                    for b in append_at..append_at + count {
                        let content = block_content(b, generation);
                        data.extend_from_slice(&content);
                        model.last_sent.insert(b, content);
                    }
                    let req = LbsRequest::Append { count: count as u32, start: append_at, data: data.into() };
                    life.request(next_id, req, Pending::Append { start: append_at, count }, &mut model, seed);
                    append_at += count;
                }
                5..=7 => {
                    let block = rng.below(append_at + 2);
                    let must_exist = model.must_exist(block);
                    life.request(
                        next_id,
                        LbsRequest::Get { block },
                        Pending::Get { block, must_exist },
                        &mut model,
                        seed,
                    );
                }
                8 => {
                    let keep_from = rng.below(model.acked_end + 1);
                    model.freed_below = model.freed_below.max(keep_from);
                    life.request(next_id, LbsRequest::Free { keep_from }, Pending::Free, &mut model, seed);
                }
                _ => life.run_disk(&mut disk, rng.below(8) as usize, &mut model, seed),
            }
            next_id += 1;
            if life.exited.is_some() || life.closed.is_some() {
                break;
            }
        }
        if rng.chance(50) {
            life.run_disk(&mut disk, rng.below(20) as usize, &mut model, seed);
        }
        for log in &life.logs {
            cov.torn_tails_cut += log.contains("discarding") as u64;
            cov.torn_new_files_removed += log.contains("first write was torn") as u64;
            cov.torn_headers_rewritten += log.contains("rewriting a header") as u64;
            cov.freed_files_removed += log.contains("were freed") as u64;
        }
        match &life.exited {
            Some(reason) => {
                assert!(reason.contains("fsync"), "seed {seed}: unexpected exit: {reason}");
                cov.fsync_failures += 1;
            }
            None => assert!(life.closed.is_none(), "seed {seed}: connection dropped: {:?}", life.closed),
        }
        disk.clear_faults();
        if rng.chance(35) {
            // The process dies; the machine (and its page cache) stays up.
            cov.process_crashes += 1;
        } else {
            cov.power_losses += 1;
            disk = disk.crash_random(&mut |n| rng.below(n));
        }
    }
}

#[test]
fn random_crashes_never_lose_acknowledged_blocks() {
    let only: Option<u64> = std::env::var("LBS_CRASH_SEED").ok().and_then(|s| s.parse().ok());
    let mut cov = Coverage::default();
    let seeds: u64 = std::env::var("LBS_CRASH_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(SEEDS);
    for seed in only.map_or(0..seeds, |s| s..s + 1) {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_seed(seed, &mut cov)));
        if let Err(e) = result {
            eprintln!("failing seed: LBS_CRASH_SEED={seed} cargo test -p kivaloo-nodes --test lbs_crash");
            std::panic::resume_unwind(e);
        }
    }
    eprintln!("coverage over the sweep: {cov:?}");
    if only.is_none() {
        // A sweep that stops reaching the hard paths tests nothing there.
        assert!(cov.torn_tails_cut > 0, "no crash tore a tail: {cov:?}");
        assert!(cov.torn_new_files_removed > 0, "no crash tore a new file's first write: {cov:?}");
        assert!(cov.fsync_failures > 0, "no fsync failed: {cov:?}");
        assert!(cov.torn_headers_rewritten > 0, "no new file's header was torn alone: {cov:?}");
        assert!(cov.process_crashes > 0 && cov.power_losses > 0, "{cov:?}");
        assert!(cov.freed_files_removed > 0, "FREE never removed a file: {cov:?}");
        assert!(cov.acked_blocks_checked > 1000, "few acknowledged blocks checked: {cov:?}");
    }
}
