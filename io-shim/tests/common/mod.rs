//! A `kivaloo serve` for the end-to-end tests of the command line (dump,
//! load, bench): started in a directory, stopped when dropped.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use kivaloo_io_shim::addr::SocketAddr;
use kivaloo_io_shim::client::Client;
use kivaloo_io_shim::runtime::build_runtime;

pub const KIVALOO: &str = env!("CARGO_BIN_EXE_kivaloo");

/// `kivaloo serve` on `<dir>/data`, listening on `<dir>/kv.sock`.
pub struct Store {
    child: Child,
    socket: PathBuf,
}

impl Store {
    /// Starts it (with `extra` arguments) and waits until it accepts
    /// connections.
    pub fn start(dir: &Path, extra: &[&str]) -> Store {
        let socket = dir.join("kv.sock");
        let child = Command::new(KIVALOO)
            .arg("serve")
            .arg("--data")
            .arg(dir.join("data"))
            .arg("--listen")
            .arg(&socket)
            .args(extra)
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

    pub fn socket(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    /// Every pair, with RANGE.
    pub fn pairs(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
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
