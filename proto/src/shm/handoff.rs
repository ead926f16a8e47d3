//! Handing a running dataplane's region to a (re)started control plane (hitless restart).
//!
//! Why a socket: the control plane that created the region may be gone (SIGKILL) while `hypha-dp`
//! keeps forwarding. A new control plane finds the dataplane by the node's overlay address (network
//! namespaces share the filesystem, so the runtime directory is keyed by address, see
//! [`runtime_dir`]) and receives the five region descriptors over `SCM_RIGHTS`. docs/restart.md
//! describes the whole procedure.
//!
//! Protocol on the unix stream socket [`socket_path`]: the client writes one command byte.
//! * [`CMD_ATTACH`]: the dataplane answers [`ATTACH_REPLY_LEN`] bytes (`"HYHO"`, its pid as u32
//!   little-endian) with the descriptors attached in [`FdNumbers`] order. The connection stays open
//!   while the control plane lives; the dataplane takes its end-of-file as "control plane gone".
//! * [`CMD_STATS`]: the dataplane writes its counters as one JSON document and closes.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::Ipv6Addr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use super::{FdNumbers, RegionFds};

/// Ask for the region descriptors (and keep the connection as the attachment).
pub const CMD_ATTACH: u8 = b'A';
/// Ask for the counters as JSON.
pub const CMD_STATS: u8 = b'S';
/// Magic of the attach reply.
pub const ATTACH_MAGIC: [u8; 4] = *b"HYHO";
/// Length of the attach reply: magic and pid.
pub const ATTACH_REPLY_LEN: usize = 8;
/// Base of the per-node runtime directories.
pub const RUNTIME_BASE: &str = "/run/hypha";

/// Why a hand-over failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// Socket I/O failed (including "no dataplane listening").
    #[error("dataplane hand-over socket: {0}")]
    Io(#[from] std::io::Error),
    /// The reply was not an attach reply with five descriptors.
    #[error("malformed hand-over reply ({0})")]
    Malformed(&'static str),
}

/// The runtime directory of the node with overlay address `addr` under `base`.
pub fn runtime_dir(base: &Path, addr: Ipv6Addr) -> PathBuf {
    base.join(addr.to_string())
}

/// The dataplane's hand-over socket in a runtime directory.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("dp.sock")
}

/// The dataplane's pid file in a runtime directory.
pub fn pid_path(dir: &Path) -> PathBuf {
    dir.join("dp.pid")
}

/// Dataplane side: answers [`CMD_ATTACH`] on `stream` with `fds` and `pid`.
pub fn send_region(stream: &UnixStream, fds: FdNumbers, pid: u32) -> Result<(), HandoffError> {
    let all = fds.all();
    // SAFETY: the caller passes the numbers of its live region, which outlives this call.
    let borrowed: Vec<BorrowedFd<'_>> = all
        .iter()
        .map(|fd| unsafe { BorrowedFd::borrow_raw(*fd) })
        .collect();
    let mut reply = [0u8; ATTACH_REPLY_LEN];
    reply[..4].copy_from_slice(&ATTACH_MAGIC);
    reply[4..].copy_from_slice(&pid.to_le_bytes());
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(5))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    if !cmsg.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(HandoffError::Malformed("ancillary buffer too small"));
    }
    sendmsg(
        stream,
        &[IoSlice::new(&reply)],
        &mut cmsg,
        SendFlags::NOSIGNAL,
    )
    .map_err(std::io::Error::from)?;
    Ok(())
}

/// Control-plane side: connects to `socket`, asks for the region and returns its descriptors, the
/// dataplane's pid, and the connection (keep it open while attached).
pub fn attach(socket: &Path) -> Result<(RegionFds, u32, UnixStream), HandoffError> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(&[CMD_ATTACH])?;
    let mut reply = [0u8; ATTACH_REPLY_LEN];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(5))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        stream.as_fd(),
        &mut [IoSliceMut::new(&mut reply)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC | RecvFlags::WAITALL,
    )
    .map_err(std::io::Error::from)?;
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(5);
    for msg in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    if got.bytes != ATTACH_REPLY_LEN || reply[..4] != ATTACH_MAGIC {
        return Err(HandoffError::Malformed("bad reply"));
    }
    let pid = u32::from_le_bytes([reply[4], reply[5], reply[6], reply[7]]);
    let mut it = fds.into_iter();
    let (Some(memfd), Some(a), Some(b), Some(c), Some(d), None) = (
        it.next(),
        it.next(),
        it.next(),
        it.next(),
        it.next(),
        it.next(),
    ) else {
        return Err(HandoffError::Malformed("expected five descriptors"));
    };
    stream.set_read_timeout(None)?;
    Ok((
        RegionFds {
            memfd,
            events: [a, b, c, d],
        },
        pid,
        stream,
    ))
}

/// Asks the dataplane at `socket` for its counters (a JSON document).
pub fn query_stats(socket: &Path, timeout: Duration) -> Result<String, HandoffError> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(&[CMD_STATS])?;
    let mut out = String::new();
    stream.take(1 << 20).read_to_string(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::{Region, RegionConfig};
    use std::os::unix::net::UnixListener;

    #[test]
    fn region_crosses_the_socket_and_attaches() {
        use crate::shm::{Direction, Record, Resync};
        let dir = std::env::temp_dir().join(format!("hypha-handoff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = socket_path(&dir);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let region = Region::create(&RegionConfig::default()).unwrap();
        let nums = region.fd_numbers();
        let server = std::thread::spawn(move || {
            let mut down = region.consumer(Direction::Down).unwrap();
            let (mut s, _) = listener.accept().unwrap();
            let mut cmd = [0u8; 1];
            s.read_exact(&mut cmd).unwrap();
            assert_eq!(cmd[0], CMD_ATTACH);
            send_region(&s, nums, 4242).unwrap();
            // The client's end-of-file is the detach.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
            let mut seen = Vec::new();
            down.drain(16, |r| seen.push(format!("{:?}", r.unwrap().record)))
                .unwrap();
            seen
        });
        let (fds, pid, conn) = attach(&path).unwrap();
        assert_eq!(pid, 4242);
        let attached = Region::attach(fds).unwrap();
        let mut up = attached.producer(Direction::Down).unwrap();
        up.try_push(&Record::Resync(Resync::Begin { generation: 7 }))
            .unwrap();
        drop(conn);
        let seen = server.join().unwrap();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].contains("generation: 7"), "{seen:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_listener_is_an_error() {
        let p = Path::new("/nonexistent/hypha/dp.sock");
        assert!(matches!(attach(p), Err(HandoffError::Io(_))));
    }
}
