//! Reading the fields of a record, with a precise error for a record that is
//! too short, too long, or carries an impossible value.

use bytes::{Buf, Bytes};
use std::fmt;

/// Why a record (the body of a packet) is not a valid message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageError {
    /// The record ended inside the named field.
    Truncated { field: &'static str, needed: usize, remaining: usize },
    /// Bytes were left over after the last field.
    TrailingBytes { message: &'static str, trailing: usize },
    /// The request type is not one this peer serves.
    UnknownRequestType(u32),
    /// A response status other than those the protocol defines.
    BadStatus { message: &'static str, status: u32 },
    /// A field holds a value the protocol forbids.
    BadValue { field: &'static str, detail: String },
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageError::Truncated { field, needed, remaining } => {
                write!(f, "record truncated in field `{field}`: needs {needed} bytes, {remaining} remain")
            }
            MessageError::TrailingBytes { message, trailing } => {
                write!(f, "{trailing} bytes left over after the last field of {message}")
            }
            MessageError::UnknownRequestType(t) => write!(f, "unknown request type {t:#010x}"),
            MessageError::BadStatus { message, status } => {
                write!(f, "response to {message} has undefined status {status}")
            }
            MessageError::BadValue { field, detail } => write!(f, "bad `{field}`: {detail}"),
        }
    }
}

impl std::error::Error for MessageError {}

/// A cursor over a record's fields. Variable-length fields are returned as
/// slices of the record (`Bytes`), not copies.
#[derive(Debug)]
pub struct FieldReader {
    rest: Bytes,
}

impl FieldReader {
    /// Starts reading `record` from its first byte.
    pub fn new(record: Bytes) -> Self {
        FieldReader { rest: record }
    }

    fn need(&self, field: &'static str, needed: usize) -> Result<(), MessageError> {
        if self.rest.len() < needed {
            return Err(MessageError::Truncated { field, needed, remaining: self.rest.len() });
        }
        Ok(())
    }

    /// Reads a big-endian u32.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, MessageError> {
        self.need(field, 4)?;
        Ok(self.rest.get_u32())
    }

    /// Reads a big-endian u64.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, MessageError> {
        self.need(field, 8)?;
        Ok(self.rest.get_u64())
    }

    /// Reads `len` raw bytes.
    pub fn bytes(&mut self, field: &'static str, len: usize) -> Result<Bytes, MessageError> {
        self.need(field, len)?;
        Ok(self.rest.split_to(len))
    }

    /// Reads a kvlds string: one length byte, then that many bytes.
    pub fn short_string(&mut self, field: &'static str) -> Result<Bytes, MessageError> {
        self.need(field, 1)?;
        let len = self.rest.get_u8() as usize;
        self.bytes(field, len)
    }

    /// Takes every remaining byte.
    pub fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.rest)
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Checks that every byte was read.
    ///
    /// # Errors
    /// [`MessageError::TrailingBytes`] naming `message` otherwise.
    pub fn finish(self, message: &'static str) -> Result<(), MessageError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(MessageError::TrailingBytes { message, trailing: self.rest.len() })
        }
    }
}
