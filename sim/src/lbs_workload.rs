//! The lbs client and its oracle. The client pipelines APPENDs (at the
//! next block it knows), GETs (any block, many at once), FREEs and PARAMS2
//! (never while an APPEND is in flight, as PROTOCOL.md asks), reconnecting
//! after every crash or reset. The oracle checks every answer against what
//! the client has seen:
//!
//! - every acknowledged block, and every block a GET returned, reads back
//!   exactly unless freed (durability: what lbs serves is durable);
//! - a GET never returns bytes other than the last ones sent for that block
//!   number (honesty: corruption is reported, never returned);
//! - the next block number never goes below one a client was told;
//! - no APPEND is acknowledged by a process after one of its fsyncs failed.
//!
//! Runs whose disk was damaged (bit rot, misdirected writes) check honesty
//! only: damaged acknowledged data may be reported missing (a dropped
//! connection, a refusal to start), never returned wrong.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{Bytes, BytesMut};
use kivaloo::lbs_proto::{LbsRequest, LbsRequestKind, LbsResponse};
use kivaloo::packet::Packet;

use crate::rng::Stream;

#[derive(Debug, Clone)]
enum Pending {
    Append { start: u64, count: u64 },
    Get { block: u64, must_exist: bool },
    Free,
    Params2,
}

impl Pending {
    fn kind(&self) -> LbsRequestKind {
        match self {
            Pending::Append { .. } => LbsRequestKind::Append,
            Pending::Get { .. } => LbsRequestKind::Get,
            Pending::Free => LbsRequestKind::Free,
            Pending::Params2 => LbsRequestKind::Params2,
        }
    }
}

/// Counts for reports and coverage.
#[derive(Debug, Clone, Default)]
pub struct LbsStats {
    pub requests: u64,
    pub responses: u64,
    pub acked_blocks: u64,
    pub gets_checked: u64,
    pub indeterminate: u64,
    pub connections: u64,
}

/// The client, its model of the store, and the oracle.
pub struct LbsClient {
    block_size: u32,
    in_flight_max: u64,
    budget: u64,
    /// Content of every acknowledged block.
    acked: BTreeMap<u64, Bytes>,
    /// The last content sent for each block number.
    last_sent: BTreeMap<u64, Bytes>,
    /// Blocks a GET returned.
    seen: BTreeMap<u64, Bytes>,
    next_seen: u64,
    freed_below: u64,
    /// Requests on the current connection.
    pending: BTreeMap<u64, Pending>,
    appends_pending: u64,
    /// The block the next APPEND starts at, once PARAMS2 answered.
    append_at: Option<u64>,
    next_id: u64,
    generation: u64,
    /// Checking everything at the end: blocks still to GET.
    verify_queue: Vec<u64>,
    verifying: bool,
    verified: bool,
    /// Damage happened: check honesty only.
    pub damaged: bool,
    /// Block numbers whose records the damage touched (precise relaxation).
    pub damaged_blocks: BTreeSet<u64>,
    pub stats: LbsStats,
}

impl LbsClient {
    /// A client for a store of `block_size`-byte blocks that issues
    /// `budget` requests, at most `in_flight_max` at once.
    pub fn new(block_size: u32, in_flight_max: u64, budget: u64) -> LbsClient {
        LbsClient {
            block_size,
            in_flight_max,
            budget,
            acked: BTreeMap::new(),
            last_sent: BTreeMap::new(),
            seen: BTreeMap::new(),
            next_seen: 0,
            freed_below: 0,
            pending: BTreeMap::new(),
            appends_pending: 0,
            append_at: None,
            next_id: 1,
            generation: 0,
            verify_queue: Vec::new(),
            verifying: false,
            verified: false,
            damaged: false,
            damaged_blocks: BTreeSet::new(),
            stats: LbsStats::default(),
        }
    }

    /// Damage touched a block in `lo..hi`.
    fn damage_in(&self, lo: u64, hi: u64) -> bool {
        lo < hi && self.damaged_blocks.range(lo..hi).next().is_some()
    }

    /// Damage touched a block that must still be there.
    pub fn damage_touches_live(&self) -> bool {
        self.damage_in(0, self.next_seen.max(self.acked.keys().next_back().map_or(0, |b| b + 1)))
    }

    fn must_exist(&self, block: u64) -> bool {
        !self.damaged_blocks.contains(&block)
            && (self.acked.contains_key(&block) || self.seen.contains_key(&block))
            && block >= self.freed_below
    }

    /// Whether the workload budget is spent and nothing is pending.
    pub fn workload_done(&self) -> bool {
        self.stats.requests >= self.budget && self.pending.is_empty()
    }

    /// Whether the final check has read every block back.
    pub fn verified(&self) -> bool {
        self.verified
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Starts the final check (after faults stop): on the next connection,
    /// every block below the next block is read back.
    pub fn start_verify(&mut self) {
        self.verifying = true;
    }

    /// A new connection: ask where the store ends.
    pub fn on_connected(&mut self, out: &mut BytesMut) {
        self.stats.connections += 1;
        self.append_at = None;
        self.send(Pending::Params2, LbsRequest::Params2, out);
    }

    /// The connection is gone: what was pending is indeterminate.
    pub fn on_disconnected(&mut self) {
        self.stats.indeterminate += self.pending.len() as u64;
        self.pending.clear();
        self.appends_pending = 0;
        self.append_at = None;
        self.verify_queue.clear();
    }

    fn send(&mut self, p: Pending, req: LbsRequest, out: &mut BytesMut) {
        let id = self.next_id;
        self.next_id += 1;
        req.encode(id, out);
        if matches!(p, Pending::Append { .. }) {
            self.appends_pending += 1;
        }
        self.pending.insert(id, p);
        if !self.verifying {
            self.stats.requests += 1;
        }
    }

    /// Issues what the workload wants now into `out`.
    pub fn issue(&mut self, rng: &mut Stream, out: &mut BytesMut) {
        let Some(append_at) = self.append_at else { return };
        if self.verifying {
            while (self.pending.len() as u64) < self.in_flight_max {
                let Some(block) = self.verify_queue.pop() else { break };
                let must_exist = self.must_exist(block);
                self.send(Pending::Get { block, must_exist }, LbsRequest::Get { block }, out);
            }
            if self.verify_queue.is_empty() && self.pending.is_empty() {
                self.verified = true;
            }
            return;
        }
        let mut append_at = append_at;
        while (self.pending.len() as u64) < self.in_flight_max && self.stats.requests < self.budget {
            match rng.below(100) {
                0..=44 => {
                    let count = 1 + rng.below(4);
                    self.generation += 1;
                    let mut data = BytesMut::with_capacity(count as usize * self.block_size as usize);
                    for b in append_at..append_at + count {
                        let start = data.len();
                        data.resize(start + self.block_size as usize, 0);
                        fill_block(&mut data[start..], b, self.generation);
                        self.last_sent.insert(b, Bytes::copy_from_slice(&data[start..]));
                    }
                    let req =
                        LbsRequest::Append { count: count as u32, start: append_at, data: data.freeze() };
                    self.send(Pending::Append { start: append_at, count }, req, out);
                    append_at += count;
                }
                45..=93 => {
                    let block = rng.below(append_at + 2);
                    let must_exist = self.must_exist(block);
                    self.send(Pending::Get { block, must_exist }, LbsRequest::Get { block }, out);
                }
                94..=96 => {
                    let keep_from = rng.below(append_at.min(self.next_seen) / 2 + 1);
                    self.freed_below = self.freed_below.max(keep_from);
                    self.send(Pending::Free, LbsRequest::Free { keep_from }, out);
                }
                _ => {
                    if self.appends_pending == 0 {
                        self.send(Pending::Params2, LbsRequest::Params2, out);
                    }
                }
            }
        }
        self.append_at = Some(append_at);
    }

    /// Checks one response. `after_fsync_failure`: the node emitted it after
    /// one of its fsyncs had failed.
    ///
    /// # Errors
    /// What the oracle caught.
    pub fn on_packet(&mut self, packet: Packet, after_fsync_failure: bool) -> Result<(), String> {
        let Some(p) = self.pending.remove(&packet.id) else {
            return Err(format!("response to request {:#x}, which is not pending", packet.id));
        };
        self.stats.responses += 1;
        let resp = LbsResponse::decode(p.kind(), packet.record)
            .map_err(|e| format!("malformed response to {p:?}: {e}"))?;
        match (p, resp) {
            (Pending::Append { start, count }, LbsResponse::Append(Some(next))) => {
                self.appends_pending -= 1;
                if after_fsync_failure {
                    return Err(format!(
                        "APPEND of {start}..{} acknowledged after a failed fsync",
                        start + count
                    ));
                }
                if next != start + count {
                    return Err(format!("APPEND at {start} of {count} answered next block {next}"));
                }
                for b in start..start + count {
                    self.acked.insert(b, self.last_sent[&b].clone());
                }
                self.stats.acked_blocks += count;
                self.next_seen = self.next_seen.max(next);
            }
            (Pending::Append { start, .. }, LbsResponse::Append(None)) => {
                return Err(format!("APPEND at {start}, the next block as PARAMS2 said, was refused"));
            }
            (Pending::Get { block, must_exist }, LbsResponse::Get(got)) => {
                self.stats.gets_checked += 1;
                match got {
                    Some(data) => {
                        if self.last_sent.get(&block) != Some(&data) {
                            return Err(format!("GET {block} returned bytes never sent for that block"));
                        }
                        self.seen.insert(block, data);
                        // lbs serves only durable blocks: the store now ends past this one.
                        self.next_seen = self.next_seen.max(block + 1);
                    }
                    None if must_exist => {
                        return Err(format!("block {block}, acknowledged or read before, is missing"));
                    }
                    None => {}
                }
            }
            (Pending::Free, LbsResponse::Free) => {}
            (Pending::Params2, LbsResponse::Params2 { block_size, next_block, last_block }) => {
                if block_size != self.block_size {
                    return Err(format!("PARAMS2 block size {block_size}, expected {}", self.block_size));
                }
                if next_block < self.next_seen
                    && self.next_seen - next_block <= 4 * self.in_flight_max
                    && self.damage_in(next_block, self.next_seen)
                {
                    // The newest batch rotted and was rolled back (lbs's stated limitation).
                    self.acked.retain(|b, _| *b < next_block);
                    self.seen.retain(|b, _| *b < next_block);
                    self.next_seen = next_block;
                }
                if next_block < self.next_seen {
                    return Err(format!(
                        "next block {next_block} went below {} (seen before)",
                        self.next_seen
                    ));
                }
                if last_block != next_block.wrapping_sub(1) {
                    return Err(format!("PARAMS2 last block {last_block} with next {next_block}"));
                }
                self.next_seen = self.next_seen.max(next_block);
                if self.append_at.is_none() {
                    // Numbers from here on may be written again.
                    self.last_sent.retain(|b, _| *b < next_block);
                    self.seen.retain(|b, _| *b < next_block);
                    self.append_at = Some(next_block);
                    if self.verifying {
                        self.verify_queue = (0..next_block).rev().collect();
                        let acked_past_end =
                            self.must_exist(next_block) || self.acked.range(next_block..).next().is_some();
                        if acked_past_end {
                            return Err(format!("acknowledged blocks past the next block {next_block}"));
                        }
                    }
                }
            }
            (p, r) => return Err(format!("{p:?} answered {r:?}")),
        }
        Ok(())
    }
}

/// The content of block `b` in append generation `generation`.
fn fill_block(buf: &mut [u8], b: u64, generation: u64) {
    let mut x = b.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ generation.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}
