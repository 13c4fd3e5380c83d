//! Socket addresses as kivaloo's daemons take them: a path (unix socket),
//! `host:port`, or `[ip]:port`; and the listener and stream for each.

use std::io;
use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// Where a daemon listens or a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddr {
    /// A unix-domain socket at this path.
    Unix(PathBuf),
    /// A TCP address, `host:port` or `[ip]:port`, resolved when used.
    Tcp(String),
}

impl SocketAddr {
    /// Parses kivaloo's socket syntax: anything ending in `:<port>` that
    /// does not contain a `/` is TCP; everything else is a unix path.
    pub fn parse(s: &str) -> SocketAddr {
        if !s.contains('/') {
            if let Some((host, port)) = s.rsplit_once(':') {
                if !host.is_empty() && port.parse::<u16>().is_ok() {
                    return SocketAddr::Tcp(s.to_string());
                }
            }
        }
        SocketAddr::Unix(PathBuf::from(s))
    }

    /// The default pidfile: `<socket>.pid`.
    pub fn default_pidfile(&self) -> PathBuf {
        match self {
            SocketAddr::Unix(p) => {
                let mut s = p.clone().into_os_string();
                s.push(".pid");
                PathBuf::from(s)
            }
            SocketAddr::Tcp(s) => PathBuf::from(format!("{s}.pid")),
        }
    }
}

impl std::fmt::Display for SocketAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketAddr::Unix(p) => write!(f, "{}", p.display()),
            SocketAddr::Tcp(s) => f.write_str(s),
        }
    }
}

/// A bound listener: a unix or TCP socket, or an in-process one whose
/// connections are byte streams handed over by the process itself (the
/// all-in-one server joins its nodes so).
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
    Memory(tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Box<dyn Stream>>>, String),
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listener::Unix(_, path) => write!(f, "Listener::Unix({})", path.display()),
            Listener::Tcp(l) => write!(f, "Listener::Tcp({:?})", l.local_addr()),
            Listener::Memory(_, name) => write!(f, "Listener::Memory({name})"),
        }
    }
}

/// The other end of an in-process [`Listener::Memory`]: each stream sent
/// is accepted as a connection.
pub type MemoryConnector = tokio::sync::mpsc::Sender<Box<dyn Stream>>;

/// A connected byte stream of either kind.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

impl Listener {
    /// Binds `addr`. A stale unix socket (a socket file nobody listens on:
    /// connecting is refused) is replaced; a live one, or a path that is not
    /// a socket, is an error.
    ///
    /// # Errors
    /// The address is in use, cannot be resolved, or cannot be bound.
    pub async fn bind(addr: &SocketAddr) -> io::Result<Listener> {
        match addr {
            SocketAddr::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if !meta.file_type().is_socket() {
                        return Err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            format!("{} exists and is not a socket", path.display()),
                        ));
                    }
                    match UnixStream::connect(path).await {
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)?,
                        _ => {
                            return Err(io::Error::new(
                                io::ErrorKind::AddrInUse,
                                format!("{} is in use by a running server", path.display()),
                            ))
                        }
                    }
                }
                Ok(Listener::Unix(UnixListener::bind(path)?, path.clone()))
            }
            SocketAddr::Tcp(s) => {
                let l = TcpListener::bind(s.as_str()).await?;
                Ok(Listener::Tcp(l))
            }
        }
    }

    /// An in-process listener named `name` (for logs) and the sender that
    /// hands it connections; up to `backlog` wait to be accepted.
    pub fn memory(name: &str, backlog: usize) -> (Listener, MemoryConnector) {
        let (tx, rx) = tokio::sync::mpsc::channel(backlog.max(1));
        (Listener::Memory(tokio::sync::Mutex::new(rx), name.to_string()), tx)
    }

    /// Accepts one connection; returns the stream and a description of the
    /// peer for logs.
    ///
    /// # Errors
    /// As the operating system reports.
    pub async fn accept(&self) -> io::Result<(Box<dyn Stream>, String)> {
        match self {
            Listener::Unix(l, path) => {
                let (s, _) = l.accept().await?;
                Ok((Box::new(s), format!("unix:{}", path.display())))
            }
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok((Box::new(s), format!("tcp:{peer}")))
            }
            Listener::Memory(rx, name) => match rx.lock().await.recv().await {
                Some(s) => Ok((s, format!("in-process:{name}"))),
                None => std::future::pending().await,
            },
        }
    }
}

impl Drop for Listener {
    /// A unix listener removes its socket file, so that a stopped daemon
    /// leaves nothing behind.
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Connects to `addr`.
///
/// # Errors
/// As the operating system reports.
/// Bytes a daemon asks the kernel to buffer for sending to its upstream
/// (kvlds to lbs): a whole commit's APPEND (several MiB) then leaves in a
/// few writes instead of a hundred, so the node's one thread is not called
/// back to the socket between requests. The kernel caps it at
/// `net.core.wmem_max` (4 MiB here); asking is harmless where less is
/// allowed.
pub const UPSTREAM_SEND_BUFFER_BYTES: usize = 4 << 20;

/// Connects to a daemon's upstream, as [`connect`], with a send buffer of
/// [`UPSTREAM_SEND_BUFFER_BYTES`] (a unix socket's; TCP tunes its own).
///
/// # Errors
/// As [`connect`].
pub async fn connect_upstream(addr: &SocketAddr) -> io::Result<Box<dyn Stream>> {
    match addr {
        SocketAddr::Unix(p) => {
            let st = UnixStream::connect(p).await?;
            set_send_buffer(&st, UPSTREAM_SEND_BUFFER_BYTES);
            Ok(Box::new(st))
        }
        SocketAddr::Tcp(_) => connect(addr).await,
    }
}

/// Asks for a send buffer of `bytes`; a refusal only leaves the default.
fn set_send_buffer(st: &UnixStream, bytes: usize) {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live
    // c_int; the descriptor belongs to `st`, open for this call.
    unsafe {
        libc::setsockopt(
            st.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

pub async fn connect(addr: &SocketAddr) -> io::Result<Box<dyn Stream>> {
    match addr {
        SocketAddr::Unix(p) => Ok(Box::new(UnixStream::connect(p).await?)),
        SocketAddr::Tcp(s) => {
            let st = TcpStream::connect(s.as_str()).await?;
            st.set_nodelay(true)?;
            Ok(Box::new(st))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kivaloo_socket_syntax() {
        assert_eq!(SocketAddr::parse("/tmp/lbs.sock"), SocketAddr::Unix("/tmp/lbs.sock".into()));
        assert_eq!(SocketAddr::parse("lbs.sock"), SocketAddr::Unix("lbs.sock".into()));
        assert_eq!(SocketAddr::parse("localhost:7000"), SocketAddr::Tcp("localhost:7000".into()));
        assert_eq!(SocketAddr::parse("[::1]:7000"), SocketAddr::Tcp("[::1]:7000".into()));
        assert_eq!(SocketAddr::parse("./a:1"), SocketAddr::Unix("./a:1".into()));
        assert_eq!(SocketAddr::parse("a:notaport"), SocketAddr::Unix("a:notaport".into()));
        assert_eq!(SocketAddr::parse("/s").default_pidfile(), PathBuf::from("/s.pid"));
    }
}
