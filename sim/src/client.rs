//! The run's workload clients behind one interface: the lbs client (blocks;
//! one client) or the kvlds clients (keys; one or more, each in a slot
//! with one connection at a time), each with its own oracle. The world
//! connects them, feeds them responses, and tells them when a connection
//! broke.

use bytes::BytesMut;
use kivaloo::packet::Packet;

use crate::kvlds_workload::KvldsClient;
use crate::lbs_workload::LbsClient;
use crate::rng::Stream;

/// The workload of a run.
pub enum Client {
    Lbs(LbsClient),
    Kvlds(KvldsClient),
}

impl Client {
    /// How many clients (slots) there are.
    pub fn clients(&self) -> usize {
        match self {
            Client::Lbs(_) => 1,
            Client::Kvlds(c) => c.clients(),
        }
    }

    /// Client `slot` has a new connection: send what starts it into `out`.
    pub fn on_connected(&mut self, slot: usize, out: &mut BytesMut) {
        match self {
            Client::Lbs(c) => c.on_connected(out),
            Client::Kvlds(c) => c.on_connected(slot),
        }
    }

    /// Client `slot`'s connection broke: what was pending is indeterminate.
    pub fn on_disconnected(&mut self, slot: usize) {
        match self {
            Client::Lbs(c) => c.on_disconnected(),
            Client::Kvlds(c) => c.on_disconnected(slot),
        }
    }

    /// Issues what client `slot` wants to send now into `out`.
    pub fn issue(&mut self, slot: usize, rng: &mut Stream, now_ns: u64, out: &mut BytesMut) {
        match self {
            Client::Lbs(c) => c.issue(rng, out),
            Client::Kvlds(c) => c.issue(slot, rng, now_ns, out),
        }
    }

    /// Checks a response to client `slot`; `tainted` if the node emitted it
    /// after one of its fsyncs failed.
    ///
    /// # Errors
    /// What the oracle caught.
    pub fn on_packet(
        &mut self,
        slot: usize,
        packet: Packet,
        tainted: bool,
        now_ns: u64,
    ) -> Result<(), String> {
        match self {
            Client::Lbs(c) => c.on_packet(packet, tainted),
            Client::Kvlds(c) => c.on_packet(slot, packet, now_ns),
        }
    }

    /// Faults stopped: starts the liveness phase, if this workload has one
    /// (kvlds: every client is served a fresh request and has nothing left
    /// pending). False if it has none (lbs).
    pub fn start_liveness(&mut self) -> bool {
        match self {
            Client::Lbs(_) => false,
            Client::Kvlds(c) => {
                c.start_liveness();
                true
            }
        }
    }

    /// Whether the liveness phase is complete.
    pub fn liveness_done(&self) -> bool {
        match self {
            Client::Lbs(_) => true,
            Client::Kvlds(c) => c.liveness_done(),
        }
    }

    /// Whether client `slot` is through the liveness phase.
    pub fn liveness_done_for(&self, slot: usize) -> bool {
        match self {
            Client::Lbs(_) => true,
            Client::Kvlds(c) => c.liveness_done_for(slot),
        }
    }

    /// What keeps the liveness phase from ending, readable.
    pub fn liveness_state(&self) -> String {
        match self {
            Client::Lbs(_) => String::new(),
            Client::Kvlds(c) => c.liveness_state(),
        }
    }

    /// The workload budget is spent and nothing is pending.
    pub fn workload_done(&self) -> bool {
        match self {
            Client::Lbs(c) => c.workload_done(),
            Client::Kvlds(c) => c.workload_done(),
        }
    }

    /// Starts the final read-back on the next connection.
    pub fn start_verify(&mut self) {
        match self {
            Client::Lbs(c) => c.start_verify(),
            Client::Kvlds(c) => c.start_verify(),
        }
    }

    /// Every component was crashed at `now_ns` (see
    /// `KvldsClient::effects_end_now`).
    pub fn effects_end_now(&mut self, now_ns: u64) {
        if let Client::Kvlds(c) = self {
            c.effects_end_now(now_ns);
        }
    }

    /// When the oldest request still waiting for its answer was sent (kvlds
    /// workloads).
    pub fn oldest_pending_ns(&self) -> Option<u64> {
        match self {
            Client::Lbs(_) => None,
            Client::Kvlds(c) => c.oldest_pending_ns(),
        }
    }

    /// The final read-back is complete.
    pub fn verified(&self) -> bool {
        match self {
            Client::Lbs(c) => c.verified(),
            Client::Kvlds(c) => c.verified(),
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        match self {
            Client::Lbs(c) => c.in_flight(),
            Client::Kvlds(c) => c.in_flight(),
        }
    }

    /// Workload requests issued.
    pub fn requests(&self) -> u64 {
        match self {
            Client::Lbs(c) => c.stats.requests,
            Client::Kvlds(c) => c.stats.requests,
        }
    }

    /// Writes acknowledged: blocks (lbs) or modifying requests (kvlds).
    pub fn acked(&self) -> u64 {
        match self {
            Client::Lbs(c) => c.stats.acked_blocks,
            Client::Kvlds(c) => c.stats.acked,
        }
    }

    /// The ids of the requests sent since the last call (kvlds), in order.
    pub fn take_issued(&mut self) -> Vec<u64> {
        match self {
            Client::Lbs(_) => Vec::new(),
            Client::Kvlds(c) => c.take_issued(),
        }
    }

    /// Client `slot`'s pending request `id`, readable.
    pub fn describe_request(&self, slot: usize, id: u64) -> String {
        match self {
            Client::Lbs(_) => format!("request {id:#x}"),
            Client::Kvlds(c) => c.describe_request(slot, id),
        }
    }

    /// The last response, readable, if the client keeps notes.
    pub fn take_response_note(&mut self) -> Option<String> {
        match self {
            Client::Lbs(_) => None,
            Client::Kvlds(c) => c.take_response_note(),
        }
    }
}
