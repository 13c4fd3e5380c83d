//! An async kvlds client on tokio: one connection, many requests in flight
//! at once, answered in any order.
//!
//! A [`Client`] is a cheap handle (clone it freely, share it between tasks):
//! every method takes `&self`, so requests made concurrently (futures
//! joined, or several tasks) are pipelined on the one connection. A
//! background task owns the connection: it encodes requests with
//! [`kivaloo::client::ClientConn`], writes whatever has queued up in one
//! write, reads responses and hands each to the request it answers.
//!
//! # Bounds
//!
//! - At most `in_flight_max` requests (default [`DEFAULT_IN_FLIGHT_MAX`],
//!   4096, like kivaloo's own clients) are queued for the connection task
//!   or sent and unanswered; a caller beyond that waits for a slot (it is
//!   not an error). A slot is held until the response arrives, even if the
//!   caller stopped waiting for it. The task's command queue holds only
//!   requests that have a slot, so it is bounded by the same number.
//! - The bytes waiting to be written are those requests, each at most 792
//!   bytes encoded.
//! - Reads are of [`READ_CHUNK_BYTES`] at a time; the receive buffer holds
//!   at most one partial response of at most
//!   [`kivaloo::client::RESPONSE_RECORD_LEN_MAX`] bytes (a RANGE page) plus
//!   one chunk.
//! - Keys and values returned are copies, not slices of the receive buffer,
//!   so that keeping one does not keep a buffer alive.
//!
//! # Failures
//!
//! If the server closes the connection, an I/O error occurs, or the server
//! sends anything invalid, the connection is dropped and every request in
//! flight fails: with [`Error::ConnectionLost`] (whose [`Effect`] tells
//! whether the request may have taken effect) or [`Error::Protocol`].
//! Every later call fails at once with `ConnectionLost` and
//! [`Effect::None`]: connect again for a new `Client`.
//!
//! # Example
//!
//! ```
//! # use bytes::{Bytes, BytesMut};
//! # use kivaloo::kvlds_proto::{KvldsRequest, KvldsResponse};
//! # use kivaloo::packet::PacketDecoder;
//! # use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use kivaloo_io_shim::client::{Client, Error};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Error> {
//! let (stream, mut server) = tokio::io::duplex(64 << 10);
//! # // A toy server: SET succeeds and GET answers "v" for every key.
//! # tokio::spawn(async move {
//! #     let (mut decoder, mut buf) = (PacketDecoder::new(), vec![0u8; 4096]);
//! #     while let Ok(n @ 1..) = server.read(&mut buf).await {
//! #         decoder.push(&buf[..n]);
//! #         let mut out = BytesMut::new();
//! #         while let Some(p) = decoder.next_packet().unwrap() {
//! #             let resp = match KvldsRequest::decode(p.record).unwrap() {
//! #                 KvldsRequest::Get { .. } => KvldsResponse::Get(Some(Bytes::from_static(b"v"))),
//! #                 _ => KvldsResponse::Done(true),
//! #             };
//! #             resp.encode(p.id, &mut out);
//! #         }
//! #         server.write_all(&out).await.unwrap();
//! #     }
//! # });
//! // With a server at the other end of `stream`:
//! let client = Client::from_stream(Box::new(stream), 64);
//! client.set("k", "v").await?;
//! // Requests made concurrently share the connection.
//! let (a, b) = tokio::join!(client.get("k"), client.get(b"k2"));
//! assert_eq!(a?.as_deref(), Some(&b"v"[..]));
//! assert!(b?.is_some());
//! # Ok(())
//! # }
//! ```
//!
//! Connecting to a running kvlds:
//!
//! ```no_run
//! use kivaloo_io_shim::addr::SocketAddr;
//! use kivaloo_io_shim::client::Client;
//!
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::connect(&SocketAddr::parse("/var/run/kvlds.sock")).await?;
//! let (max_key_len, max_value_len) = client.params().await?;
//! let mut pairs = client.range_iter("", "")?; // every pair
//! while let Some((key, value)) = pairs.next().await? {
//!     println!("{key:?} = {value:?}");
//! }
//! # let _ = (max_key_len, max_value_len);
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use kivaloo::client::{check_request, ClientConn, ProtocolError, RequestId, SendError};
use kivaloo::kvlds_proto::{KvldsRequest, KvldsRequestKind, KvldsResponse, SHORT_STRING_LEN_MAX};

use crate::addr::{connect, SocketAddr, Stream};

pub use kivaloo::client::{DEFAULT_IN_FLIGHT_MAX, RANGE_MAX_BYTES};

/// Bytes read from the connection at once.
pub const READ_CHUNK_BYTES: usize = 64 << 10;

/// Whether a request that failed may have changed the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Effect {
    /// It did not: it was never sent, or it does not modify the store
    /// (PARAMS, GET, RANGE). Retrying it is safe.
    None,
    /// A modifying request (SET, ADD, MODIFY, CAS, DELETE, CAD) whose answer
    /// did not arrive: it may or may not have taken effect (and may still,
    /// if the server had already received it).
    Unknown,
}

impl Effect {
    fn of(kind: KvldsRequestKind) -> Effect {
        if kind.is_modifying() {
            Effect::Unknown
        } else {
            Effect::None
        }
    }
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The connection was lost (closed by the server, an I/O error, or
    /// earlier a protocol error) before the answer arrived, or before the
    /// request was sent. The client is unusable from then on.
    ConnectionLost {
        /// Whether the request may have taken effect.
        effect: Effect,
        /// Why the connection was lost, for humans.
        reason: String,
    },
    /// A key or value is longer than the protocol allows (255 bytes):
    /// rejected before sending; the connection is unaffected. (A key or
    /// value over the server's own, possibly smaller, limits, see
    /// [`Client::params`], makes kvlds drop the connection.)
    TooLong {
        /// Which field: "key", "value", "old value", "new value", "start
        /// key" or "end key".
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// The server sent something invalid: the connection was dropped, and
    /// every request in flight failed with this error. A modifying request
    /// failing so may or may not have taken effect. (From
    /// [`RangeIter`], a `next` that makes no progress; the connection is
    /// then kept.)
    Protocol(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ConnectionLost { effect: Effect::None, reason } => {
                write!(f, "connection to kvlds lost ({reason}); the request had no effect")
            }
            Error::ConnectionLost { effect: Effect::Unknown, reason } => {
                write!(f, "connection to kvlds lost ({reason}); the request may or may not have taken effect")
            }
            Error::TooLong { field, len } => {
                write!(f, "{field} of {len} bytes is over the {SHORT_STRING_LEN_MAX}-byte maximum")
            }
            Error::Protocol(msg) => write!(f, "kvlds protocol error: {msg}"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// The error for a request refused by [`ClientConn::send`].
    fn from_send(e: SendError, reason: impl FnOnce() -> String) -> Error {
        match e {
            SendError::TooLong { field, len } => Error::TooLong { field, len },
            // Neither happens: budgets are clamped and the window is the
            // semaphore's; reported as unsent all the same.
            SendError::RangeBudgetTooLarge { .. } | SendError::WindowFull { .. } | SendError::Closed => {
                Error::ConnectionLost { effect: Effect::None, reason: format!("{} ({e})", reason()) }
            }
        }
    }
}

/// A request on its way to the connection task, holding its slot in the
/// window.
struct Command {
    request: KvldsRequest,
    reply: oneshot::Sender<Result<KvldsResponse, Error>>,
    permit: OwnedSemaphorePermit,
}

/// A request sent and not yet answered. Dropping it frees its slot.
struct Waiter {
    reply: oneshot::Sender<Result<KvldsResponse, Error>>,
    _permit: OwnedSemaphorePermit,
}

struct Shared {
    /// To the connection task; bounded by `window` (see the module docs).
    commands: mpsc::UnboundedSender<Command>,
    /// `in_flight_max` slots; closed when the connection is lost.
    window: Arc<Semaphore>,
    /// Why the connection was lost, set before `window` is closed.
    lost: Arc<Mutex<Option<String>>>,
    in_flight_max: usize,
}

/// A kvlds client: a handle on one connection. Cloning it is cheap and the
/// clones share the connection; it is `Send` and `Sync`. The connection
/// closes when the last handle (including those held by [`RangeIter`]s) is
/// dropped.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("in_flight_max", &self.shared.in_flight_max)
            .field("lost", &self.lost_reason())
            .finish()
    }
}

impl Client {
    /// Connects to a kvlds (or a mux) at `addr`, with a window of
    /// [`DEFAULT_IN_FLIGHT_MAX`] requests.
    ///
    /// # Errors
    /// Connecting failed, as the operating system reports.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub async fn connect(addr: &SocketAddr) -> io::Result<Client> {
        Ok(Client::from_stream(connect(addr).await?, DEFAULT_IN_FLIGHT_MAX))
    }

    /// A client speaking on `stream`, already connected to a kvlds, with at
    /// most `in_flight_max` requests in flight. Spawns the connection task.
    ///
    /// # Panics
    /// Outside a tokio runtime, or if `in_flight_max` is 0 or over
    /// [`Semaphore::MAX_PERMITS`].
    pub fn from_stream(stream: Box<dyn Stream>, in_flight_max: usize) -> Client {
        assert!(
            in_flight_max > 0 && in_flight_max <= Semaphore::MAX_PERMITS,
            "in_flight_max of {in_flight_max} is not in 1..={}",
            Semaphore::MAX_PERMITS
        );
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let window = Arc::new(Semaphore::new(in_flight_max));
        let lost = Arc::new(Mutex::new(None));
        let task = ConnTask {
            conn: ClientConn::new(in_flight_max),
            commands: commands_rx,
            waiting: HashMap::new(),
            window: window.clone(),
            lost: lost.clone(),
        };
        tokio::spawn(task.run(stream));
        Client { shared: Arc::new(Shared { commands, window, lost, in_flight_max }) }
    }

    /// The most requests in flight at once.
    pub fn in_flight_max(&self) -> usize {
        self.shared.in_flight_max
    }

    /// Why the connection was lost, or `None` while it is up.
    pub fn lost_reason(&self) -> Option<String> {
        self.shared.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lost_error(&self) -> Error {
        let reason = self.lost_reason().unwrap_or_else(|| "the connection task ended".to_string());
        Error::ConnectionLost { effect: Effect::None, reason }
    }

    /// Sends `request` (once there is room in the window) and waits for its
    /// answer.
    async fn call(&self, request: KvldsRequest) -> Result<KvldsResponse, Error> {
        check_request(&request).map_err(|e| Error::from_send(e, || "refused".to_string()))?;
        let kind = request.kind();
        let Ok(permit) = self.shared.window.clone().acquire_owned().await else {
            return Err(self.lost_error());
        };
        let (reply, answer) = oneshot::channel();
        if self.shared.commands.send(Command { request, reply, permit }).is_err() {
            return Err(self.lost_error());
        }
        match answer.await {
            Ok(result) => result,
            // The task ended without a word (it panicked).
            Err(_) => Err(Error::ConnectionLost {
                effect: Effect::of(kind),
                reason: "the connection task ended".to_string(),
            }),
        }
    }

    /// PARAMS: the longest key and the longest value the server accepts.
    ///
    /// # Errors
    /// See [`Error`].
    pub async fn params(&self) -> Result<(u32, u32), Error> {
        match self.call(KvldsRequest::Params).await? {
            KvldsResponse::Params { max_key_len, max_value_len } => Ok((max_key_len, max_value_len)),
            other => Err(mismatch("PARAMS", &other)),
        }
    }

    /// GET: the value of `key`, or `None` if it is absent.
    ///
    /// # Errors
    /// See [`Error`].
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>, Error> {
        let key = field("key", key)?;
        match self.call(KvldsRequest::Get { key }).await? {
            KvldsResponse::Get(value) => Ok(value.map(|v| Bytes::copy_from_slice(&v))),
            other => Err(mismatch("GET", &other)),
        }
    }

    /// SET `key` to `value`.
    ///
    /// # Errors
    /// See [`Error`].
    pub async fn set(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<(), Error> {
        let (key, value) = (field("key", key)?, field("value", value)?);
        self.done("SET", KvldsRequest::Set { key, value }).await.map(|_| ())
    }

    /// ADD: set `key` to `value` if `key` is absent. Returns whether it was
    /// set.
    ///
    /// # Errors
    /// See [`Error`].
    pub async fn add(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<bool, Error> {
        let (key, value) = (field("key", key)?, field("value", value)?);
        self.done("ADD", KvldsRequest::Add { key, value }).await
    }

    /// MODIFY: set `key` to `value` if `key` is present. Returns whether it
    /// was set.
    ///
    /// # Errors
    /// See [`Error`].
    pub async fn modify(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<bool, Error> {
        let (key, value) = (field("key", key)?, field("value", value)?);
        self.done("MODIFY", KvldsRequest::Modify { key, value }).await
    }

    /// CAS: set `key` to `new` if its value is `old`. Returns whether it was
    /// set.
    ///
    /// # Errors
    /// See [`Error`].
    pub async fn cas(
        &self,
        key: impl AsRef<[u8]>,
        old: impl AsRef<[u8]>,
        new: impl AsRef<[u8]>,
    ) -> Result<bool, Error> {
        let (key, old_value, new_value) =
            (field("key", key)?, field("old value", old)?, field("new value", new)?);
        self.done("CAS", KvldsRequest::Cas { key, old_value, new_value }).await
    }

    /// DELETE `key` (whether or not it is present).
    ///
    /// # Errors
    /// See [`Error`].
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<(), Error> {
        let key = field("key", key)?;
        self.done("DELETE", KvldsRequest::Delete { key }).await.map(|_| ())
    }

    /// CAD: delete `key` if its value is `old`. Returns whether it was
    /// deleted.
    ///
    /// # Errors
    /// See [`Error`].
    pub async fn cad(&self, key: impl AsRef<[u8]>, old: impl AsRef<[u8]>) -> Result<bool, Error> {
        let (key, old_value) = (field("key", key)?, field("old value", old)?);
        self.done("CAD", KvldsRequest::Cad { key, old_value }).await
    }

    async fn done(&self, name: &str, request: KvldsRequest) -> Result<bool, Error> {
        match self.call(request).await? {
            KvldsResponse::Done(done) => Ok(done),
            other => Err(mismatch(name, &other)),
        }
    }

    /// RANGE, one page: pairs with `start <= key < end` in key order (an
    /// empty `end` is past the last key), about `max_bytes` of them (each
    /// pair counting its key, its value and their two length bytes; at
    /// least one pair if any is in range; `max_bytes` is clamped to
    /// [`RANGE_MAX_BYTES`]), and `next`: every key in `[start, next)` was
    /// returned. The range is done if `next` is empty or (with a non-empty
    /// `end`) `next >= end`; otherwise the next page starts at `next`.
    /// [`Client::range_iter`] does that paging.
    ///
    /// A pair whose key is `end` is dropped: kivaloo's kvlds returns one,
    /// against its own documented semantics.
    ///
    /// # Errors
    /// See [`Error`].
    pub async fn range(
        &self,
        start: impl AsRef<[u8]>,
        end: impl AsRef<[u8]>,
        max_bytes: u32,
    ) -> Result<(Vec<(Bytes, Bytes)>, Bytes), Error> {
        let (start, end) = (field("start key", start)?, field("end key", end)?);
        self.range_page(start, end, max_bytes).await
    }

    async fn range_page(
        &self,
        start: Bytes,
        end: Bytes,
        max_bytes: u32,
    ) -> Result<(Vec<(Bytes, Bytes)>, Bytes), Error> {
        let request =
            KvldsRequest::Range { max_bytes: max_bytes.min(RANGE_MAX_BYTES), start, end: end.clone() };
        match self.call(request).await? {
            KvldsResponse::Range { next, mut pairs } => {
                if !end.is_empty() {
                    pairs.retain(|(k, _)| *k < end);
                }
                Ok((copy_pairs(&pairs), Bytes::copy_from_slice(&next)))
            }
            other => Err(mismatch("RANGE", &other)),
        }
    }

    /// Every pair with `start <= key < end` (an empty `end` is past the last
    /// key), in key order, fetched a page at a time with RANGE (one page in
    /// flight at a time, [`RANGE_MAX_BYTES`] per page unless
    /// [`RangeIter::with_page_bytes`] says otherwise).
    ///
    /// The pages are separate requests: a pair changed while the iteration
    /// goes on is seen as it was when its page was read.
    ///
    /// # Errors
    /// [`Error::TooLong`] if `start` or `end` is over 255 bytes.
    pub fn range_iter(&self, start: impl AsRef<[u8]>, end: impl AsRef<[u8]>) -> Result<RangeIter, Error> {
        let (start, end) = (field("start key", start)?, field("end key", end)?);
        let done = !end.is_empty() && start >= end;
        Ok(RangeIter {
            client: self.clone(),
            start,
            end,
            page_bytes: RANGE_MAX_BYTES,
            page: Vec::new().into_iter(),
            done,
        })
    }
}

/// Copies a key or value into a request, checking its length first.
fn field(name: &'static str, b: impl AsRef<[u8]>) -> Result<Bytes, Error> {
    let b = b.as_ref();
    if b.len() > SHORT_STRING_LEN_MAX {
        return Err(Error::TooLong { field: name, len: b.len() });
    }
    Ok(Bytes::copy_from_slice(b))
}

/// Copies a page's pairs into one buffer of their own (so that they do not
/// keep the receive buffer alive), as slices of it.
fn copy_pairs(pairs: &[(Bytes, Bytes)]) -> Vec<(Bytes, Bytes)> {
    let total = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
    let mut buf = BytesMut::with_capacity(total);
    for (k, v) in pairs {
        buf.extend_from_slice(k);
        buf.extend_from_slice(v);
    }
    let mut buf = buf.freeze();
    pairs
        .iter()
        .map(|(k, v)| {
            let key = buf.split_to(k.len());
            let value = buf.split_to(v.len());
            (key, value)
        })
        .collect()
}

/// A response of the wrong kind for its request: [`ClientConn`] decodes by
/// the request's kind, so this does not happen.
fn mismatch(request: &str, response: &KvldsResponse) -> Error {
    Error::Protocol(format!("{request} answered with {response:?}"))
}

/// The pairs of a key range, in key order, fetched a page (one RANGE) at a
/// time; from [`Client::range_iter`]. Holds one page at a time.
///
/// After an error, calling [`RangeIter::next`] again retries the page that
/// failed (except after a [`Error::Protocol`], which ends the iteration).
#[derive(Debug)]
pub struct RangeIter {
    client: Client,
    /// Where the next page starts.
    start: Bytes,
    end: Bytes,
    page_bytes: u32,
    /// What is left of the current page.
    page: std::vec::IntoIter<(Bytes, Bytes)>,
    /// No more pages.
    done: bool,
}

impl RangeIter {
    /// Asks for about `page_bytes` per page (clamped to
    /// [`RANGE_MAX_BYTES`]; each pair counts its key, its value and two
    /// length bytes; a page holds at least one pair).
    pub fn with_page_bytes(mut self, page_bytes: u32) -> Self {
        self.page_bytes = page_bytes.min(RANGE_MAX_BYTES);
        self
    }

    /// The next pair, `None` after the last.
    ///
    /// # Errors
    /// See [`Error`].
    pub async fn next(&mut self) -> Result<Option<(Bytes, Bytes)>, Error> {
        loop {
            if let Some(pair) = self.page.next() {
                return Ok(Some(pair));
            }
            if self.done {
                return Ok(None);
            }
            self.fetch().await?;
        }
    }

    /// The rest of the current page, or the next non-empty page; `None`
    /// after the last.
    ///
    /// # Errors
    /// See [`Error`].
    pub async fn next_page(&mut self) -> Result<Option<Vec<(Bytes, Bytes)>>, Error> {
        loop {
            let rest: Vec<_> = self.page.by_ref().collect();
            if !rest.is_empty() {
                return Ok(Some(rest));
            }
            if self.done {
                return Ok(None);
            }
            self.fetch().await?;
        }
    }

    /// Every remaining pair.
    ///
    /// # Errors
    /// See [`Error`].
    pub async fn collect_all(mut self) -> Result<Vec<(Bytes, Bytes)>, Error> {
        let mut all = Vec::new();
        while let Some(page) = self.next_page().await? {
            all.extend(page);
        }
        Ok(all)
    }

    /// Reads the page at `self.start`.
    async fn fetch(&mut self) -> Result<(), Error> {
        let (pairs, next) =
            self.client.range_page(self.start.clone(), self.end.clone(), self.page_bytes).await?;
        if next.is_empty() || (!self.end.is_empty() && next >= self.end) {
            self.done = true;
        } else if next <= self.start {
            self.done = true;
            return Err(Error::Protocol(format!(
                "RANGE from {:?} answered next {:?}: no progress",
                self.start, next
            )));
        } else {
            self.start = next;
        }
        self.page = pairs.into_iter();
        Ok(())
    }
}

/// How the connection ended.
enum Failure {
    /// Closed by the server, or an I/O error.
    Lost(String),
    /// The server sent something invalid.
    Protocol(ProtocolError),
}

/// The task that owns the connection.
struct ConnTask {
    conn: ClientConn,
    commands: mpsc::UnboundedReceiver<Command>,
    /// The requests given to `conn` and not yet answered.
    waiting: HashMap<RequestId, Waiter>,
    window: Arc<Semaphore>,
    lost: Arc<Mutex<Option<String>>>,
}

impl ConnTask {
    async fn run(mut self, stream: Box<dyn Stream>) {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut read_buf = vec![0u8; READ_CHUNK_BYTES];
        // Being written: every request queued when the last write ended.
        let mut writing = Bytes::new();
        let failure = loop {
            if writing.is_empty() {
                writing = self.conn.take_outgoing().unwrap_or_default();
            }
            tokio::select! {
                biased;
                r = rd.read(&mut read_buf) => match r {
                    Ok(0) => break Failure::Lost("the server closed the connection".to_string()),
                    Ok(n) => {
                        self.conn.receive(&read_buf[..n]);
                        if let Err(e) = self.dispatch() {
                            break Failure::Protocol(e);
                        }
                    }
                    Err(e) => break Failure::Lost(format!("reading from the server failed: {e}")),
                },
                command = self.commands.recv() => match command {
                    Some(command) => {
                        self.submit(command);
                        while let Ok(command) = self.commands.try_recv() {
                            self.submit(command);
                        }
                    }
                    // Every handle is gone: nobody waits for anything.
                    None => return,
                },
                r = wr.write(&writing), if !writing.is_empty() => match r {
                    Ok(0) => break Failure::Lost("writing to the server failed: wrote nothing".to_string()),
                    Ok(n) => {
                        writing.advance(n);
                        // Immediate on sockets and pipes; for a stream that
                        // buffers, lets the requests out once all are written.
                        if writing.is_empty() && self.conn.outgoing_len() == 0 {
                            if let Err(e) = wr.flush().await {
                                break Failure::Lost(format!("writing to the server failed: {e}"));
                            }
                        }
                    }
                    Err(e) => break Failure::Lost(format!("writing to the server failed: {e}")),
                },
            }
        };
        self.fail(failure);
    }

    /// Hands a request to the connection.
    fn submit(&mut self, Command { request, reply, permit }: Command) {
        match self.conn.send(&request) {
            Ok(id) => {
                self.waiting.insert(id, Waiter { reply, _permit: permit });
            }
            Err(e) => {
                let _ = reply.send(Err(Error::from_send(e, || "not sent".to_string())));
            }
        }
    }

    /// Answers every whole response received.
    fn dispatch(&mut self) -> Result<(), ProtocolError> {
        while let Some((id, response)) = self.conn.next_response()? {
            if let Some(waiter) = self.waiting.remove(&id) {
                let _ = waiter.reply.send(Ok(response));
            }
        }
        Ok(())
    }

    /// Fails every request queued or in flight, and every later one.
    fn fail(mut self, failure: Failure) {
        let reason = match &failure {
            Failure::Lost(reason) => reason.clone(),
            Failure::Protocol(e) => format!("protocol error: {e}"),
        };
        *self.lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.clone());
        self.window.close();
        self.commands.close();
        while let Ok(Command { reply, .. }) = self.commands.try_recv() {
            let _ = reply.send(Err(Error::ConnectionLost { effect: Effect::None, reason: reason.clone() }));
        }
        for (id, kind) in self.conn.connection_lost() {
            let Some(waiter) = self.waiting.remove(&id) else { continue };
            let error = match &failure {
                Failure::Lost(reason) => {
                    Error::ConnectionLost { effect: Effect::of(kind), reason: reason.clone() }
                }
                Failure::Protocol(e) => Error::Protocol(e.to_string()),
            };
            let _ = waiter.reply.send(Err(error));
        }
    }
}
