//! The client side of one kvlds connection, as a state machine: it chooses
//! request IDs, validates and encodes requests into one outgoing buffer
//! (many pipelined requests per write), and matches responses, which may
//! arrive in any order, to the requests by ID.
//!
//! It performs no I/O: the caller writes what [`ClientConn::take_outgoing`]
//! returns, feeds what it reads to [`ClientConn::receive`], takes responses
//! from [`ClientConn::next_response`], and reports the end of the connection
//! with [`ClientConn::connection_lost`]. An async client, a simulator or any
//! other runtime can drive it.
//!
//! # Example
//!
//! ```
//! use bytes::{Bytes, BytesMut};
//! use kivaloo::client::ClientConn;
//! use kivaloo::kvlds_proto::{KvldsRequest, KvldsResponse};
//! use kivaloo::packet::PacketDecoder;
//!
//! let mut conn = ClientConn::new(64);
//! let set = KvldsRequest::Set { key: Bytes::from_static(b"k"), value: Bytes::from_static(b"v") };
//! let get = KvldsRequest::Get { key: Bytes::from_static(b"k") };
//! let set_id = conn.send(&set).unwrap();
//! let get_id = conn.send(&get).unwrap();
//! assert_eq!(conn.in_flight(), 2);
//!
//! // Both requests go out in one buffer; here a pretend server reads them...
//! let wire = conn.take_outgoing().unwrap();
//! let mut server = PacketDecoder::new();
//! server.push(&wire);
//! let p1 = server.next_packet().unwrap().unwrap();
//! let p2 = server.next_packet().unwrap().unwrap();
//! assert_eq!((p1.id, p2.id), (set_id, get_id));
//!
//! // ...and answers the GET first.
//! let mut answers = BytesMut::new();
//! KvldsResponse::Get(Some(Bytes::from_static(b"v"))).encode(get_id, &mut answers);
//! KvldsResponse::Done(true).encode(set_id, &mut answers);
//! conn.receive(&answers);
//! assert_eq!(
//!     conn.next_response().unwrap(),
//!     Some((get_id, KvldsResponse::Get(Some(Bytes::from_static(b"v")))))
//! );
//! assert_eq!(conn.next_response().unwrap(), Some((set_id, KvldsResponse::Done(true))));
//! assert_eq!(conn.next_response().unwrap(), None);
//! assert_eq!(conn.in_flight(), 0);
//! ```

use std::collections::BTreeMap;
use std::fmt;

use bytes::{Bytes, BytesMut};

use crate::fields::MessageError;
use crate::kvlds_proto::{KvldsRequest, KvldsRequestKind, KvldsResponse, SHORT_STRING_LEN_MAX};
use crate::packet::{FrameError, PacketDecoder};

/// A request ID, as carried in the packet header.
pub type RequestId = u64;

/// The number of requests kivaloo's own clients keep in flight on one
/// connection, and a good default window.
pub const DEFAULT_IN_FLIGHT_MAX: usize = 4096;

/// The largest RANGE byte budget a [`ClientConn`] sends (1 MiB, the most
/// kvlds returns in one RANGE anyway). Asking for more could bring a
/// response over [`RESPONSE_RECORD_LEN_MAX`] from a server that honours it.
pub const RANGE_MAX_BYTES: u32 = 1 << 20;

/// The longest response record a [`ClientConn`] accepts: 2 MiB + 64 KiB.
///
/// The longest kvlds response is a RANGE: at most [`RANGE_MAX_BYTES`] of
/// pairs (each counted with its two length bytes), plus the one pair it may
/// return beyond its budget (at most 512 bytes), plus 264 bytes of status,
/// count and `next`. Twice the budget leaves room for a server that counts
/// pair bytes differently. A header announcing a longer record breaks the
/// connection before any of the record is buffered.
pub const RESPONSE_RECORD_LEN_MAX: usize = (2 << 20) + (64 << 10);

/// Why [`ClientConn::send`] refused a request. Nothing was encoded or sent;
/// the connection is unaffected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// A key or value is longer than [`SHORT_STRING_LEN_MAX`] (255) bytes,
    /// which the protocol cannot carry.
    TooLong {
        /// Which field: "key", "value", "old value", "new value", "start key"
        /// or "end key".
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// A RANGE asking for more than [`RANGE_MAX_BYTES`].
    RangeBudgetTooLarge {
        /// The budget asked for.
        max_bytes: u32,
    },
    /// `in_flight_max` requests are already in flight (see
    /// [`ClientConn::can_send`]): wait for a response first.
    WindowFull {
        /// The window.
        in_flight_max: usize,
    },
    /// The connection is broken (a [`ProtocolError`] was returned) or was
    /// reported lost: a new connection needs a new `ClientConn`.
    Closed,
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::TooLong { field, len } => {
                write!(f, "kvlds {field} of {len} bytes is over the {SHORT_STRING_LEN_MAX}-byte maximum")
            }
            SendError::RangeBudgetTooLarge { max_bytes } => {
                write!(f, "RANGE budget of {max_bytes} bytes is over the maximum of {RANGE_MAX_BYTES}")
            }
            SendError::WindowFull { in_flight_max } => {
                write!(f, "{in_flight_max} requests are already in flight")
            }
            SendError::Closed => f.write_str("the connection is closed"),
        }
    }
}

impl std::error::Error for SendError {}

/// The server sent something that is not a valid answer. The connection is
/// broken: it is to be dropped, and the requests still in flight (see
/// [`ClientConn::connection_lost`]) are indeterminate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// The byte stream is not a valid sequence of packets.
    Frame(FrameError),
    /// A response carries an ID no request in flight has.
    UnknownId(RequestId),
    /// A response record does not decode as the answer to its request.
    BadResponse {
        /// The request's ID.
        id: RequestId,
        /// What the request was.
        kind: KvldsRequestKind,
        /// What is wrong with the record.
        error: MessageError,
    },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Frame(e) => write!(f, "invalid packet from the server: {e}"),
            ProtocolError::UnknownId(id) => {
                write!(f, "response with request ID {id:#x}, which no request in flight has")
            }
            ProtocolError::BadResponse { id, kind, error } => {
                write!(f, "invalid response to {kind:?} request {id:#x}: {error}")
            }
        }
    }
}

impl std::error::Error for ProtocolError {}

impl From<FrameError> for ProtocolError {
    fn from(e: FrameError) -> Self {
        ProtocolError::Frame(e)
    }
}

/// Checks that `req` can be encoded and is one a [`ClientConn`] sends: every
/// key and value at most [`SHORT_STRING_LEN_MAX`] bytes, a RANGE budget at
/// most [`RANGE_MAX_BYTES`].
///
/// # Errors
/// [`SendError::TooLong`] or [`SendError::RangeBudgetTooLarge`].
pub fn check_request(req: &KvldsRequest) -> Result<(), SendError> {
    let fields: &[(&'static str, &Bytes)] = match req {
        KvldsRequest::Params => &[],
        KvldsRequest::Set { key, value }
        | KvldsRequest::Add { key, value }
        | KvldsRequest::Modify { key, value } => &[("key", key), ("value", value)],
        KvldsRequest::Cas { key, old_value, new_value } => {
            &[("key", key), ("old value", old_value), ("new value", new_value)]
        }
        KvldsRequest::Delete { key } | KvldsRequest::Get { key } => &[("key", key)],
        KvldsRequest::Cad { key, old_value } => &[("key", key), ("old value", old_value)],
        KvldsRequest::Range { max_bytes, start, end } => {
            if *max_bytes > RANGE_MAX_BYTES {
                return Err(SendError::RangeBudgetTooLarge { max_bytes: *max_bytes });
            }
            &[("start key", start), ("end key", end)]
        }
    };
    match fields.iter().find(|(_, b)| b.len() > SHORT_STRING_LEN_MAX) {
        Some((field, b)) => Err(SendError::TooLong { field, len: b.len() }),
        None => Ok(()),
    }
}

/// One kvlds client connection's protocol state: request IDs, the requests
/// in flight, the bytes to send and the bytes received.
///
/// Bounds: at most `in_flight_max` requests in flight; the outgoing buffer
/// holds only requests sent and not yet taken (each at most 792 bytes); the
/// receive buffer holds at most one partial response (at most
/// [`RESPONSE_RECORD_LEN_MAX`] plus framing) plus whatever was received and
/// not yet taken with [`ClientConn::next_response`].
#[derive(Debug)]
pub struct ClientConn {
    in_flight_max: usize,
    next_id: RequestId,
    in_flight: BTreeMap<RequestId, KvldsRequestKind>,
    outgoing: BytesMut,
    decoder: PacketDecoder,
    /// The protocol error that broke the connection, returned forever.
    error: Option<ProtocolError>,
    /// Set by [`ClientConn::connection_lost`].
    lost: bool,
}

impl ClientConn {
    /// A connection allowing `in_flight_max` requests in flight at once,
    /// whose first request gets ID 0.
    ///
    /// # Panics
    /// If `in_flight_max` is 0.
    pub fn new(in_flight_max: usize) -> Self {
        Self::with_first_id(in_flight_max, 0)
    }

    /// Like [`ClientConn::new`], but the first request gets ID `first_id`
    /// (IDs then count up, wrapping, skipping any still in flight).
    ///
    /// # Panics
    /// If `in_flight_max` is 0.
    pub fn with_first_id(in_flight_max: usize, first_id: RequestId) -> Self {
        assert!(in_flight_max > 0, "a client connection needs a window of at least one request");
        ClientConn {
            in_flight_max,
            next_id: first_id,
            in_flight: BTreeMap::new(),
            outgoing: BytesMut::new(),
            decoder: PacketDecoder::with_record_len_max(RESPONSE_RECORD_LEN_MAX),
            error: None,
            lost: false,
        }
    }

    /// The most requests this connection has in flight at once.
    pub fn in_flight_max(&self) -> usize {
        self.in_flight_max
    }

    /// Requests sent (or queued to send) and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The kind of the request in flight with ID `id`, if any.
    pub fn in_flight_kind(&self, id: RequestId) -> Option<KvldsRequestKind> {
        self.in_flight.get(&id).copied()
    }

    /// Whether [`ClientConn::send`] would accept a valid request now: the
    /// window is not full and the connection is neither broken nor lost.
    pub fn can_send(&self) -> bool {
        !self.is_closed() && self.in_flight.len() < self.in_flight_max
    }

    /// Whether the connection is broken (a [`ProtocolError`] was returned)
    /// or was reported lost.
    pub fn is_closed(&self) -> bool {
        self.lost || self.error.is_some()
    }

    /// Validates `req` (see [`check_request`]), gives it an ID unique among
    /// the requests in flight, and appends it to the outgoing buffer.
    ///
    /// # Errors
    /// [`SendError`]: nothing was sent.
    pub fn send(&mut self, req: &KvldsRequest) -> Result<RequestId, SendError> {
        if self.is_closed() {
            return Err(SendError::Closed);
        }
        check_request(req)?;
        if self.in_flight.len() >= self.in_flight_max {
            return Err(SendError::WindowFull { in_flight_max: self.in_flight_max });
        }
        // Fewer than `in_flight_max` IDs are taken, so this ends.
        let mut id = self.next_id;
        while self.in_flight.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        req.encode(id, &mut self.outgoing);
        self.in_flight.insert(id, req.kind());
        Ok(id)
    }

    /// Bytes sent and not yet taken.
    pub fn outgoing_len(&self) -> usize {
        self.outgoing.len()
    }

    /// Takes every byte sent since the last call (all the requests sent
    /// since, in order, as one buffer), or `None` if there is none.
    pub fn take_outgoing(&mut self) -> Option<Bytes> {
        if self.outgoing.is_empty() {
            None
        } else {
            Some(self.outgoing.split().freeze())
        }
    }

    /// Appends bytes received from the server, in any split. Ignored once
    /// the connection is closed.
    pub fn receive(&mut self, data: &[u8]) {
        if !self.is_closed() {
            self.decoder.push(data);
        }
    }

    /// The next whole response received: the ID of the request it answers
    /// and the decoded response, which is no longer in flight. `Ok(None)`
    /// if more bytes are needed (or the connection was reported lost).
    ///
    /// Decoded keys and values share the receive buffer; copy any kept for
    /// long so as not to pin it.
    ///
    /// # Errors
    /// A [`ProtocolError`] if the server sent a bad packet, a response to an
    /// ID not in flight, or a record that is not a valid answer. The
    /// connection is then broken: this returns the same error forever and
    /// [`ClientConn::send`] refuses; drop the connection and call
    /// [`ClientConn::connection_lost`] for the requests it leaves
    /// indeterminate.
    pub fn next_response(&mut self) -> Result<Option<(RequestId, KvldsResponse)>, ProtocolError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.lost {
            return Ok(None);
        }
        let packet = match self.decoder.next_packet() {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(None),
            Err(e) => return Err(self.fail(ProtocolError::Frame(e))),
        };
        let Some(kind) = self.in_flight.remove(&packet.id) else {
            return Err(self.fail(ProtocolError::UnknownId(packet.id)));
        };
        match KvldsResponse::decode(kind, packet.record) {
            Ok(resp) => Ok(Some((packet.id, resp))),
            Err(error) => {
                // Still indeterminate: the server may have acted on it.
                self.in_flight.insert(packet.id, kind);
                Err(self.fail(ProtocolError::BadResponse { id: packet.id, kind, error }))
            }
        }
    }

    fn fail(&mut self, e: ProtocolError) -> ProtocolError {
        self.error = Some(e.clone());
        self.decoder = PacketDecoder::with_record_len_max(0);
        self.outgoing = BytesMut::new();
        e
    }

    /// The connection ended (closed by either side, or dropped after a
    /// [`ProtocolError`]): returns the requests that were in flight, in ID
    /// order, and forgets them. Their outcome is indeterminate: a modifying
    /// request ([`KvldsRequestKind::is_modifying`]) may or may not have
    /// taken effect; PARAMS, GET and RANGE changed nothing and may be
    /// retried. Afterwards [`ClientConn::send`] refuses and nothing more is
    /// received: a new connection needs a new `ClientConn`.
    pub fn connection_lost(&mut self) -> Vec<(RequestId, KvldsRequestKind)> {
        self.lost = true;
        self.outgoing = BytesMut::new();
        self.decoder = PacketDecoder::with_record_len_max(0);
        std::mem::take(&mut self.in_flight).into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvlds_proto::KvldsRequestKind as Kind;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn b(s: &'static [u8]) -> Bytes {
        Bytes::from_static(s)
    }

    fn response_bytes(id: RequestId, resp: &KvldsResponse) -> BytesMut {
        let mut out = BytesMut::new();
        resp.encode(id, &mut out);
        out
    }

    #[test]
    fn golden_set_request_and_response() {
        let mut c = ClientConn::with_first_id(4, 7);
        let id = c.send(&KvldsRequest::Set { key: b(b"k"), value: b(b"v") }).unwrap();
        assert_eq!(id, 7);
        assert_eq!(
            &c.take_outgoing().unwrap()[..],
            &hex("00000000000000070000000893bc173a00000110016b0176e3b7ed91")[..]
        );
        assert_eq!(c.take_outgoing(), None);
        c.receive(&hex("00000000000000070000000443735477000000001fa6f619"));
        assert_eq!(c.next_response(), Ok(Some((7, KvldsResponse::Done(true)))));
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn golden_params_request_and_response() {
        let mut c = ClientConn::with_first_id(4, 0x0102_0304_0506_0708);
        let id = c.send(&KvldsRequest::Params).unwrap();
        assert_eq!(id, 0x0102_0304_0506_0708);
        assert_eq!(
            &c.take_outgoing().unwrap()[..],
            &hex("0102030405060708000000045e9c6c1d0000010075d16c60")[..]
        );
        c.receive(&hex("0102030405060708000000088e532f500000004000000060a9afd0a0"));
        assert_eq!(
            c.next_response(),
            Ok(Some((id, KvldsResponse::Params { max_key_len: 64, max_value_len: 96 })))
        );
    }

    #[test]
    fn golden_get_request_and_response_byte_by_byte() {
        let mut c = ClientConn::with_first_id(4, 9);
        let id = c.send(&KvldsRequest::Get { key: b(b"k") }).unwrap();
        assert_eq!(
            &c.take_outgoing().unwrap()[..],
            &hex("000000000000000900000006cd696fc300000130016b31eb4f91")[..]
        );
        let wire = hex("000000000000000900000006cd696fc3000000000176ab4c9a72");
        for (i, byte) in wire.iter().enumerate() {
            c.receive(&[*byte]);
            let r = c.next_response().unwrap();
            if i + 1 < wire.len() {
                assert_eq!(r, None, "after {} bytes", i + 1);
                assert_eq!(c.in_flight(), 1);
            } else {
                assert_eq!(r, Some((id, KvldsResponse::Get(Some(b(b"v"))))));
            }
        }
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn ids_count_up_and_requests_share_one_buffer() {
        let mut c = ClientConn::new(8);
        let ids: Vec<_> = (0..3).map(|_| c.send(&KvldsRequest::Params).unwrap()).collect();
        assert_eq!(ids, [0, 1, 2]);
        let wire = c.take_outgoing().unwrap();
        let mut d = PacketDecoder::new();
        d.push(&wire);
        for id in ids {
            let p = d.next_packet().unwrap().unwrap();
            assert_eq!(p.id, id);
            assert_eq!(KvldsRequest::decode(p.record).unwrap(), KvldsRequest::Params);
        }
        assert_eq!(d.buffered_len(), 0);
    }

    #[test]
    fn every_request_round_trips_and_its_response_is_decoded_by_kind() {
        let cases = [
            (KvldsRequest::Params, KvldsResponse::Params { max_key_len: 255, max_value_len: 255 }),
            (KvldsRequest::Set { key: b(b"a"), value: b(b"1") }, KvldsResponse::Done(true)),
            (
                KvldsRequest::Cas { key: b(b"a"), old_value: b(b"1"), new_value: b(b"2") },
                KvldsResponse::Done(false),
            ),
            (KvldsRequest::Add { key: b(b"a"), value: b(b"1") }, KvldsResponse::Done(false)),
            (KvldsRequest::Modify { key: b(b"a"), value: b(b"1") }, KvldsResponse::Done(true)),
            (KvldsRequest::Delete { key: b(b"a") }, KvldsResponse::Done(true)),
            (KvldsRequest::Cad { key: b(b"a"), old_value: b(b"1") }, KvldsResponse::Done(true)),
            (KvldsRequest::Get { key: b(b"a") }, KvldsResponse::Get(None)),
            (
                KvldsRequest::Range { max_bytes: 100, start: b(b""), end: b(b"z") },
                KvldsResponse::Range { next: b(b"c"), pairs: vec![(b(b"a"), b(b"1")), (b(b"b"), b(b""))] },
            ),
        ];
        let mut c = ClientConn::new(16);
        let ids: Vec<_> = cases.iter().map(|(req, _)| c.send(req).unwrap()).collect();
        let mut d = PacketDecoder::new();
        d.push(&c.take_outgoing().unwrap());
        for (id, (req, _)) in ids.iter().zip(&cases) {
            let p = d.next_packet().unwrap().unwrap();
            assert_eq!(p.id, *id);
            assert_eq!(&KvldsRequest::decode(p.record).unwrap(), req);
            assert_eq!(c.in_flight_kind(*id), Some(req.kind()));
        }
        // Answer in reverse order.
        for (id, (_, resp)) in ids.iter().zip(&cases).rev() {
            c.receive(&response_bytes(*id, resp));
            assert_eq!(c.next_response().unwrap(), Some((*id, resp.clone())));
        }
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn out_of_order_responses_in_one_chunk_match_by_id() {
        let mut c = ClientConn::new(8);
        let get = c.send(&KvldsRequest::Get { key: b(b"x") }).unwrap();
        let add = c.send(&KvldsRequest::Add { key: b(b"x"), value: b(b"1") }).unwrap();
        let params = c.send(&KvldsRequest::Params).unwrap();
        let mut wire = response_bytes(params, &KvldsResponse::Params { max_key_len: 1, max_value_len: 2 });
        wire.extend_from_slice(&response_bytes(get, &KvldsResponse::Get(None)));
        wire.extend_from_slice(&response_bytes(add, &KvldsResponse::Done(false)));
        c.receive(&wire);
        assert_eq!(
            c.next_response(),
            Ok(Some((params, KvldsResponse::Params { max_key_len: 1, max_value_len: 2 })))
        );
        assert_eq!(c.next_response(), Ok(Some((get, KvldsResponse::Get(None)))));
        assert_eq!(c.next_response(), Ok(Some((add, KvldsResponse::Done(false)))));
        assert_eq!(c.next_response(), Ok(None));
    }

    #[test]
    fn a_response_to_an_unknown_id_breaks_the_connection() {
        let mut c = ClientConn::new(8);
        let id = c.send(&KvldsRequest::Delete { key: b(b"k") }).unwrap();
        c.receive(&response_bytes(id + 1, &KvldsResponse::Done(true)));
        assert_eq!(c.next_response(), Err(ProtocolError::UnknownId(id + 1)));
        // Sticky, and sending is refused.
        assert_eq!(c.next_response(), Err(ProtocolError::UnknownId(id + 1)));
        assert!(!c.can_send());
        assert_eq!(c.send(&KvldsRequest::Params), Err(SendError::Closed));
        assert_eq!(c.connection_lost(), vec![(id, Kind::Delete)]);
    }

    #[test]
    fn a_duplicate_response_is_an_unknown_id() {
        let mut c = ClientConn::new(8);
        let id = c.send(&KvldsRequest::Set { key: b(b"k"), value: b(b"v") }).unwrap();
        let once = response_bytes(id, &KvldsResponse::Done(true));
        c.receive(&once);
        c.receive(&once);
        assert_eq!(c.next_response(), Ok(Some((id, KvldsResponse::Done(true)))));
        assert_eq!(c.next_response(), Err(ProtocolError::UnknownId(id)));
    }

    #[test]
    fn an_undecodable_response_breaks_the_connection_and_stays_in_flight() {
        let mut c = ClientConn::new(8);
        let id = c.send(&KvldsRequest::Set { key: b(b"k"), value: b(b"v") }).unwrap();
        // SET may not fail: status 1 is not a valid answer.
        c.receive(&response_bytes(id, &KvldsResponse::Done(false)));
        assert!(matches!(
            c.next_response(),
            Err(ProtocolError::BadResponse { id: i, kind: Kind::Set, error: MessageError::BadStatus { .. } })
                if i == id
        ));
        assert_eq!(c.connection_lost(), vec![(id, Kind::Set)]);
    }

    #[test]
    fn a_bad_frame_breaks_the_connection() {
        let mut c = ClientConn::with_first_id(8, 7);
        c.send(&KvldsRequest::Set { key: b(b"k"), value: b(b"v") }).unwrap();
        let mut wire = hex("00000000000000070000000443735477000000001fa6f619");
        wire[20] ^= 1;
        c.receive(&wire);
        let e = c.next_response().unwrap_err();
        assert!(matches!(e, ProtocolError::Frame(FrameError::RecordCrc { id: 7, .. })), "{e}");
        assert!(c.is_closed());
    }

    #[test]
    fn a_header_announcing_an_over_long_response_is_refused_at_once() {
        let mut c = ClientConn::new(8);
        c.send(&KvldsRequest::Range { max_bytes: RANGE_MAX_BYTES, start: b(b""), end: b(b"") }).unwrap();
        let mut header = Vec::new();
        header.extend_from_slice(&0u64.to_be_bytes());
        header.extend_from_slice(&(RESPONSE_RECORD_LEN_MAX as u32 + 1).to_be_bytes());
        header.extend_from_slice(&crate::crc::wire_crc(&header).to_le_bytes());
        c.receive(&header);
        assert!(matches!(c.next_response(), Err(ProtocolError::Frame(FrameError::RecordTooLong { .. }))));
    }

    #[test]
    fn connection_lost_returns_what_was_in_flight() {
        let mut c = ClientConn::new(8);
        let set = c.send(&KvldsRequest::Set { key: b(b"k"), value: b(b"v") }).unwrap();
        let get = c.send(&KvldsRequest::Get { key: b(b"k") }).unwrap();
        let cad = c.send(&KvldsRequest::Cad { key: b(b"k"), old_value: b(b"v") }).unwrap();
        c.receive(&response_bytes(get, &KvldsResponse::Get(None)));
        assert!(c.next_response().unwrap().is_some());
        let lost = c.connection_lost();
        assert_eq!(lost, vec![(set, Kind::Set), (cad, Kind::Cad)]);
        assert!(lost[0].1.is_modifying());
        assert_eq!(c.in_flight(), 0);
        assert_eq!(c.take_outgoing(), None);
        assert_eq!(c.send(&KvldsRequest::Params), Err(SendError::Closed));
        c.receive(&response_bytes(set, &KvldsResponse::Done(true)));
        assert_eq!(c.next_response(), Ok(None));
        assert_eq!(c.connection_lost(), vec![]);
    }

    #[test]
    fn a_full_window_is_refused_and_frees_with_a_response() {
        let mut c = ClientConn::new(2);
        let a = c.send(&KvldsRequest::Params).unwrap();
        c.send(&KvldsRequest::Params).unwrap();
        assert!(!c.can_send());
        assert_eq!(c.send(&KvldsRequest::Params), Err(SendError::WindowFull { in_flight_max: 2 }));
        assert_eq!(c.in_flight(), 2);
        c.receive(&response_bytes(a, &KvldsResponse::Params { max_key_len: 1, max_value_len: 1 }));
        c.next_response().unwrap().unwrap();
        assert!(c.can_send());
        c.send(&KvldsRequest::Params).unwrap();
    }

    #[test]
    fn ids_wrap_and_skip_those_in_flight() {
        let mut c = ClientConn::with_first_id(3, u64::MAX);
        assert_eq!(c.send(&KvldsRequest::Params).unwrap(), u64::MAX);
        assert_eq!(c.send(&KvldsRequest::Params).unwrap(), 0);
        c.next_id = u64::MAX; // as if the counter had come round again
        assert_eq!(c.send(&KvldsRequest::Params).unwrap(), 1);
    }

    #[test]
    fn too_long_fields_and_budgets_are_refused_before_encoding() {
        let mut c = ClientConn::new(2);
        let long = Bytes::from(vec![0u8; 256]);
        let max = Bytes::from(vec![0u8; 255]);
        assert_eq!(
            c.send(&KvldsRequest::Set { key: max.clone(), value: long.clone() }),
            Err(SendError::TooLong { field: "value", len: 256 })
        );
        assert_eq!(
            c.send(&KvldsRequest::Cas { key: b(b"k"), old_value: b(b""), new_value: long.clone() }),
            Err(SendError::TooLong { field: "new value", len: 256 })
        );
        assert_eq!(
            c.send(&KvldsRequest::Range { max_bytes: 1, start: b(b""), end: long }),
            Err(SendError::TooLong { field: "end key", len: 256 })
        );
        assert_eq!(
            c.send(&KvldsRequest::Range { max_bytes: RANGE_MAX_BYTES + 1, start: b(b""), end: b(b"") }),
            Err(SendError::RangeBudgetTooLarge { max_bytes: RANGE_MAX_BYTES + 1 })
        );
        assert_eq!(c.in_flight(), 0);
        assert_eq!(c.take_outgoing(), None);
        c.send(&KvldsRequest::Set { key: max.clone(), value: max }).unwrap();
    }

    #[test]
    #[should_panic(expected = "at least one request")]
    fn a_window_of_zero_is_a_programmer_error() {
        let _ = ClientConn::new(0);
    }
}
