//! One connection's two tasks: a reader that hands received chunks to the
//! event loop, and a writer that sends what the node sends, coalescing
//! whatever is queued into one write and reporting what it wrote (the node
//! bounds what it has sent and not yet seen written). The reader reads only
//! while the node wants bytes and fewer than
//! [`RECEIVED_CHUNKS_IN_FLIGHT_MAX`] chunks wait for the node. It reads
//! [`READ_CHUNK_BYTES`] at a time, more (see [`next_read_chunk_bytes`]) on a
//! connection whose node allows larger chunks and whose reads keep filling
//! them.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

use kivaloo::contract::{ConnClosed, ConnId};

use crate::addr::Stream;

/// Bytes read from a socket at once, at first and whenever reads come back
/// short.
pub const READ_CHUNK_BYTES: usize = 64 << 10;
/// The largest read buffer of lbs's connections: its client (kvlds) sends
/// commits of megabytes in one packet.
pub const BULK_READ_CHUNK_BYTES_MAX: usize = 2 << 20;
/// Chunks read from one connection and not yet handed to the node.
pub const RECEIVED_CHUNKS_IN_FLIGHT_MAX: usize = 2;
/// The most bytes the writer gathers into one write.
pub const WRITE_GATHER_BYTES_MAX: usize = 1 << 20;
/// After the node closes a connection, how long the writer may take to send
/// what was queued before it gives up on a peer that does not read.
pub const CLOSE_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a connection's tasks tell the event loop.
pub enum ConnEvent {
    /// A chunk arrived; hand it to the node, then call
    /// [`ConnHandle::chunk_delivered`].
    Received(ConnId, Bytes),
    /// Bytes given to [`ConnHandle::send`] were written to the socket.
    Sent(ConnId, u64),
    /// The connection ended from the peer's side or the transport's.
    Closed(ConnId, ConnClosed),
}

enum WriterMsg {
    Data(Bytes),
    Close,
}

/// State shared by the event loop and the connection's tasks.
#[derive(Default)]
struct Shared {
    read_enabled: AtomicBool,
    received_chunks: AtomicUsize,
    /// Wakes the reader when one of the above may now allow reading.
    reader_wake: Notify,
}

/// The size of the next read's buffer after a read of `read_bytes` into a
/// buffer of `chunk_bytes`: double (up to `chunk_bytes_max`) after a read
/// that filled it, back to [`READ_CHUNK_BYTES`] after one that did not fill
/// half of it. A peer streaming a large packet (kvlds sending lbs a
/// commit of megabytes) is then read in a few large reads rather than in a
/// hundred that each pass through the event loop; a connection holds at
/// most [`RECEIVED_CHUNKS_IN_FLIGHT_MAX`] chunks of `chunk_bytes_max`.
pub fn next_read_chunk_bytes(chunk_bytes: usize, read_bytes: usize, chunk_bytes_max: usize) -> usize {
    if read_bytes >= chunk_bytes {
        (chunk_bytes * 2).min(chunk_bytes_max).max(READ_CHUNK_BYTES)
    } else if read_bytes < chunk_bytes / 2 {
        READ_CHUNK_BYTES
    } else {
        chunk_bytes
    }
}

impl Shared {
    fn may_read(&self) -> bool {
        self.read_enabled.load(Ordering::Acquire)
            && self.received_chunks.load(Ordering::Acquire) < RECEIVED_CHUNKS_IN_FLIGHT_MAX
    }
}

/// The event loop's handle on one connection.
pub struct ConnHandle {
    /// The peer, for logs.
    pub peer: String,
    writer: mpsc::UnboundedSender<WriterMsg>,
    shared: Arc<Shared>,
    reader: tokio::task::JoinHandle<()>,
    writer_task: tokio::task::AbortHandle,
}

impl ConnHandle {
    /// Starts the reader and writer tasks of `stream`; reads use buffers
    /// of at most `read_chunk_bytes_max` (at least [`READ_CHUNK_BYTES`]).
    pub fn spawn(
        conn: ConnId,
        stream: Box<dyn Stream>,
        peer: String,
        events: mpsc::UnboundedSender<ConnEvent>,
        read_chunk_bytes_max: usize,
    ) -> ConnHandle {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let shared = Arc::new(Shared::default());
        shared.read_enabled.store(true, Ordering::Release);

        let reader_shared = shared.clone();
        let reader_events = events.clone();
        let reader = tokio::spawn(async move {
            let mut chunk_bytes = READ_CHUNK_BYTES;
            loop {
                while !reader_shared.may_read() {
                    reader_shared.reader_wake.notified().await;
                }
                let mut buf = BytesMut::with_capacity(chunk_bytes);
                let event = match rd.read_buf(&mut buf).await {
                    Ok(0) => ConnEvent::Closed(conn, ConnClosed::PeerClosed),
                    Ok(n) => {
                        chunk_bytes = next_read_chunk_bytes(chunk_bytes, n, read_chunk_bytes_max);
                        reader_shared.received_chunks.fetch_add(1, Ordering::AcqRel);
                        ConnEvent::Received(conn, buf.freeze())
                    }
                    Err(e) => ConnEvent::Closed(conn, ConnClosed::Failed(e.to_string())),
                };
                let last = matches!(event, ConnEvent::Closed(..));
                if reader_events.send(event).is_err() || last {
                    return;
                }
            }
        });

        let (writer, mut writer_rx) = mpsc::unbounded_channel::<WriterMsg>();
        let writer_task = tokio::spawn(async move {
            let mut gathered = BytesMut::new();
            while let Some(first) = writer_rx.recv().await {
                // Gather what is already queued into one write.
                let mut close = false;
                let mut single = None;
                let mut total = 0;
                let mut next = Some(first);
                while let Some(msg) = next.take() {
                    match msg {
                        WriterMsg::Close => close = true,
                        WriterMsg::Data(data) => {
                            total += data.len();
                            match single.take() {
                                None if gathered.is_empty() => single = Some(data),
                                prev => {
                                    if let Some(p) = prev {
                                        gathered.extend_from_slice(&p);
                                    }
                                    gathered.extend_from_slice(&data);
                                }
                            }
                        }
                    }
                    if !close && total < WRITE_GATHER_BYTES_MAX {
                        next = writer_rx.try_recv().ok();
                    }
                }
                let write = async {
                    match &single {
                        Some(data) => wr.write_all(data).await,
                        None => wr.write_all(&gathered).await,
                    }
                };
                let result = if close {
                    match tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, write).await {
                        Ok(r) => r,
                        Err(_) => return, // the peer does not read: drop the socket
                    }
                } else {
                    write.await
                };
                gathered.clear();
                if let Err(e) = result {
                    let _ = events.send(ConnEvent::Closed(conn, ConnClosed::Failed(e.to_string())));
                    return;
                }
                if total > 0 && events.send(ConnEvent::Sent(conn, total as u64)).is_err() {
                    return;
                }
                if close {
                    let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, wr.shutdown()).await;
                    return;
                }
            }
        });
        let writer_task = writer_task.abort_handle();
        ConnHandle { peer, writer, shared, reader, writer_task }
    }

    /// Queues bytes to send.
    pub fn send(&self, data: Bytes) {
        let _ = self.writer.send(WriterMsg::Data(data));
    }

    /// Turns reading on or off at the node's request.
    pub fn set_read_enabled(&self, enabled: bool) {
        self.shared.read_enabled.store(enabled, Ordering::Release);
        if enabled {
            self.shared.reader_wake.notify_one();
        }
    }

    /// Records that a received chunk was handed to the node.
    pub fn chunk_delivered(&self) {
        self.shared.received_chunks.fetch_sub(1, Ordering::AcqRel);
        self.shared.reader_wake.notify_one();
    }

    /// Stops reading, sends what is queued (for at most
    /// [`CLOSE_FLUSH_TIMEOUT`]), then closes.
    pub fn close(self) {
        let _ = self.writer.send(WriterMsg::Close);
        // Dropping `self` stops the reader.
    }
}

impl Drop for ConnHandle {
    /// The reader may be parked waiting for room; stop it, so that it does
    /// not hold the socket open after the connection is gone. The writer
    /// ends once its queue is closed (this handle held the only sender),
    /// or, if it is stuck writing to a peer that does not read, is stopped
    /// [`CLOSE_FLUSH_TIMEOUT`] from now, dropping the socket and whatever
    /// was queued: a connection the node is done with holds no memory for
    /// longer than that.
    fn drop(&mut self) {
        self.reader.abort();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let writer = self.writer_task.clone();
            rt.spawn(async move {
                tokio::time::sleep(CLOSE_FLUSH_TIMEOUT).await;
                writer.abort();
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_grow_while_they_fill_and_fall_back_when_short() {
        let max = BULK_READ_CHUNK_BYTES_MAX;
        let mut chunk = READ_CHUNK_BYTES;
        let mut sizes = vec![chunk];
        while chunk < max {
            chunk = next_read_chunk_bytes(chunk, chunk, max);
            sizes.push(chunk);
        }
        assert_eq!(sizes, [64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20]);
        assert_eq!(next_read_chunk_bytes(max, max, max), max, "never above the maximum");
        assert_eq!(next_read_chunk_bytes(max, max / 2, max), max, "half full keeps the size");
        assert_eq!(next_read_chunk_bytes(max, max / 2 - 1, max), READ_CHUNK_BYTES, "less falls back");
        assert_eq!(
            next_read_chunk_bytes(READ_CHUNK_BYTES, READ_CHUNK_BYTES, READ_CHUNK_BYTES),
            READ_CHUNK_BYTES,
            "a node that allows no growth gets none"
        );
    }
}
