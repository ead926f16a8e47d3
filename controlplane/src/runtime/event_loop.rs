//! The mio loop: the underlay (own UDP socket or the dataplane's shm rings), the shutdown
//! signals, and time, fed into one [`Node`].
//!
//! babeld's `timeval_min` loop with `now` passed explicitly: after every wakeup the loop reads what
//! is readable, runs the node's timers, sends what the node queued, publishes the API snapshot when
//! due, and sleeps until the earliest deadline. Socket interest comes from state (as in rustls'
//! `event_set()`): WRITABLE is asked for only while a datagram waits after a full send buffer.
//! Everything underlay-specific sits behind [`Underlay`].
//!
//! Other threads (the message bus driver, the API) reach the node through [`Commands`]: a
//! bounded channel of [`Command`]s plus a [`mio::Waker`], drained at the top of every iteration.
//! Bus frames the node received go the other way, straight into the [`SharedBus`] (whose own
//! mutex and driver thread take it from there).

use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use hypha_proto::addr::OverlayAddr;
use hypha_proto::time::{Clock, Instant};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use super::node::Node;
use super::peers::PeerError;
use super::signals::Signals;
use super::underlay::{Input, Underlay};
use crate::api::{PeerChange, SharedSnapshot};
use crate::bus::shared::{BusTransport, SharedBus};
use crate::fib::FibSink;

const SOCKET: Token = Token(0);
const SIGNALS: Token = Token(1);
const WAKER: Token = Token(2);

/// Commands queued for the loop at most; more are refused (a bus frame is then lost and
/// retransmitted by the bus, a peer change answered "unavailable").
const COMMAND_QUEUE: usize = 4096;
/// Commands taken per iteration before the underlay gets its turn again.
const COMMAND_BATCH: usize = 1024;

/// What other threads ask of the node.
#[derive(Debug)]
pub enum Command {
    /// Send one message-bus frame to `dst` (sealed by the dataplane under the E2E session).
    BusFrame {
        /// The destination node.
        dst: Ipv6Addr,
        /// The frame.
        frame: Vec<u8>,
    },
    /// Add a configured peer; the outcome goes back on `reply`.
    AddPeer {
        /// Its underlay endpoint.
        endpoint: SocketAddr,
        /// Where the outcome goes.
        reply: SyncSender<Result<(), PeerError>>,
    },
    /// Remove a peer and tear its links down; the outcome goes back on `reply`.
    RemovePeer {
        /// Its underlay endpoint.
        endpoint: SocketAddr,
        /// Where the outcome goes.
        reply: SyncSender<Result<(), PeerError>>,
    },
}

/// The sending side of the loop's command channel; cheap to clone, usable from any thread.
#[derive(Debug, Clone)]
pub struct Commands {
    tx: SyncSender<Command>,
    waker: Arc<Waker>,
    refused: Arc<AtomicU64>,
}

impl Commands {
    /// Queues `cmd` without waking the loop (see [`Commands::wake`]); false if the queue is full
    /// or the loop has gone (counted).
    pub fn push(&self, cmd: Command) -> bool {
        match self.tx.try_send(cmd) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Wakes the loop so it takes the queued commands.
    pub fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            tracing::debug!(error = %e, "cannot wake the event loop");
        }
    }

    /// Queues `cmd` and wakes the loop.
    pub fn send(&self, cmd: Command) -> bool {
        let ok = self.push(cmd);
        self.wake();
        ok
    }

    /// Asks the loop to add or remove a peer and waits up to `timeout` for the outcome.
    pub fn change_peer(&self, change: PeerChange, timeout: Duration) -> Result<(), PeerError> {
        let (reply, rx) = mpsc::sync_channel(1);
        let cmd = match change {
            PeerChange::Add(endpoint) => Command::AddPeer { endpoint, reply },
            PeerChange::Remove(endpoint) => Command::RemovePeer { endpoint, reply },
        };
        if !self.send(cmd) {
            return Err(PeerError::Unavailable);
        }
        rx.recv_timeout(timeout)
            .unwrap_or(Err(PeerError::Unavailable))
    }

    /// Commands refused so far (queue full or loop gone).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// The bus driver's way out: each frame becomes a [`Command::BusFrame`]; the loop is woken once
/// per batch.
#[derive(Debug)]
pub struct LoopTransport {
    commands: Commands,
    queued: bool,
}

impl LoopTransport {
    /// A transport through `commands`.
    pub fn new(commands: Commands) -> Self {
        LoopTransport {
            commands,
            queued: false,
        }
    }
}

impl BusTransport for LoopTransport {
    fn send(&mut self, dst: OverlayAddr, frame: &[u8]) {
        self.queued |= self.commands.push(Command::BusFrame {
            dst: dst.into(),
            frame: frame.to_vec(),
        });
    }

    fn flush(&mut self) {
        if std::mem::take(&mut self.queued) {
            self.commands.wake();
        }
    }
}

/// Datagrams read per wakeup before timers get their turn.
const RX_BATCH: usize = 256;
/// Shortest time between two snapshot publications.
const PUBLISH_MIN: Duration = Duration::from_millis(100);
/// Longest time between two publications (counters move even when nothing else does).
const PUBLISH_MAX: Duration = Duration::from_secs(1);
/// Largest datagram accepted.
const RX_BUF: usize = 65_536;

/// The loop's resources.
pub struct EventLoop<F: FibSink, U: Underlay> {
    /// The node being driven.
    pub node: Node<F>,
    underlay: U,
    signals: Signals,
    clock: Clock,
    snapshot: SharedSnapshot,
    start_unix: u64,
    /// Created with the loop so the waker can be registered before [`EventLoop::run`].
    poll: Option<Poll>,
    commands: Commands,
    command_rx: Receiver<Command>,
    bus: Option<Arc<SharedBus>>,
}

impl<F: FibSink, U: Underlay> EventLoop<F, U> {
    /// Wraps an underlay and the signal fd around `node`. `clock` must be the clock whose `now`
    /// the node was created with.
    pub fn new(
        node: Node<F>,
        underlay: U,
        signals: Signals,
        clock: Clock,
        snapshot: SharedSnapshot,
        start_unix: u64,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, command_rx) = mpsc::sync_channel(COMMAND_QUEUE);
        Ok(EventLoop {
            node,
            underlay,
            signals,
            clock,
            snapshot,
            start_unix,
            poll: Some(poll),
            commands: Commands {
                tx,
                waker,
                refused: Arc::new(AtomicU64::new(0)),
            },
            command_rx,
            bus: None,
        })
    }

    /// The handle other threads use to send the loop [`Command`]s.
    pub fn commands(&self) -> Commands {
        self.commands.clone()
    }

    /// Hands every message-bus frame the node receives to `bus`.
    pub fn with_bus(mut self, bus: Arc<SharedBus>) -> Self {
        self.bus = Some(bus);
        self
    }

    /// Applies queued commands and moves received bus frames to the bus; true if commands are
    /// left for the next iteration.
    fn handle_commands(&mut self, now: Instant) -> bool {
        let mut more = true;
        for _ in 0..COMMAND_BATCH {
            let cmd = match self.command_rx.try_recv() {
                Ok(c) => c,
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => {
                    more = false;
                    break;
                }
            };
            match cmd {
                Command::BusFrame { dst, frame } => {
                    // Without a session the dataplane drops it and reports "no session", which
                    // starts the E2E handshake; the bus retransmits.
                    self.node.send_bus_frame(dst, &frame);
                }
                Command::AddPeer { endpoint, reply } => {
                    // The asker may have given up waiting: nothing to do then.
                    let _ = reply.try_send(self.node.add_peer(now, endpoint));
                }
                Command::RemovePeer { endpoint, reply } => {
                    let _ = reply.try_send(self.node.remove_peer(now, endpoint));
                }
            }
        }
        while let Some(dst) = self.node.poll_session_up() {
            if let (Some(bus), Ok(dst)) = (&self.bus, OverlayAddr::new(dst)) {
                bus.path_up(dst);
            }
        }
        while let Some((src, frame)) = self.node.poll_bus_frame() {
            let Some(bus) = &self.bus else { continue };
            let Ok(src) = OverlayAddr::new(src) else {
                continue;
            };
            // Errors are counted by the bus (malformed or misbehaving frames).
            if let Err(e) = bus.handle_frame(src, &frame) {
                tracing::trace!(%src, error = %e, "bus frame dropped");
            }
        }
        more
    }

    fn publish(&mut self) {
        let mut snap = self.node.snapshot(self.start_unix);
        self.underlay.stats(&mut snap.stats);
        if let Some(rt) = snap.stats.get_mut("runtime") {
            rt.insert("commands_refused".into(), self.commands.refused());
        }
        self.snapshot.store(Arc::new(snap));
    }

    /// Runs until SIGINT or SIGTERM; returns the signal number. A clean stop also stops the
    /// dataplane (a killed control plane leaves it running: hitless restart).
    pub fn run(&mut self) -> io::Result<i32> {
        let r = self.run_inner();
        if r.is_ok() {
            self.underlay.shutdown();
        }
        r
    }

    fn run_inner(&mut self) -> io::Result<i32> {
        // Taken out for the run so `self` can be borrowed mutably next to it.
        let mut poll = self
            .poll
            .take()
            .ok_or_else(|| io::Error::other("the event loop ran already"))?;
        let r = self.run_with(&mut poll);
        self.poll = Some(poll);
        r
    }

    fn run_with(&mut self, poll: &mut Poll) -> io::Result<i32> {
        self.underlay.register(poll.registry(), SOCKET)?;
        let sigfd = self.signals.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&sigfd), SIGNALS, Interest::READABLE)?;
        let mut events = Events::with_capacity(16);
        let mut rx = vec![0u8; RX_BUF];
        let mut tx: Vec<u8> = Vec::with_capacity(2048);
        let mut pending: Option<SocketAddr> = None;
        let mut writable_interest = false;
        let mut more_to_read = true;
        let mut last_publish: Option<Instant> = None;

        self.node.handle_timeout(self.clock.now());
        loop {
            let more_commands = self.handle_commands(self.clock.now());
            while let Some(cmd) = self.node.poll_dataplane() {
                if let Err(e) = self.underlay.apply(cmd) {
                    tracing::debug!(error = %e, "dataplane command failed");
                }
            }
            // Send what the node queued; keep the datagram that would block.
            loop {
                let to = match pending.take() {
                    Some(to) => to,
                    None => match self.node.poll_transmit(&mut tx) {
                        Some(to) => to,
                        None => break,
                    },
                };
                match self.underlay.send_to(to, &tx) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        pending = Some(to);
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => pending = Some(to),
                    Err(e) => {
                        self.node.counters_mut().socket_send_errors += 1;
                        tracing::debug!(%to, error = %e, "send failed");
                    }
                }
            }
            let want_writable = pending.is_some();
            if want_writable != writable_interest {
                self.underlay
                    .set_writable_interest(poll.registry(), SOCKET, want_writable)?;
                writable_interest = want_writable;
            }

            // Publish the API snapshot when something changed (at most every 100 ms) and at
            // least every second.
            let now = self.clock.now();
            let due = match last_publish {
                None => true,
                Some(t) => {
                    (self.node.changed() && now >= t + PUBLISH_MIN) || now >= t + PUBLISH_MAX
                }
            };
            if due {
                self.node.clear_changed();
                self.publish();
                last_publish = Some(now);
            }
            let next_publish = last_publish.map(|t| {
                if self.node.changed() {
                    t + PUBLISH_MIN
                } else {
                    t + PUBLISH_MAX
                }
            });

            // Sleep until the earliest deadline.
            let deadline = [
                self.node.poll_timeout(),
                next_publish,
                self.underlay.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            if !more_to_read && !self.underlay.prepare_sleep()? {
                more_to_read = true;
            }
            let timeout = if more_to_read || more_commands {
                Some(Duration::ZERO)
            } else {
                deadline.map(|d| d.saturating_duration_since(self.clock.now()))
            };
            let polled = poll.poll(&mut events, timeout);
            self.underlay.woke();
            match polled {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                match ev.token() {
                    SIGNALS => {
                        if let Some(signo) = self.signals.read()? {
                            return Ok(signo);
                        }
                    }
                    SOCKET if ev.is_readable() => more_to_read = true,
                    _ => {}
                }
            }

            let now = self.clock.now();
            if more_to_read {
                let mut drained = false;
                for _ in 0..RX_BATCH {
                    match self.underlay.recv(&mut rx) {
                        Ok(Some(Input::Datagram { from, len })) => {
                            let data = rx.get(..len).unwrap_or_default();
                            self.node.handle_datagram(now, from, data);
                        }
                        Ok(Some(Input::Local { len })) => {
                            let data = rx.get(..len).unwrap_or_default();
                            self.node.handle_local_packet(now, data);
                        }
                        Ok(Some(Input::NoSession(dst))) => self.node.handle_no_session(now, dst),
                        Ok(Some(Input::NoRoute(dst))) => self.node.handle_no_route(now, dst),
                        Ok(Some(Input::Consumed)) => {}
                        Ok(None) => {
                            drained = true;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            // ICMP errors (port unreachable from a peer that is down) surface
                            // here on Linux; they are not fatal.
                            self.node.counters_mut().socket_recv_errors += 1;
                            tracing::trace!(error = %e, "recv failed");
                        }
                    }
                }
                // A full batch: come back without sleeping.
                more_to_read = !drained;
            }
            if self.node.poll_timeout().is_some_and(|t| t <= now) {
                self.node.handle_timeout(now);
            }
            if self.underlay.poll_timeout().is_some_and(|t| t <= now) {
                self.underlay
                    .handle_timeout(now, &mut self.node, poll.registry())?;
            }
        }
    }
}
