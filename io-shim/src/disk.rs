//! Real file I/O for a node's disk operations: one writer thread (every
//! operation but reads, in the order asked) and `readers` reader threads
//! (positioned reads, concurrently). Completions go back to the event loop
//! over a channel. Files are kept open by name.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

use bytes::Bytes;
use kivaloo::contract::{DiskDone, DiskError, DiskErrorKind, DiskOp, DiskOpId};

/// A completed disk operation, as sent back to the event loop.
pub type DiskCompletion = (DiskOpId, Result<DiskDone, DiskError>);

type Job = (DiskOpId, DiskOp);

/// Open files by name, shared by the writer and the readers.
#[derive(Debug)]
struct Files {
    dir: PathBuf,
    open: Mutex<HashMap<String, Arc<File>>>,
}

impl Files {
    fn path(&self, name: &str) -> io::Result<PathBuf> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad file name {name:?}")));
        }
        Ok(self.dir.join(name))
    }

    fn get(&self, name: &str, create: bool) -> io::Result<Arc<File>> {
        if let Some(f) = self.open.lock().expect("files lock").get(name) {
            return Ok(f.clone());
        }
        let f = Arc::new(OpenOptions::new().read(true).write(true).create(create).open(self.path(name)?)?);
        self.open.lock().expect("files lock").insert(name.to_string(), f.clone());
        Ok(f)
    }
}

/// Runs disk operations on threads; see the module doc.
#[derive(Debug)]
pub struct DiskExecutor {
    writer: mpsc::Sender<Job>,
    readers: mpsc::Sender<Job>,
}

impl DiskExecutor {
    /// Starts the threads for the directory `dir`, sending completions to
    /// `done`.
    pub fn start(
        dir: &Path,
        readers: usize,
        done: tokio::sync::mpsc::UnboundedSender<DiskCompletion>,
    ) -> Self {
        let files = Arc::new(Files { dir: dir.to_path_buf(), open: Mutex::new(HashMap::new()) });
        let (writer_tx, writer_rx) = mpsc::channel::<Job>();
        {
            let files = files.clone();
            let done = done.clone();
            thread::Builder::new()
                .name("disk-writer".into())
                .spawn(move || {
                    for (id, op) in writer_rx {
                        if done.send((id, execute(&files, op))).is_err() {
                            break;
                        }
                    }
                })
                .expect("spawn the disk writer thread");
        }
        let (reader_tx, reader_rx) = mpsc::channel::<Job>();
        let reader_rx = Arc::new(Mutex::new(reader_rx));
        for i in 0..readers.max(1) {
            let files = files.clone();
            let done = done.clone();
            let rx = reader_rx.clone();
            thread::Builder::new()
                .name(format!("disk-reader-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().expect("reader queue lock").recv();
                    let Ok((id, op)) = job else { break };
                    if done.send((id, execute(&files, op))).is_err() {
                        break;
                    }
                })
                .expect("spawn a disk reader thread");
        }
        DiskExecutor { writer: writer_tx, readers: reader_tx }
    }

    /// Queues `op`; its completion arrives on the channel given to `start`.
    pub fn submit(&self, id: DiskOpId, op: DiskOp) {
        let queue = if matches!(op, DiskOp::Read { .. }) { &self.readers } else { &self.writer };
        // The threads only stop when these senders are dropped.
        queue.send((id, op)).expect("disk threads are running");
    }
}

fn to_disk_error(e: io::Error) -> DiskError {
    let kind = match e.kind() {
        io::ErrorKind::NotFound => DiskErrorKind::NotFound,
        _ if e.raw_os_error() == Some(28) => DiskErrorKind::NoSpace, // ENOSPC
        _ => DiskErrorKind::Io,
    };
    DiskError { kind, message: e.to_string() }
}

fn execute(files: &Files, op: DiskOp) -> Result<DiskDone, DiskError> {
    run(files, op).map_err(to_disk_error)
}

fn run(files: &Files, op: DiskOp) -> io::Result<DiskDone> {
    match op {
        DiskOp::List => {
            let mut names = Vec::new();
            for entry in std::fs::read_dir(&files.dir)? {
                if let Ok(name) = entry?.file_name().into_string() {
                    names.push(name);
                }
            }
            Ok(DiskDone::Listed(names))
        }
        DiskOp::Open { name, create } => {
            let f = files.get(&name, create)?;
            Ok(DiskDone::Opened { len_bytes: f.metadata()?.len() })
        }
        DiskOp::Read { name, offset, len } => {
            let f = files.get(&name, false)?;
            let mut buf = vec![0u8; len as usize];
            let mut got = 0;
            while got < buf.len() {
                match f.read_at(&mut buf[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            buf.truncate(got);
            Ok(DiskDone::Read(Bytes::from(buf)))
        }
        DiskOp::Write { name, offset, data } => {
            let f = files.get(&name, false)?;
            f.write_all_at(&data, offset)?;
            Ok(DiskDone::Written { len_bytes: data.len() as u64 })
        }
        DiskOp::Truncate { name, len } => {
            files.get(&name, false)?.set_len(len)?;
            Ok(DiskDone::Done)
        }
        DiskOp::SyncFile { name } => {
            files.get(&name, false)?.sync_data()?;
            Ok(DiskDone::Done)
        }
        DiskOp::SyncDir => {
            File::open(&files.dir)?.sync_all()?;
            Ok(DiskDone::Done)
        }
        DiskOp::DropCache { name } => {
            let f = files.get(&name, false)?;
            use std::os::fd::AsRawFd;
            // SAFETY: posix_fadvise only reads its integer arguments; the
            // descriptor is valid for as long as `f` lives.
            let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(DiskDone::Done)
        }
        DiskOp::Remove { name } => {
            files.open.lock().expect("files lock").remove(&name);
            std::fs::remove_file(files.path(&name)?)?;
            Ok(DiskDone::Done)
        }
    }
}
