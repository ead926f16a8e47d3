//! A user-space UDP delay relay, because this kernel has no `sch_netem`.
//!
//! The relay runs on a thread of the test process that has entered a node's namespace. It listens
//! on one UDP address; for every client address that sends to it, it opens an upstream socket
//! connected to the target. A datagram from a client is held for `delay` and then sent to the
//! target from that client's upstream socket; a datagram the target sends back to an upstream
//! socket is held for `delay` and sent to the client from the listening socket. So each direction
//! gets `delay` and a round trip through the relay at least `2 × delay`. One FIFO queue with a
//! constant delay keeps datagrams in order.
//!
//! It delays **UDP only** — Hypha's underlay is UDP. To put a delay between hypha nodes A and B,
//! run the relay in A's namespace listening on a free port, and configure A to peer with the
//! relay's address instead of B's (and B not to dial A directly). B sees A's traffic coming from
//! the relay's upstream socket (A's address with another port). For delay on *all* traffic of a
//! link (ping included), use [`LinkOpts::delay`](crate::LinkOpts::delay) instead.

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::error::{Error, Result};
use crate::ns;

const LISTEN: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_UPSTREAM: usize = 2;
/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_536;

pub(crate) struct RelayShared {
    listen: SocketAddr,
    target: SocketAddr,
    delay: Duration,
    stop: AtomicBool,
    waker: Waker,
    thread: Mutex<Option<JoinHandle<()>>>,
    to_target: AtomicU64,
    to_clients: AtomicU64,
    dropped: AtomicU64,
}

/// A running UDP delay relay, made by
/// [`TestNet::udp_delay_relay`](crate::TestNet::udp_delay_relay). Cheap to clone.
///
/// It runs on a thread of the test process inside a node's namespace. For every client address
/// that sends to [`local_addr`](Relay::local_addr) it opens an upstream socket connected to the
/// [`target`](Relay::target): client datagrams are held for [`delay`](Relay::delay) and sent to
/// the target from that socket; the target's replies are held for `delay` and sent back to the
/// client from the listening socket. A round trip through it takes at least `2 × delay`, and
/// datagrams keep their order. **UDP only** (Hypha's underlay is UDP); for delaying everything on
/// a link use [`LinkOpts::delay`](crate::LinkOpts::delay).
///
/// Delaying one hypha peering: start the relay in A's namespace (e.g. listening on
/// `127.0.0.1:0`, target B's underlay address), and configure A to peer with
/// `relay.local_addr()` instead of B — and B not to dial A directly. B sees A's packets coming
/// from A's address with the upstream socket's port.
///
/// ```no_run
/// # fn f(net: &hypha_testnet::TestNet, a: &hypha_testnet::Node, ab: &hypha_testnet::Link)
/// #     -> hypha_testnet::Result<()> {
/// use std::net::SocketAddr;
/// let b_underlay = SocketAddr::new(ab.b().ipv4().into(), 9651);
/// let relay = net.udp_delay_relay(a, "127.0.0.1:0".parse().unwrap(), b_underlay,
///                                 std::time::Duration::from_millis(50))?;
/// let peer_arg = format!("udp://{}", relay.local_addr()); // give this to A
/// # let _ = peer_arg; Ok(()) }
/// ```
///
/// It runs until [`stop`](Relay::stop) or until the `TestNet` is dropped; dropping the handle does
/// not stop it.
#[derive(Clone)]
pub struct Relay {
    pub(crate) shared: Arc<RelayShared>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("listen", &self.shared.listen)
            .field("target", &self.shared.target)
            .field("delay", &self.shared.delay)
            .finish()
    }
}

impl Relay {
    /// The address clients send to (the actual port if `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.listen
    }

    /// Where datagrams from clients are forwarded.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// The one-way delay per direction.
    pub fn delay(&self) -> Duration {
        self.shared.delay
    }

    /// Datagrams forwarded from clients to the target so far. Counted just after each send, so a
    /// receiver may see a datagram a moment before it is counted; read after
    /// [`stop`](Relay::stop) for final numbers.
    pub fn forwarded_to_target(&self) -> u64 {
        self.shared.to_target.load(Ordering::Relaxed)
    }

    /// Datagrams forwarded from the target back to clients so far.
    pub fn forwarded_to_clients(&self) -> u64 {
        self.shared.to_clients.load(Ordering::Relaxed)
    }

    /// Datagrams that could not be sent (socket buffer full, unreachable target).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Stops the relay and waits for its thread; datagrams still held are discarded. Idempotent.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // A failed wake only delays the stop until the next event; the thread still sees the flag.
        let _ = self.shared.waker.wake();
        let thread = self
            .shared
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(thread) = thread {
            // The loop does not panic on network input; a panic would be a harness bug, already
            // printed by the panic hook.
            let _ = thread.join();
        }
    }
}

/// Starts a relay in namespace `netns`.
pub(crate) fn start(
    netns: &str,
    listen: SocketAddr,
    target: SocketAddr,
    delay: Duration,
) -> Result<Relay> {
    let (tx, rx) = mpsc::channel::<Result<Arc<RelayShared>>>();
    let ns_name = netns.to_string();
    let thread = std::thread::Builder::new()
        .name(format!("relay-{netns}"))
        .spawn(move || {
            let setup = (|| {
                ns::enter_netns(&ns_name)?;
                let std_sock = StdUdpSocket::bind(listen)
                    .map_err(|e| Error::io(format!("bind relay to {listen} in {ns_name}"), e))?;
                std_sock
                    .set_nonblocking(true)
                    .map_err(|e| Error::io("set relay socket nonblocking", e))?;
                let local = std_sock
                    .local_addr()
                    .map_err(|e| Error::io("relay local address", e))?;
                let mut sock = UdpSocket::from_std(std_sock);
                let poll = Poll::new().map_err(|e| Error::io("create poll", e))?;
                poll.registry()
                    .register(&mut sock, LISTEN, Interest::READABLE)
                    .map_err(|e| Error::io("register relay socket", e))?;
                let waker =
                    Waker::new(poll.registry(), WAKER).map_err(|e| Error::io("create waker", e))?;
                let shared = Arc::new(RelayShared {
                    listen: local,
                    target,
                    delay,
                    stop: AtomicBool::new(false),
                    waker,
                    thread: Mutex::new(None),
                    to_target: AtomicU64::new(0),
                    to_clients: AtomicU64::new(0),
                    dropped: AtomicU64::new(0),
                });
                let worker = Worker {
                    shared: shared.clone(),
                    poll,
                    listen: sock,
                    upstreams: Vec::new(),
                    clients: HashMap::new(),
                    queue: VecDeque::new(),
                };
                Ok((shared, worker))
            })();
            match setup {
                Ok((shared, worker)) => {
                    // `start` waits for exactly this message; if it is gone, so is the caller.
                    if tx.send(Ok(shared)).is_ok() {
                        worker.run();
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })
        .map_err(|e| Error::io("spawn relay thread", e))?;
    let shared = match rx.recv() {
        Ok(Ok(shared)) => shared,
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(e);
        }
        Err(_) => {
            let _ = thread.join();
            return Err(Error::io(
                "relay thread",
                io::Error::other("relay thread ended during setup"),
            ));
        }
    };
    *shared.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread);
    Ok(Relay { shared })
}

/// Where a held datagram goes when its time comes.
enum Dest {
    /// To the target, from this client's upstream socket.
    Upstream(usize),
    /// To this client, from the listening socket.
    Client(SocketAddr),
}

struct Held {
    due: Instant,
    dest: Dest,
    data: Vec<u8>,
}

pub(crate) struct Worker {
    shared: Arc<RelayShared>,
    poll: Poll,
    listen: UdpSocket,
    /// Upstream socket and its client, indexed by `token - FIRST_UPSTREAM`.
    upstreams: Vec<(UdpSocket, SocketAddr)>,
    clients: HashMap<SocketAddr, usize>,
    queue: VecDeque<Held>,
}

impl Worker {
    fn run(mut self) {
        let mut events = Events::with_capacity(64);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let timeout = self
                .queue
                .front()
                .map(|h| h.due.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if self.shared.stop.load(Ordering::SeqCst) {
                return;
            }
            for event in events.iter() {
                match event.token() {
                    LISTEN => self.read_clients(&mut buf),
                    WAKER => {}
                    Token(t) => self.read_upstream(t.wrapping_sub(FIRST_UPSTREAM), &mut buf),
                }
            }
            self.send_due();
        }
    }

    fn read_clients(&mut self, buf: &mut [u8]) {
        loop {
            match self.listen.recv_from(buf) {
                Ok((len, client)) => {
                    let Some(idx) = self.upstream_for(client) else {
                        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let data = buf.get(..len).unwrap_or_default().to_vec();
                    self.hold(Dest::Upstream(idx), data);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                // ICMP errors reported on the socket; nothing was read, keep draining.
                Err(_) => continue,
            }
        }
    }

    fn read_upstream(&mut self, idx: usize, buf: &mut [u8]) {
        loop {
            let Some((sock, client)) = self.upstreams.get(idx) else {
                return;
            };
            let client = *client;
            match sock.recv(buf) {
                Ok(len) => {
                    let data = buf.get(..len).unwrap_or_default().to_vec();
                    self.hold(Dest::Client(client), data);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                // ECONNREFUSED while the target is not listening yet: keep draining.
                Err(_) => continue,
            }
        }
    }

    fn hold(&mut self, dest: Dest, data: Vec<u8>) {
        self.queue.push_back(Held {
            due: Instant::now() + self.shared.delay,
            dest,
            data,
        });
    }

    /// The upstream socket for `client`, opened on first use.
    fn upstream_for(&mut self, client: SocketAddr) -> Option<usize> {
        if let Some(&idx) = self.clients.get(&client) {
            return Some(idx);
        }
        let target = self.shared.target;
        let bind: SocketAddr = if target.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = StdUdpSocket::bind(bind).ok()?;
        sock.connect(target).ok()?;
        sock.set_nonblocking(true).ok()?;
        let mut sock = UdpSocket::from_std(sock);
        let idx = self.upstreams.len();
        self.poll
            .registry()
            .register(&mut sock, Token(FIRST_UPSTREAM + idx), Interest::READABLE)
            .ok()?;
        self.upstreams.push((sock, client));
        self.clients.insert(client, idx);
        Some(idx)
    }

    fn send_due(&mut self) {
        let now = Instant::now();
        while self.queue.front().is_some_and(|h| h.due <= now) {
            let Some(held) = self.queue.pop_front() else {
                return;
            };
            let sent = match held.dest {
                Dest::Upstream(idx) => match self.upstreams.get(idx) {
                    Some((sock, _)) => sock.send(&held.data).is_ok(),
                    None => false,
                },
                Dest::Client(client) => self.listen.send_to(&held.data, client).is_ok(),
            };
            let counter = match (sent, &held.dest) {
                (false, _) => &self.shared.dropped,
                (true, Dest::Upstream(_)) => &self.shared.to_target,
                (true, Dest::Client(_)) => &self.shared.to_clients,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}
