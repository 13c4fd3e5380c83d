//! Typed lbs (block store) requests and responses, and their records.
//!
//! Record layouts are PROTOCOL.md's "Block store (lbs) requests" table.

use bytes::{BufMut, Bytes, BytesMut};

use crate::fields::{FieldReader, MessageError};
use crate::packet::encode_packet_with;

/// Request type codes.
pub mod request_type {
    /// PARAMS (obsolete): block size and next block number.
    pub const PARAMS: u32 = 0x0000_0000;
    /// GET one block.
    pub const GET: u32 = 0x0000_0001;
    /// APPEND blocks at the next unused block number.
    pub const APPEND: u32 = 0x0000_0002;
    /// FREE blocks below a number (advisory).
    pub const FREE: u32 = 0x0000_0003;
    /// PARAMS2: block size, next block number, last block number.
    pub const PARAMS2: u32 = 0x0000_0004;
}

/// The "last block number" of an empty store in a PARAMS2 response (-1).
pub const NO_LAST_BLOCK: u64 = u64::MAX;

/// The kind of an lbs request, which is what a requester needs to know to
/// decode the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LbsRequestKind {
    Params,
    Params2,
    Get,
    Append,
    Free,
}

/// An lbs request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LbsRequest {
    /// Obsolete PARAMS.
    Params,
    /// PARAMS2.
    Params2,
    /// Read one block.
    Get { block: u64 },
    /// Append `count` blocks starting at block `start`; `data` is
    /// `count * block size` bytes (checked by the store, which knows the
    /// block size).
    Append { count: u32, start: u64, data: Bytes },
    /// Blocks below `keep_from` may be deleted.
    Free { keep_from: u64 },
}

impl LbsRequest {
    /// The kind of this request.
    pub fn kind(&self) -> LbsRequestKind {
        match self {
            LbsRequest::Params => LbsRequestKind::Params,
            LbsRequest::Params2 => LbsRequestKind::Params2,
            LbsRequest::Get { .. } => LbsRequestKind::Get,
            LbsRequest::Append { .. } => LbsRequestKind::Append,
            LbsRequest::Free { .. } => LbsRequestKind::Free,
        }
    }

    /// Decodes a request record. The APPEND data is a slice of `record`.
    ///
    /// # Errors
    /// A truncated record, trailing bytes, or an unknown request type.
    pub fn decode(record: Bytes) -> Result<Self, MessageError> {
        let mut r = FieldReader::new(record);
        let request_type = r.u32("request type")?;
        let (req, name) = match request_type {
            request_type::PARAMS => (LbsRequest::Params, "lbs PARAMS"),
            request_type::PARAMS2 => (LbsRequest::Params2, "lbs PARAMS2"),
            request_type::GET => (LbsRequest::Get { block: r.u64("block number")? }, "lbs GET"),
            request_type::APPEND => {
                let count = r.u32("block count")?;
                let start = r.u64("start block")?;
                (LbsRequest::Append { count, start, data: r.rest() }, "lbs APPEND")
            }
            request_type::FREE => (LbsRequest::Free { keep_from: r.u64("first block to keep")? }, "lbs FREE"),
            other => return Err(MessageError::UnknownRequestType(other)),
        };
        r.finish(name)?;
        Ok(req)
    }

    /// Appends this request as a packet with request ID `id`.
    pub fn encode(&self, id: u64, out: &mut BytesMut) {
        encode_packet_with(out, id, |o| match self {
            LbsRequest::Params => o.put_u32(request_type::PARAMS),
            LbsRequest::Params2 => o.put_u32(request_type::PARAMS2),
            LbsRequest::Get { block } => {
                o.put_u32(request_type::GET);
                o.put_u64(*block);
            }
            LbsRequest::Append { count, start, data } => {
                o.reserve(16 + data.len());
                append_fields(o, *count, *start);
                o.extend_from_slice(data);
            }
            LbsRequest::Free { keep_from } => {
                o.put_u32(request_type::FREE);
                o.put_u64(*keep_from);
            }
        });
    }
}

/// The fields of an APPEND record before its blocks.
fn append_fields(o: &mut BytesMut, count: u32, start: u64) {
    o.put_u32(request_type::APPEND);
    o.put_u32(count);
    o.put_u64(start);
}

/// Appends to `out`, as a packet with request ID `id`, the APPEND of
/// `count` blocks from block `start` whose bytes `write_blocks` writes
/// straight into `out`: the packet [`LbsRequest::Append`] encodes, without
/// gathering the blocks into one buffer first.
pub fn encode_append_with(
    id: u64,
    count: u32,
    start: u64,
    out: &mut BytesMut,
    write_blocks: impl FnOnce(&mut BytesMut),
) {
    encode_packet_with(out, id, |o| {
        append_fields(o, count, start);
        write_blocks(o);
    });
}

/// An lbs response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LbsResponse {
    /// PARAMS: block size in bytes and the next block number.
    Params { block_size: u32, next_block: u64 },
    /// PARAMS2: as PARAMS plus the last block number ([`NO_LAST_BLOCK`]
    /// when the store is empty).
    Params2 { block_size: u32, next_block: u64, last_block: u64 },
    /// GET: the block's data, or `None` if the block does not exist.
    Get(Option<Bytes>),
    /// APPEND: `Some(next block number)` once durable; `None` (status 1) if
    /// the start block was not the next unused one.
    Append(Option<u64>),
    /// FREE: acknowledged.
    Free,
}

impl LbsResponse {
    /// Decodes the response record to a request of kind `kind`.
    ///
    /// # Errors
    /// A truncated record, trailing bytes, or an undefined status.
    pub fn decode(kind: LbsRequestKind, record: Bytes) -> Result<Self, MessageError> {
        let mut r = FieldReader::new(record);
        let (resp, name) = match kind {
            LbsRequestKind::Params => {
                let block_size = r.u32("block size")?;
                let next_block = r.u64("next block")?;
                (LbsResponse::Params { block_size, next_block }, "lbs PARAMS response")
            }
            LbsRequestKind::Params2 => {
                let block_size = r.u32("block size")?;
                let next_block = r.u64("next block")?;
                let last_block = r.u64("last block")?;
                (LbsResponse::Params2 { block_size, next_block, last_block }, "lbs PARAMS2 response")
            }
            LbsRequestKind::Get => match r.u32("status")? {
                0 => (LbsResponse::Get(Some(r.rest())), "lbs GET response"),
                1 => (LbsResponse::Get(None), "lbs GET response"),
                status => return Err(MessageError::BadStatus { message: "lbs GET", status }),
            },
            LbsRequestKind::Append => match r.u32("status")? {
                0 => (LbsResponse::Append(Some(r.u64("next block")?)), "lbs APPEND response"),
                1 => (LbsResponse::Append(None), "lbs APPEND response"),
                status => return Err(MessageError::BadStatus { message: "lbs APPEND", status }),
            },
            LbsRequestKind::Free => match r.u32("status")? {
                0 => (LbsResponse::Free, "lbs FREE response"),
                status => return Err(MessageError::BadStatus { message: "lbs FREE", status }),
            },
        };
        r.finish(name)?;
        Ok(resp)
    }

    /// Appends this response as a packet with request ID `id`.
    pub fn encode(&self, id: u64, out: &mut BytesMut) {
        encode_packet_with(out, id, |o| match self {
            LbsResponse::Params { block_size, next_block } => {
                o.put_u32(*block_size);
                o.put_u64(*next_block);
            }
            LbsResponse::Params2 { block_size, next_block, last_block } => {
                o.put_u32(*block_size);
                o.put_u64(*next_block);
                o.put_u64(*last_block);
            }
            LbsResponse::Get(Some(data)) => {
                o.reserve(4 + data.len());
                o.put_u32(0);
                o.extend_from_slice(data);
            }
            LbsResponse::Get(None) => o.put_u32(1),
            LbsResponse::Append(Some(next_block)) => {
                o.put_u32(0);
                o.put_u64(*next_block);
            }
            LbsResponse::Append(None) => o.put_u32(1),
            LbsResponse::Free => o.put_u32(0),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_append_written_in_place_is_the_append_encoded() {
        let data = Bytes::from((0..1024u32).map(|i| (i * 7) as u8).collect::<Vec<u8>>());
        let mut want = BytesMut::new();
        LbsRequest::Append { count: 2, start: 9, data: data.clone() }.encode(5, &mut want);
        let mut got = BytesMut::new();
        encode_append_with(5, 2, 9, &mut got, |o| {
            o.extend_from_slice(&data[..300]);
            o.extend_from_slice(&data[300..]);
        });
        assert_eq!(got, want);
    }
}
