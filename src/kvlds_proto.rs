//! Typed kvlds (key-value store) requests and responses, and their records.
//!
//! Record layouts are PROTOCOL.md's "Key-value store (kvlds) requests"
//! table. Keys and values are kvlds strings: one length byte, then 0..=255
//! bytes. Decoded keys and values are slices of the record (`Bytes`), not
//! copies.

use bytes::{BufMut, Bytes, BytesMut};

use crate::fields::{FieldReader, MessageError};
use crate::packet::encode_packet_with;

/// Request type codes.
pub mod request_type {
    /// PARAMS: maximum key and value lengths.
    pub const PARAMS: u32 = 0x0000_0100;
    /// SET a key's value.
    pub const SET: u32 = 0x0000_0110;
    /// CAS: set a key's value if its current value is the given one.
    pub const CAS: u32 = 0x0000_0111;
    /// ADD: set a key's value if the key is absent.
    pub const ADD: u32 = 0x0000_0112;
    /// MODIFY: set a key's value if the key is present.
    pub const MODIFY: u32 = 0x0000_0113;
    /// DELETE a key.
    pub const DELETE: u32 = 0x0000_0120;
    /// CAD: delete a key if its current value is the given one.
    pub const CAD: u32 = 0x0000_0121;
    /// GET a key's value.
    pub const GET: u32 = 0x0000_0130;
    /// RANGE: list the pairs with start <= key < end.
    pub const RANGE: u32 = 0x0000_0131;
}

/// The longest key or value the encoding can carry (one length byte).
pub const SHORT_STRING_LEN_MAX: usize = 255;

/// The longest kvlds request record: CAS, with its type and three
/// 255-byte strings. A server can frame requests with this bound.
pub const REQUEST_RECORD_LEN_MAX: usize = 4 + 3 * (1 + SHORT_STRING_LEN_MAX);

/// The kind of a kvlds request, which is what a requester needs to know to
/// decode the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvldsRequestKind {
    /// PARAMS.
    Params,
    /// SET.
    Set,
    /// CAS.
    Cas,
    /// ADD.
    Add,
    /// MODIFY.
    Modify,
    /// DELETE.
    Delete,
    /// CAD.
    Cad,
    /// GET.
    Get,
    /// RANGE.
    Range,
}

impl KvldsRequestKind {
    /// Every kind, in request type order.
    pub const ALL: [KvldsRequestKind; 9] = [
        KvldsRequestKind::Params,
        KvldsRequestKind::Set,
        KvldsRequestKind::Cas,
        KvldsRequestKind::Add,
        KvldsRequestKind::Modify,
        KvldsRequestKind::Delete,
        KvldsRequestKind::Cad,
        KvldsRequestKind::Get,
        KvldsRequestKind::Range,
    ];

    /// The request type code that begins a request of this kind.
    pub fn request_type(self) -> u32 {
        match self {
            KvldsRequestKind::Params => request_type::PARAMS,
            KvldsRequestKind::Set => request_type::SET,
            KvldsRequestKind::Cas => request_type::CAS,
            KvldsRequestKind::Add => request_type::ADD,
            KvldsRequestKind::Modify => request_type::MODIFY,
            KvldsRequestKind::Delete => request_type::DELETE,
            KvldsRequestKind::Cad => request_type::CAD,
            KvldsRequestKind::Get => request_type::GET,
            KvldsRequestKind::Range => request_type::RANGE,
        }
    }

    /// Whether requests of this kind modify the store (SET, CAS, ADD,
    /// MODIFY, DELETE, CAD), as opposed to PARAMS, GET and RANGE.
    pub fn is_modifying(self) -> bool {
        match self {
            KvldsRequestKind::Set
            | KvldsRequestKind::Cas
            | KvldsRequestKind::Add
            | KvldsRequestKind::Modify
            | KvldsRequestKind::Delete
            | KvldsRequestKind::Cad => true,
            KvldsRequestKind::Params | KvldsRequestKind::Get | KvldsRequestKind::Range => false,
        }
    }
}

/// A kvlds request. Every key and value is at most
/// [`SHORT_STRING_LEN_MAX`] bytes (the encoding allows no more; whether it
/// is within the store's own, smaller limits is the store's to check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvldsRequest {
    /// The maximum key and value lengths.
    Params,
    /// Set `key` to `value`.
    Set { key: Bytes, value: Bytes },
    /// Set `key` to `new_value` if its current value is `old_value`.
    Cas { key: Bytes, old_value: Bytes, new_value: Bytes },
    /// Set `key` to `value` if `key` is absent.
    Add { key: Bytes, value: Bytes },
    /// Set `key` to `value` if `key` is present.
    Modify { key: Bytes, value: Bytes },
    /// Delete `key` (whether or not it is present).
    Delete { key: Bytes },
    /// Delete `key` if its current value is `old_value`.
    Cad { key: Bytes, old_value: Bytes },
    /// The value of `key`.
    Get { key: Bytes },
    /// The pairs with `start <= key < end` (an empty `end` is past the last
    /// key), in key order, about `max_bytes` of them.
    Range { max_bytes: u32, start: Bytes, end: Bytes },
}

impl KvldsRequest {
    /// The kind of this request.
    pub fn kind(&self) -> KvldsRequestKind {
        match self {
            KvldsRequest::Params => KvldsRequestKind::Params,
            KvldsRequest::Set { .. } => KvldsRequestKind::Set,
            KvldsRequest::Cas { .. } => KvldsRequestKind::Cas,
            KvldsRequest::Add { .. } => KvldsRequestKind::Add,
            KvldsRequest::Modify { .. } => KvldsRequestKind::Modify,
            KvldsRequest::Delete { .. } => KvldsRequestKind::Delete,
            KvldsRequest::Cad { .. } => KvldsRequestKind::Cad,
            KvldsRequest::Get { .. } => KvldsRequestKind::Get,
            KvldsRequest::Range { .. } => KvldsRequestKind::Range,
        }
    }

    /// Whether this request modifies the store (see
    /// [`KvldsRequestKind::is_modifying`]).
    pub fn is_modifying(&self) -> bool {
        self.kind().is_modifying()
    }

    /// Why this request is over a store's limits (a key longer than
    /// `key_len_max` or a value longer than `value_len_max`), if it is a
    /// modifying request and is. kvlds drops a connection that sends one;
    /// reads are never over the limits (a GET of a longer key finds
    /// nothing).
    pub fn over_limits(&self, key_len_max: usize, value_len_max: usize) -> Option<String> {
        let (key, values): (&Bytes, [Option<&Bytes>; 2]) = match self {
            KvldsRequest::Set { key, value }
            | KvldsRequest::Add { key, value }
            | KvldsRequest::Modify { key, value } => (key, [Some(value), None]),
            KvldsRequest::Cas { key, old_value, new_value } => (key, [Some(old_value), Some(new_value)]),
            KvldsRequest::Cad { key, old_value } => (key, [Some(old_value), None]),
            KvldsRequest::Delete { key } => (key, [None, None]),
            KvldsRequest::Params | KvldsRequest::Get { .. } | KvldsRequest::Range { .. } => return None,
        };
        if key.len() > key_len_max {
            return Some(format!("key of {} bytes is over the limit of {key_len_max}", key.len()));
        }
        values
            .into_iter()
            .flatten()
            .find(|v| v.len() > value_len_max)
            .map(|v| format!("value of {} bytes is over the limit of {value_len_max}", v.len()))
    }

    /// Decodes a request record. Keys and values are slices of `record`.
    ///
    /// # Errors
    /// [`MessageError::Truncated`] if the record ends inside a field,
    /// [`MessageError::TrailingBytes`] if bytes follow the last field, and
    /// [`MessageError::UnknownRequestType`] for any type that is not a kvlds
    /// request (lbs request types included).
    pub fn decode(record: Bytes) -> Result<Self, MessageError> {
        let mut r = FieldReader::new(record);
        let request_type = r.u32("request type")?;
        let (req, name) = match request_type {
            request_type::PARAMS => (KvldsRequest::Params, "kvlds PARAMS"),
            request_type::SET => {
                let key = r.short_string("key")?;
                let value = r.short_string("value")?;
                (KvldsRequest::Set { key, value }, "kvlds SET")
            }
            request_type::CAS => {
                let key = r.short_string("key")?;
                let old_value = r.short_string("old value")?;
                let new_value = r.short_string("new value")?;
                (KvldsRequest::Cas { key, old_value, new_value }, "kvlds CAS")
            }
            request_type::ADD => {
                let key = r.short_string("key")?;
                let value = r.short_string("value")?;
                (KvldsRequest::Add { key, value }, "kvlds ADD")
            }
            request_type::MODIFY => {
                let key = r.short_string("key")?;
                let value = r.short_string("value")?;
                (KvldsRequest::Modify { key, value }, "kvlds MODIFY")
            }
            request_type::DELETE => (KvldsRequest::Delete { key: r.short_string("key")? }, "kvlds DELETE"),
            request_type::CAD => {
                let key = r.short_string("key")?;
                let old_value = r.short_string("old value")?;
                (KvldsRequest::Cad { key, old_value }, "kvlds CAD")
            }
            request_type::GET => (KvldsRequest::Get { key: r.short_string("key")? }, "kvlds GET"),
            request_type::RANGE => {
                let max_bytes = r.u32("max bytes")?;
                let start = r.short_string("start key")?;
                let end = r.short_string("end key")?;
                (KvldsRequest::Range { max_bytes, start, end }, "kvlds RANGE")
            }
            other => return Err(MessageError::UnknownRequestType(other)),
        };
        r.finish(name)?;
        Ok(req)
    }

    /// Appends this request as a packet with request ID `id`.
    ///
    /// # Panics
    /// If a key or value is longer than [`SHORT_STRING_LEN_MAX`] bytes: a
    /// programmer error (the caller must check lengths before building the
    /// request).
    pub fn encode(&self, id: u64, out: &mut BytesMut) {
        encode_packet_with(out, id, |o| {
            o.put_u32(self.kind().request_type());
            match self {
                KvldsRequest::Params => {}
                KvldsRequest::Set { key, value }
                | KvldsRequest::Add { key, value }
                | KvldsRequest::Modify { key, value } => {
                    put_short_string(o, "key", key);
                    put_short_string(o, "value", value);
                }
                KvldsRequest::Cas { key, old_value, new_value } => {
                    put_short_string(o, "key", key);
                    put_short_string(o, "old value", old_value);
                    put_short_string(o, "new value", new_value);
                }
                KvldsRequest::Delete { key } | KvldsRequest::Get { key } => put_short_string(o, "key", key),
                KvldsRequest::Cad { key, old_value } => {
                    put_short_string(o, "key", key);
                    put_short_string(o, "old value", old_value);
                }
                KvldsRequest::Range { max_bytes, start, end } => {
                    o.put_u32(*max_bytes);
                    put_short_string(o, "start key", start);
                    put_short_string(o, "end key", end);
                }
            }
        });
    }
}

/// A kvlds response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvldsResponse {
    /// PARAMS: the longest key and the longest value the store accepts.
    Params { max_key_len: u32, max_value_len: u32 },
    /// The status of a modifying request: `Done(true)` is status 0 (the
    /// change was made), `Done(false)` is status 1 (CAS, ADD, MODIFY or CAD
    /// whose condition did not hold: nothing changed). SET and DELETE are
    /// always answered `Done(true)`.
    Done(bool),
    /// GET: the key's value, or `None` (status 1) if the key is absent.
    Get(Option<Bytes>),
    /// RANGE: the pairs found, in key order, and `next`, such that every
    /// key in `[start, next)` was returned (an empty `next` is past the last
    /// key).
    Range { next: Bytes, pairs: Vec<(Bytes, Bytes)> },
}

impl KvldsResponse {
    /// Decodes the response record to a request of kind `kind`. Values and
    /// keys are slices of `record`.
    ///
    /// # Errors
    /// [`MessageError::Truncated`] if the record ends inside a field,
    /// [`MessageError::TrailingBytes`] if bytes follow the last field, and
    /// [`MessageError::BadStatus`] for a status the protocol does not define
    /// for `kind` (anything but 0 for SET, DELETE and RANGE; anything but 0
    /// or 1 for CAS, ADD, MODIFY, CAD and GET).
    pub fn decode(kind: KvldsRequestKind, record: Bytes) -> Result<Self, MessageError> {
        let mut r = FieldReader::new(record);
        let (resp, name) = match kind {
            KvldsRequestKind::Params => {
                let max_key_len = r.u32("max key length")?;
                let max_value_len = r.u32("max value length")?;
                (KvldsResponse::Params { max_key_len, max_value_len }, "kvlds PARAMS response")
            }
            KvldsRequestKind::Set => (decode_done(&mut r, "kvlds SET", false)?, "kvlds SET response"),
            KvldsRequestKind::Delete => {
                (decode_done(&mut r, "kvlds DELETE", false)?, "kvlds DELETE response")
            }
            KvldsRequestKind::Cas => (decode_done(&mut r, "kvlds CAS", true)?, "kvlds CAS response"),
            KvldsRequestKind::Add => (decode_done(&mut r, "kvlds ADD", true)?, "kvlds ADD response"),
            KvldsRequestKind::Modify => (decode_done(&mut r, "kvlds MODIFY", true)?, "kvlds MODIFY response"),
            KvldsRequestKind::Cad => (decode_done(&mut r, "kvlds CAD", true)?, "kvlds CAD response"),
            KvldsRequestKind::Get => match r.u32("status")? {
                0 => (KvldsResponse::Get(Some(r.short_string("value")?)), "kvlds GET response"),
                1 => (KvldsResponse::Get(None), "kvlds GET response"),
                status => return Err(MessageError::BadStatus { message: "kvlds GET", status }),
            },
            KvldsRequestKind::Range => {
                match r.u32("status")? {
                    0 => {}
                    status => return Err(MessageError::BadStatus { message: "kvlds RANGE", status }),
                }
                let pair_count = r.u32("pair count")?;
                let next = r.short_string("next key")?;
                // The count is the peer's word: reserve no more than the
                // record can hold (a pair takes at least two length bytes).
                let capacity = (pair_count as usize).min(r.remaining() / 2);
                let mut pairs = Vec::with_capacity(capacity);
                for _ in 0..pair_count {
                    let key = r.short_string("key")?;
                    let value = r.short_string("value")?;
                    pairs.push((key, value));
                }
                (KvldsResponse::Range { next, pairs }, "kvlds RANGE response")
            }
        };
        r.finish(name)?;
        Ok(resp)
    }

    /// Appends this response as a packet with request ID `id`.
    ///
    /// # Panics
    /// If a key or value is longer than [`SHORT_STRING_LEN_MAX`] bytes, or a
    /// RANGE response has more than `u32::MAX` pairs or a record over
    /// [`crate::packet::RECORD_LEN_MAX`]: programmer errors.
    pub fn encode(&self, id: u64, out: &mut BytesMut) {
        encode_packet_with(out, id, |o| match self {
            KvldsResponse::Params { max_key_len, max_value_len } => {
                o.put_u32(*max_key_len);
                o.put_u32(*max_value_len);
            }
            KvldsResponse::Done(done) => o.put_u32(if *done { 0 } else { 1 }),
            KvldsResponse::Get(Some(value)) => {
                o.put_u32(0);
                put_short_string(o, "value", value);
            }
            KvldsResponse::Get(None) => o.put_u32(1),
            KvldsResponse::Range { next, pairs } => {
                let pair_count = u32::try_from(pairs.len()).expect("RANGE response with over u32::MAX pairs");
                let len: usize =
                    9 + next.len() + pairs.iter().map(|(k, v)| 2 + k.len() + v.len()).sum::<usize>();
                o.reserve(len);
                o.put_u32(0);
                o.put_u32(pair_count);
                put_short_string(o, "next key", next);
                for (key, value) in pairs {
                    put_short_string(o, "key", key);
                    put_short_string(o, "value", value);
                }
            }
        });
    }
}

/// Reads the status of a modifying request's response: 0 is `Done(true)`,
/// 1 is `Done(false)` if `may_fail`, anything else is
/// [`MessageError::BadStatus`].
fn decode_done(
    r: &mut FieldReader,
    message: &'static str,
    may_fail: bool,
) -> Result<KvldsResponse, MessageError> {
    match r.u32("status")? {
        0 => Ok(KvldsResponse::Done(true)),
        1 if may_fail => Ok(KvldsResponse::Done(false)),
        status => Err(MessageError::BadStatus { message, status }),
    }
}

/// Writes a kvlds string: one length byte, then `s`.
///
/// # Panics
/// If `s` is longer than [`SHORT_STRING_LEN_MAX`] bytes (a programmer
/// error; `field` names it in the message).
fn put_short_string(o: &mut BytesMut, field: &str, s: &[u8]) {
    assert!(
        s.len() <= SHORT_STRING_LEN_MAX,
        "kvlds {field} of {} bytes is over the {SHORT_STRING_LEN_MAX}-byte maximum",
        s.len()
    );
    o.put_u8(s.len() as u8);
    o.extend_from_slice(s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{Packet, PacketDecoder};

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// Decodes exactly one packet from `wire`, checking nothing is left.
    fn one_packet(wire: &[u8]) -> Packet {
        let mut d = PacketDecoder::new();
        d.push(wire);
        let p = d.next_packet().unwrap().expect("a whole packet");
        assert_eq!(d.next_packet(), Ok(None));
        assert_eq!(d.buffered_len(), 0);
        p
    }

    fn check_request(id: u64, req: KvldsRequest, golden: &str) {
        let mut out = BytesMut::new();
        req.encode(id, &mut out);
        assert_eq!(&out[..], &hex(golden)[..], "encoding of {req:?}");
        let p = one_packet(&hex(golden));
        assert_eq!(p.id, id);
        assert_eq!(KvldsRequest::decode(p.record).unwrap(), req);
    }

    fn check_response(id: u64, kind: KvldsRequestKind, resp: KvldsResponse, golden: &str) {
        let mut out = BytesMut::new();
        resp.encode(id, &mut out);
        assert_eq!(&out[..], &hex(golden)[..], "encoding of {resp:?}");
        let p = one_packet(&hex(golden));
        assert_eq!(p.id, id);
        assert_eq!(KvldsResponse::decode(kind, p.record).unwrap(), resp);
    }

    #[test]
    fn golden_params_request() {
        check_request(
            0x0102_0304_0506_0708,
            KvldsRequest::Params,
            "0102030405060708000000045e9c6c1d0000010075d16c60",
        );
    }

    #[test]
    fn golden_set_request() {
        check_request(
            7,
            KvldsRequest::Set { key: Bytes::from_static(b"k"), value: Bytes::from_static(b"v") },
            "00000000000000070000000893bc173a00000110016b0176e3b7ed91",
        );
    }

    #[test]
    fn golden_status_0_response() {
        let golden = "00000000000000070000000443735477000000001fa6f619";
        for kind in KvldsRequestKind::ALL.into_iter().filter(|k| k.is_modifying()) {
            check_response(7, kind, KvldsResponse::Done(true), golden);
        }
    }

    #[test]
    fn golden_params_response() {
        check_response(
            0x0102_0304_0506_0708,
            KvldsRequestKind::Params,
            KvldsResponse::Params { max_key_len: 64, max_value_len: 96 },
            "0102030405060708000000088e532f500000004000000060a9afd0a0",
        );
    }

    #[test]
    fn golden_get_request() {
        check_request(
            9,
            KvldsRequest::Get { key: Bytes::from_static(b"k") },
            "000000000000000900000006cd696fc300000130016b31eb4f91",
        );
    }

    #[test]
    fn golden_get_response() {
        check_response(
            9,
            KvldsRequestKind::Get,
            KvldsResponse::Get(Some(Bytes::from_static(b"v"))),
            "000000000000000900000006cd696fc3000000000176ab4c9a72",
        );
    }

    #[test]
    fn request_errors() {
        let rec = |b: &[u8]| Bytes::copy_from_slice(b);
        // lbs request types are not kvlds requests.
        for t in 0u32..=4 {
            assert_eq!(KvldsRequest::decode(rec(&t.to_be_bytes())), Err(MessageError::UnknownRequestType(t)));
        }
        assert_eq!(KvldsRequest::decode(rec(&[0, 0, 1, 0x14])), Err(MessageError::UnknownRequestType(0x114)));
        assert!(matches!(
            KvldsRequest::decode(rec(&[0, 0, 1])),
            Err(MessageError::Truncated { field: "request type", .. })
        ));
        // SET whose value length says 2 but only 1 byte follows.
        assert!(matches!(
            KvldsRequest::decode(rec(&[0, 0, 1, 0x10, 1, b'k', 2, b'v'])),
            Err(MessageError::Truncated { field: "value", needed: 2, remaining: 1 })
        ));
        // SET with no value at all.
        assert!(matches!(
            KvldsRequest::decode(rec(&[0, 0, 1, 0x10, 1, b'k'])),
            Err(MessageError::Truncated { field: "value", .. })
        ));
        assert_eq!(
            KvldsRequest::decode(rec(&[0, 0, 1, 0x30, 1, b'k', 0])),
            Err(MessageError::TrailingBytes { message: "kvlds GET", trailing: 1 })
        );
        assert_eq!(
            KvldsRequest::decode(rec(&[0, 0, 1, 0, 0])),
            Err(MessageError::TrailingBytes { message: "kvlds PARAMS", trailing: 1 })
        );
    }

    #[test]
    fn request_kinds_and_modifying() {
        let k = Bytes::from_static(b"k");
        let reqs = [
            KvldsRequest::Params,
            KvldsRequest::Set { key: k.clone(), value: k.clone() },
            KvldsRequest::Cas { key: k.clone(), old_value: k.clone(), new_value: k.clone() },
            KvldsRequest::Add { key: k.clone(), value: k.clone() },
            KvldsRequest::Modify { key: k.clone(), value: k.clone() },
            KvldsRequest::Delete { key: k.clone() },
            KvldsRequest::Cad { key: k.clone(), old_value: k.clone() },
            KvldsRequest::Get { key: k.clone() },
            KvldsRequest::Range { max_bytes: 1, start: k.clone(), end: k },
        ];
        let modifying: Vec<bool> = reqs.iter().map(KvldsRequest::is_modifying).collect();
        assert_eq!(modifying, [false, true, true, true, true, true, true, false, false]);
        let kinds: Vec<KvldsRequestKind> = reqs.iter().map(KvldsRequest::kind).collect();
        assert_eq!(kinds, KvldsRequestKind::ALL);
        for req in &reqs {
            let mut out = BytesMut::new();
            req.encode(1, &mut out);
            let p = one_packet(&out);
            assert_eq!(&p.record[..4], &req.kind().request_type().to_be_bytes());
        }
    }

    #[test]
    fn response_errors() {
        let rec = |b: &[u8]| Bytes::copy_from_slice(b);
        for kind in [KvldsRequestKind::Set, KvldsRequestKind::Delete, KvldsRequestKind::Range] {
            assert!(matches!(
                KvldsResponse::decode(kind, rec(&[0, 0, 0, 1])),
                Err(MessageError::BadStatus { status: 1, .. })
            ));
        }
        for kind in [KvldsRequestKind::Cas, KvldsRequestKind::Cad, KvldsRequestKind::Get] {
            assert!(matches!(
                KvldsResponse::decode(kind, rec(&[0, 0, 0, 2])),
                Err(MessageError::BadStatus { status: 2, .. })
            ));
        }
        assert_eq!(
            KvldsResponse::decode(KvldsRequestKind::Add, rec(&[0, 0, 0, 1])),
            Ok(KvldsResponse::Done(false))
        );
        assert_eq!(
            KvldsResponse::decode(KvldsRequestKind::Get, rec(&[0, 0, 0, 1])),
            Ok(KvldsResponse::Get(None))
        );
        // Absent GET with a value after it.
        assert!(matches!(
            KvldsResponse::decode(KvldsRequestKind::Get, rec(&[0, 0, 0, 1, 0])),
            Err(MessageError::TrailingBytes { trailing: 1, .. })
        ));
        // Present GET with no value.
        assert!(matches!(
            KvldsResponse::decode(KvldsRequestKind::Get, rec(&[0, 0, 0, 0])),
            Err(MessageError::Truncated { field: "value", .. })
        ));
        assert!(matches!(
            KvldsResponse::decode(KvldsRequestKind::Params, rec(&[0, 0, 0, 64, 0, 0, 0])),
            Err(MessageError::Truncated { field: "max value length", .. })
        ));
    }

    #[test]
    fn range_response_layout_and_huge_count() {
        let resp = KvldsResponse::Range {
            next: Bytes::from_static(b"c"),
            pairs: vec![
                (Bytes::from_static(b"a"), Bytes::from_static(b"1")),
                (Bytes::from_static(b"b"), Bytes::new()),
            ],
        };
        let mut out = BytesMut::new();
        resp.encode(3, &mut out);
        let p = one_packet(&out);
        assert_eq!(&p.record[..], &[0, 0, 0, 0, 0, 0, 0, 2, 1, b'c', 1, b'a', 1, b'1', 1, b'b', 0]);
        assert_eq!(KvldsResponse::decode(KvldsRequestKind::Range, p.record).unwrap(), resp);

        // A pair count of 2^32 - 1 with two bytes of pairs is refused as
        // truncated, without reserving room for four billion pairs.
        let record = rec_range(u32::MAX, &[0, 0]);
        assert!(matches!(
            KvldsResponse::decode(KvldsRequestKind::Range, record),
            Err(MessageError::Truncated { field: "key", .. })
        ));
        // Fewer pairs than announced leaves bytes over.
        assert!(matches!(
            KvldsResponse::decode(KvldsRequestKind::Range, rec_range(0, &[0, 0])),
            Err(MessageError::TrailingBytes { trailing: 2, .. })
        ));
    }

    fn rec_range(pair_count: u32, pairs: &[u8]) -> Bytes {
        let mut r = vec![0, 0, 0, 0];
        r.extend_from_slice(&pair_count.to_be_bytes());
        r.push(0); // empty next key
        r.extend_from_slice(pairs);
        Bytes::from(r)
    }

    #[test]
    #[should_panic(expected = "kvlds value of 256 bytes is over the 255-byte maximum")]
    fn encoding_an_over_long_value_is_a_programmer_error() {
        let req = KvldsRequest::Set { key: Bytes::from_static(b"k"), value: Bytes::from(vec![0u8; 256]) };
        req.encode(1, &mut BytesMut::new());
    }

    #[test]
    #[should_panic(expected = "kvlds key of 256 bytes")]
    fn encoding_an_over_long_range_key_is_a_programmer_error() {
        let resp = KvldsResponse::Range {
            next: Bytes::new(),
            pairs: vec![(Bytes::from(vec![0u8; 256]), Bytes::new())],
        };
        resp.encode(1, &mut BytesMut::new());
    }

    #[test]
    fn longest_strings_round_trip() {
        let long = Bytes::from(vec![0xa5u8; 255]);
        let req = KvldsRequest::Cas { key: long.clone(), old_value: long.clone(), new_value: long };
        let mut out = BytesMut::new();
        req.encode(u64::MAX, &mut out);
        let p = one_packet(&out);
        assert_eq!(p.record.len(), 4 + 3 * 256);
        assert_eq!(KvldsRequest::decode(p.record).unwrap(), req);
    }
}
