//! perf: a performance-monitoring proxy between one client and one server
//! of either kivaloo protocol (kvlds, or a mux in front of one; or lbs).
//!
//! The node serves one client connection at a time and forwards each
//! request to its upstream (the target) and each response back, **byte for
//! byte**: it frames both directions with [`PacketDecoder`] only to learn
//! each packet's request ID and, for a request, its type (the record's
//! first 4 bytes, big-endian, in both protocols); what it forwards are the
//! received bytes themselves, whole packets at a time, never re-encoded.
//! Like kivaloo's perf it does not check that requests make sense for the
//! target. It times each request from when it is forwarded (the `now` of
//! the input that let it go upstream: the one that completed it, or, after
//! a pause for backpressure, the one that made room) to when its whole
//! response has arrived, matching responses to requests by request ID
//! (servers answer out of order), and reports per request type, every
//! `interval_ns` of the node's time, the count, mean, median (p50), p99
//! and maximum.
//!
//! # Clients, IDs and responses that cannot be matched
//!
//! - IDs are not rewritten, so that the bytes stay the client's. So that a
//!   late response to a departed client can never reach the next one (which
//!   may use the same IDs), a client that leaves with requests in flight is
//!   forgotten, their responses are dropped (and still timed: the target
//!   did the work), and the next client is accepted only once the target
//!   has answered all of them (`Output::Accepting(false)` until then;
//!   kivaloo's perf also waits for them). A target that never answers some
//!   request thus keeps the next client waiting, as it would keep that
//!   request's client waiting.
//! - A client that sends a request under an ID already in flight: both are
//!   forwarded (perf does not police the protocol); the node expects two
//!   answers for that ID, and since it cannot tell which answer is whose,
//!   they are forwarded and counted as *untimed* rather than guessed. A
//!   response to an ID not in flight is forwarded too, and counted untimed.
//!   Each is logged once per client.
//! - A client whose bytes are not packets (bad CRC, a record over 64 MiB) is
//!   dropped: its garbage would make the target drop the one upstream
//!   connection. Its whole requests before that point were forwarded.
//! - The upstream sending a bad packet, closing or failing:
//!   `Output::Exit` (failure), after a last report of the partial interval;
//!   the driver then closes the client.
//! - The driver stopping the node ([`PerfNode::finish`]: a signal, or the
//!   daemon's `-1` once its one client has closed): the node does not wait
//!   for the answers the target still owes (to requests a client sent and
//!   did not wait for). They are neither forwarded nor timed, so the last
//!   report may miss requests the target was still working on.
//!
//! # Request types and their names
//!
//! The two protocols' type numbers do not overlap (lbs: 0 to 4; kvlds:
//! 0x100 to 0x131), so one table names both, with kivaloo's perf's names:
//! `LBS_PARAMS`, `LBS_GET`, `LBS_APPEND`, `LBS_FREE`, `LBS_PARAMS2`,
//! `KVLDS_PARAMS`, `KVLDS_SET`, `KVLDS_CAS`, `KVLDS_ADD`, `KVLDS_MODIFY`,
//! `KVLDS_DELETE`, `KVLDS_CAD`, `KVLDS_GET`, `KVLDS_RANGE`. Any other type is
//! named by number (`TYPE_0x00000200`), up to [`UNKNOWN_TYPES_MAX`] of them
//! per interval, the rest together as `OTHER_TYPES`; a record shorter than
//! 4 bytes has type `NO_TYPE`.
//!
//! # The report
//!
//! Every `interval_ns` from the start instant (and once more, for the
//! partial interval, when the node stops, unless that interval is empty: no
//! time since the last report and nothing completed, as when the upstream
//! closes right at an interval's end), the node queues [`ReportLine`]s,
//! which the driver takes with [`PerfNode::poll_report`] and writes where
//! the operator asked (the daemon: a file or stderr). One line per request
//! type that completed requests in the interval, in type order; then, if
//! any, one line counting untimed responses; an interval with neither
//! gives one line saying so (a heartbeat: the proxy is alive and idle).
//! The format is stable; times are milliseconds with 3 decimals, the
//! interval the actual time since the previous report:
//!
//! ```text
//! perf: interval 60.000 s: KVLDS_SET count 12345 mean 0.231 ms p50 0.210 ms p99 0.900 ms max 4.100 ms
//! perf: interval 60.000 s: untimed responses 3
//! perf: interval 60.000 s: no requests completed
//! ```
//!
//! Count, mean and max are exact; p50 and p99 are nearest-rank quantiles
//! from a log-linear [`LatencyHistogram`], within 0.8% (see
//! [`histogram`]). Statistics reset after each report.
//!
//! # Bounds
//!
//! | what | bound |
//! |---|---|
//! | client connections | one at a time; the next waits in the listen backlog |
//! | requests in flight (tracked, one entry per ID, a few MiB at most) | [`IN_FLIGHT_MAX`] (65,536); at the bound, with bytes waiting, reading from the client stops until answers come |
//! | request bytes sent upstream and not yet reported written | [`UPSTREAM_UNSENT_BYTES_MAX`] (4 MiB) plus one request; reading from the client stops, and resumes once half has drained |
//! | response bytes sent to the client and not yet reported written | [`CLIENT_UNSENT_BYTES_MAX`] (4 MiB) plus what the driver hands over after reading stops (io-shim: 2 chunks of 64 KiB) and one response; reading from the upstream stops, and resumes once half has drained |
//! | bytes held from one peer | one partial packet (a record is at most 64 MiB, the codec's bound) plus the chunks the driver delivered before reading stopped, twice (the decoder's copy and the bytes to forward) |
//! | statistics | one histogram (about 30 KiB) per type seen in the interval: at most 14 named + [`UNKNOWN_TYPES_MAX`] + 2 |
//! | report lines queued for the driver | [`REPORT_LINES_QUEUED_MAX`]; past it the oldest are dropped and counted (a driver that drains after every input never gets there) |

pub mod histogram;

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use bytes::BytesMut;
use kivaloo::contract::{ConnClosed, ConnId, ExitReason, Input, Instant, LogLevel, Node, Output};
use kivaloo::kvlds_proto::request_type as kvlds_type;
use kivaloo::lbs_proto::request_type as lbs_type;
use kivaloo::packet::{PacketDecoder, HEADER_LEN, RECORD_LEN_MAX, TRAILER_LEN};

pub use histogram::LatencyHistogram;

/// `-w` when not given: 60 seconds between reports.
pub const INTERVAL_NS_DEFAULT: u64 = 60_000_000_000;
/// Requests in flight (forwarded, not yet answered) tracked at once. At the
/// bound the node stops reading from the client until answers come.
pub const IN_FLIGHT_MAX: usize = 65_536;
/// Request bytes sent upstream and not yet reported written: at the bound
/// the node stops reading from the client until half has drained.
pub const UPSTREAM_UNSENT_BYTES_MAX: u64 = 4 << 20;
/// Response bytes sent to the client and not yet reported written: at the
/// bound the node stops reading from the upstream until half has drained.
pub const CLIENT_UNSENT_BYTES_MAX: u64 = 4 << 20;
/// Request types without a name tracked apart in one interval; further
/// ones are counted together as `OTHER_TYPES`.
pub const UNKNOWN_TYPES_MAX: usize = 8;
/// Report lines waiting for [`PerfNode::poll_report`]; past this the oldest
/// are dropped (and counted in [`PerfProbes::report_lines_lost`]).
pub const REPORT_LINES_QUEUED_MAX: usize = 256;

/// How a perf node is configured.
#[derive(Debug, Clone)]
pub struct PerfConfig {
    /// `-w`: nanoseconds of the node's time between reports; more than 0.
    pub interval_ns: u64,
}

impl Default for PerfConfig {
    fn default() -> Self {
        PerfConfig { interval_ns: INTERVAL_NS_DEFAULT }
    }
}

/// kivaloo's name for a request type number, if it is one of lbs's or
/// kvlds's (their numbers do not overlap).
pub fn request_type_name(request_type: u32) -> Option<&'static str> {
    Some(match request_type {
        lbs_type::PARAMS => "LBS_PARAMS",
        lbs_type::GET => "LBS_GET",
        lbs_type::APPEND => "LBS_APPEND",
        lbs_type::FREE => "LBS_FREE",
        lbs_type::PARAMS2 => "LBS_PARAMS2",
        kvlds_type::PARAMS => "KVLDS_PARAMS",
        kvlds_type::SET => "KVLDS_SET",
        kvlds_type::CAS => "KVLDS_CAS",
        kvlds_type::ADD => "KVLDS_ADD",
        kvlds_type::MODIFY => "KVLDS_MODIFY",
        kvlds_type::DELETE => "KVLDS_DELETE",
        kvlds_type::CAD => "KVLDS_CAD",
        kvlds_type::GET => "KVLDS_GET",
        kvlds_type::RANGE => "KVLDS_RANGE",
        _ => return None,
    })
}

/// What the statistics of a request are kept under. Ordered as reported:
/// by type number, then `Untyped`, then `OtherTypes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RequestType {
    /// The record's first 4 bytes, big-endian.
    Typed(u32),
    /// A record shorter than 4 bytes (`NO_TYPE`).
    Untyped,
    /// Unnamed types past [`UNKNOWN_TYPES_MAX`] in one interval
    /// (`OTHER_TYPES`).
    OtherTypes,
}

impl RequestType {
    /// The type of a request record.
    pub fn of_record(record: &[u8]) -> RequestType {
        match record.get(..4) {
            Some(b) => RequestType::Typed(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
            None => RequestType::Untyped,
        }
    }

    /// Whether this is a type number with no name.
    fn is_unnamed_type(self) -> bool {
        matches!(self, RequestType::Typed(t) if request_type_name(t).is_none())
    }
}

impl fmt::Display for RequestType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestType::Typed(t) => match request_type_name(*t) {
                Some(name) => f.write_str(name),
                None => write!(f, "TYPE_{t:#010x}"),
            },
            RequestType::Untyped => f.write_str("NO_TYPE"),
            RequestType::OtherTypes => f.write_str("OTHER_TYPES"),
        }
    }
}

/// One request type's statistics over one interval, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeSummary {
    /// Requests completed (answered) in the interval.
    pub count: u64,
    /// Their mean time to complete (exact, rounded down to a nanosecond).
    pub mean_ns: u64,
    /// The median (nearest rank), within 0.8%.
    pub p50_ns: u64,
    /// The 99th percentile (nearest rank), within 0.8%.
    pub p99_ns: u64,
    /// The longest (exact).
    pub max_ns: u64,
}

/// One line of a report. `Display` gives the stable text (see the module
/// documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportLine {
    /// Requests of one type completed in the interval.
    Type { interval_ns: u64, request_type: RequestType, summary: TypeSummary },
    /// Responses forwarded (or dropped) in the interval that could not be
    /// matched to one request: a response to an ID not in flight, or to an
    /// ID the client had in flight twice.
    Untimed { interval_ns: u64, responses: u64 },
    /// Nothing completed in the interval.
    Idle { interval_ns: u64 },
}

impl ReportLine {
    /// The interval this line covers, in nanoseconds.
    pub fn interval_ns(&self) -> u64 {
        match self {
            ReportLine::Type { interval_ns, .. }
            | ReportLine::Untimed { interval_ns, .. }
            | ReportLine::Idle { interval_ns } => *interval_ns,
        }
    }
}

/// `ns` as a decimal number of `unit_ns` units with 3 decimals, rounded.
fn decimal_3(ns: u64, unit_ns: u64) -> String {
    let thousandths = (u128::from(ns) * 1000 + u128::from(unit_ns) / 2) / u128::from(unit_ns);
    format!("{}.{:03}", thousandths / 1000, thousandths % 1000)
}

impl fmt::Display for ReportLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MS: u64 = 1_000_000;
        write!(f, "perf: interval {} s: ", decimal_3(self.interval_ns(), 1_000_000_000))?;
        match self {
            ReportLine::Type { request_type, summary: s, .. } => write!(
                f,
                "{request_type} count {} mean {} ms p50 {} ms p99 {} ms max {} ms",
                s.count,
                decimal_3(s.mean_ns, MS),
                decimal_3(s.p50_ns, MS),
                decimal_3(s.p99_ns, MS),
                decimal_3(s.max_ns, MS)
            ),
            ReportLine::Untimed { responses, .. } => write!(f, "untimed responses {responses}"),
            ReportLine::Idle { .. } => f.write_str("no requests completed"),
        }
    }
}

/// Counters of the paths a perf node has been through, for tests. They
/// only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PerfProbes {
    /// Client connections accepted.
    pub clients_accepted: u64,
    /// Requests forwarded upstream.
    pub requests_forwarded: u64,
    /// Responses forwarded to the client.
    pub responses_forwarded: u64,
    /// Responses dropped because their client had gone.
    pub responses_dropped: u64,
    /// Responses that could not be matched to one request.
    pub responses_untimed: u64,
    /// Requests sent under an ID already in flight.
    pub duplicate_ids: u64,
    /// Clients that left (or were dropped) with requests in flight.
    pub clients_gone_with_requests: u64,
    /// Clients dropped for sending bytes that are not packets.
    pub clients_dropped: u64,
    /// Reports made (including the last, partial one, unless it was empty).
    pub reports: u64,
    /// Report lines dropped because the driver did not take them.
    pub report_lines_lost: u64,
}

/// A request forwarded and not yet answered.
struct InFlight {
    request_type: RequestType,
    /// When it was forwarded (the first one, if the ID was reused).
    sent_at: Instant,
    /// Answers still expected under this ID (more than 1 if reused).
    answers_due: u32,
    /// The ID was in flight twice: its answers are not timed.
    ambiguous: bool,
}

/// The one client connection.
struct Client {
    conn: ConnId,
    decoder: PacketDecoder,
    /// The bytes received and not yet forwarded; they begin with the
    /// packets the decoder has yet to return (or has just returned).
    received: BytesMut,
    /// Whether the driver delivers its bytes (the last `ReadInterest`).
    reading: bool,
    /// Response bytes sent to it and not yet reported written.
    unsent_bytes: u64,
    warned_duplicate_id: bool,
    warned_unknown_id: bool,
}

/// Why forwarding a client's requests stopped.
enum ForwardEnd {
    /// Every whole packet received went upstream.
    Drained,
    /// A bound was reached.
    Paused,
    /// The client's bytes are not packets.
    Bad(String),
}

/// The perf node. See the module documentation.
pub struct PerfNode {
    interval_ns: u64,
    stopped: bool,
    client: Option<Client>,
    accepting: bool,
    /// Requests in flight, by request ID: the current client's, or, while
    /// there is no client, the departed one's.
    in_flight: BTreeMap<u64, InFlight>,
    /// Answers expected (the sum of `answers_due` over `in_flight`).
    answers_due: usize,
    upstream_decoder: PacketDecoder,
    /// Bytes received from upstream and not yet forwarded or dropped.
    upstream_received: BytesMut,
    upstream_unsent_bytes: u64,
    upstream_reading: bool,
    interval_started_at: Instant,
    next_report_at: Instant,
    /// This interval's statistics.
    types: BTreeMap<RequestType, LatencyHistogram>,
    untimed: u64,
    reports: VecDeque<ReportLine>,
    outputs: VecDeque<Output>,
    probes: PerfProbes,
}

impl PerfNode {
    /// A perf node whose upstream (`ConnId::UPSTREAM`, open already) is the
    /// target, whose first interval starts at `start` (the driver's time
    /// now; io-shim's event loop counts from 0 when it starts). It accepts
    /// a client at once.
    ///
    /// # Panics
    /// If `config.interval_ns` is 0 (a programmer error; the daemon refuses
    /// `-w 0`).
    pub fn new(config: PerfConfig, start: Instant) -> PerfNode {
        assert!(config.interval_ns > 0, "a report interval of 0");
        let mut node = PerfNode {
            interval_ns: config.interval_ns,
            stopped: false,
            client: None,
            accepting: false,
            in_flight: BTreeMap::new(),
            answers_due: 0,
            upstream_decoder: PacketDecoder::with_record_len_max(RECORD_LEN_MAX),
            upstream_received: BytesMut::new(),
            upstream_unsent_bytes: 0,
            upstream_reading: true,
            interval_started_at: start,
            next_report_at: start.after_ns(config.interval_ns),
            types: BTreeMap::new(),
            untimed: 0,
            reports: VecDeque::new(),
            outputs: VecDeque::new(),
            probes: PerfProbes::default(),
        };
        node.set_accepting();
        node
    }

    /// Takes the next report line, if any. Drivers drain this after every
    /// input (and after [`PerfNode::finish`]).
    pub fn poll_report(&mut self) -> Option<ReportLine> {
        self.reports.pop_front()
    }

    /// Stops the node for good at `now` (the driver is going away: a
    /// signal, or `-1`), reporting the partial interval since the last
    /// report. Does nothing if the node has stopped already (it reported
    /// then).
    ///
    /// An empty last interval is not reported: if no time has passed since
    /// the last report and nothing completed since (as when the input that
    /// stops the node is the first after an interval's end, which it
    /// reported), there is no line of "interval 0.000 s: no requests
    /// completed".
    pub fn finish(&mut self, now: Instant) {
        if !self.stopped {
            let empty =
                now.ns_since(self.interval_started_at) == 0 && self.types.is_empty() && self.untimed == 0;
            if !empty {
                self.report(now);
            }
            self.stopped = true;
            self.client = None;
        }
    }

    /// The counters so far.
    pub fn probes(&self) -> PerfProbes {
        self.probes
    }

    /// Answers the target still owes (requests in flight).
    pub fn in_flight(&self) -> usize {
        self.answers_due
    }

    /// The client connection being served, if any.
    pub fn client(&self) -> Option<ConnId> {
        self.client.as_ref().map(|c| c.conn)
    }

    fn log(&mut self, level: LogLevel, message: String) {
        self.outputs.push_back(Output::Log { level, message });
    }

    /// Accepting exactly while there is no client and nothing in flight.
    fn set_accepting(&mut self) {
        let on = !self.stopped && self.client.is_none() && self.answers_due == 0;
        if on != self.accepting {
            self.accepting = on;
            self.outputs.push_back(Output::Accepting(on));
        }
    }

    fn set_upstream_reading(&mut self, enabled: bool) {
        if self.upstream_reading != enabled {
            self.upstream_reading = enabled;
            self.outputs.push_back(Output::ReadInterest { conn: ConnId::UPSTREAM, enabled });
        }
    }

    fn set_client_reading(&mut self, enabled: bool) {
        if let Some(c) = self.client.as_mut() {
            if c.reading != enabled {
                c.reading = enabled;
                self.outputs.push_back(Output::ReadInterest { conn: c.conn, enabled });
            }
        }
    }

    fn accept(&mut self, conn: ConnId) {
        if self.client.is_some() || self.answers_due > 0 {
            let reason = if self.client.is_some() {
                "perf: serving one client at a time".to_string()
            } else {
                format!("perf: the target still owes {} answers to the previous client", self.answers_due)
            };
            self.outputs.push_back(Output::Close { conn, reason });
            return;
        }
        self.probes.clients_accepted += 1;
        self.client = Some(Client {
            conn,
            decoder: PacketDecoder::with_record_len_max(RECORD_LEN_MAX),
            received: BytesMut::new(),
            reading: true,
            unsent_bytes: 0,
            warned_duplicate_id: false,
            warned_unknown_id: false,
        });
        self.set_accepting();
    }

    /// Forgets the client; answers to its requests in flight will be
    /// dropped, and the next client waits for them.
    fn forget_client(&mut self) {
        let Some(c) = self.client.take() else { return };
        if self.answers_due > 0 {
            self.probes.clients_gone_with_requests += 1;
            self.log(
                LogLevel::Info,
                format!(
                    "client {} left with {} requests in flight; the next client is accepted once the target has answered them",
                    c.conn, self.answers_due
                ),
            );
        }
        // Its unsent responses went with it.
        self.set_upstream_reading(true);
        self.set_accepting();
    }

    /// Forwards the client's whole requests upstream while the bounds
    /// allow, and turns its reading on or off to match.
    fn forward_requests(&mut self, now: Instant) {
        let Some(c) = self.client.as_mut() else { return };
        let mut forward_len = 0usize;
        let mut forwarded = 0u64;
        let end = loop {
            // At a bound with bytes waiting, stop reading; with none, there
            // is no reason to.
            let at_bound = self.answers_due >= IN_FLIGHT_MAX
                || self.upstream_unsent_bytes + forward_len as u64 >= UPSTREAM_UNSENT_BYTES_MAX;
            if at_bound {
                break if c.decoder.buffered_len() > 0 { ForwardEnd::Paused } else { ForwardEnd::Drained };
            }
            let packet = match c.decoder.next_packet() {
                Ok(Some(p)) => p,
                Ok(None) => break ForwardEnd::Drained,
                Err(e) => break ForwardEnd::Bad(format!("perf: bad packet: {e}")),
            };
            forward_len += HEADER_LEN + packet.record.len() + TRAILER_LEN;
            forwarded += 1;
            let request_type = RequestType::of_record(&packet.record);
            match self.in_flight.entry(packet.id) {
                Entry::Vacant(v) => {
                    v.insert(InFlight { request_type, sent_at: now, answers_due: 1, ambiguous: false });
                }
                Entry::Occupied(mut o) => {
                    let f = o.get_mut();
                    f.answers_due += 1;
                    f.ambiguous = true;
                    self.probes.duplicate_ids += 1;
                    if !c.warned_duplicate_id {
                        c.warned_duplicate_id = true;
                        self.outputs.push_back(Output::Log {
                            level: LogLevel::Warn,
                            message: format!(
                                "client {} sent request ID {:#x} while it was in flight; answers to a reused ID are forwarded but not timed (logged once per client)",
                                c.conn, packet.id
                            ),
                        });
                    }
                }
            }
            self.answers_due += 1;
        };
        if forward_len > 0 {
            assert!(
                c.received.len() >= forward_len,
                "the decoder returned {forward_len} bytes of packets out of {} received",
                c.received.len()
            );
            let data = c.received.split_to(forward_len).freeze();
            self.upstream_unsent_bytes += forward_len as u64;
            self.probes.requests_forwarded += forwarded;
            self.outputs.push_back(Output::Send { conn: ConnId::UPSTREAM, data });
        }
        match end {
            ForwardEnd::Drained => self.set_client_reading(true),
            ForwardEnd::Paused => self.set_client_reading(false),
            ForwardEnd::Bad(reason) => {
                let conn = c.conn;
                self.probes.clients_dropped += 1;
                self.outputs.push_back(Output::Close { conn, reason });
                self.forget_client();
            }
        }
    }

    /// Takes the upstream's whole responses: times them and forwards them
    /// to the client (or drops them if it has gone).
    fn upstream_bytes(&mut self, now: Instant, data: &[u8]) {
        self.upstream_received.extend_from_slice(data);
        self.upstream_decoder.push(data);
        let mut packets_len = 0usize;
        let mut packets = 0u64;
        loop {
            match self.upstream_decoder.next_packet() {
                Ok(Some(p)) => {
                    packets_len += HEADER_LEN + p.record.len() + TRAILER_LEN;
                    packets += 1;
                    self.complete(now, p.id);
                }
                Ok(None) => break,
                Err(e) => return self.stop(now, format!("the target sent a bad packet: {e}")),
            }
        }
        if packets_len > 0 {
            assert!(
                self.upstream_received.len() >= packets_len,
                "the decoder returned {packets_len} bytes of packets out of {} received",
                self.upstream_received.len()
            );
            let data = self.upstream_received.split_to(packets_len).freeze();
            match self.client.as_mut() {
                Some(c) => {
                    c.unsent_bytes += packets_len as u64;
                    self.probes.responses_forwarded += packets;
                    self.outputs.push_back(Output::Send { conn: c.conn, data });
                    if c.unsent_bytes >= CLIENT_UNSENT_BYTES_MAX {
                        self.set_upstream_reading(false);
                    }
                }
                None => self.probes.responses_dropped += packets,
            }
        }
        // Answers free room for a paused client, or end the wait for a
        // departed one's.
        if self.client.as_ref().is_some_and(|c| !c.reading) {
            self.forward_requests(now);
        }
        self.set_accepting();
    }

    /// Matches the response to `id` with its request, and times it.
    fn complete(&mut self, now: Instant, id: u64) {
        let Some(f) = self.in_flight.get_mut(&id) else {
            self.untimed += 1;
            self.probes.responses_untimed += 1;
            if let Some(c) = self.client.as_mut() {
                if !c.warned_unknown_id {
                    c.warned_unknown_id = true;
                    let message = format!(
                        "the target answered request ID {id:#x}, which is not in flight; forwarded, not timed (logged once per client)"
                    );
                    self.outputs.push_back(Output::Log { level: LogLevel::Warn, message });
                }
            }
            return;
        };
        f.answers_due -= 1;
        self.answers_due -= 1;
        let (request_type, elapsed_ns, ambiguous) = (f.request_type, now.ns_since(f.sent_at), f.ambiguous);
        if f.answers_due == 0 {
            self.in_flight.remove(&id);
        }
        if ambiguous {
            self.untimed += 1;
            self.probes.responses_untimed += 1;
        } else {
            self.record(request_type, elapsed_ns);
        }
    }

    /// Adds one completed request to this interval's statistics.
    fn record(&mut self, request_type: RequestType, elapsed_ns: u64) {
        let mut key = request_type;
        if key.is_unnamed_type() && !self.types.contains_key(&key) {
            let unnamed = self.types.keys().filter(|t| t.is_unnamed_type()).count();
            if unnamed >= UNKNOWN_TYPES_MAX {
                key = RequestType::OtherTypes;
            }
        }
        self.types.entry(key).or_default().record(elapsed_ns);
    }

    fn push_report(&mut self, line: ReportLine) {
        if self.reports.len() >= REPORT_LINES_QUEUED_MAX {
            self.reports.pop_front();
            self.probes.report_lines_lost += 1;
        }
        self.reports.push_back(line);
    }

    /// Reports the interval from the previous report to `now`, and starts
    /// the next.
    fn report(&mut self, now: Instant) {
        let interval_ns = now.ns_since(self.interval_started_at);
        let types = std::mem::take(&mut self.types);
        let idle = types.is_empty() && self.untimed == 0;
        for (request_type, h) in types {
            let summary = TypeSummary {
                count: h.count(),
                mean_ns: h.mean_ns(),
                p50_ns: h.quantile_ns(50, 100).unwrap_or(0),
                p99_ns: h.quantile_ns(99, 100).unwrap_or(0),
                max_ns: h.max_ns(),
            };
            self.push_report(ReportLine::Type { interval_ns, request_type, summary });
        }
        if self.untimed > 0 {
            let responses = std::mem::take(&mut self.untimed);
            self.push_report(ReportLine::Untimed { interval_ns, responses });
        }
        if idle {
            self.push_report(ReportLine::Idle { interval_ns });
        }
        self.probes.reports += 1;
        self.interval_started_at = now;
    }

    /// Reports if the interval has ended, and schedules the next report at
    /// the first multiple of the interval (from the start) after `now`.
    fn report_if_due(&mut self, now: Instant) {
        if now < self.next_report_at {
            return;
        }
        self.report(now);
        let missed = now.ns_since(self.next_report_at) / self.interval_ns + 1;
        self.next_report_at = self.next_report_at.after_ns(missed.saturating_mul(self.interval_ns));
    }

    /// Stops with a failure: a last report, then `Output::Exit`.
    fn stop(&mut self, now: Instant, message: String) {
        self.finish(now);
        self.outputs.push_back(Output::Exit(ExitReason { failure: true, message }));
    }
}

impl Node for PerfNode {
    fn handle_input(&mut self, now: Instant, input: Input) {
        if self.stopped {
            return;
        }
        // What completes after the interval's end counts in the next one.
        self.report_if_due(now);
        let client = self.client();
        match input {
            Input::Received { conn, data } if conn == ConnId::UPSTREAM => self.upstream_bytes(now, &data),
            Input::Sent { conn, len_bytes } if conn == ConnId::UPSTREAM => {
                self.upstream_unsent_bytes = self.upstream_unsent_bytes.saturating_sub(len_bytes);
                let paused = self.client.as_ref().is_some_and(|c| !c.reading);
                if paused && self.upstream_unsent_bytes <= UPSTREAM_UNSENT_BYTES_MAX / 2 {
                    self.forward_requests(now);
                }
            }
            Input::Closed { conn, reason } if conn == ConnId::UPSTREAM => {
                let why = match reason {
                    ConnClosed::PeerClosed => "closed".to_string(),
                    ConnClosed::Failed(e) => format!("failed: {e}"),
                };
                self.stop(now, format!("the target connection {why}"));
            }
            Input::Accepted { conn } => self.accept(conn),
            Input::Received { conn, data } if Some(conn) == client => {
                if let Some(c) = self.client.as_mut() {
                    c.received.extend_from_slice(&data);
                    c.decoder.push(&data);
                }
                self.forward_requests(now);
            }
            Input::Sent { conn, len_bytes } if Some(conn) == client => {
                if let Some(c) = self.client.as_mut() {
                    c.unsent_bytes = c.unsent_bytes.saturating_sub(len_bytes);
                    if c.unsent_bytes <= CLIENT_UNSENT_BYTES_MAX / 2 {
                        self.set_upstream_reading(true);
                    }
                }
            }
            Input::Closed { conn, reason } if Some(conn) == client => {
                if let ConnClosed::Failed(e) = reason {
                    self.log(LogLevel::Info, format!("client {conn} failed: {e}"));
                }
                self.forget_client();
            }
            // A connection the node has closed or never took.
            Input::Received { .. } | Input::Sent { .. } | Input::Closed { .. } => {}
            Input::Disk { .. } => {
                self.stop(now, "a disk completion arrived, but perf asks for no disk I/O".into())
            }
            Input::Timeout => {}
        }
    }

    fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        (!self.stopped).then_some(self.next_report_at)
    }
}
