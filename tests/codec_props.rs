//! Properties of the wire codec: typed messages round-trip, packet streams
//! survive any split, and hostile bytes never make a decoder panic, hold
//! memory it was not sent, or accept a corrupted packet.

use bytes::{Bytes, BytesMut};
use kivaloo::crc::wire_crc;
use kivaloo::kvlds_proto::{KvldsRequest, KvldsRequestKind, KvldsResponse};
use kivaloo::lbs_proto::{LbsRequest, LbsRequestKind, LbsResponse};
use kivaloo::packet::{encode_packet, FrameError, Packet, PacketDecoder, HEADER_LEN, TRAILER_LEN};
use kivaloo::MessageError;
use proptest::prelude::*;
use proptest::sample::Index;

/// The record bound of the decoders fed hostile bytes.
const SMALL_RECORD_LEN_MAX: usize = 1024;

// ---------------------------------------------------------------------------
// Strategies

fn bytes_up_to(len_max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..=len_max).prop_map(Bytes::from)
}

/// A kvlds key or value: 0..=255 bytes, often short.
fn short_string() -> impl Strategy<Value = Bytes> {
    prop_oneof![bytes_up_to(8), bytes_up_to(255), Just(Bytes::from(vec![0xffu8; 255]))]
}

fn lbs_request() -> impl Strategy<Value = LbsRequest> {
    prop_oneof![
        Just(LbsRequest::Params),
        Just(LbsRequest::Params2),
        any::<u64>().prop_map(|block| LbsRequest::Get { block }),
        (any::<u32>(), any::<u64>(), bytes_up_to(2048)).prop_map(|(count, start, data)| LbsRequest::Append {
            count,
            start,
            data
        }),
        any::<u64>().prop_map(|keep_from| LbsRequest::Free { keep_from }),
    ]
}

/// An lbs response with the kind of request it answers.
fn lbs_response() -> impl Strategy<Value = (LbsRequestKind, LbsResponse)> {
    prop_oneof![
        (any::<u32>(), any::<u64>()).prop_map(|(block_size, next_block)| {
            (LbsRequestKind::Params, LbsResponse::Params { block_size, next_block })
        }),
        (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(block_size, next_block, last_block)| {
            (LbsRequestKind::Params2, LbsResponse::Params2 { block_size, next_block, last_block })
        }),
        prop::option::of(bytes_up_to(2048)).prop_map(|data| (LbsRequestKind::Get, LbsResponse::Get(data))),
        prop::option::of(any::<u64>()).prop_map(|next| (LbsRequestKind::Append, LbsResponse::Append(next))),
        Just((LbsRequestKind::Free, LbsResponse::Free)),
    ]
}

fn kvlds_request() -> impl Strategy<Value = KvldsRequest> {
    let s = short_string;
    prop_oneof![
        Just(KvldsRequest::Params),
        (s(), s()).prop_map(|(key, value)| KvldsRequest::Set { key, value }),
        (s(), s(), s()).prop_map(|(key, old_value, new_value)| KvldsRequest::Cas {
            key,
            old_value,
            new_value
        }),
        (s(), s()).prop_map(|(key, value)| KvldsRequest::Add { key, value }),
        (s(), s()).prop_map(|(key, value)| KvldsRequest::Modify { key, value }),
        s().prop_map(|key| KvldsRequest::Delete { key }),
        (s(), s()).prop_map(|(key, old_value)| KvldsRequest::Cad { key, old_value }),
        s().prop_map(|key| KvldsRequest::Get { key }),
        (any::<u32>(), s(), s()).prop_map(|(max_bytes, start, end)| KvldsRequest::Range {
            max_bytes,
            start,
            end
        }),
    ]
}

/// A kvlds response with the kind of request it answers; only the statuses
/// the protocol defines for that kind.
fn kvlds_response() -> impl Strategy<Value = (KvldsRequestKind, KvldsResponse)> {
    let s = short_string;
    prop_oneof![
        (any::<u32>(), any::<u32>()).prop_map(|(max_key_len, max_value_len)| {
            (KvldsRequestKind::Params, KvldsResponse::Params { max_key_len, max_value_len })
        }),
        prop::sample::select(vec![KvldsRequestKind::Set, KvldsRequestKind::Delete])
            .prop_map(|kind| (kind, KvldsResponse::Done(true))),
        (
            prop::sample::select(vec![
                KvldsRequestKind::Cas,
                KvldsRequestKind::Add,
                KvldsRequestKind::Modify,
                KvldsRequestKind::Cad,
            ]),
            any::<bool>()
        )
            .prop_map(|(kind, done)| (kind, KvldsResponse::Done(done))),
        prop::option::of(s()).prop_map(|value| (KvldsRequestKind::Get, KvldsResponse::Get(value))),
        (s(), prop::collection::vec((s(), s()), 0..6))
            .prop_map(|(next, pairs)| (KvldsRequestKind::Range, KvldsResponse::Range { next, pairs })),
    ]
}

/// One message of a packet stream.
#[derive(Debug, Clone)]
enum Message {
    Raw { id: u64, record: Bytes },
    Lbs { id: u64, request: LbsRequest },
    Kvlds { id: u64, response: (KvldsRequestKind, KvldsResponse) },
}

impl Message {
    fn encode(&self, out: &mut BytesMut) {
        match self {
            Message::Raw { id, record } => encode_packet(out, *id, record),
            Message::Lbs { id, request } => request.encode(*id, out),
            Message::Kvlds { id, response } => response.1.encode(*id, out),
        }
    }

    /// Checks that `p` is this message.
    fn check(&self, p: &Packet) -> Result<(), TestCaseError> {
        match self {
            Message::Raw { id, record } => {
                prop_assert_eq!(p.id, *id);
                prop_assert_eq!(&p.record, record);
            }
            Message::Lbs { id, request } => {
                prop_assert_eq!(p.id, *id);
                prop_assert_eq!(&LbsRequest::decode(p.record.clone()), &Ok(request.clone()));
            }
            Message::Kvlds { id, response: (kind, response) } => {
                prop_assert_eq!(p.id, *id);
                prop_assert_eq!(&KvldsResponse::decode(*kind, p.record.clone()), &Ok(response.clone()));
            }
        }
        Ok(())
    }
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u64>(), bytes_up_to(300)).prop_map(|(id, record)| Message::Raw { id, record }),
        (any::<u64>(), lbs_request()).prop_map(|(id, request)| Message::Lbs { id, request }),
        (any::<u64>(), kvlds_response()).prop_map(|(id, response)| Message::Kvlds { id, response }),
    ]
}

/// Interesting first words of a record: every request type of both
/// protocols, the statuses, and a few undefined values.
fn record_prefix_word() -> impl Strategy<Value = u32> {
    prop_oneof![
        prop::sample::select(vec![
            0u32,
            1,
            2,
            3,
            4,
            5,
            0x100,
            0x110,
            0x111,
            0x112,
            0x113,
            0x114,
            0x120,
            0x121,
            0x130,
            0x131,
            0x132,
            0xffff_ffff,
        ]),
        any::<u32>(),
    ]
}

/// Arbitrary records, biased towards ones that get past the first fields.
fn arbitrary_record() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        1 => bytes_up_to(64),
        1 => bytes_up_to(600),
        1 => (record_prefix_word(), bytes_up_to(600)).prop_map(|(w, rest)| concat(&[&w.to_be_bytes(), &rest])),
        // A word, a small count (a RANGE response's pair count), the rest.
        1 => (record_prefix_word(), 0u32..8, bytes_up_to(600)).prop_map(|(w, n, rest)| concat(&[
            &w.to_be_bytes(),
            &n.to_be_bytes(),
            &rest
        ])),
        // A valid record, as is or with one byte changed, cut or added.
        4 => (valid_record(), any::<Index>(), any::<u8>(), 0u8..4).prop_map(|(record, at, byte, how)| {
            let mut record = record.to_vec();
            let i = at.index(record.len());
            match how {
                0 => record[i] = byte,
                1 => record.truncate(i),
                2 => record.insert(i, byte),
                _ => {}
            }
            Bytes::from(record)
        }),
    ]
}

/// The record of a valid message of either protocol.
fn valid_record() -> impl Strategy<Value = Bytes> {
    fn record_of(encode: impl FnOnce(&mut BytesMut)) -> Bytes {
        let mut out = BytesMut::new();
        encode(&mut out);
        let len = out.len();
        out.freeze().slice(HEADER_LEN..len - TRAILER_LEN)
    }
    prop_oneof![
        lbs_request().prop_map(|m| record_of(|out| m.encode(0, out))),
        lbs_response().prop_map(|(_, m)| record_of(|out| m.encode(0, out))),
        kvlds_request().prop_map(|m| record_of(|out| m.encode(0, out))),
        kvlds_response().prop_map(|(_, m)| record_of(|out| m.encode(0, out))),
    ]
}

fn concat(parts: &[&[u8]]) -> Bytes {
    Bytes::from(parts.concat())
}

/// Cut points for a byte string of length `len`, sorted, from indices.
fn cut_points(len: usize, cuts: &[Index]) -> Vec<usize> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(len + 1)).collect();
    points.push(0);
    points.push(len);
    points.sort_unstable();
    points
}

// ---------------------------------------------------------------------------
// Helpers

/// Frames `encode`'s packet, decodes it, and returns the one packet found,
/// checking the frame's length and that nothing else is in the stream.
fn frame_one(id: u64, encode: impl FnOnce(&mut BytesMut)) -> Result<Packet, TestCaseError> {
    let mut out = BytesMut::new();
    encode(&mut out);
    let mut d = PacketDecoder::new();
    d.push(&out);
    let p = d.next_packet().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let p = p.ok_or_else(|| TestCaseError::fail("no whole packet"))?;
    prop_assert_eq!(p.id, id);
    prop_assert_eq!(out.len(), HEADER_LEN + p.record.len() + TRAILER_LEN);
    prop_assert_eq!(d.next_packet(), Ok(None));
    prop_assert_eq!(d.buffered_len(), 0);
    Ok(p)
}

/// What a decoder fed hostile bytes went through.
#[derive(Debug, Default)]
struct Feed {
    packets: Vec<Packet>,
    error: Option<FrameError>,
}

/// Pushes `wire` into `d` in the pieces given by `points`, draining packets
/// after each piece and checking the decoder's invariants throughout: it
/// never holds more bytes than it was sent and not yet returned, never
/// returns a record over its bound, and once failed stays failed (with
/// nothing buffered).
fn feed(d: &mut PacketDecoder, wire: &[u8], points: &[usize]) -> Result<Feed, TestCaseError> {
    let mut result = Feed::default();
    let mut pushed = 0usize;
    let mut returned = 0usize;
    for piece in points.windows(2) {
        d.push(&wire[piece[0]..piece[1]]);
        pushed += piece[1] - piece[0];
        loop {
            match d.next_packet() {
                Ok(Some(p)) => {
                    prop_assert!(result.error.is_none(), "a packet after an error");
                    prop_assert!(p.record.len() <= d.record_len_max());
                    returned += HEADER_LEN + p.record.len() + TRAILER_LEN;
                    result.packets.push(p);
                }
                Ok(None) => {
                    prop_assert!(result.error.is_none(), "no error after an error");
                    break;
                }
                Err(e) => {
                    if let Some(first) = &result.error {
                        prop_assert_eq!(first, &e, "the error changed");
                    }
                    result.error = Some(e);
                    prop_assert_eq!(d.buffered_len(), 0, "a failed decoder holds bytes");
                    break;
                }
            }
        }
        prop_assert!(returned <= pushed);
        prop_assert!(
            d.buffered_len() <= pushed - returned,
            "{} bytes buffered, {} pushed, {} returned",
            d.buffered_len(),
            pushed,
            returned
        );
    }
    Ok(result)
}

/// Checks that `decode` finds every strict prefix of `record` (the empty
/// one, one cut at `cut`, and all but the last byte) truncated, and
/// `record` plus `extra` one byte too long.
fn check_exact(
    record: &Bytes,
    cut: Index,
    extra: u8,
    decode: &dyn Fn(Bytes) -> Result<(), MessageError>,
) -> Result<(), TestCaseError> {
    for len in [0, cut.index(record.len()), record.len() - 1] {
        let result = decode(record.slice(..len));
        prop_assert!(
            matches!(result, Err(MessageError::Truncated { .. })),
            "prefix of {} of {} bytes: {:?}",
            len,
            record.len(),
            result
        );
    }
    let result = decode(concat(&[record, &[extra]]));
    prop_assert!(
        matches!(result, Err(MessageError::TrailingBytes { trailing: 1, .. })),
        "one byte more: {:?}",
        result
    );
    Ok(())
}

/// A valid header announcing `record_len` bytes.
fn header(id: u64, record_len: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&record_len.to_be_bytes());
    let crc = wire_crc(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

// ---------------------------------------------------------------------------
// Round trips

proptest! {
    #[test]
    fn lbs_request_round_trips(id in any::<u64>(), req in lbs_request()) {
        let p = frame_one(id, |out| req.encode(id, out))?;
        prop_assert_eq!(LbsRequest::decode(p.record), Ok(req));
    }

    #[test]
    fn lbs_response_round_trips(id in any::<u64>(), (kind, resp) in lbs_response()) {
        let p = frame_one(id, |out| resp.encode(id, out))?;
        prop_assert_eq!(LbsResponse::decode(kind, p.record), Ok(resp));
    }

    #[test]
    fn kvlds_request_round_trips(id in any::<u64>(), req in kvlds_request()) {
        let p = frame_one(id, |out| req.encode(id, out))?;
        prop_assert_eq!(KvldsRequest::decode(p.record.clone()), Ok(req.clone()));
        prop_assert_eq!(KvldsRequest::decode(p.record).map(|r| r.kind()), Ok(req.kind()));
    }

    #[test]
    fn kvlds_response_round_trips(id in any::<u64>(), (kind, resp) in kvlds_response()) {
        let p = frame_one(id, |out| resp.encode(id, out))?;
        prop_assert_eq!(KvldsResponse::decode(kind, p.record), Ok(resp));
    }

    /// kvlds records are self-delimiting: any strict prefix is truncated,
    /// and one more byte is left over.
    #[test]
    fn kvlds_records_are_exact(
        req in kvlds_request(),
        (kind, resp) in kvlds_response(),
        cut in any::<Index>(),
        extra in any::<u8>(),
    ) {
        let req_record = frame_one(1, |out| req.encode(1, out))?.record;
        check_exact(&req_record, cut, extra, &|r| KvldsRequest::decode(r).map(drop))?;
        let resp_record = frame_one(1, |out| resp.encode(1, out))?.record;
        check_exact(&resp_record, cut, extra, &|r| KvldsResponse::decode(kind, r).map(drop))?;
    }
}

// ---------------------------------------------------------------------------
// Streams

proptest! {
    /// Several packets, split anywhere and pushed piece by piece into one
    /// decoder, come out whole, unchanged and in order.
    #[test]
    fn packet_stream_survives_any_split(
        messages in prop::collection::vec(message(), 1..6),
        cuts in prop::collection::vec(any::<Index>(), 0..24),
    ) {
        let mut wire = BytesMut::new();
        for m in &messages {
            m.encode(&mut wire);
        }
        let mut d = PacketDecoder::new();
        let fed = feed(&mut d, &wire, &cut_points(wire.len(), &cuts))?;
        prop_assert_eq!(fed.error, None);
        prop_assert_eq!(fed.packets.len(), messages.len());
        for (m, p) in messages.iter().zip(&fed.packets) {
            m.check(p)?;
        }
        prop_assert_eq!(d.buffered_len(), 0);
    }

    /// Changing any one byte of a stream of valid packets is detected: the
    /// packets before it come out intact, then the CRC of the damaged
    /// packet's header or record fails; no damaged packet is returned.
    #[test]
    fn one_corrupted_byte_is_always_detected(
        records in prop::collection::vec((any::<u64>(), bytes_up_to(512)), 1..5),
        at in any::<Index>(),
        flip in 1u8..=255,
        cuts in prop::collection::vec(any::<Index>(), 0..12),
    ) {
        let mut wire = BytesMut::new();
        let mut starts = Vec::new();
        for (id, record) in &records {
            starts.push(wire.len());
            encode_packet(&mut wire, *id, record);
        }
        let i = at.index(wire.len());
        wire[i] ^= flip;
        let damaged = starts.iter().rposition(|s| *s <= i).expect("packet 0 starts at 0");
        let offset = i - starts[damaged];

        let mut d = PacketDecoder::with_record_len_max(SMALL_RECORD_LEN_MAX);
        let fed = feed(&mut d, &wire, &cut_points(wire.len(), &cuts))?;
        prop_assert_eq!(fed.packets.len(), damaged);
        for ((id, record), p) in records.iter().zip(&fed.packets) {
            prop_assert_eq!(p.id, *id);
            prop_assert_eq!(&p.record, record);
        }
        match fed.error {
            Some(FrameError::HeaderCrc { .. }) => prop_assert!(offset < HEADER_LEN),
            Some(FrameError::RecordCrc { id, .. }) => {
                prop_assert!(offset >= HEADER_LEN);
                prop_assert_eq!(id, records[damaged].0);
            }
            other => prop_assert!(false, "byte {} of packet {} changed, got {:?}", offset, damaged, other),
        }
    }
}

// ---------------------------------------------------------------------------
// Hostile bytes

proptest! {
    /// Arbitrary bytes in arbitrary pieces: no panic, invariants hold.
    #[test]
    fn arbitrary_bytes_never_panic(
        wire in prop::collection::vec(any::<u8>(), 0..4096),
        cuts in prop::collection::vec(any::<Index>(), 0..16),
    ) {
        let mut d = PacketDecoder::with_record_len_max(SMALL_RECORD_LEN_MAX);
        feed(&mut d, &wire, &cut_points(wire.len(), &cuts))?;
    }

    /// Valid packets mangled in several places (bytes changed, removed,
    /// inserted, the stream cut short): no panic, invariants hold.
    #[test]
    fn mangled_packets_never_panic(
        messages in prop::collection::vec(message(), 1..5),
        edits in prop::collection::vec((any::<Index>(), any::<u8>(), 0u8..4), 1..8),
        cuts in prop::collection::vec(any::<Index>(), 0..16),
    ) {
        let mut wire = Vec::new();
        for m in &messages {
            let mut out = BytesMut::new();
            m.encode(&mut out);
            wire.extend_from_slice(&out);
        }
        for (at, byte, how) in edits {
            if wire.is_empty() {
                break;
            }
            let i = at.index(wire.len());
            match how {
                0 => wire[i] = byte,
                1 => { wire.remove(i); }
                2 => wire.insert(i, byte),
                _ => wire.truncate(i),
            }
        }
        let mut d = PacketDecoder::with_record_len_max(SMALL_RECORD_LEN_MAX);
        feed(&mut d, &wire, &cut_points(wire.len(), &cuts))?;
    }

    /// A valid header followed by garbage. A header announcing more than
    /// the decoder's bound is refused from the header alone, before any
    /// record byte arrives and with nothing kept; any other is judged
    /// exactly by its trailer once the record is in.
    #[test]
    fn valid_header_then_garbage(
        id in any::<u64>(),
        record_len in prop_oneof![
            0u32..=SMALL_RECORD_LEN_MAX as u32,
            Just(SMALL_RECORD_LEN_MAX as u32 + 1),
            SMALL_RECORD_LEN_MAX as u32 + 1..=u32::MAX,
            Just(u32::MAX),
        ],
        garbage in prop::collection::vec(any::<u8>(), 0..2048),
        cuts in prop::collection::vec(any::<Index>(), 0..8),
    ) {
        let head = header(id, record_len);
        let mut d = PacketDecoder::with_record_len_max(SMALL_RECORD_LEN_MAX);
        // The header alone, one byte short and then whole.
        d.push(&head[..HEADER_LEN - 1]);
        prop_assert_eq!(d.next_packet(), Ok(None));
        d.push(&head[HEADER_LEN - 1..]);
        let len = record_len as usize;
        if len > SMALL_RECORD_LEN_MAX {
            let refused = FrameError::RecordTooLong {
                id,
                record_len: u64::from(record_len),
                record_len_max: SMALL_RECORD_LEN_MAX,
            };
            prop_assert_eq!(d.next_packet(), Err(refused.clone()));
            prop_assert_eq!(d.buffered_len(), 0);
            let fed = feed(&mut d, &garbage, &cut_points(garbage.len(), &cuts))?;
            prop_assert!(fed.packets.is_empty());
            prop_assert_eq!(d.next_packet(), Err(refused));
            return Ok(());
        }
        prop_assert_eq!(d.next_packet(), Ok(None));
        let fed = feed(&mut d, &garbage, &cut_points(garbage.len(), &cuts))?;
        if garbage.len() < len + TRAILER_LEN {
            prop_assert!(fed.packets.is_empty());
            prop_assert_eq!(fed.error, None);
            return Ok(());
        }
        let record = &garbage[..len];
        let found = u32::from_le_bytes(garbage[len..len + 4].try_into().unwrap());
        let header_crc = u32::from_le_bytes(head[12..16].try_into().unwrap());
        let expected = wire_crc(record) ^ header_crc;
        if found == expected {
            prop_assert_eq!(fed.packets.first(), Some(&Packet { id, record: Bytes::copy_from_slice(record) }));
        } else {
            prop_assert!(fed.packets.is_empty());
            prop_assert_eq!(fed.error, Some(FrameError::RecordCrc { id, expected, found }));
        }
    }

    /// Every message decoder, on any record: no panic, and whatever is
    /// accepted re-encodes to exactly the same record (one encoding per
    /// message, so nothing a peer sent is silently reinterpreted).
    #[test]
    fn message_decoders_never_panic(record in arbitrary_record()) {
        if let Ok(req) = LbsRequest::decode(record.clone()) {
            prop_assert_eq!(frame_one(0, |out| req.encode(0, out))?.record, record.clone());
        }
        if let Ok(req) = KvldsRequest::decode(record.clone()) {
            prop_assert_eq!(frame_one(0, |out| req.encode(0, out))?.record, record.clone());
            // No record is both a kvlds and an lbs request.
            prop_assert!(LbsRequest::decode(record.clone()).is_err());
        }
        for kind in [
            LbsRequestKind::Params,
            LbsRequestKind::Params2,
            LbsRequestKind::Get,
            LbsRequestKind::Append,
            LbsRequestKind::Free,
        ] {
            if let Ok(resp) = LbsResponse::decode(kind, record.clone()) {
                prop_assert_eq!(frame_one(0, |out| resp.encode(0, out))?.record, record.clone());
            }
        }
        for kind in KvldsRequestKind::ALL {
            if let Ok(resp) = KvldsResponse::decode(kind, record.clone()) {
                prop_assert_eq!(frame_one(0, |out| resp.encode(0, out))?.record, record.clone());
            }
        }
    }
}
