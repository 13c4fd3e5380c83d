//! The CRC of kivaloo's wire protocol.
//!
//! kivaloo's packets carry a CRC that uses the Castagnoli polynomial
//! (reflected 0x82F63B78) but starts from the state 0x82F63B78 (the CRC of an
//! implicit leading 1 bit) and applies no final XOR. It is therefore *not*
//! the textbook CRC-32C; in terms of the `crc32c` crate (which pre- and
//! post-inverts) it is `!crc32c_append(!0x82F6_3B78, data)`. On the wire the
//! 32-bit value is written little-endian.

/// The initial state of kivaloo's CRC, which is also the CRC of no bytes.
pub const WIRE_CRC_EMPTY: u32 = 0x82F6_3B78;

/// Returns kivaloo's wire CRC of `data`.
#[inline]
pub fn wire_crc(data: &[u8]) -> u32 {
    wire_crc_append(WIRE_CRC_EMPTY, data)
}

/// Continues a wire CRC `state` (as returned by [`wire_crc`]) over `data`.
#[inline]
pub fn wire_crc_append(state: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!state, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden vectors from PROTOCOL.md, computed by kivaloo itself.
    #[test]
    fn golden_crc_values() {
        assert_eq!(wire_crc(b""), 0x82F6_3B78);
        assert_eq!(wire_crc(b"a"), 0x686E_EA98);
        assert_eq!(wire_crc(b"123456789"), 0x22FC_9104);
        assert_eq!(wire_crc(b"123456789").to_le_bytes(), [0x04, 0x91, 0xfc, 0x22]);
        assert_eq!(wire_crc(b"a").to_le_bytes(), [0x98, 0xea, 0x6e, 0x68]);
    }

    #[test]
    fn append_equals_whole() {
        let whole = wire_crc(b"hello, world");
        let split = wire_crc_append(wire_crc(b"hello, "), b"world");
        assert_eq!(whole, split);
    }
}
