//! The run's workload client behind one interface: the lbs client (blocks)
//! or the kvlds client (keys), each with its own oracle. The world
//! connects it, feeds it responses, and tells it when its connection
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
    /// A new connection is open: send what starts it into `out`.
    pub fn on_connected(&mut self, out: &mut BytesMut) {
        match self {
            Client::Lbs(c) => c.on_connected(out),
            Client::Kvlds(c) => c.on_connected(),
        }
    }

    /// The connection broke: what was pending is indeterminate.
    pub fn on_disconnected(&mut self) {
        match self {
            Client::Lbs(c) => c.on_disconnected(),
            Client::Kvlds(c) => c.on_disconnected(),
        }
    }

    /// Issues what the workload wants now into `out`.
    pub fn issue(&mut self, rng: &mut Stream, now_ns: u64, out: &mut BytesMut) {
        match self {
            Client::Lbs(c) => c.issue(rng, out),
            Client::Kvlds(c) => c.issue(rng, now_ns, out),
        }
    }

    /// Checks a response; `tainted` if the node emitted it after one of
    /// its fsyncs failed.
    ///
    /// # Errors
    /// What the oracle caught.
    pub fn on_packet(&mut self, packet: Packet, tainted: bool, now_ns: u64) -> Result<(), String> {
        match self {
            Client::Lbs(c) => c.on_packet(packet, tainted),
            Client::Kvlds(c) => c.on_packet(packet, now_ns),
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

    /// A pending request, readable.
    pub fn describe_request(&self, id: u64) -> String {
        match self {
            Client::Lbs(_) => format!("request {id:#x}"),
            Client::Kvlds(c) => c.describe_request(id),
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
