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
use std::thread;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use kivaloo::kvlds_proto::{KvldsRequest, KvldsResponse};
use kivaloo::packet::PacketDecoder;
use kivaloo_io_shim::addr::SocketAddr;
use kivaloo_io_shim::client::{Client, RANGE_MAX_BYTES};
use kivaloo_io_shim::dump::{DumpReader, DumpWriter, CHUNK_HEADER_LEN, TRAILER_LEN};
use kivaloo_io_shim::runtime::build_runtime;

const KIVALOO: &str = env!("CARGO_BIN_EXE_kivaloo");

/// A `kivaloo serve` of `<dir>/data` on `<dir>/kv.sock`, in the
/// foreground; killed when dropped.
struct Store {
    child: Child,
    socket: PathBuf,
}

impl Store {
    /// Starts it and waits until it accepts connections.
    fn start(dir: &Path) -> Store {
        let socket = dir.join("kv.sock");
        let child = Command::new(KIVALOO)
            .arg("serve")
            .arg("--data")
            .arg(dir.join("data"))
            .arg("--listen")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut store = Store { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&store.socket).is_err() {
            if let Some(status) = store.child.try_wait().unwrap() {
                panic!("kivaloo serve exited with {status}");
            }
            assert!(Instant::now() < deadline, "kivaloo serve does not listen after 10 s");
            thread::sleep(Duration::from_millis(20));
        }
        store
    }

    fn socket(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    /// SETs every pair, pipelined, with the library.
    fn set_all(&self, pairs: &[(Vec<u8>, Vec<u8>)]) {
        build_runtime().unwrap().block_on(async {
            let client = Client::connect(&SocketAddr::parse(self.socket())).await.unwrap();
            let sets = pairs.iter().map(|(k, v)| client.set(k, v));
            for r in futures::future::join_all(sets).await {
                r.unwrap();
            }
        });
    }

    /// Every pair, with RANGE.
    fn pairs(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        build_runtime().unwrap().block_on(async {
            let client = Client::connect(&SocketAddr::parse(self.socket())).await.unwrap();
            let pairs = client.range_iter("", "").unwrap().collect_all().await.unwrap();
            pairs.into_iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
        })
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let a = Store::start(&a_dir);
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
    a.set_all(&pairs);
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

    let b = Store::start(&b_dir);
    b.set_all(&[(b"only in b".to_vec(), b"stays".to_vec())]);
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
    let store = Store::start(dir.path());
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
    let store = Store::start(dir.path());
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
    let store = Store::start(dir.path());
    store.set_all(&sample_pairs(10));
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
    /// SETs it answers before it closes the connection.
    sets_answered_max: usize,
    /// Run when PARAMS arrives, before it is answered.
    on_params: Box<dyn FnOnce() + Send>,
}

/// A fake store on `<dir>/fake.sock` serving one connection: it answers
/// PARAMS and SETs as `fake` says, and closes on anything else. Returns the
/// socket and a handle whose result is the number of SETs it received.
fn fake_store(dir: &Path, fake: Fake) -> (PathBuf, thread::JoinHandle<usize>) {
    let path = dir.join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let handle = thread::spawn(move || {
        let Fake { limits: (max_key_len, max_value_len), sets_answered_max, on_params } = fake;
        let mut on_params = Some(on_params);
        let (mut s, _) = listener.accept().unwrap();
        let (mut decoder, mut buf, mut sets) = (PacketDecoder::new(), vec![0u8; 64 << 10], 0);
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
                        return sets + 1;
                    }
                    _ => return sets,
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
    let (sock, server) = fake_store(
        dir.path(),
        Fake { limits: (255, 255), sets_answered_max: 1000, on_params: Box::new(|| {}) },
    );
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
    let (sock, server) =
        fake_store(dir.path(), Fake { limits: (255, 255), sets_answered_max: 0, on_params: Box::new(|| {}) });
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
    let (sock, server) =
        fake_store(dir.path(), Fake { limits: (4, 8), sets_answered_max: 10, on_params: Box::new(|| {}) });
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
    // the second chunk changes in place.
    let damaged = file.clone();
    let damage = Box::new(move || {
        let mut f = fs::OpenOptions::new().write(true).open(&damaged).unwrap();
        f.seek(SeekFrom::Start(second as u64 + 600)).unwrap();
        f.write_all(&[!bytes[second + 600]]).unwrap();
    });
    let (sock, server) =
        fake_store(dir.path(), Fake { limits: (255, 255), sets_answered_max: usize::MAX, on_params: damage });
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
