//! Packet framing: the incremental decoder and the encoder.
//!
//! A packet is `8 request ID | 4 record length N | 4 header CRC | N record |
//! 4 trailer`, integers big-endian, CRCs little-endian, where the trailer is
//! the record's CRC XOR the header's CRC (see PROTOCOL.md and [`crate::crc`]).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fmt;

use crate::crc::wire_crc;

/// Bytes before the record: request ID, record length, header CRC.
pub const HEADER_LEN: usize = 16;
/// Bytes after the record: the record CRC XOR the header CRC.
pub const TRAILER_LEN: usize = 4;
/// The largest record any decoder accepts (64 MiB): an lbs APPEND of
/// 512 blocks of 128 KiB fits, with room to spare. A decoder can be given a
/// smaller bound with [`PacketDecoder::with_record_len_max`].
pub const RECORD_LEN_MAX: usize = 64 << 20;

/// One decoded packet: the request ID and the record, which shares the
/// decoder's buffer (no copy).
#[derive(Clone, PartialEq, Eq)]
pub struct Packet {
    /// The ID the requester chose; a response carries the request's ID.
    pub id: u64,
    /// The record, without header or trailer.
    pub record: Bytes,
}

impl fmt::Debug for Packet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Packet {{ id: {:#x}, record: {} bytes }}", self.id, self.record.len())
    }
}

/// Why a byte stream is not a valid sequence of packets. Any of these means
/// the peer is broken or hostile: the connection is to be dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The header's CRC does not match its first 12 bytes.
    HeaderCrc { id: u64, expected: u32, found: u32 },
    /// The header announces a record longer than this decoder accepts.
    RecordTooLong { id: u64, record_len: u64, record_len_max: usize },
    /// The trailer does not match the record's CRC.
    RecordCrc { id: u64, expected: u32, found: u32 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::HeaderCrc { id, expected, found } => write!(
                f,
                "bad packet header CRC (request ID {id:#x}): expected {expected:#010x}, found {found:#010x}"
            ),
            FrameError::RecordTooLong { id, record_len, record_len_max } => write!(
                f,
                "packet record of {record_len} bytes exceeds the maximum of {record_len_max} (request ID {id:#x})"
            ),
            FrameError::RecordCrc { id, expected, found } => write!(
                f,
                "bad packet record CRC (request ID {id:#x}): expected {expected:#010x}, found {found:#010x}"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// An incremental packet decoder: feed it bytes as they arrive, in any split,
/// and take whole packets out.
///
/// Memory: the decoder holds at most one partial packet plus whatever whole
/// packets were fed and not yet taken; it never allocates on the strength of
/// a length field, only for bytes actually received, and it refuses a header
/// announcing more than `record_len_max` bytes before any of them arrive.
/// After an error the decoder is poisoned and returns the same error forever.
#[derive(Debug)]
pub struct PacketDecoder {
    buf: BytesMut,
    record_len_max: usize,
    /// See [`PacketDecoder::with_grow_bytes_min`].
    grow_bytes_min: usize,
    /// The validated header of the packet being received, once known.
    pending: Option<PendingHeader>,
    error: Option<FrameError>,
}

#[derive(Debug, Clone, Copy)]
struct PendingHeader {
    id: u64,
    record_len: usize,
    header_crc: u32,
}

impl Default for PacketDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl PacketDecoder {
    /// A decoder accepting records up to [`RECORD_LEN_MAX`] bytes.
    pub fn new() -> Self {
        Self::with_record_len_max(RECORD_LEN_MAX)
    }

    /// A decoder accepting records up to `record_len_max` bytes (clamped to
    /// [`RECORD_LEN_MAX`]).
    pub fn with_record_len_max(record_len_max: usize) -> Self {
        PacketDecoder {
            buf: BytesMut::new(),
            record_len_max: record_len_max.min(RECORD_LEN_MAX),
            grow_bytes_min: 0,
            pending: None,
            error: None,
        }
    }

    /// The largest record this decoder accepts.
    pub fn record_len_max(&self) -> usize {
        self.record_len_max
    }

    /// Allocates at least `bytes` whenever the buffer must grow (see
    /// [`PacketDecoder::push`]); 0, the default, allocates what is needed.
    /// For a busy connection: one allocation then serves many small reads,
    /// where each read of a few requests would otherwise cost its own. The
    /// buffer stays that large while the connection lives.
    pub fn with_grow_bytes_min(mut self, bytes: usize) -> Self {
        self.grow_bytes_min = bytes;
        self
    }

    /// Appends received bytes.
    ///
    /// Packets taken out share the buffer (and keep it alive: a consumer
    /// that holds one for long, a cache, should copy it), so it can seldom
    /// be grown in place; when it cannot, a new one is allocated.
    pub fn push(&mut self, data: &[u8]) {
        if self.error.is_some() {
            return;
        }
        if !self.buf.try_reclaim(data.len()) {
            // At least doubling what is held, so that a large packet
            // arriving in many reads is copied a bounded number of times.
            let needed = self.buf.len() + data.len();
            let mut grown = BytesMut::with_capacity(needed.max(2 * self.buf.len()).max(self.grow_bytes_min));
            grown.extend_from_slice(&self.buf);
            self.buf = grown;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes received and not yet returned as packets.
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// Returns the next whole packet, `Ok(None)` if more bytes are needed.
    ///
    /// # Errors
    /// A [`FrameError`] if the stream is malformed; the decoder then stays
    /// in that error.
    pub fn next_packet(&mut self) -> Result<Option<Packet>, FrameError> {
        if let Some(err) = &self.error {
            return Err(err.clone());
        }
        let header = match self.pending {
            Some(h) => h,
            None => {
                if self.buf.len() < HEADER_LEN {
                    return Ok(None);
                }
                match parse_header(&self.buf[..HEADER_LEN], self.record_len_max) {
                    Ok(h) => {
                        self.buf.advance(HEADER_LEN);
                        self.pending = Some(h);
                        h
                    }
                    Err(e) => return Err(self.fail(e)),
                }
            }
        };
        let total = header.record_len + TRAILER_LEN;
        if self.buf.len() < total {
            // Grow towards the rest of this packet no faster than its bytes
            // arrive (at most doubling what is held), never on the strength
            // of the length field alone: a 16-byte header announcing a
            // large record must not cost a large allocation.
            let missing = total - self.buf.len();
            self.buf.reserve(missing.min(self.buf.len()));
            return Ok(None);
        }
        let record = self.buf.split_to(header.record_len).freeze();
        let trailer = self.buf.get_u32_le();
        self.pending = None;
        let expected = wire_crc(&record) ^ header.header_crc;
        if trailer != expected {
            return Err(self.fail(FrameError::RecordCrc { id: header.id, expected, found: trailer }));
        }
        Ok(Some(Packet { id: header.id, record }))
    }

    fn fail(&mut self, e: FrameError) -> FrameError {
        self.buf = BytesMut::new();
        self.pending = None;
        self.error = Some(e.clone());
        e
    }
}

fn parse_header(h: &[u8], record_len_max: usize) -> Result<PendingHeader, FrameError> {
    let id = u64::from_be_bytes(h[0..8].try_into().expect("8 bytes"));
    let record_len = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes"));
    let found = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
    let expected = wire_crc(&h[0..12]);
    if found != expected {
        return Err(FrameError::HeaderCrc { id, expected, found });
    }
    if record_len as u64 > record_len_max as u64 {
        return Err(FrameError::RecordTooLong { id, record_len: record_len as u64, record_len_max });
    }
    Ok(PendingHeader { id, record_len: record_len as usize, header_crc: found })
}

/// Appends one packet to `out`, writing the record with `write_record`
/// directly into `out` (no intermediate buffer).
///
/// # Panics
/// If the record written is longer than [`RECORD_LEN_MAX`]: a programmer
/// error, since every record this crate builds is bounded well below it.
pub fn encode_packet_with(out: &mut BytesMut, id: u64, write_record: impl FnOnce(&mut BytesMut)) {
    let start = out.len();
    out.put_u64(id);
    out.put_u32(0); // length, patched below
    out.put_u32(0); // header CRC, patched below
    let record_start = out.len();
    write_record(out);
    let record_len = out.len() - record_start;
    assert!(record_len <= RECORD_LEN_MAX, "record of {record_len} bytes is over RECORD_LEN_MAX");
    out[start + 8..start + 12].copy_from_slice(&(record_len as u32).to_be_bytes());
    let header_crc = wire_crc(&out[start..start + 12]);
    out[start + 12..start + 16].copy_from_slice(&header_crc.to_le_bytes());
    let trailer = wire_crc(&out[record_start..]) ^ header_crc;
    out.put_u32_le(trailer);
}

/// Appends one packet carrying `record` to `out`.
pub fn encode_packet(out: &mut BytesMut, id: u64, record: &[u8]) {
    out.reserve(HEADER_LEN + record.len() + TRAILER_LEN);
    encode_packet_with(out, id, |o| o.extend_from_slice(record));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn decodes_golden_status_response_byte_by_byte() {
        let wire = hex("00000000000000070000000443735477000000001fa6f619");
        let mut d = PacketDecoder::new();
        for (i, b) in wire.iter().enumerate() {
            d.push(&[*b]);
            let p = d.next_packet().unwrap();
            if i + 1 < wire.len() {
                assert!(p.is_none());
            } else {
                let p = p.unwrap();
                assert_eq!(p.id, 7);
                assert_eq!(&p.record[..], &[0, 0, 0, 0]);
            }
        }
    }

    #[test]
    fn bad_header_crc_is_reported_and_sticky() {
        let mut wire = hex("00000000000000070000000443735477000000001fa6f619");
        wire[13] ^= 1;
        let mut d = PacketDecoder::new();
        d.push(&wire);
        assert!(matches!(d.next_packet(), Err(FrameError::HeaderCrc { id: 7, .. })));
        assert!(matches!(d.next_packet(), Err(FrameError::HeaderCrc { .. })));
    }

    #[test]
    fn bad_record_crc_is_reported() {
        let mut wire = hex("00000000000000070000000443735477000000001fa6f619");
        wire[19] ^= 0x80;
        let mut d = PacketDecoder::new();
        d.push(&wire);
        assert!(matches!(d.next_packet(), Err(FrameError::RecordCrc { id: 7, .. })));
    }

    #[test]
    fn a_large_packet_in_small_reads_grows_the_buffer_geometrically() {
        let record = vec![7u8; 1 << 20];
        let mut wire = BytesMut::new();
        encode_packet(&mut wire, 3, &record);
        let mut d = PacketDecoder::new();
        // A packet taken out and still held shares the buffer, which then
        // cannot simply be reallocated in place.
        let mut small = BytesMut::new();
        encode_packet(&mut small, 2, b"small");
        d.push(&small);
        let held = d.next_packet().unwrap().expect("the small packet");
        let mut growths = 0;
        let mut capacity = d.buf.capacity();
        for piece in wire.chunks(1024) {
            d.push(piece);
            if d.buf.capacity() != capacity {
                growths += 1;
                capacity = d.buf.capacity();
            }
        }
        // (Taken out only at the end: pushing alone must grow the buffer
        // geometrically, whoever calls `next_packet` when.)
        let got = d.next_packet().unwrap();
        assert_eq!(got.map(|p| p.record.len()), Some(1 << 20));
        // Each growth at least doubles: about log2(1 MiB / 1 KiB) of them,
        // not one per read.
        assert!(growths <= 16, "{growths} growths for 1025 reads");
        assert_eq!(held.record.as_ref(), b"small");
    }

    #[test]
    fn a_minimum_growth_serves_many_small_pushes_with_one_allocation() {
        let mut d = PacketDecoder::new().with_grow_bytes_min(64 << 10);
        let mut held = Vec::new();
        let mut buffers = 0;
        let mut capacity = usize::MAX;
        for i in 0..200u64 {
            let mut wire = BytesMut::new();
            encode_packet(&mut wire, i, &[1u8; 100]);
            d.push(&wire);
            // A new buffer: more room than the one before had left.
            if d.buf.capacity() > capacity {
                buffers += 1;
            }
            held.push(d.next_packet().unwrap().expect("a whole packet"));
            capacity = d.buf.capacity();
        }
        // 200 packets of 120 bytes, each held: one 64 KiB buffer, not one
        // allocation each.
        assert!(buffers <= 1, "{buffers} new buffers");
        assert_eq!(held.len(), 200);
    }

    #[test]
    fn a_header_alone_does_not_allocate_its_record() {
        let mut header = Vec::new();
        header.extend_from_slice(&1u64.to_be_bytes());
        header.extend_from_slice(&(RECORD_LEN_MAX as u32).to_be_bytes());
        header.extend_from_slice(&wire_crc(&header).to_le_bytes());
        let mut d = PacketDecoder::new();
        d.push(&header);
        assert_eq!(d.next_packet(), Ok(None));
        assert!(d.buf.capacity() <= 4096, "{} bytes reserved after a header", d.buf.capacity());
        d.push(&[0u8; 1000]);
        assert_eq!(d.next_packet(), Ok(None));
        assert!(d.buf.capacity() <= 64 << 10, "{} bytes reserved after 1000", d.buf.capacity());
    }

    #[test]
    fn over_long_record_is_refused_from_the_header_alone() {
        let mut out = BytesMut::new();
        encode_packet(&mut out, 1, &[0u8; 100]);
        let mut d = PacketDecoder::with_record_len_max(99);
        d.push(&out[..HEADER_LEN]);
        assert_eq!(
            d.next_packet(),
            Err(FrameError::RecordTooLong { id: 1, record_len: 100, record_len_max: 99 })
        );
    }
}
