//! Background processes started in a node, tracked by PID.
//!
//! Each process runs in its own process group (its PGID is its PID), with stdin from /dev/null and
//! stdout and stderr appended to one log file. Signals go to the whole group, so helpers the process
//! forks (a `sh -c` wrapper's child, say) are stopped with it. The harness reaps the process itself
//! with `waitid`/`waitpid`; until it has been reaped the PID cannot be reused, so a signal never hits
//! a stranger. Before reaping, whatever is left of the group is killed.

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcExit {
    /// It called `exit` with this code.
    Code(i32),
    /// It was killed by this signal number.
    Signal(i32),
    /// Something else in the test process reaped it (a stray `waitpid(-1)`); status unknown.
    Lost,
}

impl ProcExit {
    /// True for exit code 0.
    pub fn success(self) -> bool {
        self == ProcExit::Code(0)
    }
}

impl fmt::Display for ProcExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcExit::Code(code) => write!(f, "exit code {code}"),
            ProcExit::Signal(sig) => match Signal::try_from(*sig) {
                Ok(s) => write!(f, "killed by {s}"),
                Err(_) => write!(f, "killed by signal {sig}"),
            },
            ProcExit::Lost => write!(f, "reaped elsewhere, status unknown"),
        }
    }
}

pub(crate) struct ProcInner {
    name: String,
    node: String,
    cmdline: String,
    pid: Pid,
    log_path: PathBuf,
    /// `Some` once the process has been reaped. Holding this lock serialises signals and reaping.
    exit: Mutex<Option<ProcExit>>,
}

/// A process started with [`Node::spawn`](crate::Node::spawn). Cheap to clone.
///
/// The [`TestNet`](crate::TestNet) keeps a clone and stops the process when it is dropped
/// (SIGTERM to the group, up to 2 s grace, SIGKILL, reap). Dropping a `ProcHandle` does nothing.
#[derive(Clone)]
pub struct ProcHandle {
    inner: Arc<ProcInner>,
}

impl fmt::Debug for ProcHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcHandle")
            .field("name", &self.inner.name)
            .field("node", &self.inner.node)
            .field("pid", &self.inner.pid)
            .finish()
    }
}

/// Grace period between SIGTERM and SIGKILL in [`ProcHandle::stop`] and at teardown.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

fn lock(m: &Mutex<Option<ProcExit>>) -> MutexGuard<'_, Option<ProcExit>> {
    // A poisoned lock only means another thread panicked while holding it; the Option is still valid.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn exit_of(status: WaitStatus) -> Option<ProcExit> {
    match status {
        WaitStatus::Exited(_, code) => Some(ProcExit::Code(code)),
        WaitStatus::Signaled(_, sig, _) => Some(ProcExit::Signal(sig as i32)),
        _ => None,
    }
}

impl ProcHandle {
    pub(crate) fn new(
        name: String,
        node: String,
        cmdline: String,
        pid: u32,
        log_path: PathBuf,
    ) -> Self {
        let raw = i32::try_from(pid).unwrap_or(i32::MAX);
        ProcHandle {
            inner: Arc::new(ProcInner {
                name,
                node,
                cmdline,
                pid: Pid::from_raw(raw),
                log_path,
                exit: Mutex::new(None),
            }),
        }
    }

    /// The name given to `spawn` (also the log file's stem).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The node (namespace) the process runs in.
    pub fn node_name(&self) -> &str {
        &self.inner.node
    }

    /// The process ID (also its process group ID).
    pub fn pid(&self) -> u32 {
        self.inner.pid.as_raw().unsigned_abs()
    }

    /// The command line, for messages.
    pub fn cmdline(&self) -> &str {
        &self.inner.cmdline
    }

    /// The file that receives the process's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.inner.log_path
    }

    /// Everything the process has written so far (stdout and stderr interleaved; lossy UTF-8).
    pub fn log(&self) -> Result<String> {
        let bytes = std::fs::read(&self.inner.log_path)
            .map_err(|e| Error::io(format!("read {}", self.inner.log_path.display()), e))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The last `lines` lines of the log (reads at most the last 64 KiB).
    pub fn log_tail(&self, lines: usize) -> Result<String> {
        let path = &self.inner.log_path;
        let mut file =
            File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        let len = file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io("seek log", e))?;
        let start = len.saturating_sub(64 * 1024);
        file.seek(SeekFrom::Start(start))
            .map_err(|e| Error::io("seek log", e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| Error::io("read log", e))?;
        let text = String::from_utf8_lossy(&bytes);
        let all: Vec<&str> = text.lines().collect();
        let from = all.len().saturating_sub(lines);
        Ok(all.get(from..).unwrap_or_default().join("\n"))
    }

    /// Sends `signal` to the process's group. Does nothing if the process has already been reaped.
    pub fn kill(&self, signal: Signal) -> Result<()> {
        let exit = lock(&self.inner.exit);
        if exit.is_some() {
            return Ok(());
        }
        self.signal_group(signal)
    }

    fn signal_group(&self, signal: Signal) -> Result<()> {
        match killpg(self.inner.pid, signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(Error::sys(
                format!("kill({}, {signal}) for {}", self.inner.pid, self.inner.name),
                e,
            )),
        }
    }

    /// Reaps the process if it has exited; `None` while it runs.
    ///
    /// When the process has exited, the rest of its process group is killed before it is reaped.
    pub fn try_exit(&self) -> Result<Option<ProcExit>> {
        let mut exit = lock(&self.inner.exit);
        self.try_reap(&mut exit)
    }

    fn try_reap(&self, exit: &mut Option<ProcExit>) -> Result<Option<ProcExit>> {
        if let Some(done) = *exit {
            return Ok(Some(done));
        }
        let pid = self.inner.pid;
        let peek = waitid(
            Id::Pid(pid),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        );
        match peek {
            Ok(WaitStatus::StillAlive) => return Ok(None),
            Ok(_) => {}
            Err(Errno::ECHILD) => {
                // Someone else reaped it (a stray waitpid(-1) elsewhere in the test process).
                *exit = Some(ProcExit::Lost);
                return Ok(*exit);
            }
            Err(e) => return Err(Error::sys(format!("waitid({pid})"), e)),
        }
        // The leader is a zombie, so its PID (= PGID) is still reserved: safe to signal the group.
        self.signal_group(Signal::SIGKILL)?;
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(status) => {
                *exit = exit_of(status);
                Ok(*exit)
            }
            Err(e) => Err(Error::sys(format!("waitpid({pid})"), e)),
        }
    }

    /// True until the process has exited (reaping it if it has).
    pub fn is_running(&self) -> bool {
        matches!(self.try_exit(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit on its own; [`Error::Timeout`] if it does not.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ProcExit> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(done) = self.try_exit()? {
                return Ok(done);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the log contains `needle` (e.g. a daemon's "listening" line). Fails fast with
    /// [`Error::Exited`] if the process ends first, or with [`Error::Timeout`].
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log()?.contains(needle) {
                return Ok(());
            }
            if let Some(exit) = self.try_exit()? {
                // It may have written the line just before exiting.
                if self.log()?.contains(needle) {
                    return Ok(());
                }
                return Err(Error::Exited {
                    name: self.inner.name.clone(),
                    exit,
                });
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process: SIGTERM to its group, up to [`STOP_GRACE`], then SIGKILL; reaps it.
    pub fn stop(&self) -> Result<ProcExit> {
        self.stop_with_grace(STOP_GRACE)
    }

    pub(crate) fn stop_with_grace(&self, grace: Duration) -> Result<ProcExit> {
        let mut exit = lock(&self.inner.exit);
        if let Some(done) = self.try_reap(&mut exit)? {
            return Ok(done);
        }
        self.signal_group(Signal::SIGTERM)?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(done) = self.try_reap(&mut exit)? {
                return Ok(done);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.signal_group(Signal::SIGKILL)?;
        // SIGKILL cannot be ignored; allow generous time for a process stuck in the kernel.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(done) = self.try_reap(&mut exit)? {
                return Ok(done);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(grace + Duration::from_secs(10)));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The exit status if the process has been reaped (never blocks, never reaps).
    pub(crate) fn known_exit(&self) -> Option<ProcExit> {
        *lock(&self.inner.exit)
    }
}
