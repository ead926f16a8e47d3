//! SIGINT and SIGTERM as an fd in the event loop (signalfd), so shutdown is just another event.
//!
//! Why signalfd and not a handler: a handler can do almost nothing safely, while a readable fd
//! lets the loop finish its iteration and exit cleanly. The signals must be blocked in every
//! thread, so [`Signals::new`] has to run before any other thread is spawned (threads inherit the
//! mask).

use std::os::fd::{AsRawFd, RawFd};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// The shutdown signals, readable through an fd.
#[derive(Debug)]
pub struct Signals {
    fd: SignalFd,
}

impl Signals {
    /// Blocks SIGINT and SIGTERM in this thread and opens a signalfd for them.
    pub fn new() -> std::io::Result<Signals> {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGINT);
        mask.add(Signal::SIGTERM);
        mask.thread_block().map_err(std::io::Error::from)?;
        let fd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(std::io::Error::from)?;
        Ok(Signals { fd })
    }

    /// Reads pending signals; returns the first shutdown signal's number, if any arrived.
    pub fn read(&mut self) -> std::io::Result<Option<i32>> {
        let mut got = None;
        while let Some(info) = self.fd.read_signal().map_err(std::io::Error::from)? {
            let signo = i32::try_from(info.ssi_signo).unwrap_or(i32::MAX);
            got.get_or_insert(signo);
        }
        Ok(got)
    }
}

impl AsRawFd for Signals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_signal_becomes_readable() {
        // Runs on its own test thread: the signal is blocked and raised for this thread only, so
        // the rest of the test process is unaffected.
        let mut s = Signals::new().unwrap();
        assert_eq!(s.read().unwrap(), None);
        // SAFETY: pthread_self() is this live thread; SIGTERM is blocked in it.
        let rc = unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGTERM) };
        assert_eq!(rc, 0);
        assert_eq!(s.read().unwrap(), Some(libc::SIGTERM));
        assert_eq!(s.read().unwrap(), None);
    }
}
