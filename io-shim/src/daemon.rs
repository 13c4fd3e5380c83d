//! Becoming a daemon the way kivaloo's do: the command returns to the shell
//! only once the server is listening, and a pidfile names the server.
//!
//! Forking a process that already runs threads is unsafe, so instead the
//! command starts itself again as a child (same arguments, marked by an
//! environment variable) in a new session (no controlling terminal, so
//! neither the terminal's signals nor `stty tostop` reach it), with stdin
//! from /dev/null, stderr shared (logs stay visible, as kivaloo's do), and
//! stdout a pipe on which the child writes one line when it is ready. The
//! parent exits 0 on that line, or 1 if the child died first.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

const CHILD_ENV: &str = "KIVALOO_DAEMON_CHILD";
const READY_LINE: &str = "ready";

/// What the process is, after [`daemonize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Run in the foreground (`-F`), no parent waiting.
    Foreground,
    /// The daemon child: call [`signal_ready`] once listening.
    DaemonChild,
}

/// Unless `foreground`, starts the daemon child and exits when it is ready
/// (this function then does not return). Call before starting any thread.
pub fn daemonize(name: &str, foreground: bool) -> Role {
    if foreground {
        return Role::Foreground;
    }
    if std::env::var_os(CHILD_ENV).is_some() {
        return Role::DaemonChild;
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => fail(name, &format!("cannot find my own executable to daemonize: {e}")),
    };
    let mut command = Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: setsid is async-signal-safe, as code between fork and exec
    // must be; it touches no memory of the parent.
    unsafe {
        command.pre_exec(|| if libc::setsid() == -1 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => fail(name, &format!("cannot start the daemon: {e}")),
    };
    let mut line = String::new();
    let stdout = child.stdout.take().expect("piped stdout");
    let _ = BufReader::new(stdout).read_line(&mut line);
    if line.trim_end() == READY_LINE {
        std::process::exit(0);
    }
    let status = child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
    fail(name, &format!("the daemon exited during startup ({status})"));
}

/// Tells the waiting parent (if any) that the server is listening.
pub fn signal_ready(role: Role) {
    if role == Role::DaemonChild {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{READY_LINE}");
        let _ = out.flush();
    }
}

/// Writes the pidfile.
///
/// # Errors
/// A message for the operator.
pub fn write_pidfile(path: &Path) -> Result<(), String> {
    std::fs::write(path, format!("{}\n", std::process::id()))
        .map_err(|e| format!("cannot write pidfile {}: {e}", path.display()))
}

fn fail(name: &str, message: &str) -> ! {
    eprintln!("{name}: error: {message}");
    std::process::exit(1);
}
