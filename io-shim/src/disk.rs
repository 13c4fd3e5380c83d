//! Real file I/O for a node's disk operations: one writer thread (every
//! operation but reads, in the order asked) and `readers` reader threads
//! (positioned reads, concurrently). Completions go back to the event loop
//! over a channel. Files are kept open by name.
//!
//! Writes of whole sectors (offset and length multiples of
//! [`DIRECT_SECTOR_BYTES`], which lbs's are) bypass the page cache: the
//! writer copies them into a buffer of its own, aligned for the device, and
//! writes them through a second descriptor opened with `O_DIRECT` (see
//! [`DirectWriter`]). A buffered write of megabytes costs the kernel a copy
//! into freshly allocated page-cache pages, which on a virtual machine were
//! measured at up to ten times the cost of the copy itself, and the
//! writeback of those pages at `fsync`; the direct write is one copy into
//! warm memory and the device's own transfer. Durability is unchanged: a
//! direct write is no more durable than a buffered one until the file is
//! synced, and nothing is acknowledged before that. Reads stay buffered
//! (Linux keeps the two coherent). Where the file system refuses `O_DIRECT`
//! (tmpfs before Linux 6.6, say) or a device wants larger alignment, writes
//! fall back to buffered ones for the rest of the run.

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
                    let mut direct = DirectWriter::new();
                    for (id, op) in writer_rx {
                        if done.send((id, execute_write(&files, &mut direct, op))).is_err() {
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

/// Runs an operation on the writer thread: whole-sector writes directly,
/// everything else as [`run`] does.
fn execute_write(files: &Files, direct: &mut DirectWriter, op: DiskOp) -> Result<DiskDone, DiskError> {
    match op {
        DiskOp::Write { name, offset, data } => {
            let written = match direct.write(files, &name, offset, &data) {
                Ok(true) => Ok(DiskDone::Written { len_bytes: data.len() as u64 }),
                Ok(false) => run(files, DiskOp::Write { name, offset, data }),
                Err(e) => Err(e),
            };
            written.map_err(to_disk_error)
        }
        DiskOp::Remove { name } => {
            direct.forget(&name);
            execute(files, DiskOp::Remove { name })
        }
        op => execute(files, op),
    }
}

/// Offsets and lengths of direct writes are multiples of this: the
/// logical sector of nearly every device, and the unit lbs lays records
/// out in.
pub const DIRECT_SECTOR_BYTES: u64 = 512;
/// Alignment of the memory a direct write is made from (a page: enough
/// for any device's logical block).
const DIRECT_MEMORY_ALIGN_BYTES: usize = 4096;

/// The writer thread's `O_DIRECT` descriptors and aligned buffer. The
/// buffer grows to the largest write and is kept: for lbs, one write batch
/// (at most `BATCH_DATA_BYTES_MAX`, 16 MiB, of block data, written as
/// records: up to twice that with 512-byte blocks, 20 MiB with 2048-byte
/// ones).
struct DirectWriter {
    /// False once the file system or device has refused a direct write.
    enabled: bool,
    files: HashMap<String, File>,
    buf: Vec<u8>,
}

impl DirectWriter {
    fn new() -> Self {
        DirectWriter { enabled: true, files: HashMap::new(), buf: Vec::new() }
    }

    /// Writes `data` at `offset` of `name` directly. `Ok(false)`: nothing
    /// was written; the caller writes it buffered.
    fn write(&mut self, files: &Files, name: &str, offset: u64, data: &[u8]) -> io::Result<bool> {
        if !self.enabled
            || data.is_empty()
            || !offset.is_multiple_of(DIRECT_SECTOR_BYTES)
            || !(data.len() as u64).is_multiple_of(DIRECT_SECTOR_BYTES)
        {
            return Ok(false);
        }
        if !self.files.contains_key(name) {
            use std::os::unix::fs::OpenOptionsExt;
            match OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(files.path(name)?) {
                Ok(f) => {
                    self.files.insert(name.to_string(), f);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
                // EINVAL where the file system has no O_DIRECT, EOPNOTSUPP
                // on some others: buffered writes from now on.
                Err(_) => {
                    self.enabled = false;
                    return Ok(false);
                }
            }
        }
        let f = &self.files[name];
        let room = data.len() + DIRECT_MEMORY_ALIGN_BYTES;
        if self.buf.len() < room {
            self.buf = vec![0; room];
        }
        let start = self.buf.as_ptr().align_offset(DIRECT_MEMORY_ALIGN_BYTES);
        let aligned = &mut self.buf[start..start + data.len()];
        aligned.copy_from_slice(data);
        let buffered = |rest: &[u8], at: u64| files.get(name, false)?.write_all_at(rest, at);
        if write_sectors(|rest, at| f.write_at(rest, at), buffered, aligned, offset)? == Direct::Refused {
            self.enabled = false;
        }
        Ok(true)
    }

    /// Closes the direct descriptor of a file being removed.
    fn forget(&mut self, name: &str) {
        self.files.remove(name);
    }
}

/// Whether the direct path took a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direct {
    Taken,
    /// Refused (`EINVAL`: the device wants larger alignment, say); what was
    /// left was written buffered, and so should everything after.
    Refused,
}

/// Writes `data` at `offset` with `direct` (one positioned write, returning
/// how much it wrote), as long as it writes whole sectors, and whatever it
/// leaves with `buffered`: after a write that stopped short of a sector
/// (it should not), or after it refused.
fn write_sectors(
    mut direct: impl FnMut(&[u8], u64) -> io::Result<usize>,
    buffered: impl FnOnce(&[u8], u64) -> io::Result<()>,
    data: &[u8],
    offset: u64,
) -> io::Result<Direct> {
    let mut done = 0;
    while done < data.len() {
        match direct(&data[done..], offset + done as u64) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "a direct write wrote nothing")),
            Ok(n) if !(n as u64).is_multiple_of(DIRECT_SECTOR_BYTES) => {
                done += n;
                buffered(&data[done..], offset + done as u64)?;
                return Ok(Direct::Taken);
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                buffered(&data[done..], offset + done as u64)?;
                return Ok(Direct::Refused);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Direct::Taken)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn read(files: &Files, name: &str, offset: u64, len: usize) -> Vec<u8> {
        match run(files, DiskOp::Read { name: name.into(), offset, len: len as u32 }) {
            Ok(DiskDone::Read(b)) => b.to_vec(),
            other => panic!("read: {other:?}"),
        }
    }

    /// Whole-sector writes (direct where the file system allows it) and
    /// others (buffered) land where asked, and reads see both, including
    /// a direct write over a range a read had cached.
    #[test]
    fn direct_and_buffered_writes_read_back() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let files = Files { dir: dir.path().to_path_buf(), open: Mutex::new(HashMap::new()) };
        let mut direct = DirectWriter::new();
        let name = "f".to_string();
        execute_write(&files, &mut direct, DiskOp::Open { name: name.clone(), create: true }).expect("open");
        let sectors: Vec<u8> = (0..3 * 512).map(|i| (i % 251) as u8).collect();
        let odd: Vec<u8> = (0..700).map(|i| (i % 7) as u8 + 1).collect();
        let write = |direct: &mut DirectWriter, offset: u64, data: &[u8]| {
            let op = DiskOp::Write { name: name.clone(), offset, data: Bytes::copy_from_slice(data) };
            match execute_write(&files, direct, op) {
                Ok(DiskDone::Written { len_bytes }) => assert_eq!(len_bytes, data.len() as u64),
                other => panic!("write: {other:?}"),
            }
        };
        write(&mut direct, 1024, &sectors);
        write(&mut direct, 100, &odd);
        assert_eq!(read(&files, &name, 1024, sectors.len()), sectors);
        assert_eq!(read(&files, &name, 100, odd.len()), odd);
        // A read caches the range; a direct write over it must be seen.
        let again: Vec<u8> = sectors.iter().map(|b| b ^ 0xff).collect();
        write(&mut direct, 1024, &again);
        assert_eq!(read(&files, &name, 1024, again.len()), again);
        // Where the file system takes O_DIRECT, the direct path was used.
        use std::os::unix::fs::OpenOptionsExt;
        let supported =
            OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(dir.path().join(&name)).is_ok();
        assert_eq!(direct.enabled, supported);
        assert_eq!(direct.files.contains_key(&name), supported);
        if !supported {
            eprintln!("this file system refuses O_DIRECT: only buffered writes were tested here");
        }
        execute_write(&files, &mut direct, DiskOp::SyncFile { name: name.clone() }).expect("sync");
        execute_write(&files, &mut direct, DiskOp::Remove { name: name.clone() }).expect("remove");
        assert!(direct.files.is_empty(), "the direct descriptor of a removed file is closed");
    }

    /// A file as a byte vector, written by a scripted direct path (each
    /// call takes the next outcome: bytes written, or an errno) and by a
    /// buffered one.
    fn scripted(script: &[Result<usize, i32>], data: &[u8], offset: u64) -> (io::Result<Direct>, Vec<u8>) {
        let file = std::cell::RefCell::new(vec![0u8; offset as usize + data.len()]);
        let mut calls = script.iter();
        let put = |bytes: &[u8], at: u64| {
            file.borrow_mut()[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        };
        let direct = |bytes: &[u8], at: u64| match calls.next().expect("a scripted outcome") {
            Ok(n) => {
                let n = (*n).min(bytes.len());
                put(&bytes[..n], at);
                Ok(n)
            }
            Err(errno) => Err(io::Error::from_raw_os_error(*errno)),
        };
        let buffered = |bytes: &[u8], at: u64| {
            put(bytes, at);
            Ok(())
        };
        let outcome = write_sectors(direct, buffered, data, offset);
        (outcome, file.into_inner())
    }

    /// Every way the direct path can stop leaves the file as asked: a
    /// refusal at once or midway (the rest buffered, the path marked
    /// refused), a write short of a sector (the rest buffered), an
    /// interruption (retried); any other error is the write's.
    #[test]
    fn a_direct_write_that_stops_leaves_the_rest_to_a_buffered_one() {
        let data: Vec<u8> = (0..4 * 512).map(|i| (i % 253) as u8 + 1).collect();
        let offset = 1024;
        let mut want = vec![0u8; offset as usize];
        want.extend_from_slice(&data);
        for (script, outcome) in [
            (vec![Ok(4 * 512)], Direct::Taken),
            (vec![Ok(1024), Ok(1024)], Direct::Taken),
            (vec![Err(libc::EINTR), Ok(4 * 512)], Direct::Taken),
            (vec![Err(libc::EINVAL)], Direct::Refused),
            (vec![Ok(1024), Err(libc::EINVAL)], Direct::Refused),
            (vec![Ok(700)], Direct::Taken),
            (vec![Ok(512), Ok(300)], Direct::Taken),
        ] {
            let (got, file) = scripted(&script, &data, offset);
            assert_eq!(got.expect("written"), outcome, "{script:?}");
            assert_eq!(file, want, "{script:?}");
        }
        let (got, _) = scripted(&[Ok(512), Err(libc::EIO)], &data, offset);
        assert_eq!(got.expect_err("an I/O error").raw_os_error(), Some(libc::EIO));
        let (got, _) = scripted(&[Ok(0)], &data, offset);
        assert_eq!(got.expect_err("no progress").kind(), io::ErrorKind::WriteZero);
    }
}
