//! A simulated connection between a requester (the client, or a node
//! reaching its upstream through `ConnId::UPSTREAM`) and the node that
//! accepted it: two directions, each a `Pipe` (in order, split, delayed)
//! with the receiver's read interest, the bytes held while it does not
//! read, and whether each end has closed. The world moves the bytes; this
//! is the state.

use std::collections::VecDeque;

use bytes::Bytes;
use kivaloo::contract::ConnId;
use kivaloo::packet::PacketDecoder;

use crate::network::Pipe;

/// One end of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The workload's client.
    Client,
    /// Component `i` of the chain.
    Proc(usize),
}

/// A direction of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Requester to server (requests).
    ToServer,
    /// Server to requester (responses).
    ToRequester,
}

impl Dir {
    /// The other direction.
    pub fn reverse(self) -> Dir {
        match self {
            Dir::ToServer => Dir::ToRequester,
            Dir::ToRequester => Dir::ToServer,
        }
    }
}

/// One direction of a link.
#[derive(Debug, Default)]
pub struct Half {
    pub pipe: Pipe,
    /// The receiver wants bytes (`Output::ReadInterest`); a client always
    /// reads.
    pub reading: bool,
    /// Bytes that arrived while the receiver did not read, in order.
    pub held: VecDeque<Bytes>,
    /// The sender sends no more (it closed, or died); the receiver learns
    /// after the last bytes.
    pub sender_closed: bool,
    /// ... because the sender died (rather than closed it on purpose).
    pub sender_died: bool,
    /// Why the sender closed.
    pub close_reason: String,
    /// The receiver is gone (closed its end, or died): arrivals are dropped.
    pub receiver_gone: bool,
    /// Decodes what a node sends to another, only to show it in a kept
    /// trace.
    pub tap: PacketDecoder,
}

/// A connection.
#[derive(Debug)]
pub struct Link {
    /// The server's name for it (the requester, if a node, calls it
    /// `ConnId::UPSTREAM`). Unique in a run; also the link's key.
    pub id: ConnId,
    /// The component that accepted it, and that component's incarnation.
    pub server: usize,
    pub server_inc: u64,
    /// Who opened it, and (for a component) its incarnation.
    pub requester: End,
    pub requester_inc: u64,
    pub to_server: Half,
    pub to_requester: Half,
    /// The client's packet decoder (unused for a node requester).
    pub decoder: PacketDecoder,
}

impl Link {
    /// A link just accepted by `server` (incarnation `server_inc`), opened
    /// by `requester` (incarnation `requester_inc`; 0 for the client).
    pub fn new(id: ConnId, server: usize, server_inc: u64, requester: End, requester_inc: u64) -> Link {
        Link {
            id,
            server,
            server_inc,
            requester,
            requester_inc,
            to_server: Half { reading: true, ..Half::default() },
            to_requester: Half { reading: true, ..Half::default() },
            decoder: PacketDecoder::new(),
        }
    }

    /// The direction's state.
    pub fn half(&self, dir: Dir) -> &Half {
        match dir {
            Dir::ToServer => &self.to_server,
            Dir::ToRequester => &self.to_requester,
        }
    }

    /// The direction's state, to change.
    pub fn half_mut(&mut self, dir: Dir) -> &mut Half {
        match dir {
            Dir::ToServer => &mut self.to_server,
            Dir::ToRequester => &mut self.to_requester,
        }
    }

    /// Who receives what goes in `dir`.
    pub fn receiver(&self, dir: Dir) -> End {
        match dir {
            Dir::ToServer => End::Proc(self.server),
            Dir::ToRequester => self.requester,
        }
    }

    /// Who sends what goes in `dir`.
    pub fn sender(&self, dir: Dir) -> End {
        self.receiver(dir.reverse())
    }

    /// The incarnation of `end` this link belongs to.
    pub fn inc_of(&self, end: End) -> u64 {
        if end == End::Proc(self.server) {
            self.server_inc
        } else {
            self.requester_inc
        }
    }

    /// The connection id `end` knows this link by.
    pub fn conn_seen_by(&self, end: End) -> ConnId {
        if end == End::Proc(self.server) {
            self.id
        } else {
            ConnId::UPSTREAM
        }
    }
}
