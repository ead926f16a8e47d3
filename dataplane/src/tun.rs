//! The TUN device: one multi-queue IPv6 TUN interface, one file descriptor per worker.
//!
//! Opened with `IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | IFF_VNET_HDR` (DESIGN.md, "Dataplane"):
//! - `IFF_MULTI_QUEUE`: each worker gets its own queue (fd); the kernel spreads flows over them.
//! - `IFF_VNET_HDR`: every read and write starts with a [`VNET_HDR_LEN`]-byte `virtio_net_hdr`, which
//!   is what lets the kernel hand us (and take from us) 64 KiB TSO/USO super-packets with the
//!   checksum left to compute ([`Offloads`]).
//! - `IFF_NO_PI`: no 4-byte protocol header; the overlay carries IPv6 only.
//!
//! Offloads are negotiated with `TUNSETOFFLOAD`: CSUM + TSO6 + USO6 (Linux ≥ 6.2), falling back to
//! CSUM + TSO6, then to none. Without offloads every read is one MTU-sized packet and the
//! virtio header says so (`gso_type = NONE`).
//!
//! Interface configuration (MTU, address, routes, up) is done once at start with `ip(8)`, the way an
//! operator would; the hot path only reads and writes the queue fds.

#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv6Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;

/// Length of the `virtio_net_hdr` in front of every packet with `IFF_VNET_HDR` (the kernel's
/// default; `TUNSETVNETHDRSZ` is not changed).
pub const VNET_HDR_LEN: usize = crate::vnet::LEN;

/// Longest interface name, without the NUL (`IFNAMSIZ - 1`).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

const TUN_PATH: &str = "/dev/net/tun";

/// What can go wrong setting up the TUN device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunError {
    /// The interface name is empty, too long, or contains a NUL or '/'.
    #[error("invalid interface name {0:?}")]
    InvalidName(String),
    /// At least one queue is needed.
    #[error("a TUN device needs at least one queue")]
    NoQueues,
    /// Opening /dev/net/tun failed.
    #[error("opening /dev/net/tun: {0}")]
    Open(#[source] io::Error),
    /// `TUNSETIFF` failed (no permission, or the name belongs to another kind of device).
    #[error("creating TUN queue {queue} of {name}: {source}")]
    SetIff {
        /// The interface name.
        name: String,
        /// Which queue.
        queue: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {detail}")]
    Ip {
        /// The arguments.
        args: String,
        /// Exit status and stderr, or the spawn error.
        detail: String,
    },
}

/// The offloads the kernel accepted (`TUN_F_*` bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offloads(pub u32);

impl Offloads {
    /// CSUM + TSO6 + USO6: TCP and UDP super-packets, checksums left to the receiver.
    pub const FULL: Offloads = Offloads(libc::TUN_F_CSUM | libc::TUN_F_TSO6 | libc::TUN_F_USO6);
    /// CSUM + TSO6 (kernels before USO).
    pub const TSO: Offloads = Offloads(libc::TUN_F_CSUM | libc::TUN_F_TSO6);
    /// Nothing: one packet per read, checksums complete.
    pub const NONE: Offloads = Offloads(0);

    /// Whether TCP segmentation offload is on.
    pub fn tso(self) -> bool {
        self.0 & libc::TUN_F_TSO6 != 0
    }

    /// Whether UDP segmentation offload is on.
    pub fn uso(self) -> bool {
        self.0 & libc::TUN_F_USO6 != 0
    }
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (a `short`), padded to 40 bytes.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const _: () = assert!(core::mem::size_of::<IfReqFlags>() == core::mem::size_of::<libc::ifreq>());

/// A multi-queue TUN interface and its queue fds.
#[derive(Debug)]
pub struct Tun {
    name: String,
    queues: Vec<File>,
    offloads: Offloads,
}

fn check_name(name: &str) -> Result<(), TunError> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || name
            .bytes()
            .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace())
    {
        return Err(TunError::InvalidName(name.to_owned()));
    }
    Ok(())
}

fn open_queue(name: &str, queue: usize) -> Result<File, TunError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(TunError::Open)?;
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE | libc::IFF_VNET_HDR)
            as libc::c_short,
        _pad: [0; 22],
    };
    // check_name bounded the length to IFNAMSIZ - 1, so the name fits with its NUL.
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads (and writes back) one `struct ifreq`; `req` has its size and layout
    // (name then the flags union member) and lives across the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(TunError::SetIff {
            name: name.to_owned(),
            queue,
            source: io::Error::last_os_error(),
        });
    }
    Ok(file)
}

fn set_offload(file: &File, offloads: Offloads) -> bool {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned int of TUN_F_* bits).
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(offloads.0),
        )
    };
    rc == 0
}

impl Tun {
    /// Creates (or attaches to) the TUN interface `name` with `queues` queues in the calling
    /// thread's network namespace, and turns on the best offloads the kernel accepts.
    pub fn open(name: &str, queues: usize) -> Result<Tun, TunError> {
        check_name(name)?;
        if queues == 0 {
            return Err(TunError::NoQueues);
        }
        let mut files = Vec::with_capacity(queues);
        for q in 0..queues {
            files.push(open_queue(name, q)?);
        }
        // Offloads are a property of the device; setting them on one queue sets them for all.
        let mut offloads = Offloads::NONE;
        if let Some(first) = files.first() {
            for candidate in [Offloads::FULL, Offloads::TSO] {
                if set_offload(first, candidate) {
                    offloads = candidate;
                    break;
                }
            }
            if offloads == Offloads::NONE {
                // Make sure a previous owner's settings don't linger.
                let _ = set_offload(first, Offloads::NONE);
            }
        }
        tracing::info!(name, queues, offloads = offloads.0, "TUN device ready");
        Ok(Tun {
            name: name.to_owned(),
            queues: files,
            offloads,
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue fds, one per worker.
    pub fn queues(&self) -> &[File] {
        &self.queues
    }

    /// Hands the queues to the workers.
    pub fn into_queues(self) -> Vec<File> {
        self.queues
    }

    /// The offloads in effect.
    pub fn offloads(&self) -> Offloads {
        self.offloads
    }

    /// Asks for exactly `offloads` (e.g. [`Offloads::NONE`] for a reader that does not segment
    /// super-packets itself); returns whether the kernel accepted.
    pub fn set_offloads(&mut self, offloads: Offloads) -> bool {
        let ok = self
            .queues
            .first()
            .is_some_and(|q| set_offload(q, offloads));
        if ok {
            self.offloads = offloads;
        }
        ok
    }

    /// Sets the MTU and brings the interface up.
    pub fn set_mtu_up(&self, mtu: u32) -> Result<(), TunError> {
        ip(&[
            "link",
            "set",
            "dev",
            &self.name,
            "mtu",
            &mtu.to_string(),
            "up",
        ])
    }

    /// Adds an address (`nodad`: the address is ours by construction).
    pub fn add_address(&self, addr: Ipv6Addr, prefix_len: u8) -> Result<(), TunError> {
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{addr}/{prefix_len}"),
            "dev",
            &self.name,
            "nodad",
        ])
    }

    /// Routes a prefix (e.g. the overlay's 400::/7) into the interface.
    pub fn add_route(&self, prefix: Ipv6Addr, prefix_len: u8) -> Result<(), TunError> {
        ip(&[
            "-6",
            "route",
            "replace",
            &format!("{prefix}/{prefix_len}"),
            "dev",
            &self.name,
        ])
    }
}

/// Runs `ip ARGS` in the calling thread's network namespace.
fn ip(args: &[&str]) -> Result<(), TunError> {
    let out = Command::new("ip").args(args).output();
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(TunError::Ip {
            args: args.join(" "),
            detail: format!(
                "{}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        }),
        Err(e) => Err(TunError::Ip {
            args: args.join(" "),
            detail: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::process::{Child, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    static COUNTER: AtomicU32 = AtomicU32::new(0);

    /// A network namespace made with `ip netns add`, deleted on drop.
    struct Netns {
        name: String,
    }

    impl Netns {
        fn new() -> Netns {
            let name = format!(
                "hy-tun-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let st = Command::new("ip").args(["netns", "add", &name]).status();
            assert!(matches!(st, Ok(s) if s.success()), "ip netns add {name}");
            Netns { name }
        }

        /// Runs `f` on a thread that has entered the namespace (TUN devices are created in the
        /// namespace of the thread that opens them).
        fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
            let path = format!("/var/run/netns/{}", self.name);
            std::thread::spawn(move || {
                let ns = File::open(&path).expect("open netns");
                // SAFETY: setns on a namespace fd we just opened; it only affects this thread,
                // which exits after `f`.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
                f()
            })
            .join()
            .expect("netns thread")
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    /// A child process killed (by PID) and reaped on drop.
    struct Reaped(Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn names_are_checked() {
        assert!(matches!(Tun::open("", 1), Err(TunError::InvalidName(_))));
        assert!(matches!(
            Tun::open("a-very-long-name-x", 1),
            Err(TunError::InvalidName(_))
        ));
        assert!(matches!(Tun::open("a/b", 1), Err(TunError::InvalidName(_))));
        assert!(matches!(Tun::open("hy0", 0), Err(TunError::NoQueues)));
    }

    /// Root only: a 2-queue TUN in a fresh namespace receives the echo request `ping` sends to an
    /// address routed into it.
    #[test]
    fn ping_reaches_the_tun() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let ns = Netns::new();
        let tun = ns.run(|| {
            let tun = Tun::open("hyt0", 2).expect("open tun");
            tun.set_mtu_up(1400).expect("mtu");
            tun.add_address("fd00:4879::1".parse().unwrap(), 64)
                .expect("addr");
            tun.add_route("fd00:4879:1::".parse().unwrap(), 48)
                .expect("route");
            tun
        });
        assert_eq!(tun.queues().len(), 2);
        assert!(tun.offloads().tso(), "this kernel supports TSO6 on TUN");
        let _ping = Reaped(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns.name,
                    "ping",
                    "-6",
                    "-c",
                    "20",
                    "-i",
                    "0.2",
                    "-W",
                    "1",
                    "fd00:4879:1::7",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn ping"),
        );
        // Read every queue without blocking until an echo request to fd00:4879:1::7 shows up.
        for q in tun.queues() {
            set_nonblocking(q);
        }
        let want: [u8; 16] = "fd00:4879:1::7".parse::<Ipv6Addr>().unwrap().octets();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 65_536 + VNET_HDR_LEN];
        let mut found = false;
        'outer: while Instant::now() < deadline {
            for mut q in tun.queues() {
                match q.read(&mut buf) {
                    Ok(n) if n > VNET_HDR_LEN + 40 => {
                        let pkt = &buf[VNET_HDR_LEN..n];
                        let is_echo = pkt[0] >> 4 == 6 && pkt[6] == 58 && pkt[40] == 128;
                        if is_echo && pkt[24..40] == want {
                            // ICMPv6 is not segmented: the virtio header says gso_type NONE.
                            assert_eq!(buf[1], 0, "gso_type");
                            found = true;
                            break 'outer;
                        }
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("read: {e}"),
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(found, "no echo request arrived on the TUN");
    }

    /// Root only: the kernel's TCP sends TSO super-packets into the TUN, and `vnet::Segments` cuts
    /// them into segments whose checksums verify and whose payloads are the bytes the socket sent,
    /// in order. The test plays the TCP server by hand: it answers the SYN with a SYN-ACK and then
    /// just reads the first flight.
    #[test]
    fn kernel_tso_super_packets_segment_correctly() {
        use crate::vnet::{self, Segments, VnetHdr};
        use std::io::Write;
        use std::net::{SocketAddr, TcpStream};

        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let ns = Netns::new();
        let tun = ns.run(|| {
            let tun = Tun::open("hyt1", 1).expect("open tun");
            tun.set_mtu_up(1400).expect("mtu");
            tun.add_address("fd00:4879::1".parse().unwrap(), 64)
                .expect("addr");
            tun.add_route("fd00:4879:1::".parse().unwrap(), 48)
                .expect("route");
            tun
        });
        assert!(tun.offloads().tso());
        let sent: Vec<u8> = (0..30_000u32).map(|i| (i % 253) as u8).collect();
        let to_send = sent.clone();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let path = format!("/var/run/netns/{}", ns.name);
        let client = std::thread::spawn(move || {
            let nsf = File::open(&path).expect("open netns");
            // SAFETY: setns on a namespace fd we just opened; only this thread is affected.
            let rc = unsafe { libc::setns(nsf.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0);
            let server: SocketAddr = "[fd00:4879:1::7]:5201".parse().unwrap();
            let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(5))
                .expect("connect through the TUN");
            s.write_all(&to_send).expect("write");
            // Keep the connection open until the reader is done.
            let _ = done_rx.recv_timeout(Duration::from_secs(10));
        });

        let mut q = &tun.queues()[0];
        set_nonblocking(q);
        let deadline = Instant::now() + Duration::from_secs(8);
        let mut buf = vec![0u8; 65_536 + VNET_HDR_LEN];
        let mut seg = vec![0u8; 65_536];
        let mut isn: Option<u32> = None;
        let mut received = Vec::new();
        let mut super_packets = 0;
        while Instant::now() < deadline && received.len() < 8_000 {
            let n = match q.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => panic!("read: {e}"),
            };
            let hdr = VnetHdr::parse(&buf[..n]).expect("vnet header");
            let pkt = &buf[VNET_HDR_LEN..n];
            if pkt.len() < 60 || pkt[0] >> 4 != 6 || pkt[6] != 6 {
                continue; // not TCP (router solicitations, MLD)
            }
            let flags = pkt[53];
            if flags & 0x02 != 0 {
                // SYN: answer with SYN-ACK, MSS 1300.
                let syn_seq = u32::from_be_bytes([pkt[44], pkt[45], pkt[46], pkt[47]]);
                isn = Some(syn_seq.wrapping_add(1));
                let mut r = vec![0u8; VNET_HDR_LEN + 64];
                let p = &mut r[VNET_HDR_LEN..];
                p[0] = 0x60;
                p[4..6].copy_from_slice(&24u16.to_be_bytes());
                p[6] = 6;
                p[7] = 64;
                p[8..24].copy_from_slice(&pkt[24..40]);
                p[24..40].copy_from_slice(&pkt[8..24]);
                p[40..42].copy_from_slice(&pkt[42..44]);
                p[42..44].copy_from_slice(&pkt[40..42]);
                p[44..48].copy_from_slice(&1000u32.to_be_bytes());
                p[48..52].copy_from_slice(&syn_seq.wrapping_add(1).to_be_bytes());
                p[52] = 6 << 4;
                p[53] = 0x12;
                p[54..56].copy_from_slice(&65_535u16.to_be_bytes());
                p[60..64].copy_from_slice(&[2, 4, 0x05, 0x14]);
                vnet::fill_checksum(p).expect("checksum");
                q.write_all(&r).expect("write SYN-ACK");
                continue;
            }
            let Some(start) = isn else { continue };
            let mut collect = |s: &[u8]| {
                assert!(vnet::verify_checksum(s), "segment checksum");
                let data_off = usize::from(s[52] >> 4) * 4;
                let seq = u32::from_be_bytes([s[44], s[45], s[46], s[47]]);
                let payload = &s[40 + data_off..];
                if !payload.is_empty() && seq.wrapping_sub(start) as usize == received.len() {
                    assert!(payload.len() <= 1300, "segment larger than the MSS");
                    received.extend_from_slice(payload);
                }
            };
            if hdr.is_gso() {
                super_packets += 1;
                assert_eq!(hdr.gso_type & !vnet::GSO_ECN, vnet::GSO_TCPV6);
                let mut segs = Segments::new(&hdr, pkt).expect("super-packet");
                assert!(segs.count() > 1);
                while let Some(r) = segs.next_into(&mut seg) {
                    let len = r.expect("segment");
                    collect(&seg[..len]);
                }
            } else {
                let mut one = pkt.to_vec();
                vnet::complete_checksum(&hdr, &mut one).expect("checksum");
                collect(&one);
            }
        }
        let _ = done_tx.send(());
        client.join().expect("client thread");
        assert!(received.len() >= 8_000, "got {} bytes", received.len());
        assert_eq!(&received[..], &sent[..received.len()]);
        assert!(super_packets > 0, "no TSO super-packet arrived");
    }

    fn set_nonblocking(f: &File) {
        let fd = f.as_fd().as_raw_fd();
        // SAFETY: fcntl on an fd we own, with integer arguments only.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            assert!(flags >= 0);
            assert_eq!(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK), 0);
        }
    }
}
