//! The delay bridge behind [`LinkOpts::delay`](crate::LinkOpts::delay): a user-space layer-2
//! bridge with a fixed delay, because this kernel has no `sch_netem`.
//!
//! A delayed link is two veth pairs, `a ⇄ x` and `y ⇄ b`, with `x` and `y` in a hidden middle
//! namespace (IPv6 disabled, no addresses, so it never speaks itself). A thread of the test process
//! enters that namespace and opens an `AF_PACKET` socket on `x` and one on `y`; every frame read on
//! one is held for the delay and written to the other. So `a` and `b` share one Ethernet segment
//! and see each other's ARP/NDP, ping, UDP and TCP, all delayed.
//!
//! The sockets use `PACKET_VNET_HDR`: each frame carries a virtio-net header that describes a
//! pending checksum (veth hands over locally built packets with `CHECKSUM_PARTIAL`) or a GSO
//! super-packet (TCP over veth sends up to 64 KiB at once). Passing the header through unchanged
//! lets the kernel finish the checksum or segment on the far side, as a veth would; without it,
//! UDP and TCP would arrive with bad checksums or be refused as too big. `PACKET_IGNORE_OUTGOING`
//! keeps a socket from reading back the frames the bridge itself sends.

use std::collections::VecDeque;
use std::ffi::CString;
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::error::{Error, Result};
use crate::ns;

const SIDE_X: Token = Token(0);
const SIDE_Y: Token = Token(1);
const WAKER: Token = Token(2);
/// virtio-net header (10 bytes) + a 64 KiB GSO frame + Ethernet header, with room to spare.
const MAX_FRAME: usize = 128 * 1024;

struct BridgeShared {
    stop: AtomicBool,
    waker: Waker,
    thread: Mutex<Option<JoinHandle<()>>>,
    frames: AtomicU64,
    dropped: AtomicU64,
}

/// A running delay bridge; stopped by the `TestNet` at teardown.
#[derive(Clone)]
pub(crate) struct Bridge {
    shared: Arc<BridgeShared>,
}

fn last_os_error(what: &str) -> Error {
    Error::io(what.to_string(), io::Error::last_os_error())
}

/// An `AF_PACKET` socket bound to `ifname` (in the calling thread's namespace), non-blocking.
fn packet_socket(ifname: &str) -> Result<OwnedFd> {
    let name = CString::new(ifname)
        .map_err(|_| Error::InvalidArgument(format!("interface name {ifname:?}")))?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(last_os_error(&format!("if_nametoindex({ifname})")));
    }
    // Protocol 0 at creation: the socket receives nothing until it is bound to one interface.
    // SAFETY: plain system call with constant arguments.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(last_os_error("socket(AF_PACKET)"));
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    for (opt, name) in [
        (libc::PACKET_VNET_HDR, "PACKET_VNET_HDR"),
        (libc::PACKET_IGNORE_OUTGOING, "PACKET_IGNORE_OUTGOING"),
    ] {
        // SAFETY: `one` is a live c_int and the length passed is its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                opt,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(last_os_error(&format!("setsockopt({name})")));
        }
    }
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as libc::c_ushort;
    addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    addr.sll_ifindex =
        i32::try_from(ifindex).map_err(|_| Error::InvalidArgument(format!("ifindex {ifindex}")))?;
    // SAFETY: `addr` is a live sockaddr_ll and the length passed is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(last_os_error(&format!("bind AF_PACKET to {ifname}")));
    }
    Ok(fd)
}

/// One non-blocking read; `Ok(None)` when nothing is queued. Truncated frames are reported as
/// `Ok(Some(None))` so the caller can count and skip them.
fn recv_frame(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<Option<usize>>> {
    // SAFETY: `buf` is writable for `buf.len()` bytes. MSG_TRUNC makes the call return the real
    // frame length, so truncation is detectable.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_TRUNC,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        };
    }
    let n = n.unsigned_abs();
    Ok(Some((n <= buf.len()).then_some(n)))
}

fn send_frame(fd: &OwnedFd, frame: &[u8]) -> bool {
    // SAFETY: `frame` is readable for `frame.len()` bytes; the socket is bound, so no address.
    let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    n >= 0
}

impl Bridge {
    /// Starts the bridge between `x` and `y` inside namespace `netns`.
    pub(crate) fn start(netns: &str, x: &str, y: &str, delay: Duration) -> Result<Bridge> {
        let (tx, rx) = mpsc::channel::<Result<Arc<BridgeShared>>>();
        let (ns_name, x, y) = (netns.to_string(), x.to_string(), y.to_string());
        let thread = std::thread::Builder::new()
            .name(format!("bridge-{netns}"))
            .spawn(move || {
                let setup = (|| {
                    ns::enter_netns(&ns_name)?;
                    let fx = packet_socket(&x)?;
                    let fy = packet_socket(&y)?;
                    let poll = Poll::new().map_err(|e| Error::io("create poll", e))?;
                    for (fd, token) in [(&fx, SIDE_X), (&fy, SIDE_Y)] {
                        poll.registry()
                            .register(&mut SourceFd(&fd.as_raw_fd()), token, Interest::READABLE)
                            .map_err(|e| Error::io("register packet socket", e))?;
                    }
                    let waker = Waker::new(poll.registry(), WAKER)
                        .map_err(|e| Error::io("create waker", e))?;
                    let shared = Arc::new(BridgeShared {
                        stop: AtomicBool::new(false),
                        waker,
                        thread: Mutex::new(None),
                        frames: AtomicU64::new(0),
                        dropped: AtomicU64::new(0),
                    });
                    Ok((shared, poll, fx, fy))
                })();
                match setup {
                    Ok((shared, poll, fx, fy)) => {
                        if tx.send(Ok(shared.clone())).is_ok() {
                            run(&shared, poll, [fx, fy], delay);
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| Error::io("spawn bridge thread", e))?;
        let shared = match rx.recv() {
            Ok(Ok(shared)) => shared,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::io(
                    "bridge thread",
                    io::Error::other("bridge thread ended during setup"),
                ));
            }
        };
        *shared.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread);
        Ok(Bridge { shared })
    }

    /// Stops the bridge and joins its thread; frames still held are discarded. Idempotent.
    pub(crate) fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // A failed wake only delays the stop until the next frame; the flag is still seen.
        let _ = self.shared.waker.wake();
        let thread = self
            .shared
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

struct Held {
    due: Instant,
    /// Index of the socket to send on.
    out: usize,
    frame: Vec<u8>,
}

fn run(shared: &BridgeShared, mut poll: Poll, fds: [OwnedFd; 2], delay: Duration) {
    let mut events = Events::with_capacity(16);
    let mut buf = vec![0u8; MAX_FRAME];
    // One FIFO for both directions: with a constant delay, due times are in arrival order.
    let mut queue: VecDeque<Held> = VecDeque::new();
    loop {
        let timeout = queue
            .front()
            .map(|h| h.due.saturating_duration_since(Instant::now()));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        for event in events.iter() {
            let (input, out) = match event.token() {
                SIDE_X => (0, 1),
                SIDE_Y => (1, 0),
                _ => continue,
            };
            let Some(fd) = fds.get(input) else { continue };
            // Edge-triggered: drain until the socket is empty.
            loop {
                match recv_frame(fd, &mut buf) {
                    Ok(Some(Some(len))) => queue.push_back(Held {
                        due: Instant::now() + delay,
                        out,
                        frame: buf.get(..len).unwrap_or_default().to_vec(),
                    }),
                    Ok(Some(None)) => {
                        shared.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None) => break,
                    // e.g. ENETDOWN while the link is cut: nothing to read now.
                    Err(_) => break,
                }
            }
        }
        let now = Instant::now();
        while queue.front().is_some_and(|h| h.due <= now) {
            let Some(held) = queue.pop_front() else { break };
            let sent = fds
                .get(held.out)
                .is_some_and(|fd| send_frame(fd, &held.frame));
            let counter = if sent {
                &shared.frames
            } else {
                &shared.dropped
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}
