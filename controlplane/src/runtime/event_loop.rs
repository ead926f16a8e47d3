//! The mio loop: the underlay (own UDP socket or the dataplane's shm rings), the shutdown
//! signals, and time, fed into one [`Node`].
//!
//! babeld's `timeval_min` loop with `now` passed explicitly: after every wakeup the loop reads what
//! is readable, runs the node's timers, sends what the node queued, publishes the API snapshot when
//! due, and sleeps until the earliest deadline. Socket interest comes from state (as in rustls'
//! `event_set()`): WRITABLE is asked for only while a datagram waits after a full send buffer.
//! Everything underlay-specific sits behind [`Underlay`].

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use hypha_proto::time::{Clock, Instant};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::node::Node;
use super::signals::Signals;
use super::underlay::{Input, Underlay};
use crate::api::SharedSnapshot;
use crate::fib::FibSink;

const SOCKET: Token = Token(0);
const SIGNALS: Token = Token(1);

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
    ) -> Self {
        EventLoop {
            node,
            underlay,
            signals,
            clock,
            snapshot,
            start_unix,
        }
    }

    fn publish(&mut self) {
        let mut snap = self.node.snapshot(self.start_unix);
        self.underlay.stats(&mut snap.stats);
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
        let mut poll = Poll::new()?;
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
            let timeout = if more_to_read {
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
