//! The sans-IO state machines of kivaloo. Each node implements
//! [`kivaloo::contract::Node`]: it never performs I/O, reads a clock, or
//! uses ambient randomness; a driver (io-shim's tokio runtime, or the
//! simulator) moves bytes and disk results in and out. See `DESIGN.md`.

pub mod lbs;
