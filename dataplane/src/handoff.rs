//! The hand-over socket of `hypha-dp` (hitless control-plane restart, docs/restart.md).
//!
//! `hypha-dp` outlives its control plane: it is started in its own process group without a
//! parent-death signal, so a SIGKILLed `hypha` leaves it forwarding on its last FIB and sessions.
//! A restarted control plane connects to the socket in the node's runtime directory
//! (`/run/hypha/<overlay address>/dp.sock`, see `hypha_proto::shm::handoff`), receives the region's
//! descriptors and resyncs with a new producer epoch. The attach connection stays open; its
//! end-of-file is how the dataplane notices that the control plane is gone (it logs it and keeps
//! forwarding). The same socket serves the counters as JSON (`hypha stats`).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hypha_proto::shm::handoff::{self, CMD_ATTACH, CMD_STATS};
use hypha_proto::shm::Region;

use crate::control::stats_json;
use crate::state::Shared;

/// The listening socket and the files it owns in the runtime directory.
#[derive(Debug)]
pub struct Handoff {
    listener: UnixListener,
    socket: PathBuf,
    pid_file: PathBuf,
}

impl Handoff {
    /// Creates `dir`, replaces a stale socket there, binds it and writes the pid file.
    pub fn bind(dir: &Path) -> std::io::Result<Handoff> {
        std::fs::create_dir_all(dir)?;
        let socket = handoff::socket_path(dir);
        if UnixStream::connect(&socket).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another hypha-dp serves {}", socket.display()),
            ));
        }
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)?;
        listener.set_nonblocking(true)?;
        let pid_file = handoff::pid_path(dir);
        std::fs::write(&pid_file, format!("{}\n", std::process::id()))?;
        Ok(Handoff {
            listener,
            socket,
            pid_file,
        })
    }

    /// Serves attach and stats requests until `shared.stop` is set (on its own thread).
    ///
    /// One control plane at a time: the parent that spawned us with the region counts as attached
    /// until it dies (our parent pid changes), an attached one until its connection closes; an
    /// attach request meanwhile is refused (two producers on one ring would corrupt it).
    pub fn serve(self, region: Arc<Region>, shared: Arc<Shared>) {
        let attached = Arc::new(AtomicBool::new(true));
        let parent = std::os::unix::process::parent_id();
        let mut parent_alive = true;
        while !shared.stopping() {
            if parent_alive && std::os::unix::process::parent_id() != parent {
                parent_alive = false;
                attached.store(false, Ordering::Release);
                tracing::warn!(
                    "control plane (our parent) gone; forwarding continues on the last state \
                     until a control plane attaches again"
                );
            }
            match self.listener.accept() {
                Ok((conn, _)) => self.answer(conn, &region, &shared, &attached),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    tracing::warn!("hand-over socket: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    fn answer(
        &self,
        mut conn: UnixStream,
        region: &Arc<Region>,
        shared: &Arc<Shared>,
        attached: &Arc<AtomicBool>,
    ) {
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
        let mut cmd = [0u8; 1];
        if conn.read_exact(&mut cmd).is_err() {
            return;
        }
        match cmd[0] {
            CMD_ATTACH => {
                if attached.swap(true, Ordering::AcqRel) {
                    tracing::warn!("attach refused: a control plane is attached");
                    return;
                }
                if let Err(e) = handoff::send_region(&conn, region.fd_numbers(), std::process::id())
                {
                    tracing::warn!("hand-over to a control plane failed: {e}");
                    attached.store(false, Ordering::Release);
                    return;
                }
                tracing::info!("control plane attached");
                let _ = conn.set_read_timeout(None);
                let attached = Arc::clone(attached);
                // The control plane never writes after attaching: end-of-file (or an error) means
                // it is gone.
                let watch = std::thread::Builder::new()
                    .name("hypha-dp-cp-watch".into())
                    .spawn(move || {
                        let mut sink = [0u8; 64];
                        while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
                        attached.store(false, Ordering::Release);
                        tracing::warn!(
                            "control plane gone; forwarding continues on the last state until a \
                             control plane attaches again"
                        );
                    });
                if let Err(e) = watch {
                    tracing::warn!("cannot watch the control plane: {e}");
                }
            }
            CMD_STATS => {
                let body = stats_json(shared).to_string();
                let _ = conn.write_all(body.as_bytes());
            }
            other => tracing::debug!(cmd = other, "unknown hand-over command"),
        }
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.pid_file);
    }
}
