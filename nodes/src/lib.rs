//! The sans-IO state machines of kivaloo. Each node implements
//! [`kivaloo::contract::Node`]: it performs no I/O and reads neither clocks
//! nor random sources; a driver (the real runtime in io-shim, or the
//! simulator) moves bytes and disk results in and out. See `DESIGN.md`.

pub mod kvlds;
pub mod lbs;
pub mod mux;
pub mod perf;
