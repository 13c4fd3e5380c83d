//! The mux node, driven by hand: ID rewriting and routing, a client's
//! garbage or departure affecting no one else, `-n`, the upstream's end,
//! and every bound.

use bytes::{Bytes, BytesMut};
use kivaloo::contract::{ConnClosed, ConnId, Input, Instant, Node, Output};
use kivaloo::kvlds_proto::{KvldsRequest, KvldsRequestKind, KvldsResponse};
use kivaloo::packet::{encode_packet, Packet, PacketDecoder};
use kivaloo_nodes::mux::{
    answer_bytes_reserved, MuxConfig, MuxNode, CLIENT_IN_FLIGHT_MAX, CLIENT_UNSENT_BYTES_DROP,
    CLIENT_UNSENT_BYTES_MAX, UPSTREAM_UNSENT_BYTES_MAX,
};

const A: ConnId = ConnId(1);
const B: ConnId = ConnId(2);
const C: ConnId = ConnId(3);

/// A mux and what it did.
struct Harness {
    mux: MuxNode,
    /// Bytes sent upstream, decoded.
    upstream: PacketDecoder,
    /// Bytes sent to each client, decoded.
    to_client: std::collections::BTreeMap<ConnId, PacketDecoder>,
    closed: Vec<(ConnId, String)>,
    reading: std::collections::BTreeMap<ConnId, bool>,
    accepting: bool,
    exit: Option<String>,
}

impl Harness {
    /// A mux that has been told kvlds's limits (64-byte keys, 96-byte
    /// values).
    fn serving(config: MuxConfig) -> Harness {
        let mut h = Harness {
            mux: MuxNode::new(config),
            upstream: PacketDecoder::new(),
            to_client: Default::default(),
            closed: Vec::new(),
            reading: Default::default(),
            accepting: false,
            exit: None,
        };
        h.drain();
        assert!(!h.accepting, "the mux accepts only once it knows kvlds's limits");
        let sent = h.upstream_requests();
        assert_eq!(sent.len(), 1);
        assert_eq!(KvldsRequest::decode(sent[0].record.clone()).unwrap(), KvldsRequest::Params);
        h.input(Input::Sent { conn: ConnId::UPSTREAM, len_bytes: 24 });
        h.answer(sent[0].id, &KvldsResponse::Params { max_key_len: 64, max_value_len: 96 });
        assert!(h.accepting);
        h
    }

    fn input(&mut self, input: Input) {
        self.mux.handle_input(Instant::from_nanos(0), input);
        self.drain();
    }

    fn drain(&mut self) {
        while let Some(out) = self.mux.poll_output() {
            match out {
                Output::Send { conn, data } if conn == ConnId::UPSTREAM => self.upstream.push(&data),
                Output::Send { conn, data } => self.to_client.entry(conn).or_default().push(&data),
                Output::Close { conn, reason } => self.closed.push((conn, reason)),
                Output::ReadInterest { conn, enabled } => {
                    self.reading.insert(conn, enabled);
                }
                Output::Accepting(on) => self.accepting = on,
                Output::Exit(reason) => self.exit = Some(reason.message),
                Output::Log { .. } => {}
                Output::Disk { .. } => panic!("the mux asked for disk I/O"),
            }
        }
    }

    fn connect(&mut self, conn: ConnId) {
        self.input(Input::Accepted { conn });
    }

    fn send(&mut self, conn: ConnId, id: u64, req: &KvldsRequest) {
        let mut out = BytesMut::new();
        req.encode(id, &mut out);
        self.input(Input::Received { conn, data: out.freeze() });
    }

    fn upstream_requests(&mut self) -> Vec<Packet> {
        std::iter::from_fn(|| self.upstream.next_packet().unwrap()).collect()
    }

    fn client_responses(&mut self, conn: ConnId) -> Vec<Packet> {
        let Some(d) = self.to_client.get_mut(&conn) else { return Vec::new() };
        std::iter::from_fn(|| d.next_packet().unwrap()).collect()
    }

    fn answer(&mut self, upstream_id: u64, resp: &KvldsResponse) {
        let mut out = BytesMut::new();
        resp.encode(upstream_id, &mut out);
        self.input(Input::Received { conn: ConnId::UPSTREAM, data: out.freeze() });
    }
}

fn get(key: &'static [u8]) -> KvldsRequest {
    KvldsRequest::Get { key: Bytes::from_static(key) }
}

fn set(key: &'static [u8], value: &'static [u8]) -> KvldsRequest {
    KvldsRequest::Set { key: Bytes::from_static(key), value: Bytes::from_static(value) }
}

#[test]
fn ids_are_rewritten_upstream_and_restored_for_each_client() {
    let mut h = Harness::serving(MuxConfig::default());
    h.connect(A);
    h.connect(B);
    // Both clients use the same IDs.
    h.send(A, 7, &get(b"a"));
    h.send(B, 7, &get(b"b"));
    h.send(A, 8, &set(b"a", b"1"));
    let up = h.upstream_requests();
    assert_eq!(up.len(), 3);
    let ids: std::collections::BTreeSet<u64> = up.iter().map(|p| p.id).collect();
    assert_eq!(ids.len(), 3, "upstream IDs are unique");
    // The records are forwarded unchanged.
    assert_eq!(KvldsRequest::decode(up[1].record.clone()).unwrap(), get(b"b"));
    // Answer out of order.
    h.answer(up[2].id, &KvldsResponse::Done(true));
    h.answer(up[1].id, &KvldsResponse::Get(Some(Bytes::from_static(b"B"))));
    h.answer(up[0].id, &KvldsResponse::Get(None));
    let a = h.client_responses(A);
    let b = h.client_responses(B);
    assert_eq!(a.iter().map(|p| p.id).collect::<Vec<_>>(), vec![8, 7]);
    assert_eq!(
        KvldsResponse::decode(KvldsRequestKind::Set, a[0].record.clone()).unwrap(),
        KvldsResponse::Done(true)
    );
    assert_eq!(
        KvldsResponse::decode(KvldsRequestKind::Get, a[1].record.clone()).unwrap(),
        KvldsResponse::Get(None)
    );
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].id, 7);
    assert_eq!(
        KvldsResponse::decode(KvldsRequestKind::Get, b[0].record.clone()).unwrap(),
        KvldsResponse::Get(Some(Bytes::from_static(b"B")))
    );
    assert_eq!(h.mux.in_flight(), 0);
    assert!(h.closed.is_empty() && h.exit.is_none());
}

#[test]
fn requests_split_at_every_byte_are_forwarded_whole() {
    let mut h = Harness::serving(MuxConfig::default());
    h.connect(A);
    let mut out = BytesMut::new();
    set(b"key", b"value").encode(1, &mut out);
    get(b"key").encode(2, &mut out);
    for byte in out.freeze().iter() {
        h.input(Input::Received { conn: A, data: Bytes::copy_from_slice(&[*byte]) });
    }
    let up = h.upstream_requests();
    assert_eq!(up.len(), 2);
    assert_eq!(KvldsRequest::decode(up[0].record.clone()).unwrap(), set(b"key", b"value"));
}

#[test]
fn a_client_sending_garbage_is_dropped_alone() {
    let mut h = Harness::serving(MuxConfig::default());
    h.connect(A);
    h.connect(B);
    h.send(A, 1, &get(b"a"));
    h.input(Input::Received { conn: B, data: Bytes::from_static(&[0xff; 40]) });
    assert_eq!(h.closed.len(), 1);
    assert_eq!(h.closed[0].0, B);
    assert!(h.closed[0].1.contains("bad packet"), "{}", h.closed[0].1);
    // A's request is answered as usual.
    let up = h.upstream_requests();
    assert_eq!(up.len(), 1);
    h.answer(up[0].id, &KvldsResponse::Get(None));
    assert_eq!(h.client_responses(A).len(), 1);
    assert!(h.exit.is_none());
}

#[test]
fn a_well_framed_but_malformed_request_never_reaches_the_upstream() {
    let mut h = Harness::serving(MuxConfig::default());
    for (conn, record) in [
        (A, vec![0, 0, 0, 0]),                // an lbs request type
        (B, vec![0, 0, 1, 0x30, 5, b'a']),    // a GET whose key is truncated
        (C, vec![0, 0, 1, 0x30, 1, b'a', 0]), // a GET with a byte left over
    ] {
        h.connect(conn);
        let mut out = BytesMut::new();
        encode_packet(&mut out, 1, &record);
        h.input(Input::Received { conn, data: out.freeze() });
    }
    assert_eq!(h.closed.iter().map(|c| c.0).collect::<Vec<_>>(), vec![A, B, C]);
    assert!(h.upstream_requests().is_empty());
}

#[test]
fn requests_over_kvlds_limits_drop_the_client_but_long_gets_pass() {
    let mut h = Harness::serving(MuxConfig::default());
    h.connect(A);
    h.connect(B);
    let long_key = Bytes::from(vec![b'k'; 65]);
    h.send(A, 1, &KvldsRequest::Get { key: long_key.clone() });
    h.send(A, 2, &KvldsRequest::Set { key: Bytes::from_static(b"k"), value: Bytes::from(vec![0; 96]) });
    assert_eq!(h.upstream_requests().len(), 2, "a long GET finds nothing upstream; a 96-byte value fits");
    h.send(
        B,
        1,
        &KvldsRequest::Cas {
            key: Bytes::from_static(b"k"),
            old_value: Bytes::new(),
            new_value: Bytes::from(vec![0; 97]),
        },
    );
    assert_eq!(h.closed.len(), 1);
    assert_eq!(h.closed[0].0, B);
    assert!(h.closed[0].1.contains("over the limit"), "{}", h.closed[0].1);
    h.send(A, 3, &KvldsRequest::Delete { key: long_key });
    assert_eq!(h.closed.len(), 2);
    assert!(h.upstream_requests().is_empty());
}

#[test]
fn answers_for_a_departed_client_are_dropped_not_misrouted() {
    let mut h = Harness::serving(MuxConfig::default());
    h.connect(A);
    for id in 0..10 {
        h.send(A, id, &get(b"a"));
    }
    let up = h.upstream_requests();
    h.input(Input::Closed { conn: A, reason: ConnClosed::Failed("reset".into()) });
    // A new client with the same IDs.
    h.connect(B);
    h.send(B, 3, &get(b"b"));
    let up_b = h.upstream_requests();
    for p in &up {
        h.answer(p.id, &KvldsResponse::Get(Some(Bytes::from_static(b"A's"))));
    }
    assert!(h.client_responses(B).is_empty(), "A's answers went to B");
    h.answer(up_b[0].id, &KvldsResponse::Get(None));
    let b = h.client_responses(B);
    assert_eq!(b.len(), 1);
    assert_eq!(
        KvldsResponse::decode(KvldsRequestKind::Get, b[0].record.clone()).unwrap(),
        KvldsResponse::Get(None)
    );
    let probes = h.mux.probes();
    assert_eq!(probes.responses_dropped, 10);
    assert_eq!(probes.clients_gone_with_requests, 1);
    assert_eq!(h.mux.in_flight(), 0);
}

#[test]
fn dash_n_caps_the_clients_served_at_once() {
    let mut h = Harness::serving(MuxConfig { connections_max: 2 });
    h.connect(A);
    assert!(h.accepting);
    h.connect(B);
    assert!(!h.accepting, "at the cap the mux stops accepting");
    assert_eq!(h.mux.probes().accepting_paused_at_limit, 1);
    // One that the driver accepted anyway is closed.
    h.connect(C);
    assert_eq!(h.closed.len(), 1);
    assert_eq!(h.closed[0].0, C);
    assert_eq!(h.mux.clients(), 2);
    h.input(Input::Closed { conn: A, reason: ConnClosed::PeerClosed });
    assert!(h.accepting);
}

#[test]
fn the_mux_exits_when_its_upstream_closes_or_misbehaves() {
    let mut h = Harness::serving(MuxConfig::default());
    h.connect(A);
    h.input(Input::Closed { conn: ConnId::UPSTREAM, reason: ConnClosed::PeerClosed });
    assert!(h.exit.as_deref().is_some_and(|m| m.contains("upstream")));
    assert_eq!(h.mux.clients(), 0);

    let mut h = Harness::serving(MuxConfig::default());
    h.answer(12345, &KvldsResponse::Done(true));
    assert!(h.exit.as_deref().is_some_and(|m| m.contains("not in flight")), "{:?}", h.exit);

    let mut h = Harness::serving(MuxConfig::default());
    h.input(Input::Received { conn: ConnId::UPSTREAM, data: Bytes::from_static(&[0xff; 64]) });
    assert!(h.exit.as_deref().is_some_and(|m| m.contains("bad packet")), "{:?}", h.exit);
}

#[test]
fn a_client_is_paused_at_its_in_flight_bound_and_resumed_by_answers() {
    let mut h = Harness::serving(MuxConfig::default());
    h.connect(A);
    let mut out = BytesMut::new();
    for id in 0..CLIENT_IN_FLIGHT_MAX as u64 + 10 {
        get(b"a").encode(id, &mut out);
    }
    h.input(Input::Received { conn: A, data: out.freeze() });
    let up = h.upstream_requests();
    assert_eq!(up.len(), CLIENT_IN_FLIGHT_MAX);
    assert_eq!(h.reading.get(&A), Some(&false));
    assert_eq!(h.mux.probes().client_reads_paused_at_in_flight_bound, 1);
    assert_eq!(h.mux.probes().client_reads_paused_at_bytes_bound, 0);
    // Report the upstream bytes written, so only the client's bound holds.
    h.input(Input::Sent { conn: ConnId::UPSTREAM, len_bytes: u64::MAX });
    h.answer(up[0].id, &KvldsResponse::Get(None));
    assert_eq!(h.upstream_requests().len(), 1, "one answer makes room for one more");
    for p in &up[1..] {
        h.answer(p.id, &KvldsResponse::Get(None));
    }
    assert_eq!(h.upstream_requests().len(), 9);
    assert_eq!(h.reading.get(&A), Some(&true));
}

#[test]
fn every_client_waits_while_the_upstream_does_not_take_requests() {
    let mut h = Harness::serving(MuxConfig::default());
    h.connect(A);
    h.connect(B);
    let value = Bytes::from(vec![0u8; 96]);
    let req = KvldsRequest::Set { key: Bytes::from_static(b"k"), value };
    // Answer as we go, so that no client reaches its own bound; the
    // upstream reports nothing written, so together they fill it.
    let mut id = 0;
    let mut bytes = 0;
    while h.reading.get(&B) != Some(&false) {
        let conn = if id % 2 == 0 { A } else { B };
        h.send(conn, id, &req);
        id += 1;
        assert!(id < 1_000_000);
        for p in h.upstream_requests() {
            bytes += p.record.len() + 20;
            h.answer(p.id, &KvldsResponse::Done(true));
        }
    }
    assert_eq!(h.reading.get(&A), Some(&false));
    assert!(bytes as u64 >= UPSTREAM_UNSENT_BYTES_MAX);
    // A newcomer waits too.
    h.connect(C);
    assert_eq!(h.reading.get(&C), Some(&false));
    h.input(Input::Sent { conn: ConnId::UPSTREAM, len_bytes: bytes as u64 });
    for conn in [A, B, C] {
        assert_eq!(h.reading.get(&conn), Some(&true), "{conn} resumes");
    }
}

#[test]
fn answers_have_room_reserved_so_a_slow_reader_is_paused_not_dropped() {
    let mut h = Harness::serving(MuxConfig::default());
    h.connect(A);
    // 1 MiB of pairs: the most an answer to a 1 MiB budget holds, but for
    // the one pair past the budget.
    let big = KvldsResponse::Range {
        next: Bytes::new(),
        pairs: (0..4096u32)
            .map(|i| (Bytes::from(i.to_be_bytes().to_vec()), Bytes::from(vec![0; 250])))
            .collect(),
    };
    let mut out = BytesMut::new();
    for id in 0..400 {
        KvldsRequest::Range { max_bytes: 1 << 20, start: Bytes::new(), end: Bytes::new() }
            .encode(id, &mut out);
    }
    h.input(Input::Received { conn: A, data: out.freeze() });
    // Four answers of up to 1 MiB fill the client's 4 MiB.
    let up = h.upstream_requests();
    assert_eq!(up.len(), 4);
    assert_eq!(h.reading.get(&A), Some(&false));
    assert_eq!(h.mux.probes().client_reads_paused_at_bytes_bound, 1);
    assert_eq!(h.mux.probes().client_reads_paused_at_in_flight_bound, 0);
    for p in &up {
        h.answer(p.id, &big);
    }
    assert!(h.upstream_requests().is_empty(), "the answers wait for the client: it stays paused");
    let unsent: u64 = h.client_responses(A).iter().map(|p| p.record.len() as u64 + 20).sum();
    let one_range = answer_bytes_reserved(&KvldsRequest::Range {
        max_bytes: 1 << 20,
        start: Bytes::new(),
        end: Bytes::new(),
    });
    assert!(unsent <= CLIENT_UNSENT_BYTES_MAX + one_range, "held for the client: {unsent} bytes");
    h.input(Input::Sent { conn: A, len_bytes: unsent });
    assert_eq!(h.upstream_requests().len(), 4, "written answers make room for more");
    assert!(h.closed.is_empty());
}

#[test]
fn a_client_is_dropped_when_answers_beyond_any_reservation_pile_up() {
    let mut h = Harness::serving(MuxConfig::default());
    h.connect(A);
    h.connect(B);
    for id in 0..5 {
        h.send(A, id, &get(b"a"));
    }
    h.send(B, 1, &get(b"b"));
    let up = h.upstream_requests();
    assert_eq!(up.len(), 6);
    // An upstream that answers far beyond what a GET can be (20 MiB each).
    let huge = vec![0u8; 20 << 20];
    for p in &up[..5] {
        let mut out = BytesMut::new();
        encode_packet(&mut out, p.id, &huge);
        h.input(Input::Received { conn: ConnId::UPSTREAM, data: out.freeze() });
        if !h.closed.is_empty() {
            break;
        }
    }
    assert_eq!(h.closed.len(), 1);
    assert_eq!(h.closed[0].0, A);
    assert!(h.closed[0].1.contains("does not read"), "{}", h.closed[0].1);
    assert!(h.mux.probes().clients_dropped == 1);
    // B is unaffected.
    h.answer(up[5].id, &KvldsResponse::Get(None));
    assert_eq!(h.client_responses(B).len(), 1);
    assert!(h.exit.is_none());
    let _ = CLIENT_UNSENT_BYTES_DROP;
}
