//! The perf node, driven by hand on a virtual clock: bytes forwarded
//! unchanged both ways under any split, statistics for known latencies,
//! out-of-order answers, a client leaving with requests in flight, reused
//! and unknown IDs, the upstream's end, every bound; and the histogram's
//! accuracy.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use kivaloo::contract::{ConnClosed, ConnId, Input, Instant, LogLevel, Node, Output};
use kivaloo::kvlds_proto::KvldsRequest;
use kivaloo::lbs_proto::LbsRequest;
use kivaloo::packet::{encode_packet, PacketDecoder};
use kivaloo_nodes::perf::histogram::{LatencyHistogram, RELATIVE_ERROR_MAX};
use kivaloo_nodes::perf::{
    PerfConfig, PerfNode, ReportLine, RequestType, TypeSummary, CLIENT_UNSENT_BYTES_MAX, IN_FLIGHT_MAX,
    REPORT_LINES_QUEUED_MAX, UNKNOWN_TYPES_MAX, UPSTREAM_UNSENT_BYTES_MAX,
};
use proptest::prelude::*;

const A: ConnId = ConnId(1);
const B: ConnId = ConnId(2);
const C: ConnId = ConnId(3);
const MS: u64 = 1_000_000;
const US: u64 = 1_000;
const INTERVAL_NS: u64 = 60_000 * MS;

/// A perf node and everything it did.
struct Harness {
    node: PerfNode,
    now_ns: u64,
    /// Bytes sent upstream, as sent.
    upstream: Vec<u8>,
    /// Bytes sent to each client, as sent.
    to_client: BTreeMap<ConnId, Vec<u8>>,
    closed: Vec<(ConnId, String)>,
    reading: BTreeMap<ConnId, bool>,
    accepting: bool,
    exit: Option<(bool, String)>,
    reports: Vec<ReportLine>,
    logs: Vec<(LogLevel, String)>,
}

impl Harness {
    fn new() -> Harness {
        Harness::with_interval(INTERVAL_NS)
    }

    fn with_interval(interval_ns: u64) -> Harness {
        let mut h = Harness {
            node: PerfNode::new(PerfConfig { interval_ns }, Instant::from_nanos(0)),
            now_ns: 0,
            upstream: Vec::new(),
            to_client: BTreeMap::new(),
            closed: Vec::new(),
            reading: BTreeMap::new(),
            accepting: false,
            exit: None,
            reports: Vec::new(),
            logs: Vec::new(),
        };
        h.drain();
        assert!(h.accepting, "perf accepts a client at once");
        h
    }

    fn at(&mut self, now_ns: u64) -> &mut Self {
        assert!(now_ns >= self.now_ns, "time goes forward");
        self.now_ns = now_ns;
        self
    }

    fn input(&mut self, input: Input) {
        self.node.handle_input(Instant::from_nanos(self.now_ns), input);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(out) = self.node.poll_output() {
            match out {
                Output::Send { conn, data } if conn == ConnId::UPSTREAM => {
                    self.upstream.extend_from_slice(&data)
                }
                Output::Send { conn, data } => {
                    self.to_client.entry(conn).or_default().extend_from_slice(&data)
                }
                Output::Close { conn, reason } => self.closed.push((conn, reason)),
                Output::ReadInterest { conn, enabled } => {
                    self.reading.insert(conn, enabled);
                }
                Output::Accepting(on) => self.accepting = on,
                Output::Exit(reason) => self.exit = Some((reason.failure, reason.message)),
                Output::Log { level, message } => self.logs.push((level, message)),
                Output::Disk { .. } => panic!("perf asked for disk I/O"),
            }
        }
        while let Some(line) = self.node.poll_report() {
            self.reports.push(line);
        }
    }

    fn connect(&mut self, conn: ConnId) {
        self.input(Input::Accepted { conn });
    }

    fn client_sends(&mut self, conn: ConnId, data: &[u8]) {
        self.input(Input::Received { conn, data: Bytes::copy_from_slice(data) });
    }

    fn upstream_sends(&mut self, data: &[u8]) {
        self.input(Input::Received { conn: ConnId::UPSTREAM, data: Bytes::copy_from_slice(data) });
    }

    fn answer(&mut self, id: u64) {
        self.upstream_sends(&status_response(id));
    }

    fn timeout(&mut self) {
        self.input(Input::Timeout);
    }

    /// The packets sent upstream so far, decoded.
    fn upstream_packets(&self) -> Vec<(u64, Bytes)> {
        packets(&self.upstream)
    }

    fn client_packets(&self, conn: ConnId) -> Vec<(u64, Bytes)> {
        self.to_client.get(&conn).map(|b| packets(b)).unwrap_or_default()
    }

    /// The report lines of type `t` so far.
    fn summaries(&self, t: RequestType) -> Vec<TypeSummary> {
        self.reports
            .iter()
            .filter_map(|l| match l {
                ReportLine::Type { request_type, summary, .. } if *request_type == t => Some(*summary),
                _ => None,
            })
            .collect()
    }
}

fn packets(bytes: &[u8]) -> Vec<(u64, Bytes)> {
    let mut d = PacketDecoder::new();
    d.push(bytes);
    std::iter::from_fn(|| d.next_packet().unwrap()).map(|p| (p.id, p.record)).collect()
}

fn kvlds(id: u64, req: &KvldsRequest) -> Vec<u8> {
    let mut out = BytesMut::new();
    req.encode(id, &mut out);
    out.to_vec()
}

fn lbs(id: u64, req: &LbsRequest) -> Vec<u8> {
    let mut out = BytesMut::new();
    req.encode(id, &mut out);
    out.to_vec()
}

fn raw(id: u64, record: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_packet(&mut out, id, record);
    out.to_vec()
}

fn status_response(id: u64) -> Vec<u8> {
    raw(id, &[0, 0, 0, 0])
}

fn set(k: &'static [u8], v: &'static [u8]) -> KvldsRequest {
    KvldsRequest::Set { key: Bytes::from_static(k), value: Bytes::from_static(v) }
}

fn get(k: &'static [u8]) -> KvldsRequest {
    KvldsRequest::Get { key: Bytes::from_static(k) }
}

const SET: RequestType = RequestType::Typed(kivaloo::kvlds_proto::request_type::SET);
const GET: RequestType = RequestType::Typed(kivaloo::kvlds_proto::request_type::GET);

/// Feeds `bytes` in pieces of the given lengths (cycled), the rest at the end.
fn feed_split(bytes: &[u8], splits: &[usize], mut feed: impl FnMut(&[u8])) {
    let mut at = 0;
    for len in splits.iter().cycle() {
        if at >= bytes.len() {
            break;
        }
        let end = (at + len).min(bytes.len());
        feed(&bytes[at..end]);
        at = end;
    }
}

fn assert_within(what: &str, found: u64, expected: u64) {
    let error = (found as f64 - expected as f64).abs() / expected as f64;
    assert!(error <= RELATIVE_ERROR_MAX, "{what}: {found} is not within 1/128 of {expected}");
}

// ----- forwarding --------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever the splits, the upstream gets exactly the client's bytes and
    /// the client exactly the upstream's, of both protocols, including
    /// records perf has no name for.
    #[test]
    fn bytes_are_forwarded_byte_for_byte_under_any_split(
        request_splits in prop::collection::vec(1usize..700, 1..20),
        response_splits in prop::collection::vec(1usize..700, 1..20),
        block in prop::collection::vec(any::<u8>(), 0..3000),
    ) {
        let mut h = Harness::new();
        h.connect(A);
        let mut requests = Vec::new();
        requests.extend(kvlds(1, &set(b"key", b"value")));
        requests.extend(kvlds(2, &get(b"key")));
        requests.extend(lbs(3, &LbsRequest::Append { count: 1, start: 0, data: Bytes::from(block.clone()) }));
        requests.extend(raw(4, &[1, 2])); // no type
        requests.extend(raw(5, &[0, 0, 2, 0, 9, 9])); // an unnamed type
        requests.extend(lbs(6, &LbsRequest::Params2));
        feed_split(&requests, &request_splits, |piece| h.client_sends(A, piece));
        prop_assert_eq!(&h.upstream, &requests);
        prop_assert_eq!(h.node.in_flight(), 6);

        // Answers out of order, one carrying the block.
        let mut responses = Vec::new();
        for id in [6u64, 2, 4, 1, 5] {
            responses.extend(status_response(id));
        }
        let mut with_block = vec![0, 0, 0, 0];
        with_block.extend_from_slice(&block);
        responses.extend(raw(3, &with_block));
        feed_split(&responses, &response_splits, |piece| h.upstream_sends(piece));
        prop_assert_eq!(h.to_client.get(&A).cloned().unwrap_or_default(), responses);
        prop_assert_eq!(h.node.in_flight(), 0);
        prop_assert!(h.closed.is_empty() && h.exit.is_none());
        prop_assert_eq!(h.node.probes().responses_untimed, 0);
    }
}

#[test]
fn a_whole_chunk_of_requests_goes_upstream_in_one_send() {
    let mut h = Harness::new();
    h.connect(A);
    let mut chunk = Vec::new();
    for id in 0..100 {
        chunk.extend(kvlds(id, &get(b"k")));
    }
    let mut sends = 0;
    h.node
        .handle_input(Instant::from_nanos(0), Input::Received { conn: A, data: Bytes::from(chunk.clone()) });
    while let Some(out) = h.node.poll_output() {
        if let Output::Send { conn, data } = out {
            assert_eq!(conn, ConnId::UPSTREAM);
            assert_eq!(&data[..], &chunk[..]);
            sends += 1;
        }
    }
    assert_eq!(sends, 1);
}

// ----- statistics ----------------------------------------------------------------

#[test]
fn counts_and_quantiles_of_known_latencies() {
    let mut h = Harness::new();
    assert_eq!(h.node.poll_timeout(), Some(Instant::from_nanos(INTERVAL_NS)));
    h.connect(A);
    // SETs 1..=1000 sent at 1 s, SET i answered i microseconds later.
    h.at(1000 * MS);
    let mut sets = Vec::new();
    for id in 1..=1000 {
        sets.extend(kvlds(id, &set(b"k", b"v")));
    }
    h.client_sends(A, &sets);
    for id in 1..=1000 {
        h.at(1000 * MS + id * US).answer(id);
    }
    // 100 GETs taking exactly 5 ms each.
    for id in 2000..2100 {
        h.at(2000 * MS + (id - 2000) * 10 * MS);
        h.client_sends(A, &kvlds(id, &get(b"k")));
        h.at(2000 * MS + (id - 2000) * 10 * MS + 5 * MS).answer(id);
    }
    assert!(h.reports.is_empty(), "no report before the interval ends");
    h.at(INTERVAL_NS).timeout();
    assert_eq!(h.reports.len(), 2, "{:?}", h.reports);

    let s = h.summaries(SET);
    assert_eq!(s.len(), 1);
    let s = s[0];
    assert_eq!(s.count, 1000);
    assert_eq!(s.mean_ns, 500_500, "the mean is exact");
    assert_eq!(s.max_ns, 1000 * US, "the max is exact");
    assert_within("p50", s.p50_ns, 500 * US);
    assert_within("p99", s.p99_ns, 990 * US);

    let g = h.summaries(GET)[0];
    assert_eq!(
        g,
        TypeSummary { count: 100, mean_ns: 5 * MS, p50_ns: 5 * MS, p99_ns: 5 * MS, max_ns: 5 * MS }
    );
    // Lines in type order (SET 0x110 before GET 0x130), in the stable format.
    assert_eq!(
        h.reports[1].to_string(),
        "perf: interval 60.000 s: KVLDS_GET count 100 mean 5.000 ms p50 5.000 ms p99 5.000 ms max 5.000 ms"
    );
    assert!(
        h.reports[0]
            .to_string()
            .starts_with("perf: interval 60.000 s: KVLDS_SET count 1000 mean 0.501 ms p50 0."),
        "{}",
        h.reports[0]
    );
    assert!(h.reports[0].to_string().ends_with(" max 1.000 ms"), "{}", h.reports[0]);

    // The statistics reset: the next interval is idle, and says so.
    assert_eq!(h.node.poll_timeout(), Some(Instant::from_nanos(2 * INTERVAL_NS)));
    h.at(2 * INTERVAL_NS).timeout();
    assert_eq!(h.reports[2].to_string(), "perf: interval 60.000 s: no requests completed");
    assert_eq!(h.reports.len(), 3);
}

#[test]
fn a_request_counts_in_the_interval_it_completes_in() {
    let mut h = Harness::new();
    h.connect(A);
    h.at(INTERVAL_NS - MS);
    h.client_sends(A, &kvlds(1, &get(b"k")));
    // The answer arrives after the interval's end but before the timer
    // fires: the report comes first, idle.
    h.at(INTERVAL_NS + MS).answer(1);
    assert_eq!(h.reports, vec![ReportLine::Idle { interval_ns: INTERVAL_NS + MS }]);
    // Three intervals later (the timer was late): one report, then back on
    // the schedule.
    h.at(4 * INTERVAL_NS + 7 * MS).timeout();
    assert_eq!(h.reports.len(), 2);
    assert_eq!(h.summaries(GET)[0].max_ns, 2 * MS);
    assert_eq!(h.reports[1].interval_ns(), 3 * INTERVAL_NS + 6 * MS);
    assert_eq!(h.node.poll_timeout(), Some(Instant::from_nanos(5 * INTERVAL_NS)));
}

#[test]
fn out_of_order_answers_are_matched_by_id() {
    let mut h = Harness::new();
    h.connect(A);
    let mut reqs = kvlds(10, &get(b"a"));
    reqs.extend(kvlds(11, &set(b"a", b"1")));
    reqs.extend(kvlds(12, &get(b"b")));
    h.client_sends(A, &reqs);
    h.at(3 * MS).answer(11);
    h.at(7 * MS).answer(12);
    h.at(9 * MS).answer(10);
    let ids: Vec<u64> = h.client_packets(A).iter().map(|p| p.0).collect();
    assert_eq!(ids, vec![11, 12, 10], "answers are forwarded in the order they came");
    h.at(INTERVAL_NS).timeout();
    let g = h.summaries(GET)[0];
    assert_eq!((g.count, g.mean_ns, g.max_ns), (2, 8 * MS, 9 * MS));
    let s = h.summaries(SET)[0];
    assert_eq!((s.count, s.max_ns), (1, 3 * MS));
}

#[test]
fn types_are_named_for_both_protocols_and_unnamed_ones_are_bounded() {
    let mut h = Harness::new();
    h.connect(A);
    let mut reqs = lbs(1, &LbsRequest::Get { block: 3 });
    reqs.extend(lbs(2, &LbsRequest::Params2));
    reqs.extend(kvlds(3, &KvldsRequest::Params));
    reqs.extend(raw(4, &[7]));
    for i in 0..UNKNOWN_TYPES_MAX as u64 + 3 {
        reqs.extend(raw(100 + i, &(0x1000 + i as u32).to_be_bytes()));
    }
    h.client_sends(A, &reqs);
    for (id, _) in h.upstream_packets() {
        h.answer(id);
    }
    h.at(INTERVAL_NS).timeout();
    let names: Vec<String> =
        h.reports.iter().map(|l| l.to_string().split(' ').nth(4).unwrap().to_string()).collect();
    let mut expected =
        vec!["LBS_GET", "LBS_PARAMS2", "KVLDS_PARAMS"].into_iter().map(String::from).collect::<Vec<_>>();
    for i in 0..UNKNOWN_TYPES_MAX as u32 {
        expected.push(format!("TYPE_{:#010x}", 0x1000 + i));
    }
    expected.push("NO_TYPE".into());
    expected.push("OTHER_TYPES".into());
    assert_eq!(names, expected);
    assert_eq!(h.summaries(RequestType::OtherTypes)[0].count, 3);
    assert_eq!(h.node.in_flight(), 0);
}

// ----- clients coming and going -----------------------------------------------------

#[test]
fn a_client_leaving_with_requests_in_flight_holds_the_next_until_they_are_answered() {
    let mut h = Harness::new();
    h.connect(A);
    assert!(!h.accepting, "one client at a time");
    let mut reqs = Vec::new();
    for id in 1..=3 {
        reqs.extend(kvlds(id, &get(b"k")));
    }
    h.client_sends(A, &reqs);
    // Half a request, never forwarded.
    let partial = kvlds(4, &get(b"k"));
    h.client_sends(A, &partial[..10]);
    h.input(Input::Closed { conn: A, reason: ConnClosed::PeerClosed });
    assert_eq!(h.node.client(), None);
    assert!(!h.accepting, "the next client waits for the answers owed to the previous one");
    assert_eq!(h.upstream_packets().len(), 3, "a partial request is not forwarded");
    assert!(h.logs.iter().any(|(_, m)| m.contains("left with 3 requests in flight")), "{:?}", h.logs);
    // A connection the driver accepted anyway is closed.
    h.connect(B);
    assert_eq!(h.closed.len(), 1);
    assert_eq!(h.closed[0].0, B);
    h.at(MS).answer(2);
    h.answer(1);
    assert!(!h.accepting);
    h.at(2 * MS).answer(3);
    assert!(h.accepting, "all answered: the next client may come");
    assert!(h.to_client.is_empty(), "answers to a departed client reach no one");
    assert_eq!(h.node.probes().responses_dropped, 3);

    // The next client reuses the IDs; it gets only its own answers.
    h.connect(C);
    assert!(!h.accepting);
    h.client_sends(C, &kvlds(1, &set(b"k", b"v")));
    h.at(5 * MS).answer(1);
    assert_eq!(h.client_packets(C).len(), 1);
    assert_eq!(h.client_packets(C)[0].0, 1);
    h.at(INTERVAL_NS).timeout();
    assert_eq!(h.summaries(GET)[0].count, 3, "the departed client's requests are still timed");
    let three_ms = 3 * MS;
    assert_eq!(
        h.summaries(SET)[0],
        TypeSummary { count: 1, mean_ns: three_ms, p50_ns: three_ms, p99_ns: three_ms, max_ns: three_ms }
    );
}

#[test]
fn a_client_that_leaves_idle_lets_the_next_in_at_once() {
    let mut h = Harness::new();
    h.connect(A);
    h.client_sends(A, &kvlds(1, &get(b"k")));
    h.answer(1);
    h.input(Input::Closed { conn: A, reason: ConnClosed::Failed("reset".into()) });
    assert!(h.accepting);
    h.connect(B);
    assert!(h.closed.is_empty());
    assert_eq!(h.node.client(), Some(B));
}

#[test]
fn a_client_sending_garbage_is_dropped_after_its_good_requests() {
    let mut h = Harness::new();
    h.connect(A);
    let mut bytes = kvlds(1, &get(b"k"));
    let mut bad = kvlds(2, &get(b"k"));
    bad[12] ^= 1; // the header CRC
    bytes.extend(bad);
    h.client_sends(A, &bytes);
    assert_eq!(h.upstream_packets().len(), 1);
    assert_eq!(h.closed.len(), 1);
    assert!(h.closed[0].1.contains("bad packet"), "{:?}", h.closed);
    assert!(!h.accepting);
    h.answer(1);
    assert!(h.accepting);
    assert!(h.to_client.is_empty());
}

#[test]
fn reused_and_unknown_ids_are_forwarded_untimed_and_logged_once() {
    let mut h = Harness::new();
    h.connect(A);
    let mut reqs = kvlds(5, &get(b"a"));
    reqs.extend(kvlds(5, &get(b"b")));
    reqs.extend(kvlds(5, &get(b"c")));
    h.client_sends(A, &reqs);
    assert_eq!(h.upstream_packets().len(), 3);
    assert_eq!(h.node.in_flight(), 3);
    h.at(MS).answer(5);
    h.answer(5);
    h.answer(99); // never asked
    h.answer(98);
    h.answer(5);
    assert_eq!(h.client_packets(A).len(), 5, "every answer is forwarded");
    assert_eq!(h.node.in_flight(), 0);
    let warnings: Vec<&String> =
        h.logs.iter().filter(|(l, _)| *l == LogLevel::Warn).map(|(_, m)| m).collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("0x5") && warnings[1].contains("0x63"), "{warnings:?}");
    h.at(INTERVAL_NS).timeout();
    assert_eq!(h.reports, vec![ReportLine::Untimed { interval_ns: INTERVAL_NS, responses: 5 }]);
    assert_eq!(h.reports[0].to_string(), "perf: interval 60.000 s: untimed responses 5");
}

// ----- the upstream's end ---------------------------------------------------------------

#[test]
fn the_upstream_closing_makes_a_last_report_and_exits() {
    let mut h = Harness::new();
    h.connect(A);
    h.client_sends(A, &kvlds(1, &get(b"k")));
    h.at(2 * MS).answer(1);
    h.at(10 * MS).input(Input::Closed { conn: ConnId::UPSTREAM, reason: ConnClosed::PeerClosed });
    let (failure, message) = h.exit.clone().expect("perf exits without its target");
    assert!(failure);
    assert!(message.contains("target connection closed"), "{message}");
    assert_eq!(h.reports.len(), 1);
    assert_eq!(h.reports[0].interval_ns(), 10 * MS);
    assert_eq!(h.summaries(GET)[0].count, 1);
    assert_eq!(h.node.poll_timeout(), None);
    // Nothing more happens.
    h.client_sends(A, &kvlds(2, &get(b"k")));
    h.node.finish(Instant::from_nanos(20 * MS));
    h.drain();
    assert_eq!(h.upstream_packets().len(), 1);
    assert_eq!(h.reports.len(), 1);
}

#[test]
fn a_bad_packet_from_the_upstream_exits() {
    let mut h = Harness::new();
    h.connect(A);
    h.client_sends(A, &kvlds(1, &get(b"k")));
    let mut bad = status_response(1);
    bad[23] ^= 1; // the trailer
    h.upstream_sends(&bad);
    let (failure, message) = h.exit.clone().unwrap();
    assert!(failure && message.contains("bad packet"), "{message}");
    assert!(h.to_client.is_empty());
}

#[test]
fn finish_reports_the_partial_interval_once() {
    let mut h = Harness::new();
    h.connect(A);
    h.client_sends(A, &kvlds(1, &get(b"k")));
    h.at(3 * MS).answer(1);
    h.node.finish(Instant::from_nanos(INTERVAL_NS / 2));
    h.node.finish(Instant::from_nanos(INTERVAL_NS));
    h.drain();
    assert_eq!(h.reports.len(), 1);
    assert_eq!(h.reports[0].interval_ns(), INTERVAL_NS / 2);
    assert_eq!(h.node.poll_timeout(), None);
}

#[test]
fn no_empty_last_report_when_the_upstream_closes_right_at_an_interval_boundary() {
    let mut h = Harness::new();
    h.connect(A);
    h.client_sends(A, &kvlds(1, &get(b"k")));
    h.at(2 * MS).answer(1);
    // The close is the first input after the interval's end: it reports the
    // interval, then stops the node at the same instant.
    h.at(INTERVAL_NS).input(Input::Closed { conn: ConnId::UPSTREAM, reason: ConnClosed::PeerClosed });
    let (failure, message) = h.exit.clone().expect("perf exits without its target");
    assert!(failure && message.contains("target connection closed"), "{message}");
    assert_eq!(h.reports.len(), 1, "{:?}", h.reports);
    assert_eq!(h.reports[0].interval_ns(), INTERVAL_NS);
    assert_eq!(h.summaries(GET)[0].count, 1);
    assert!(!h.reports.iter().any(|l| l.to_string().contains("interval 0.000 s")), "{:?}", h.reports);
    assert_eq!(h.node.probes().reports, 1);

    // The same when the driver stops the node (finish) at the instant of a
    // report made by a timeout.
    let mut h = Harness::new();
    h.at(INTERVAL_NS).timeout();
    assert_eq!(h.reports, [ReportLine::Idle { interval_ns: INTERVAL_NS }]);
    h.node.finish(Instant::from_nanos(INTERVAL_NS));
    h.drain();
    assert_eq!(h.reports.len(), 1, "{:?}", h.reports);
    assert_eq!(h.node.poll_timeout(), None);
}

#[test]
fn a_last_interval_of_no_time_is_reported_if_something_completed_in_it() {
    let mut h = Harness::new();
    h.connect(A);
    h.client_sends(A, &kvlds(1, &get(b"k")));
    // The answer is the first input after the interval's end: the interval
    // is reported, then the answer counts in the next one, which the stop
    // at the same instant reports.
    h.at(INTERVAL_NS).answer(1);
    assert_eq!(h.reports, [ReportLine::Idle { interval_ns: INTERVAL_NS }]);
    h.node.finish(Instant::from_nanos(INTERVAL_NS));
    h.drain();
    assert_eq!(h.reports.len(), 2, "{:?}", h.reports);
    assert_eq!(h.reports[1].interval_ns(), 0);
    assert_eq!(h.summaries(GET)[0].count, 1);
}

// ----- bounds ------------------------------------------------------------------------

#[test]
fn requests_in_flight_are_bounded_by_pausing_the_client() {
    let mut h = Harness::new();
    h.connect(A);
    let mut reqs = Vec::new();
    for id in 0..IN_FLIGHT_MAX as u64 + 10 {
        reqs.extend(kvlds(id, &get(b"k")));
    }
    h.client_sends(A, &reqs);
    // Report everything written, so that only the in-flight bound holds.
    let written = h.upstream.len() as u64;
    h.input(Input::Sent { conn: ConnId::UPSTREAM, len_bytes: written });
    assert_eq!(h.upstream_packets().len(), IN_FLIGHT_MAX);
    assert_eq!(h.node.in_flight(), IN_FLIGHT_MAX);
    assert_eq!(h.reading.get(&A), Some(&false));
    for id in 0..4 {
        h.answer(id);
    }
    assert_eq!(h.upstream_packets().len(), IN_FLIGHT_MAX + 4);
    assert_eq!(h.reading.get(&A), Some(&false));
    for id in 4..10 {
        h.answer(id);
    }
    assert_eq!(h.upstream_packets().len(), IN_FLIGHT_MAX + 10);
    assert_eq!(h.reading.get(&A), Some(&true), "all forwarded: reading resumes");
    assert_eq!(h.upstream, reqs);
}

#[test]
fn unsent_upstream_bytes_are_bounded_by_pausing_the_client() {
    let mut h = Harness::new();
    h.connect(A);
    let block = Bytes::from(vec![7u8; 1 << 20]);
    let mut reqs = Vec::new();
    for id in 0..10 {
        reqs.extend(lbs(id, &LbsRequest::Append { count: 1, start: id, data: block.clone() }));
    }
    h.client_sends(A, &reqs);
    let sent = h.upstream_packets().len();
    assert!(
        h.upstream.len() as u64 >= UPSTREAM_UNSENT_BYTES_MAX
            && (h.upstream.len() as u64) < UPSTREAM_UNSENT_BYTES_MAX + (1 << 20) + 64,
        "{} bytes forwarded unwritten",
        h.upstream.len()
    );
    assert_eq!(h.reading.get(&A), Some(&false));
    // Written, but not yet half: still paused.
    h.input(Input::Sent { conn: ConnId::UPSTREAM, len_bytes: 1 << 20 });
    assert_eq!(h.upstream_packets().len(), sent);
    let all = h.upstream.len() as u64;
    h.input(Input::Sent { conn: ConnId::UPSTREAM, len_bytes: all - (1 << 20) });
    assert!(h.upstream_packets().len() > sent);
    let all = h.upstream.len() as u64;
    h.input(Input::Sent { conn: ConnId::UPSTREAM, len_bytes: all });
    h.input(Input::Sent { conn: ConnId::UPSTREAM, len_bytes: all });
    assert_eq!(h.upstream, reqs);
    assert_eq!(h.reading.get(&A), Some(&true));
}

#[test]
fn unsent_client_bytes_are_bounded_by_pausing_the_upstream() {
    let mut h = Harness::new();
    h.connect(A);
    let mut reqs = Vec::new();
    for id in 0..10 {
        reqs.extend(lbs(id, &LbsRequest::Get { block: id }));
    }
    h.client_sends(A, &reqs);
    let block = vec![1u8; 1 << 20];
    for id in 0..4 {
        h.upstream_sends(&raw(id, &block));
    }
    assert_eq!(h.reading.get(&ConnId::UPSTREAM), Some(&false), "over 4 MiB unwritten to the client");
    assert!(h.to_client[&A].len() as u64 >= CLIENT_UNSENT_BYTES_MAX);
    h.input(Input::Sent { conn: A, len_bytes: 1 << 20 });
    assert_eq!(h.reading.get(&ConnId::UPSTREAM), Some(&false), "not yet half drained");
    h.input(Input::Sent { conn: A, len_bytes: 2 << 20 });
    assert_eq!(h.reading.get(&ConnId::UPSTREAM), Some(&true));
    // A client that goes away takes its unwritten answers with it.
    for id in 4..8 {
        h.upstream_sends(&raw(id, &block));
    }
    assert_eq!(h.reading.get(&ConnId::UPSTREAM), Some(&false));
    h.input(Input::Closed { conn: A, reason: ConnClosed::PeerClosed });
    assert_eq!(h.reading.get(&ConnId::UPSTREAM), Some(&true));
}

#[test]
fn report_lines_a_driver_does_not_take_are_bounded() {
    let mut node = PerfNode::new(PerfConfig { interval_ns: 1 }, Instant::from_nanos(0));
    for t in 1..=REPORT_LINES_QUEUED_MAX as u64 + 44 {
        node.handle_input(Instant::from_nanos(t), Input::Timeout);
    }
    assert_eq!(node.probes().report_lines_lost, 44);
    let lines: Vec<ReportLine> = std::iter::from_fn(|| node.poll_report()).collect();
    assert_eq!(lines.len(), REPORT_LINES_QUEUED_MAX);
}

// ----- the histogram ---------------------------------------------------------------------

/// The exact nearest-rank quantile of sorted `values`.
fn nearest_rank(sorted: &[u64], numerator: u64, denominator: u64) -> u64 {
    let rank = ((sorted.len() as u64 * numerator).div_ceil(denominator)).max(1);
    sorted[rank as usize - 1]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Quantiles within 1/128 of the exact nearest-rank value, for values
    /// from nanoseconds to hours; count, mean and max exact.
    #[test]
    fn histogram_quantiles_are_within_the_stated_error(
        exponents in prop::collection::vec((0u32..44, any::<u64>()), 1..400),
    ) {
        let values: Vec<u64> = exponents.iter().map(|(e, r)| (1u64 << e) + r % (1u64 << e)).collect();
        let mut h = LatencyHistogram::new();
        for v in &values {
            h.record(*v);
        }
        let mut sorted = values.clone();
        sorted.sort_unstable();
        prop_assert_eq!(h.count(), values.len() as u64);
        prop_assert_eq!(h.max_ns(), *sorted.last().unwrap());
        prop_assert_eq!(h.min_ns(), Some(sorted[0]));
        let sum: u128 = values.iter().map(|v| *v as u128).sum();
        prop_assert_eq!(h.mean_ns() as u128, sum / values.len() as u128);
        for (n, d) in [(1, 100), (50, 100), (90, 100), (99, 100), (999, 1000), (100, 100)] {
            let exact = nearest_rank(&sorted, n, d);
            let found = h.quantile_ns(n, d).unwrap();
            let error = (found as f64 - exact as f64).abs() / exact as f64;
            prop_assert!(error <= RELATIVE_ERROR_MAX, "q {}/{}: {} vs exact {}", n, d, found, exact);
        }
    }
}

#[test]
fn histogram_edges() {
    let mut h = LatencyHistogram::new();
    assert_eq!(h.quantile_ns(50, 100), None);
    assert_eq!((h.count(), h.mean_ns(), h.max_ns(), h.min_ns()), (0, 0, 0, None));
    // Small values are exact.
    for v in 0..128 {
        h.record(v);
    }
    assert_eq!(h.quantile_ns(50, 100), Some(63));
    assert_eq!(h.quantile_ns(1, 1000), Some(0));
    // One value: every quantile is that value, exactly.
    h.clear();
    h.record(123_456_789);
    assert_eq!(h.quantile_ns(50, 100), Some(123_456_789));
    assert_eq!(h.quantile_ns(99, 100), Some(123_456_789));
    // The largest values have a bucket too.
    h.record(u64::MAX);
    assert_eq!(h.quantile_ns(100, 100), Some(u64::MAX));
    assert_eq!(h.mean_ns(), ((123_456_789u128 + u64::MAX as u128) / 2) as u64);
    // The median of a two-value set is the smaller (nearest rank).
    assert_within("p50 of two", h.quantile_ns(50, 100).unwrap(), 123_456_789);
}
