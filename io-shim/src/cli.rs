//! The client subcommands of the `kivaloo` command line (`get`, `set`,
//! `add`, `modify`, `cas`, `delete`, `cad`, `range`, `params`): one request
//! (or one RANGE iteration) on one connection, for people and scripts; and
//! `dump` and `load` (a whole store to a file and back), which
//! [`crate::dump`] runs.
//!
//! # Input
//!
//! Keys and values are the bytes of the command-line arguments as given
//! (UTF-8 text usually, but any bytes except NUL, which no argument can
//! hold). With `--hex` every KEY, VALUE, OLD, NEW, START and END is hex
//! instead (either case, two digits a byte, empty for the empty string). A key or value over 255 bytes, or bad hex,
//! is a usage error, found before connecting. An argument that starts with
//! `-` follows `--` (`kivaloo set -- -k -v`).
//!
//! # Output
//!
//! `get` prints the value and a newline; `range` one pair a line, the key,
//! a tab and the value; `params` two lines, `max key length: N` and `max
//! value length: N`. With `--hex` keys and values are printed as lowercase
//! hex. Without it, every byte that is not printable ASCII (below 0x20 or
//! 0x7f and above), and tab, newline and backslash, is printed as `\xNN`
//! (lowercase hex), so that a line is always one pair and the bytes can be
//! recovered: e.g. the value `a\b` prints as `a\x5cb`.
//!
//! # Exit status
//!
//! | status | meaning |
//! |---|---|
//! | 0 | done: the key was found (`get`), the request was done (`set`, `delete`, `range`, `params`), the condition held (`add`, `modify`, `cas`, `cad`) |
//! | 1 | not done: the key is absent (`get`), the condition did not hold (`add`, `modify`, `cas`, `cad`); nothing changed |
//! | 2 | usage error: bad arguments (clap's errors), bad hex, a key or value over 255 bytes or over the store's limits |
//! | 3 | the store cannot be reached, the connection was lost or the store answered garbage; stderr says why and, for a request that modifies the store, whether it may have taken effect |
//! | 4 | writing the output failed (e.g. a closed pipe, reported silently) |
//!
//! `dump` and `load` use the same statuses: 2 also for an existing dump
//! file (without `--force`) and for a dump file that is truncated, corrupt
//! or over the store's limits (nothing loaded); 4 for writing or reading
//! the dump file (see [`crate::dump`]).
//!
//! A request that modifies the store is preceded by PARAMS, so that a key or
//! value over the store's own limits (smaller than 255 bytes with small
//! blocks or kvlds's `-k`/`-v`) is a usage error (2) instead of the store
//! dropping the connection (3, effect unknown).

use std::ffi::OsString;
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;

use bytes::Bytes;
use clap::{Args, Subcommand};
use kivaloo::kvlds_proto::{KvldsRequest, SHORT_STRING_LEN_MAX};
use kivaloo::LogLevel;

use crate::addr::SocketAddr;
use crate::client::{Client, Effect, Error};
use crate::dump::{DumpArgs, LoadArgs};
use crate::runtime::{build_runtime, log};

/// The exit status of a request that was done (or a key that was found).
pub const EXIT_DONE: i32 = 0;
/// The exit status of a condition that did not hold (or a key that is
/// absent).
pub const EXIT_NOT_DONE: i32 = 1;
/// The exit status of a usage error.
pub const EXIT_USAGE: i32 = 2;
/// The exit status when the store cannot be reached, the connection was
/// lost, or the store broke the protocol.
pub const EXIT_STORE: i32 = 3;
/// The exit status when writing the output failed.
pub const EXIT_OUTPUT: i32 = 4;

const AFTER_HELP: &str = "\
Output: without --hex, every byte that is not printable ASCII, and tab, newline and backslash, \
is printed as \\xNN, so that one line is always one value or pair.

Exit status: 0 done (found); 1 not done (absent, or the condition did not hold); 2 usage error \
(bad hex, a key or value too long); 3 the store cannot be reached, the connection was lost or \
the store broke the protocol (stderr says whether a modifying request may have taken effect); \
4 writing the output failed.";

/// Where the store is, and how keys and values are written.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The store: a unix socket path, host:port or [ip]:port (where `kivaloo serve --listen`
    /// listens, or a kvlds or mux socket).
    #[arg(long, value_name = "ADDR", default_value = "kivaloo.sock")]
    pub socket: String,
    /// Every KEY, VALUE, OLD, NEW, START and END argument is hex (binary-safe input), and keys
    /// and values are printed as lowercase hex (binary-safe output).
    #[arg(long)]
    pub hex: bool,
}

const DUMP_AFTER_HELP: &str = "\
The dump is written to FILE.tmp.PID in FILE's directory, synced, then named FILE: a file named \
FILE is always a complete dump. It is not a point-in-time snapshot if other clients write \
meanwhile: each page of pairs is read at once, but a pair changed after its page was read is \
dumped as it was. The format has checksums and a trailer, so that `kivaloo load` refuses a \
truncated or damaged dump.

Exit status: 0 done; 2 usage error (FILE exists without --force); 3 the store cannot be reached, \
the connection was lost or the store broke the protocol (FILE is not written); 4 writing FILE \
failed.";

const LOAD_AFTER_HELP: &str = "\
FILE is read twice: first it is checked whole (format, checksums, counts, keys and values within \
the store's limits), then every pair is SET, many at once. Pairs in the store that are not in \
FILE are left alone.

Exit status: 0 done; 2 usage error, or FILE is truncated, damaged or over the store's limits \
(nothing was loaded); 3 the store cannot be reached, the connection was lost or the store broke \
the protocol (stderr says how many pairs were stored; running the load again finishes it); 4 \
reading FILE failed, or it changed during the load.";

/// The client subcommands: each exits with a status saying how it went.
#[derive(Subcommand, Debug, Clone)]
pub enum ClientCommand {
    #[command(flatten)]
    Request(RequestCommand),
    /// Write every pair of the store to FILE, a dump that `kivaloo load` reads.
    ///
    /// Prints a summary on stderr (pairs, bytes, seconds); on a terminal also the progress.
    #[command(after_long_help = DUMP_AFTER_HELP)]
    Dump(DumpArgs),
    /// Store every pair of FILE, a dump written by `kivaloo dump`, in the store.
    ///
    /// Prints a summary on stderr (pairs, bytes, seconds); on a terminal also the progress.
    #[command(after_long_help = LOAD_AFTER_HELP)]
    Load(LoadArgs),
}

/// The subcommands that send one request to the store (`range` as many as
/// it takes).
#[derive(Subcommand, Debug, Clone)]
pub enum RequestCommand {
    /// Print the value of KEY, followed by a newline.
    ///
    /// Exits 0 if KEY is present, 1 (printing nothing) if it is absent.
    #[command(after_long_help = AFTER_HELP)]
    Get {
        #[command(flatten)]
        target: Target,
        /// The key.
        key: OsString,
    },
    /// Set KEY to VALUE, whether or not KEY is present.
    ///
    /// Exits 0 once the store has it on disk.
    #[command(after_long_help = AFTER_HELP)]
    Set {
        #[command(flatten)]
        target: Target,
        /// The key.
        key: OsString,
        /// Its new value.
        value: OsString,
    },
    /// Set KEY to VALUE if KEY is absent.
    ///
    /// Exits 0 if it was set, 1 if KEY was present (it is left unchanged).
    #[command(after_long_help = AFTER_HELP)]
    Add {
        #[command(flatten)]
        target: Target,
        /// The key.
        key: OsString,
        /// Its value.
        value: OsString,
    },
    /// Set KEY to VALUE if KEY is present.
    ///
    /// Exits 0 if it was set, 1 if KEY was absent (it stays absent).
    #[command(after_long_help = AFTER_HELP)]
    Modify {
        #[command(flatten)]
        target: Target,
        /// The key.
        key: OsString,
        /// Its new value.
        value: OsString,
    },
    /// Compare and swap: set KEY to NEW if its value is OLD.
    ///
    /// Exits 0 if it was set, 1 if KEY was absent or its value was not OLD (nothing changed).
    #[command(after_long_help = AFTER_HELP)]
    Cas {
        #[command(flatten)]
        target: Target,
        /// The key.
        key: OsString,
        /// The value KEY must have.
        old: OsString,
        /// Its new value.
        new: OsString,
    },
    /// Delete KEY, whether or not it is present.
    ///
    /// Exits 0 once the deletion is on disk (also if KEY was absent).
    #[command(after_long_help = AFTER_HELP)]
    Delete {
        #[command(flatten)]
        target: Target,
        /// The key.
        key: OsString,
    },
    /// Compare and delete: delete KEY if its value is OLD.
    ///
    /// Exits 0 if it was deleted, 1 if KEY was absent or its value was not OLD (nothing changed).
    #[command(after_long_help = AFTER_HELP)]
    Cad {
        #[command(flatten)]
        target: Target,
        /// The key.
        key: OsString,
        /// The value KEY must have.
        old: OsString,
    },
    /// Print every pair with START <= key < END, in key order, one a line: key, tab, value.
    ///
    /// Without START, from the first key; without END (or with an empty one), to past the last
    /// key. The pairs are read a page at a time (separate RANGE requests), so a pair changed
    /// meanwhile is printed as it was when its page was read. Exits 0 once every pair is printed
    /// (none is fine); if the connection is lost midway, the pairs printed so far are all there
    /// is and the exit status is 3.
    #[command(after_long_help = AFTER_HELP)]
    Range {
        #[command(flatten)]
        target: Target,
        /// The first key (default: the first key there is).
        start: Option<OsString>,
        /// The key after the last (default: past the last key).
        end: Option<OsString>,
    },
    /// Print the longest key and value the store accepts.
    ///
    /// Two lines: `max key length: N` and `max value length: N` (255 and 255 with 2048-byte
    /// blocks or larger).
    #[command(after_long_help = AFTER_HELP)]
    Params {
        #[command(flatten)]
        target: Target,
    },
}

/// One request, its arguments decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    Get(Vec<u8>),
    Set(Vec<u8>, Vec<u8>),
    Add(Vec<u8>, Vec<u8>),
    Modify(Vec<u8>, Vec<u8>),
    Cas(Vec<u8>, Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    Cad(Vec<u8>, Vec<u8>),
    Range(Vec<u8>, Vec<u8>),
    Params,
}

impl Request {
    /// The subcommand's name, for messages.
    fn name(&self) -> &'static str {
        match self {
            Request::Get(..) => "get",
            Request::Set(..) => "set",
            Request::Add(..) => "add",
            Request::Modify(..) => "modify",
            Request::Cas(..) => "cas",
            Request::Delete(..) => "delete",
            Request::Cad(..) => "cad",
            Request::Range(..) => "range",
            Request::Params => "params",
        }
    }

    /// The request as kvlds sees it, for a request that modifies the store.
    fn modifying(&self) -> Option<KvldsRequest> {
        let b = |v: &Vec<u8>| Bytes::copy_from_slice(v);
        Some(match self {
            Request::Set(k, v) => KvldsRequest::Set { key: b(k), value: b(v) },
            Request::Add(k, v) => KvldsRequest::Add { key: b(k), value: b(v) },
            Request::Modify(k, v) => KvldsRequest::Modify { key: b(k), value: b(v) },
            Request::Cas(k, o, n) => KvldsRequest::Cas { key: b(k), old_value: b(o), new_value: b(n) },
            Request::Delete(k) => KvldsRequest::Delete { key: b(k) },
            Request::Cad(k, o) => KvldsRequest::Cad { key: b(k), old_value: b(o) },
            Request::Get(..) | Request::Range(..) | Request::Params => return None,
        })
    }
}

/// Why a command failed, by exit status.
#[derive(Debug)]
enum Failure {
    /// [`EXIT_USAGE`].
    Usage(String),
    /// [`EXIT_STORE`].
    Store(String),
    /// [`EXIT_OUTPUT`].
    Output(io::Error),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Output(e)
    }
}

/// Runs a client subcommand. Returns the exit status (see the module
/// docs).
pub fn run(cmd: ClientCommand) -> i32 {
    match cmd {
        ClientCommand::Request(cmd) => run_request(cmd),
        ClientCommand::Dump(args) => crate::dump::run_dump(&args),
        ClientCommand::Load(args) => crate::dump::run_load(&args),
    }
}

/// Runs a one-request subcommand: decodes its arguments, connects, sends
/// the request, prints the answer on stdout and any failure on stderr.
/// Returns the exit status (see the module docs).
fn run_request(cmd: RequestCommand) -> i32 {
    let (target, request) = match decode(cmd) {
        Ok(r) => r,
        Err(msg) => {
            log("kivaloo", LogLevel::Error, &msg);
            return EXIT_USAGE;
        }
    };
    let rt = match build_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            log("kivaloo", LogLevel::Error, &format!("cannot start the runtime: {e}"));
            return EXIT_STORE;
        }
    };
    let addr = SocketAddr::parse(&target.socket);
    let mut out = BufWriter::new(io::stdout().lock());
    let result = rt.block_on(execute(&addr, &request, target.hex, &mut out));
    let result = result.and_then(|done| out.flush().map(|()| done).map_err(Failure::Output));
    match result {
        Ok(true) => EXIT_DONE,
        Ok(false) => EXIT_NOT_DONE,
        Err(failure) => {
            // Whatever was printed before the failure (part of a range)
            // goes out; a failure to write it is not the one to report.
            let _ = out.flush();
            match failure {
                Failure::Usage(msg) => {
                    log("kivaloo", LogLevel::Error, &msg);
                    EXIT_USAGE
                }
                Failure::Store(msg) => {
                    log("kivaloo", LogLevel::Error, &msg);
                    EXIT_STORE
                }
                Failure::Output(e) => {
                    if e.kind() != io::ErrorKind::BrokenPipe {
                        log("kivaloo", LogLevel::Error, &format!("writing the output failed: {e}"));
                    }
                    EXIT_OUTPUT
                }
            }
        }
    }
}

/// The subcommand's target and its request, the arguments decoded and
/// checked against the protocol's 255-byte limit.
fn decode(cmd: RequestCommand) -> Result<(Target, Request), String> {
    fn arg(target: &Target, name: &str, a: &OsString) -> Result<Vec<u8>, String> {
        let bytes = if target.hex {
            let Some(s) = a.to_str() else {
                return Err(format!("{name} is not valid hex: it is not even text"));
            };
            hex_decode(s).map_err(|why| format!("{name} {s:?} is not valid hex: {why}"))?
        } else {
            a.as_bytes().to_vec()
        };
        if bytes.len() > SHORT_STRING_LEN_MAX {
            return Err(format!(
                "{name} of {} bytes is over the {SHORT_STRING_LEN_MAX}-byte maximum",
                bytes.len()
            ));
        }
        Ok(bytes)
    }
    let opt = |t: &Target, name: &str, a: &Option<OsString>| match a {
        Some(a) => arg(t, name, a),
        None => Ok(Vec::new()),
    };
    let request = match &cmd {
        RequestCommand::Get { target: t, key } => Request::Get(arg(t, "KEY", key)?),
        RequestCommand::Set { target: t, key, value } => {
            Request::Set(arg(t, "KEY", key)?, arg(t, "VALUE", value)?)
        }
        RequestCommand::Add { target: t, key, value } => {
            Request::Add(arg(t, "KEY", key)?, arg(t, "VALUE", value)?)
        }
        RequestCommand::Modify { target: t, key, value } => {
            Request::Modify(arg(t, "KEY", key)?, arg(t, "VALUE", value)?)
        }
        RequestCommand::Cas { target: t, key, old, new } => {
            Request::Cas(arg(t, "KEY", key)?, arg(t, "OLD", old)?, arg(t, "NEW", new)?)
        }
        RequestCommand::Delete { target: t, key } => Request::Delete(arg(t, "KEY", key)?),
        RequestCommand::Cad { target: t, key, old } => Request::Cad(arg(t, "KEY", key)?, arg(t, "OLD", old)?),
        RequestCommand::Range { target: t, start, end } => {
            Request::Range(opt(t, "START", start)?, opt(t, "END", end)?)
        }
        RequestCommand::Params { .. } => Request::Params,
    };
    let target = match cmd {
        RequestCommand::Get { target, .. }
        | RequestCommand::Set { target, .. }
        | RequestCommand::Add { target, .. }
        | RequestCommand::Modify { target, .. }
        | RequestCommand::Cas { target, .. }
        | RequestCommand::Delete { target, .. }
        | RequestCommand::Cad { target, .. }
        | RequestCommand::Range { target, .. }
        | RequestCommand::Params { target } => target,
    };
    Ok((target, request))
}

/// Sends `request` to the store at `addr` and prints the answer on `out`.
/// Returns whether it was done (found, the condition held).
async fn execute(
    addr: &SocketAddr,
    request: &Request,
    hex: bool,
    out: &mut impl Write,
) -> Result<bool, Failure> {
    let name = request.name();
    let client = Client::connect(addr).await.map_err(|e| Failure::Store(connect_failure(addr, &e)))?;
    let lost = |e: Error| request_failure(name, addr, e);
    if let Some(write) = request.modifying() {
        // The store drops a connection whose request is over its limits:
        // ask for them first, to say so instead.
        let (key_max, value_max) = client.params().await.map_err(|e| match e {
            Error::ConnectionLost { reason, .. } => Failure::Store(format!(
                "the connection to the store at {addr} was lost ({reason}) before the {name} was sent; \
                 it had no effect"
            )),
            e => request_failure("params", addr, e),
        })?;
        if let Some(why) = write.over_limits(key_max as usize, value_max as usize) {
            return Err(Failure::Usage(format!("{why} of the store at {addr}")));
        }
    }
    match request {
        Request::Get(key) => match client.get(key).await.map_err(lost)? {
            Some(value) => {
                write_field(out, &value, hex)?;
                out.write_all(b"\n")?;
                Ok(true)
            }
            None => Ok(false),
        },
        Request::Set(key, value) => client.set(key, value).await.map(|()| true).map_err(lost),
        Request::Add(key, value) => client.add(key, value).await.map_err(lost),
        Request::Modify(key, value) => client.modify(key, value).await.map_err(lost),
        Request::Cas(key, old, new) => client.cas(key, old, new).await.map_err(lost),
        Request::Delete(key) => client.delete(key).await.map(|()| true).map_err(lost),
        Request::Cad(key, old) => client.cad(key, old).await.map_err(lost),
        Request::Range(start, end) => {
            let mut pairs = client.range_iter(start, end).map_err(lost)?;
            while let Some((key, value)) = pairs.next().await.map_err(lost)? {
                write_field(out, &key, hex)?;
                out.write_all(b"\t")?;
                write_field(out, &value, hex)?;
                out.write_all(b"\n")?;
            }
            Ok(true)
        }
        Request::Params => {
            let (key_max, value_max) = client.params().await.map_err(lost)?;
            writeln!(out, "max key length: {key_max}")?;
            writeln!(out, "max value length: {value_max}")?;
            Ok(true)
        }
    }
}

/// Why connecting to the store at `addr` failed with `e`, with a hint.
pub(crate) fn connect_failure(addr: &SocketAddr, e: &io::Error) -> String {
    let hint = match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            " (is `kivaloo serve` running and listening there?)"
        }
        _ => "",
    };
    format!("cannot connect to the store at {addr}: {e}{hint}")
}

/// The failure of request `name` with error `e`.
fn request_failure(name: &str, addr: &SocketAddr, e: Error) -> Failure {
    match e {
        Error::TooLong { .. } => Failure::Usage(e.to_string()),
        Error::ConnectionLost { effect: Effect::None, reason } => Failure::Store(format!(
            "{name}: the connection to the store at {addr} was lost ({reason}); it had no effect"
        )),
        Error::ConnectionLost { effect: Effect::Unknown, reason } => Failure::Store(format!(
            "{name}: the connection to the store at {addr} was lost ({reason}) before the answer came; \
             the {name} may or may not have taken effect"
        )),
        Error::Protocol(msg) => {
            let effect = match name {
                "set" | "add" | "modify" | "cas" | "delete" | "cad" => {
                    format!("; the {name} may or may not have taken effect")
                }
                _ => String::new(),
            };
            Failure::Store(format!("{name}: the store at {addr} broke the protocol ({msg}){effect}"))
        }
    }
}

/// Writes a key or value: lowercase hex with `hex`, else escaped (see
/// [`escape`]).
fn write_field(out: &mut impl Write, bytes: &[u8], hex: bool) -> io::Result<()> {
    if hex {
        out.write_all(hex_encode(bytes).as_bytes())
    } else {
        out.write_all(escape(bytes).as_bytes())
    }
}

/// `bytes` with every byte that is not printable ASCII, and tab, newline
/// and backslash, written as `\xNN`.
pub fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        if (0x20..0x7f).contains(&b) && b != b'\\' {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

/// `bytes` as lowercase hex.
pub fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes hex (either case, two digits a byte).
///
/// # Errors
/// Why `s` is not hex, for humans.
pub fn hex_decode(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err(format!("an odd number of digits ({})", s.len()));
    }
    let digit = |i: usize| {
        let c = s.as_bytes()[i];
        char::from(c).to_digit(16).ok_or_else(|| match s[i..].chars().next() {
            Some(ch) => format!("{ch:?} at offset {i} is not a hex digit"),
            None => format!("offset {i} is not a hex digit"),
        })
    };
    (0..s.len() / 2).map(|i| Ok((digit(2 * i)? * 16 + digit(2 * i + 1)?) as u8)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_all_but_printable_ascii() {
        assert_eq!(escape(b"hello world ~!"), "hello world ~!");
        assert_eq!(escape(b"a\tb\nc\\d"), "a\\x09b\\x0ac\\x5cd");
        assert_eq!(escape(&[0, 0x1f, 0x7f, 0x80, 0xff]), "\\x00\\x1f\\x7f\\x80\\xff");
        assert_eq!(escape("é".as_bytes()), "\\xc3\\xa9");
        assert_eq!(escape(b""), "");
    }

    #[test]
    fn hex_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(hex_decode(&hex_encode(&all)).unwrap(), all);
        assert_eq!(hex_encode(b"\x00\xab"), "00ab");
        assert_eq!(hex_decode("00AbfF").unwrap(), vec![0, 0xab, 0xff]);
        assert_eq!(hex_decode("").unwrap(), Vec::<u8>::new());
        assert!(hex_decode("abc").unwrap_err().contains("odd"));
        assert!(hex_decode("0g").unwrap_err().contains("'g' at offset 1"));
        // A multi-byte character is refused, not split.
        assert!(hex_decode("é").unwrap_err().contains("'é' at offset 0"));
        assert!(hex_decode("0é0").unwrap_err().contains("'é' at offset 1"));
        assert!(hex_decode("0é").unwrap_err().contains("odd"));
    }

    #[test]
    fn decodes_and_checks_arguments() {
        let target = |hex| Target { socket: "s".to_string(), hex };
        let get = |hex, key: &str| decode(RequestCommand::Get { target: target(hex), key: key.into() });
        assert_eq!(get(false, "k").unwrap().1, Request::Get(b"k".to_vec()));
        assert_eq!(get(true, "6b00").unwrap().1, Request::Get(b"k\0".to_vec()));
        assert!(get(true, "6").unwrap_err().contains("KEY \"6\" is not valid hex"));
        assert!(get(false, &"k".repeat(256)).unwrap_err().contains("KEY of 256 bytes"));
        assert!(get(false, &"k".repeat(255)).is_ok());
        assert!(get(true, &"00".repeat(256)).unwrap_err().contains("KEY of 256 bytes"));
        let range = decode(RequestCommand::Range { target: target(false), start: None, end: None });
        assert_eq!(range.unwrap().1, Request::Range(Vec::new(), Vec::new()));
        let cas = RequestCommand::Cas {
            target: target(false),
            key: "k".into(),
            old: "o".into(),
            new: "n".repeat(300).into(),
        };
        assert!(decode(cas).unwrap_err().starts_with("NEW of 300 bytes"));
    }
}
