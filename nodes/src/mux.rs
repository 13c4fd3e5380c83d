//! mux: many client connections onto one upstream connection (to kvlds).
//!
//! Each request a client sends is forwarded upstream under a new request
//! ID, unique on the upstream connection; its response is routed back to
//! the client and the ID it came with. A response for a client that has
//! gone is dropped: connection ids are never reused within a run, so it
//! cannot reach anyone else.
//!
//! kivaloo's mux forwards records blind. Ours checks each request before
//! forwarding it (a well-formed kvlds request, within the limits kvlds
//! reported to the mux's PARAMS at start): kvlds drops a connection that
//! sends garbage, and the connection that would be dropped is the mux's
//! one upstream, which every client shares. So a client that sends garbage
//! is dropped here, alone. Responses are forwarded without parsing.
//!
//! If the upstream closes or misbehaves, the mux exits (the driver then
//! closes every client connection).

use std::collections::BTreeMap;

use bytes::BytesMut;
use kivaloo::contract::{ConnClosed, ConnId, ExitReason, Input, Instant, LogLevel, Node, Output};
use kivaloo::kvlds_proto::{
    KvldsRequest, KvldsRequestKind, KvldsResponse, REQUEST_RECORD_LEN_MAX, SHORT_STRING_LEN_MAX,
};
use kivaloo::packet::{encode_packet, PacketDecoder, RECORD_LEN_MAX};

/// Requests of one client in flight upstream at once. At the bound the mux
/// stops reading from that client (kivaloo's clients keep at most 4096 in
/// flight).
pub const CLIENT_IN_FLIGHT_MAX: usize = 4096;
/// Response bytes sent to one client and not yet reported written, plus
/// the room reserved for the answers to its requests in flight (see
/// [`answer_bytes_reserved`]). At this bound the mux stops reading that
/// client's requests, so that a client that does read never has more
/// than this (and one request's reservation) held for it.
pub const CLIENT_UNSENT_BYTES_MAX: u64 = 4 << 20;
/// Response bytes waiting for one client: past this the client is dropped.
/// Only an upstream that answers beyond the reservations (a RANGE over
/// kvlds's own 1 MiB) can get here with a client that reads.
pub const CLIENT_UNSENT_BYTES_DROP: u64 = 64 << 20;
/// The most a RANGE answer is expected to hold in pairs (kvlds's cap; a
/// larger budget is reserved as this).
pub const RANGE_ANSWER_BYTES_MAX: u64 = 1 << 20;
/// Packet framing (16-byte header, 4-byte trailer).
const PACKET_OVERHEAD_BYTES: u64 = 20;
/// Request bytes sent upstream and not yet reported written (kvlds stops
/// reading when its own queue is full). At the bound the mux stops reading
/// from every client until half of it has drained.
pub const UPSTREAM_UNSENT_BYTES_MAX: u64 = 4 << 20;
/// `-n` when not given: client connections served at once.
pub const CONNECTIONS_MAX_DEFAULT: usize = 1024;
/// The request ID of the mux's own PARAMS at start; clients' requests go
/// upstream under IDs from 1 on.
const PARAMS_ID: u64 = 0;

/// How a mux is configured (kivaloo's `mux` flags).
#[derive(Debug, Clone)]
pub struct MuxConfig {
    /// `-n`: client connections served at once. At the bound the mux stops
    /// accepting until one closes.
    pub connections_max: usize,
}

impl Default for MuxConfig {
    fn default() -> Self {
        MuxConfig { connections_max: CONNECTIONS_MAX_DEFAULT }
    }
}

/// Counters of the paths a mux has been through, for the simulator's
/// coverage probes and for tests. They only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MuxProbes {
    /// Client connections accepted.
    pub clients_accepted: u64,
    /// Requests forwarded upstream.
    pub requests_forwarded: u64,
    /// Responses routed back to their client.
    pub responses_routed: u64,
    /// Responses dropped because their client had gone.
    pub responses_dropped: u64,
    /// Clients that went away with requests in flight.
    pub clients_gone_with_requests: u64,
    /// Clients dropped for a malformed or over-limit request, or for not
    /// reading their responses.
    pub clients_dropped: u64,
    /// Times every client was paused because the upstream did not keep up.
    pub upstream_pauses: u64,
    /// Times a client reached its bound of requests in flight
    /// ([`CLIENT_IN_FLIGHT_MAX`]), so that the mux stopped reading it
    /// (counted once each time the bound starts holding it back).
    pub client_reads_paused_at_in_flight_bound: u64,
    /// Times a client reached its bound of response bytes unsent and
    /// reserved ([`CLIENT_UNSENT_BYTES_MAX`]), so that the mux stopped
    /// reading it (counted once each time the bound starts holding it
    /// back).
    pub client_reads_paused_at_bytes_bound: u64,
    /// Times the mux stopped accepting because `-n` clients were connected.
    pub accepting_paused_at_limit: u64,
}

/// One client connection.
struct Client {
    decoder: PacketDecoder,
    /// Its requests forwarded and not yet answered.
    in_flight: usize,
    /// Response bytes sent to it and not yet reported written.
    unsent_bytes: u64,
    /// Room reserved for the answers to its requests in flight.
    reserved_bytes: u64,
    /// Whether the driver delivers its bytes (the last `ReadInterest`).
    reading: bool,
    /// Whether its bound of requests in flight held it back when last
    /// looked at (for the probe: counted when this turns on).
    at_in_flight_bound: bool,
    /// Likewise for its bound of response bytes.
    at_bytes_bound: bool,
    /// Responses gathered for one `Output::Send`.
    out: BytesMut,
}

/// Where a response goes: the client and the ID it used, and the room
/// reserved for the answer.
struct Route {
    conn: ConnId,
    id: u64,
    reserved_bytes: u64,
}

/// The room reserved for the answer to `request`: the largest answer a
/// kvlds sends to it (a RANGE: its budget, up to 1 MiB, plus the one pair
/// it returns past the budget, `next`, the count and status).
pub fn answer_bytes_reserved(request: &KvldsRequest) -> u64 {
    let short_string_max = 1 + SHORT_STRING_LEN_MAX as u64;
    PACKET_OVERHEAD_BYTES
        + match request {
            KvldsRequest::Range { max_bytes, .. } => {
                u64::from(*max_bytes).min(RANGE_ANSWER_BYTES_MAX) + 3 * short_string_max + 8
            }
            KvldsRequest::Get { .. } => 4 + short_string_max,
            _ => 8,
        }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the answer to the mux's PARAMS.
    Starting,
    Serving,
    Stopped,
}

/// The mux node.
pub struct MuxNode {
    config: MuxConfig,
    phase: Phase,
    /// kvlds's limits, from its PARAMS answer.
    key_len_max: usize,
    value_len_max: usize,
    clients: BTreeMap<ConnId, Client>,
    accepting: bool,
    /// Requests in flight upstream, by upstream ID.
    routes: BTreeMap<u64, Route>,
    next_upstream_id: u64,
    upstream_decoder: PacketDecoder,
    upstream_out: BytesMut,
    upstream_unsent_bytes: u64,
    /// Every client is paused until the upstream drains.
    upstream_paused: bool,
    /// The client that went first the last time paused clients resumed.
    resume_cursor: ConnId,
    outputs: std::collections::VecDeque<Output>,
    probes: MuxProbes,
}

impl MuxNode {
    /// A mux whose upstream (`ConnId::UPSTREAM`, open already) is kvlds.
    /// It asks kvlds for its limits and accepts clients once it has them.
    pub fn new(config: MuxConfig) -> MuxNode {
        let mut node = MuxNode {
            config,
            phase: Phase::Starting,
            key_len_max: 0,
            value_len_max: 0,
            clients: BTreeMap::new(),
            accepting: false,
            routes: BTreeMap::new(),
            next_upstream_id: PARAMS_ID + 1,
            upstream_decoder: PacketDecoder::with_record_len_max(RECORD_LEN_MAX),
            upstream_out: BytesMut::new(),
            upstream_unsent_bytes: 0,
            upstream_paused: false,
            resume_cursor: ConnId(0),
            outputs: Default::default(),
            probes: MuxProbes::default(),
        };
        KvldsRequest::Params.encode(PARAMS_ID, &mut node.upstream_out);
        node.upstream_unsent_bytes = node.upstream_out.len() as u64;
        node.log(LogLevel::Info, "asking the upstream for its key and value limits".into());
        node.flush();
        node
    }

    /// The counters so far.
    pub fn probes(&self) -> MuxProbes {
        self.probes
    }

    /// Client connections open now.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Requests forwarded upstream and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.routes.len()
    }

    fn log(&mut self, level: LogLevel, message: String) {
        self.outputs.push_back(Output::Log { level, message });
    }

    fn exit(&mut self, message: String) {
        if self.phase != Phase::Stopped {
            self.phase = Phase::Stopped;
            self.clients.clear();
            self.outputs.push_back(Output::Exit(ExitReason { failure: true, message }));
        }
    }

    fn set_accepting(&mut self) {
        let on = self.phase == Phase::Serving && self.clients.len() < self.config.connections_max;
        if on != self.accepting {
            if !on && self.phase == Phase::Serving {
                self.probes.accepting_paused_at_limit += 1;
            }
            self.accepting = on;
            self.outputs.push_back(Output::Accepting(on));
        }
    }

    fn accept(&mut self, conn: ConnId) {
        if self.phase != Phase::Serving || self.clients.len() >= self.config.connections_max {
            let reason = if self.phase == Phase::Serving {
                format!("mux: at its limit of {} connections", self.config.connections_max)
            } else {
                "mux: not serving yet (waiting for kvlds's limits)".to_string()
            };
            self.outputs.push_back(Output::Close { conn, reason });
            return;
        }
        self.probes.clients_accepted += 1;
        self.clients.insert(
            conn,
            Client {
                decoder: PacketDecoder::with_record_len_max(REQUEST_RECORD_LEN_MAX),
                in_flight: 0,
                unsent_bytes: 0,
                reserved_bytes: 0,
                reading: true,
                at_in_flight_bound: false,
                at_bytes_bound: false,
                out: BytesMut::new(),
            },
        );
        if self.upstream_paused {
            self.set_reading(conn, false);
        }
        self.set_accepting();
    }

    /// Forgets a client; answers to its requests in flight will be dropped.
    fn forget(&mut self, conn: ConnId) {
        if let Some(c) = self.clients.remove(&conn) {
            if c.in_flight > 0 {
                self.probes.clients_gone_with_requests += 1;
            }
            self.set_accepting();
        }
    }

    fn drop_client(&mut self, conn: ConnId, reason: String) {
        self.probes.clients_dropped += 1;
        self.forget(conn);
        self.outputs.push_back(Output::Close { conn, reason });
    }

    fn set_reading(&mut self, conn: ConnId, enabled: bool) {
        if let Some(c) = self.clients.get_mut(&conn) {
            if c.reading != enabled {
                c.reading = enabled;
                self.outputs.push_back(Output::ReadInterest { conn, enabled });
            }
        }
    }

    /// Forwards the requests buffered from `conn` while its bounds and the
    /// upstream's allow, and turns its reading on or off to match.
    fn forward_requests(&mut self, conn: ConnId) {
        loop {
            let Some(c) = self.clients.get_mut(&conn) else { return };
            let in_flight_full = c.in_flight >= CLIENT_IN_FLIGHT_MAX;
            let bytes_full = c.unsent_bytes + c.reserved_bytes >= CLIENT_UNSENT_BYTES_MAX;
            if in_flight_full && !c.at_in_flight_bound {
                self.probes.client_reads_paused_at_in_flight_bound += 1;
            }
            if bytes_full && !c.at_bytes_bound {
                self.probes.client_reads_paused_at_bytes_bound += 1;
            }
            c.at_in_flight_bound = in_flight_full;
            c.at_bytes_bound = bytes_full;
            let room = !self.upstream_paused && !in_flight_full && !bytes_full;
            if !room {
                return self.set_reading(conn, false);
            }
            let packet = match c.decoder.next_packet() {
                Ok(Some(p)) => p,
                Ok(None) => return self.set_reading(conn, true),
                Err(e) => return self.drop_client(conn, format!("mux: bad packet: {e}")),
            };
            let request = match KvldsRequest::decode(packet.record.clone()) {
                Ok(r) => r,
                Err(e) => return self.drop_client(conn, format!("mux: bad request {:#x}: {e}", packet.id)),
            };
            if let Some(why) = request.over_limits(self.key_len_max, self.value_len_max) {
                return self.drop_client(conn, format!("mux: request {:#x}: {why}", packet.id));
            }
            let reserved_bytes = answer_bytes_reserved(&request);
            c.in_flight += 1;
            c.reserved_bytes += reserved_bytes;
            let up_id = self.next_upstream_id;
            self.next_upstream_id += 1;
            self.routes.insert(up_id, Route { conn, id: packet.id, reserved_bytes });
            let before = self.upstream_out.len();
            encode_packet(&mut self.upstream_out, up_id, &packet.record);
            self.upstream_unsent_bytes += (self.upstream_out.len() - before) as u64;
            self.probes.requests_forwarded += 1;
            if self.upstream_unsent_bytes >= UPSTREAM_UNSENT_BYTES_MAX && !self.upstream_paused {
                self.upstream_paused = true;
                self.probes.upstream_pauses += 1;
                let conns: Vec<ConnId> = self.clients.keys().copied().collect();
                for other in conns {
                    self.set_reading(other, false);
                }
            }
        }
    }

    /// Resumes every client once the upstream has drained to half its
    /// bound, starting after the client that went first last time, so
    /// that no client is always last to fill the upstream.
    fn maybe_resume(&mut self) {
        if self.upstream_paused && self.upstream_unsent_bytes <= UPSTREAM_UNSENT_BYTES_MAX / 2 {
            self.upstream_paused = false;
            let conns = self.clients_from_cursor(|_| true);
            for conn in conns {
                self.forward_requests(conn);
            }
        }
    }

    /// The clients that `keep` selects, in connection order starting just
    /// after the one that went first last time (which moves on).
    fn clients_from_cursor(&mut self, keep: impl Fn(&Client) -> bool) -> Vec<ConnId> {
        let start = ConnId(self.resume_cursor.0.saturating_add(1));
        let conns: Vec<ConnId> = self
            .clients
            .range(start..)
            .chain(self.clients.range(..start))
            .filter(|(_, c)| keep(c))
            .map(|(conn, _)| *conn)
            .collect();
        if let Some(first) = conns.first() {
            self.resume_cursor = *first;
        }
        conns
    }

    fn upstream_bytes(&mut self, data: &[u8]) {
        self.upstream_decoder.push(data);
        loop {
            let packet = match self.upstream_decoder.next_packet() {
                Ok(Some(p)) => p,
                Ok(None) => return,
                Err(e) => return self.exit(format!("the upstream sent a bad packet: {e}")),
            };
            if self.phase == Phase::Starting {
                if packet.id != PARAMS_ID {
                    return self.exit(format!("the upstream answered request {:#x}, not asked", packet.id));
                }
                match KvldsResponse::decode(KvldsRequestKind::Params, packet.record) {
                    Ok(KvldsResponse::Params { max_key_len, max_value_len }) => {
                        self.key_len_max = max_key_len as usize;
                        self.value_len_max = max_value_len as usize;
                        self.phase = Phase::Serving;
                        self.log(
                            LogLevel::Info,
                            format!(
                                "upstream limits: keys {max_key_len} bytes, values {max_value_len} bytes"
                            ),
                        );
                        self.set_accepting();
                    }
                    _ => return self.exit("the upstream's answer to PARAMS is malformed".into()),
                }
                continue;
            }
            let Some(route) = self.routes.remove(&packet.id) else {
                return self
                    .exit(format!("the upstream answered request {:#x}, which is not in flight", packet.id));
            };
            let Some(c) = self.clients.get_mut(&route.conn) else {
                self.probes.responses_dropped += 1;
                continue;
            };
            c.in_flight -= 1;
            c.reserved_bytes -= route.reserved_bytes;
            let before = c.out.len();
            encode_packet(&mut c.out, route.id, &packet.record);
            c.unsent_bytes += (c.out.len() - before) as u64;
            self.probes.responses_routed += 1;
            let unsent_bytes = c.unsent_bytes;
            let held_bytes = unsent_bytes + c.reserved_bytes;
            if unsent_bytes > CLIENT_UNSENT_BYTES_DROP {
                self.drop_client(
                    route.conn,
                    format!("mux: over {CLIENT_UNSENT_BYTES_DROP} bytes of responses waiting; the client does not read"),
                );
            } else if held_bytes >= CLIENT_UNSENT_BYTES_MAX {
                if !c.at_bytes_bound {
                    c.at_bytes_bound = true;
                    self.probes.client_reads_paused_at_bytes_bound += 1;
                }
                self.set_reading(route.conn, false);
            }
        }
    }

    /// Hands what was gathered for each connection to the driver, one send
    /// per connection.
    fn flush(&mut self) {
        if !self.upstream_out.is_empty() {
            let data = self.upstream_out.split().freeze();
            self.outputs.push_back(Output::Send { conn: ConnId::UPSTREAM, data });
        }
        for (conn, c) in self.clients.iter_mut() {
            if !c.out.is_empty() {
                let data = c.out.split().freeze();
                self.outputs.push_back(Output::Send { conn: *conn, data });
            }
        }
    }
}

impl Node for MuxNode {
    fn handle_input(&mut self, _now: Instant, input: Input) {
        if self.phase == Phase::Stopped {
            return;
        }
        match input {
            Input::Received { conn, data } if conn == ConnId::UPSTREAM => {
                self.upstream_bytes(&data);
                // Answers free room in paused clients' windows.
                let paused = self.clients_from_cursor(|c| !c.reading);
                for conn in paused {
                    self.forward_requests(conn);
                }
            }
            Input::Sent { conn, len_bytes } if conn == ConnId::UPSTREAM => {
                self.upstream_unsent_bytes = self.upstream_unsent_bytes.saturating_sub(len_bytes);
                self.maybe_resume();
            }
            Input::Closed { conn, reason } if conn == ConnId::UPSTREAM => {
                let why = match reason {
                    ConnClosed::PeerClosed => "closed".to_string(),
                    ConnClosed::Failed(e) => format!("failed: {e}"),
                };
                self.exit(format!("the upstream connection {why}"));
            }
            Input::Accepted { conn } => self.accept(conn),
            Input::Received { conn, data } => {
                if let Some(c) = self.clients.get_mut(&conn) {
                    c.decoder.push(&data);
                    self.forward_requests(conn);
                }
            }
            Input::Sent { conn, len_bytes } => {
                if let Some(c) = self.clients.get_mut(&conn) {
                    c.unsent_bytes = c.unsent_bytes.saturating_sub(len_bytes);
                    if !c.reading {
                        self.forward_requests(conn);
                    }
                }
            }
            Input::Closed { conn, reason } => {
                if self.clients.contains_key(&conn) {
                    if let ConnClosed::Failed(e) = reason {
                        self.log(LogLevel::Info, format!("client {conn} failed: {e}"));
                    }
                    self.forget(conn);
                }
            }
            Input::Disk { .. } => {
                self.exit("a disk completion arrived, but the mux asks for no disk I/O".into())
            }
            Input::Timeout => {}
        }
        if self.phase != Phase::Stopped {
            self.flush();
        }
    }

    fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
}
