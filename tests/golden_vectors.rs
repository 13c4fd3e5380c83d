//! Every golden vector of PROTOCOL.md, byte for byte: the three wire CRCs,
//! and each packet both encoded from its typed message and decoded back.
//! A mismatch here means every real kivaloo peer would drop the connection.
//!
//! Plus one insta snapshot of lbs packets (which PROTOCOL.md gives no
//! vectors for), so that any change of the lbs wire format is caught.

use bytes::{Bytes, BytesMut};
use kivaloo::crc::wire_crc;
use kivaloo::kvlds_proto::{KvldsRequest, KvldsRequestKind, KvldsResponse};
use kivaloo::lbs_proto::{LbsRequest, LbsRequestKind, LbsResponse, NO_LAST_BLOCK};
use kivaloo::packet::{Packet, PacketDecoder};
use std::fmt::Write as _;

fn hex(s: &str) -> Vec<u8> {
    assert_eq!(s.len() % 2, 0);
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Decodes `wire` as exactly one packet, fed whole and then byte by byte.
fn one_packet(wire: &[u8]) -> Packet {
    let mut d = PacketDecoder::new();
    d.push(wire);
    let p = d.next_packet().expect("valid packet").expect("a whole packet");
    assert_eq!(d.next_packet(), Ok(None));
    assert_eq!(d.buffered_len(), 0);

    let mut d = PacketDecoder::new();
    for (i, b) in wire.iter().enumerate() {
        d.push(&[*b]);
        let got = d.next_packet().expect("valid packet");
        if i + 1 < wire.len() {
            assert_eq!(got, None, "packet complete after {} of {} bytes", i + 1, wire.len());
        } else {
            assert_eq!(got.as_ref(), Some(&p));
        }
    }
    p
}

fn kvlds_request(id: u64, req: KvldsRequest, golden: &str) {
    let mut out = BytesMut::new();
    req.encode(id, &mut out);
    assert_eq!(to_hex(&out), golden, "encoding of {req:?}");
    let p = one_packet(&hex(golden));
    assert_eq!(p.id, id);
    assert_eq!(KvldsRequest::decode(p.record), Ok(req));
}

fn kvlds_response(id: u64, kind: KvldsRequestKind, resp: KvldsResponse, golden: &str) {
    let mut out = BytesMut::new();
    resp.encode(id, &mut out);
    assert_eq!(to_hex(&out), golden, "encoding of {resp:?}");
    let p = one_packet(&hex(golden));
    assert_eq!(p.id, id);
    assert_eq!(KvldsResponse::decode(kind, p.record), Ok(resp));
}

#[test]
fn crc_of_nothing() {
    assert_eq!(wire_crc(b""), 0x82F6_3B78);
    assert_eq!(wire_crc(b"").to_le_bytes(), [0x78, 0x3b, 0xf6, 0x82]);
}

#[test]
fn crc_of_a() {
    assert_eq!(wire_crc(b"a"), 0x686E_EA98);
    assert_eq!(wire_crc(b"a").to_le_bytes(), [0x98, 0xea, 0x6e, 0x68]);
}

#[test]
fn crc_of_123456789() {
    assert_eq!(wire_crc(b"123456789"), 0x22FC_9104);
    assert_eq!(wire_crc(b"123456789").to_le_bytes(), [0x04, 0x91, 0xfc, 0x22]);
    // Not the textbook CRC-32C (0xE3069283), nor IEEE CRC-32 (0xCBF43926).
    assert_ne!(wire_crc(b"123456789"), 0xE306_9283);
    assert_ne!(wire_crc(b"123456789"), 0xCBF4_3926);
}

#[test]
fn kvlds_params_request() {
    kvlds_request(
        0x0102_0304_0506_0708,
        KvldsRequest::Params,
        "0102030405060708000000045e9c6c1d0000010075d16c60",
    );
}

#[test]
fn kvlds_set_request() {
    kvlds_request(
        7,
        KvldsRequest::Set { key: Bytes::from_static(b"k"), value: Bytes::from_static(b"v") },
        "00000000000000070000000893bc173a00000110016b0176e3b7ed91",
    );
}

#[test]
fn status_0_response() {
    let golden = "00000000000000070000000443735477000000001fa6f619";
    // As the answer to every modifying kvlds request...
    for kind in [
        KvldsRequestKind::Set,
        KvldsRequestKind::Cas,
        KvldsRequestKind::Add,
        KvldsRequestKind::Modify,
        KvldsRequestKind::Delete,
        KvldsRequestKind::Cad,
    ] {
        kvlds_response(7, kind, KvldsResponse::Done(true), golden);
    }
    // ...and, being the same bytes, to an lbs FREE.
    let mut out = BytesMut::new();
    LbsResponse::Free.encode(7, &mut out);
    assert_eq!(to_hex(&out), golden);
    assert_eq!(
        LbsResponse::decode(LbsRequestKind::Free, one_packet(&hex(golden)).record),
        Ok(LbsResponse::Free)
    );
}

#[test]
fn kvlds_params_response() {
    kvlds_response(
        0x0102_0304_0506_0708,
        KvldsRequestKind::Params,
        KvldsResponse::Params { max_key_len: 64, max_value_len: 96 },
        "0102030405060708000000088e532f500000004000000060a9afd0a0",
    );
}

#[test]
fn kvlds_get_request() {
    kvlds_request(
        9,
        KvldsRequest::Get { key: Bytes::from_static(b"k") },
        "000000000000000900000006cd696fc300000130016b31eb4f91",
    );
}

#[test]
fn kvlds_get_response() {
    kvlds_response(
        9,
        KvldsRequestKind::Get,
        KvldsResponse::Get(Some(Bytes::from_static(b"v"))),
        "000000000000000900000006cd696fc3000000000176ab4c9a72",
    );
}

/// Renders a packet for the snapshot: each field of the frame on its own
/// line, and the record's first `record_prefix` bytes and last 8 bytes.
fn render_packet(wire: &[u8], record_prefix: usize) -> String {
    let mut s = String::new();
    let record = &wire[16..wire.len() - 4];
    writeln!(s, "total length: {} bytes", wire.len()).unwrap();
    writeln!(s, "request id:   {}", to_hex(&wire[0..8])).unwrap();
    writeln!(s, "record len:   {} ({})", to_hex(&wire[8..12]), record.len()).unwrap();
    writeln!(s, "header crc:   {}", to_hex(&wire[12..16])).unwrap();
    if record.len() <= record_prefix + 8 {
        writeln!(s, "record:       {}", to_hex(record)).unwrap();
    } else {
        writeln!(s, "record head:  {}", to_hex(&record[..record_prefix])).unwrap();
        writeln!(s, "record tail:  {}", to_hex(&record[record.len() - 8..])).unwrap();
    }
    writeln!(s, "trailer:      {}", to_hex(&wire[wire.len() - 4..])).unwrap();
    s
}

#[test]
fn lbs_wire_format_snapshot() {
    // APPEND of 2 blocks of 512 bytes at block 5; block i's bytes are
    // 0xb0 + i, except each block's last byte, which is its number.
    let mut data = vec![0u8; 1024];
    for (i, block) in data.chunks_mut(512).enumerate() {
        block.fill(0xb0 + i as u8);
        block[511] = i as u8;
    }
    let append = LbsRequest::Append { count: 2, start: 5, data: Bytes::from(data) };
    let mut append_wire = BytesMut::new();
    append.encode(0x1122_3344_5566_7788, &mut append_wire);
    assert_eq!(LbsRequest::decode(one_packet(&append_wire).record), Ok(append));

    let params2 = LbsResponse::Params2 { block_size: 4096, next_block: 0, last_block: NO_LAST_BLOCK };
    let mut params2_wire = BytesMut::new();
    params2.encode(1, &mut params2_wire);
    assert_eq!(LbsResponse::decode(LbsRequestKind::Params2, one_packet(&params2_wire).record), Ok(params2));

    let rendering = format!(
        "lbs APPEND, id 0x1122334455667788, 2 blocks of 512 bytes from block 5:\n{}\n\
         lbs PARAMS2 response, id 1, block size 4096, next 0, last 2^64-1:\n{}",
        render_packet(&append_wire, 24),
        render_packet(&params2_wire, 24),
    );
    insta::assert_snapshot!(rendering);
}
