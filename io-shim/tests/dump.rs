//! `kivaloo dump` and `kivaloo load` as a script runs them: the real binary
//! against `kivaloo serve` (a round trip into a fresh store, an empty store,
//! damaged and truncated dumps refused with nothing loaded, an existing
//! file kept without `--force`), and against fake stores (one that loses
//! the connection mid-load, one with small limits, one during whose load
//! the file changes; none at all).

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use kivaloo::kvlds_proto::{KvldsRequest, KvldsResponse};
use kivaloo::packet::PacketDecoder;
use kivaloo_io_shim::addr::SocketAddr;
use kivaloo_io_shim::client::{Client, RANGE_MAX_BYTES};
use kivaloo_io_shim::dump::{DumpReader, DumpWriter, CHUNK_HEADER_LEN, TRAILER_LEN};
use kivaloo_io_shim::runtime::build_runtime;

mod common;
use common::{Store, KIVALOO};

/// SETs every pair, pipelined, with the library.
fn set_all(store: &Store, pairs: &[(Vec<u8>, Vec<u8>)]) {
    build_runtime().unwrap().block_on(async {
        let client = Client::connect(&SocketAddr::parse(store.socket())).await.unwrap();
        let sets = pairs.iter().map(|(k, v)| client.set(k, v));
        for r in futures::future::join_all(sets).await {
            r.unwrap();
        }
    });
}

/// How a command ended.
#[derive(Debug)]
struct Out {
    code: i32,
    stderr: String,
}

/// Runs `kivaloo <args...>`, which must print nothing on stdout.
fn kivaloo<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Out {
    let out = Command::new(KIVALOO).args(args).stdin(Stdio::null()).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "{out:?}");
    Out {
        code: out.status.code().expect("killed by a signal"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `kivaloo <sub> --socket <socket> <file> [args...]`, which must
/// exit with `code`; returns its stderr.
#[track_caller]
fn expect_code(code: i32, sub: &str, socket: &str, file: &Path, args: &[&str]) -> String {
    let mut all = vec![sub, "--socket", socket, file.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = kivaloo(&all);
    assert_eq!(out.code, code, "kivaloo {all:?}: {out:?}");
    out.stderr
}

/// The files in `dir` but the store's (`data`, `kv.sock`).
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != "data" && n != "kv.sock")
        .collect();
    names.sort();
    names
}

/// `n` pairs with binary keys and values of every length, in key order.
fn sample_pairs(n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut pairs: Vec<_> = (0..n)
        .map(|i| {
            let mut key = format!("{i:05}").into_bytes();
            key.extend((0..i % 40).map(|j| (i * 13 + j * 7) as u8));
            let value: Vec<u8> = (0..i * 37 % 256).map(|j| (i + j * 251) as u8).collect();
            (key, value)
        })
        .collect();
    pairs.sort();
    pairs
}

/// A dump of `pairs` (in key order) written by the library, and the offset
/// of each of its chunks.
fn dump_bytes(pairs: &[(Vec<u8>, Vec<u8>)]) -> (Vec<u8>, Vec<u64>) {
    let mut writer = DumpWriter::new(Vec::new()).unwrap();
    for (k, v) in pairs {
        writer.push(k, v).unwrap();
    }
    let (bytes, _) = writer.finish().unwrap();
    let mut reader = DumpReader::new(&bytes[..]).unwrap();
    let mut chunks = Vec::new();
    while let Some(chunk) = reader.next_chunk().unwrap() {
        chunks.push(chunk.offset);
    }
    (bytes, chunks)
}

#[test]
fn a_dump_loads_into_a_fresh_store_pair_for_pair() {
    let dir = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    fs::create_dir_all(&a_dir).unwrap();
    fs::create_dir_all(&b_dir).unwrap();
    let a = Store::start(&a_dir, &[]);
    let mut pairs = sample_pairs(3000);
    // Enough bytes for several RANGE pages.
    pairs.extend((0..5000).map(|i| (format!("big{i:04}").into_bytes(), vec![(i % 251) as u8; 255])));
    pairs.extend([
        (Vec::new(), b"the empty key".to_vec()),
        (b"empty value".to_vec(), Vec::new()),
        (vec![0xff; 255], vec![0x00; 255]),
        (vec![0x00; 255], b"\n\t\\\r".to_vec()),
    ]);
    pairs.sort();
    set_all(&a, &pairs);
    assert_eq!(a.pairs(), pairs);

    let file = dir.path().join("backup.kvd");
    let stderr = expect_code(0, "dump", a.socket(), &file, &[]);
    // Not a terminal: no progress, one summary line.
    assert!(stderr.starts_with("kivaloo: info: dumped 8004 pairs ("), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!stderr.contains('\r'), "{stderr}");
    assert_eq!(files_in(dir.path()), ["a", "b", "backup.kvd"]);
    assert!(fs::metadata(&file).unwrap().len() > 3 * u64::from(RANGE_MAX_BYTES) / 2);
    let stderr = expect_code(0, "load", "nowhere.sock", &file, &["--check"]);
    assert!(stderr.contains("backup.kvd is a complete dump: 8004 pairs"), "{stderr}");

    let b = Store::start(&b_dir, &[]);
    set_all(&b, &[(b"only in b".to_vec(), b"stays".to_vec())]);
    let stderr = expect_code(0, "load", b.socket(), &file, &[]);
    assert!(stderr.starts_with("kivaloo: info: loaded 8004 pairs ("), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let mut expected = pairs.clone();
    expected.push((b"only in b".to_vec(), b"stays".to_vec()));
    expected.sort();
    assert_eq!(b.pairs(), expected);
    // Loading again changes nothing.
    expect_code(0, "load", b.socket(), &file, &[]);
    assert_eq!(b.pairs(), expected);

    // The same pairs make the same file.
    let file_b = dir.path().join("b.kvd");
    build_runtime().unwrap().block_on(async {
        let client = Client::connect(&SocketAddr::parse(b.socket())).await.unwrap();
        client.delete("only in b").await.unwrap();
    });
    expect_code(0, "dump", b.socket(), &file_b, &[]);
    assert_eq!(fs::read(&file).unwrap(), fs::read(&file_b).unwrap());
}

#[test]
fn an_empty_store_dumps_and_loads_to_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::start(dir.path(), &[]);
    let file = dir.path().join("empty.kvd");
    let stderr = expect_code(0, "dump", store.socket(), &file, &[]);
    assert!(stderr.contains("dumped 0 pairs (0 bytes of keys and values; the file is 48 bytes)"), "{stderr}");
    assert_eq!(fs::metadata(&file).unwrap().len(), 48);
    let stderr = expect_code(0, "load", store.socket(), &file, &[]);
    assert!(stderr.contains("loaded 0 pairs"), "{stderr}");
    assert_eq!(store.pairs(), []);
}

#[test]
fn a_truncated_or_damaged_dump_is_refused_and_nothing_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::start(dir.path(), &[]);
    let (bytes, chunks) = dump_bytes(&sample_pairs(1500));
    assert!(chunks.len() >= 3, "{} chunks", chunks.len());
    let trailer_at = bytes.len() - TRAILER_LEN;
    let second = chunks[1] as usize;
    let file = dir.path().join("bad.kvd");
    let refused = |bad: &[u8], problem: &str| {
        fs::write(&file, bad).unwrap();
        let stderr = expect_code(2, "load", store.socket(), &file, &[]);
        assert!(stderr.contains(&format!("bad.kvd is not a complete, valid dump: {problem}")), "{stderr}");
        assert!(stderr.trim_end().ends_with("; nothing was loaded"), "{stderr}");
        // --check says the same, without a store.
        let stderr = expect_code(2, "load", "nowhere.sock", &file, &["--check"]);
        assert!(stderr.contains(problem), "{stderr}");
    };

    for cut in [5, chunks[0] as usize + 10, second + CHUNK_HEADER_LEN + 1000, trailer_at + 20] {
        refused(&bytes[..cut], &format!("it is truncated: it ends at byte {cut}, inside the"));
    }
    // Exactly at a chunk boundary, and exactly before the trailer.
    for cut in [second, trailer_at] {
        refused(
            &bytes[..cut],
            &format!("it is truncated: it ends at byte {cut}, where a chunk or the trailer should start"),
        );
    }

    let flipped = |at: usize| {
        let mut bad = bytes.clone();
        bad[at] ^= 0x04;
        bad
    };
    // In a pair of the second chunk.
    refused(
        &flipped(second + CHUNK_HEADER_LEN + 500),
        &format!("at byte {second}: the chunk's pairs (bytes {}..", second + CHUNK_HEADER_LEN),
    );
    // In its header: its pair count.
    refused(
        &flipped(second + 11),
        &format!("at byte {second}: the chunk header is damaged: its checksum does not match"),
    );
    // In the trailer: its pair count.
    refused(
        &flipped(trailer_at + 11),
        &format!("at byte {trailer_at}: the trailer is damaged: its checksum does not match"),
    );
    // Not a dump at all.
    refused(b"key\tvalue\nkey2\tvalue2\n", "at byte 0: this is not a kivaloo dump");
    refused(b"k\tv\n", "it is truncated: it ends at byte 4, inside the header at byte 0");

    assert_eq!(store.pairs(), []);
    // The intact dump loads.
    fs::write(&file, &bytes).unwrap();
    expect_code(0, "load", store.socket(), &file, &[]);
    assert_eq!(store.pairs().len(), 1500);
}

#[test]
fn an_existing_file_is_replaced_only_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::start(dir.path(), &[]);
    set_all(&store, &sample_pairs(10));
    let file = dir.path().join("precious");
    fs::write(&file, "do not lose me").unwrap();
    let stderr = expect_code(2, "dump", store.socket(), &file, &[]);
    assert!(stderr.contains("precious exists; --force replaces it"), "{stderr}");
    assert_eq!(fs::read_to_string(&file).unwrap(), "do not lose me");
    // A dangling symbolic link is a file too.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(dir.path().join("absent"), &link).unwrap();
    expect_code(2, "dump", store.socket(), &link, &[]);

    expect_code(0, "dump", store.socket(), &file, &["--force"]);
    let stderr = expect_code(0, "load", "nowhere.sock", &file, &["--check"]);
    assert!(stderr.contains("is a complete dump: 10 pairs"), "{stderr}");
    assert_eq!(files_in(dir.path()), ["link", "precious"]);
    // Into a directory that does not exist: exit 4.
    let stderr = expect_code(4, "dump", store.socket(), &dir.path().join("absent/d.kvd"), &[]);
    assert!(stderr.contains("cannot create"), "{stderr}");
}

#[test]
fn without_a_store_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.kvd");
    let missing = dir.path().join("missing.sock");
    let stderr = expect_code(3, "dump", missing.to_str().unwrap(), &file, &[]);
    assert!(stderr.contains("cannot connect to the store at"), "{stderr}");
    assert_eq!(files_in(dir.path()), Vec::<String>::new());
    fs::write(&file, dump_bytes(&sample_pairs(3)).0).unwrap();
    let stderr = expect_code(3, "load", missing.to_str().unwrap(), &file, &[]);
    assert!(stderr.contains("cannot connect to the store at"), "{stderr}");
    let stderr = expect_code(2, "load", missing.to_str().unwrap(), &dir.path().join("absent.kvd"), &[]);
    assert!(stderr.contains("cannot open"), "{stderr}");
    let stderr = expect_code(2, "load", missing.to_str().unwrap(), dir.path(), &[]);
    assert!(stderr.contains("is not a regular file (load reads it twice)"), "{stderr}");
}

/// What a fake store does.
struct Fake {
    /// Its answer to PARAMS.
    limits: (u32, u32),
    /// SETs it answers before it closes the connection (or hangs).
    sets_answered_max: usize,
    /// Run when PARAMS arrives, before it is answered.
    on_params: Box<dyn FnOnce() + Send>,
    /// Instead of closing the connection, it says so here (with the SETs
    /// it received) and answers nothing more, until the client closes.
    hang: Option<mpsc::Sender<usize>>,
}

impl Fake {
    /// Answers PARAMS with the largest limits and `sets_answered_max` SETs.
    fn answering(sets_answered_max: usize) -> Fake {
        Fake { limits: (255, 255), sets_answered_max, on_params: Box::new(|| {}), hang: None }
    }
}

/// A fake store on `<dir>/fake.sock` serving one connection: it answers
/// PARAMS and SETs as `fake` says, and closes (or hangs) on anything else.
/// Returns the socket and a handle whose result is the number of SETs it
/// received.
fn fake_store(dir: &Path, fake: Fake) -> (PathBuf, thread::JoinHandle<usize>) {
    let path = dir.join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let handle = thread::spawn(move || {
        let Fake { limits: (max_key_len, max_value_len), sets_answered_max, on_params, hang } = fake;
        let mut on_params = Some(on_params);
        let (mut s, _) = listener.accept().unwrap();
        let (mut decoder, mut buf, mut sets) = (PacketDecoder::new(), vec![0u8; 64 << 10], 0);
        // Closes the connection (by returning), or hangs until the client
        // closes it.
        let done = |s: &mut UnixStream, buf: &mut [u8], sets: usize| {
            if let Some(hang) = &hang {
                let _ = hang.send(sets);
                while matches!(s.read(buf), Ok(n) if n > 0) {}
            }
            sets
        };
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return sets,
                Ok(n) => decoder.push(&buf[..n]),
            }
            let mut out = BytesMut::new();
            while let Some(p) = decoder.next_packet().unwrap() {
                let response = match KvldsRequest::decode(p.record).unwrap() {
                    KvldsRequest::Params => {
                        if let Some(hook) = on_params.take() {
                            hook();
                        }
                        KvldsResponse::Params { max_key_len, max_value_len }
                    }
                    KvldsRequest::Set { .. } if sets < sets_answered_max => {
                        sets += 1;
                        KvldsResponse::Done(true)
                    }
                    KvldsRequest::Set { .. } => {
                        s.write_all(&out).unwrap();
                        return done(&mut s, &mut buf, sets + 1);
                    }
                    _ => {
                        s.write_all(&out).unwrap();
                        return done(&mut s, &mut buf, sets);
                    }
                };
                response.encode(p.id, &mut out);
            }
            s.write_all(&out).unwrap();
        }
    });
    (path, handle)
}

#[test]
fn a_lost_connection_says_how_many_pairs_were_stored() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.kvd");
    fs::write(&file, dump_bytes(&sample_pairs(5000)).0).unwrap();
    let (sock, server) = fake_store(dir.path(), Fake::answering(1000));
    let stderr = expect_code(3, "load", sock.to_str().unwrap(), &file, &[]);
    server.join().unwrap();
    // The answers sent before the close may or may not be read first.
    let stored: u64 = stderr
        .split(" after ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(stored <= 1000, "{stderr}");
    assert!(stderr.contains("was lost"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            " after {stored} of 5000 pairs were stored; SET is idempotent: run the same load again to finish it"
        )),
        "{stderr}"
    );

    // A dump whose RANGE is dropped: exit 3, no file.
    fs::remove_file(&sock).unwrap();
    let (sock, server) = fake_store(dir.path(), Fake::answering(0));
    let out = dir.path().join("out.kvd");
    let stderr = expect_code(3, "dump", sock.to_str().unwrap(), &out, &[]);
    server.join().unwrap();
    assert!(stderr.contains("was lost") && stderr.contains("out.kvd was not written"), "{stderr}");
    assert_eq!(files_in(dir.path()), ["d.kvd", "fake.sock"]);
}

#[test]
fn pairs_over_the_stores_limits_are_refused_before_any_set() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.kvd");
    let (bytes, _) = dump_bytes(&[(b"k".to_vec(), b"v".to_vec()), (b"long key".to_vec(), b"v".to_vec())]);
    fs::write(&file, bytes).unwrap();
    let (sock, server) = fake_store(dir.path(), Fake { limits: (4, 8), ..Fake::answering(10) });
    let stderr = expect_code(2, "load", sock.to_str().unwrap(), &file, &[]);
    assert!(
        stderr.contains(
            "d.kvd holds a key of 8 bytes (the pair at byte 36), over the limit of 4 of the store at"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was loaded"), "{stderr}");
    assert_eq!(server.join().unwrap(), 0, "SETs were sent");
}

#[test]
fn a_file_changed_after_the_check_stops_the_load() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.kvd");
    let (bytes, chunks) = dump_bytes(&sample_pairs(1500));
    let second = chunks[1] as usize;
    fs::write(&file, &bytes).unwrap();
    // Between the check and the load (PARAMS comes in between), a byte of
    // the second chunk changes in place, and the file's modification time
    // is put back (as `touch -r` or `rsync -t` could): only the second
    // pass's reading can see the change.
    let damaged = file.clone();
    let damage = Box::new(move || {
        let modified = fs::metadata(&damaged).unwrap().modified().unwrap();
        let mut f = fs::OpenOptions::new().write(true).open(&damaged).unwrap();
        f.seek(SeekFrom::Start(second as u64 + 600)).unwrap();
        f.write_all(&[!bytes[second + 600]]).unwrap();
        f.set_modified(modified).unwrap();
    });
    let (sock, server) = fake_store(dir.path(), Fake { on_params: damage, ..Fake::answering(usize::MAX) });
    let stderr = expect_code(4, "load", sock.to_str().unwrap(), &file, &[]);
    let first_chunk_pairs = {
        let (all, _) = dump_bytes(&sample_pairs(1500));
        let mut reader = DumpReader::new(&all[..]).unwrap();
        reader.next_chunk().unwrap().unwrap().pairs.len()
    };
    assert!(
        stderr.contains(&format!(
            "d.kvd changed after it was checked (at byte {second}: the chunk's pairs (bytes {}..",
            second + CHUNK_HEADER_LEN
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("; {first_chunk_pairs} of 1500 pairs were stored before that was noticed")),
        "{stderr}"
    );
    assert_eq!(server.join().unwrap(), first_chunk_pairs);
}

#[test]
fn a_file_rewritten_with_another_dump_after_the_check_loads_nothing_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.kvd");
    let pairs = sample_pairs(1500);
    let (bytes, chunks) = dump_bytes(&pairs);
    // Another valid dump of the same length: a value of the first chunk
    // changed.
    let mut same_len = pairs.clone();
    let changed = same_len.iter().position(|(_, v)| !v.is_empty()).unwrap();
    same_len[changed].1[0] ^= 1;
    let (same_len_bytes, _) = dump_bytes(&same_len);
    assert_eq!(same_len_bytes.len(), bytes.len());
    // Between the check and the load (PARAMS comes in between), FILE is
    // rewritten in place (truncated and written, as `cp other.kvd FILE`
    // does): with other pairs; then with the same length and its
    // modification time put back, which only the second pass's checkpoints
    // see.
    for (other, keep_mtime) in [(dump_bytes(&sample_pairs(700)).0, false), (same_len_bytes, true)] {
        fs::write(&file, &bytes).unwrap();
        let target = file.clone();
        let rewrite = Box::new(move || {
            let modified = fs::metadata(&target).unwrap().modified().unwrap();
            fs::write(&target, &other).unwrap();
            if keep_mtime {
                fs::OpenOptions::new().write(true).open(&target).unwrap().set_modified(modified).unwrap();
            }
        });
        let (sock, server) =
            fake_store(dir.path(), Fake { on_params: rewrite, ..Fake::answering(usize::MAX) });
        let stderr = expect_code(4, "load", sock.to_str().unwrap(), &file, &[]);
        let expected = if keep_mtime {
            format!(
                "d.kvd changed after it was checked (bytes 0..{} are not the ones checked); 0 of 1500 pairs \
                 were stored before that was noticed, none from the part that changed",
                chunks[1]
            )
        } else {
            "d.kvd changed after it was checked (its length or modification time is not what it was); \
             nothing was loaded"
                .to_string()
        };
        assert!(stderr.contains(&expected), "{stderr}");
        assert_eq!(server.join().unwrap(), 0, "SETs reached the store");
        fs::remove_file(&sock).unwrap();
    }
}

/// How long a test waits for a command to exit or a fake store to be
/// reached.
const TIMEOUT: Duration = Duration::from_secs(20);

/// `kivaloo <args...>` running, its stderr piped; killed when dropped.
struct Running(Child);

impl Running {
    fn start<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Running {
        let child = Command::new(KIVALOO)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Running(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) with the ID of a child not yet reaped.
        assert_eq!(unsafe { libc::kill(self.pid() as libc::pid_t, signal) }, 0);
    }

    /// Waits for it to exit; fails if it does not within [`TIMEOUT`].
    #[track_caller]
    fn wait(&mut self) -> Out {
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "kivaloo still runs after {TIMEOUT:?}");
            thread::sleep(Duration::from_millis(10));
        };
        let mut stderr = String::new();
        if let Some(mut pipe) = self.0.stderr.take() {
            pipe.read_to_string(&mut stderr).unwrap();
        }
        Out {
            code: status.code().unwrap_or_else(|| panic!("killed by a signal: {status}; {stderr}")),
            stderr,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_signal_stops_a_dump_and_removes_its_temporary_file() {
    for (signal, code, name) in [(libc::SIGINT, 130, "SIGINT"), (libc::SIGTERM, 143, "SIGTERM")] {
        let dir = tempfile::tempdir().unwrap();
        let (reached, reached_rx) = mpsc::channel();
        // A store that never answers RANGE.
        let (sock, server) = fake_store(dir.path(), Fake { hang: Some(reached), ..Fake::answering(0) });
        let file = dir.path().join("d.kvd");
        let mut dump =
            Running::start(&["dump".as_ref(), "--socket".as_ref(), sock.as_os_str(), file.as_os_str()]);
        reached_rx.recv_timeout(TIMEOUT).expect("the dump asks for a RANGE");
        // The temporary file exists once RANGE is asked for.
        let temp = format!("d.kvd.tmp.{}", dump.pid());
        assert_eq!(files_in(dir.path()), [temp.as_str(), "fake.sock"]);
        dump.signal(signal);
        let out = dump.wait();
        assert_eq!(out.code, code, "{out:?}");
        let expected = format!(
            "kivaloo: error: stopped by {name}: {} was not written (its temporary file {} was removed)",
            file.display(),
            dir.path().join(&temp).display()
        );
        assert_eq!(out.stderr.trim_end(), expected);
        assert_eq!(files_in(dir.path()), ["fake.sock"]);
        assert_eq!(server.join().unwrap(), 0);
    }
}

#[test]
fn a_signal_stops_a_load_saying_how_many_pairs_were_acknowledged() {
    for (signal, code, name) in [(libc::SIGINT, 130, "SIGINT"), (libc::SIGTERM, 143, "SIGTERM")] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("d.kvd");
        fs::write(&file, dump_bytes(&sample_pairs(5000)).0).unwrap();
        let (reached, reached_rx) = mpsc::channel();
        // A store that answers 1000 SETs, then nothing.
        let (sock, server) = fake_store(dir.path(), Fake { hang: Some(reached), ..Fake::answering(1000) });
        let mut load =
            Running::start(&["load".as_ref(), "--socket".as_ref(), sock.as_os_str(), file.as_os_str()]);
        let received = reached_rx.recv_timeout(TIMEOUT).expect("the load sends 1001 SETs");
        assert_eq!(received, 1001);
        load.signal(signal);
        let out = load.wait();
        assert_eq!(out.code, code, "{out:?}");
        // "stopped by SIG after S of 5000 pairs were sent, A of them
        // acknowledged (...)"
        let prefix = format!("kivaloo: error: stopped by {name} after ");
        let rest = out.stderr.strip_prefix(&prefix).unwrap_or_else(|| panic!("{out:?}"));
        let numbers: Vec<u64> = rest.split(' ').filter_map(|w| w.parse().ok()).take(3).collect();
        let (sent, acknowledged) = (numbers[0], numbers[2]);
        assert!((1001..=5000).contains(&sent) && acknowledged <= 1000, "{out:?}");
        assert_eq!(
            out.stderr.trim_end(),
            format!(
                "{prefix}{sent} of 5000 pairs were sent, {acknowledged} of them acknowledged (the others may or \
                 may not have been stored); SET is idempotent: run the same load again to finish it"
            )
        );
        assert_eq!(server.join().unwrap(), 1001);
    }
}

#[test]
fn a_fifo_is_refused_without_waiting_for_a_writer() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let fifo = fifo.to_str().unwrap();
    for args in [&["load", "--check", fifo][..], &["load", "--socket", "nowhere.sock", fifo]] {
        let out = Running::start(args).wait();
        assert_eq!(out.code, 2, "{out:?}");
        assert!(out.stderr.contains("fifo is not a regular file (load reads it twice)"), "{out:?}");
    }
}

#[test]
fn a_closed_stderr_does_not_make_a_command_fail() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("d.kvd");
    fs::write(&file, dump_bytes(&sample_pairs(10)).0).unwrap();
    // Its summary goes to a pipe whose reader has gone: EPIPE.
    let mut load = Running::start(&["load".as_ref(), "--check".as_ref(), file.as_os_str()]);
    drop(load.0.stderr.take());
    assert_eq!(load.wait().code, 0);
}
