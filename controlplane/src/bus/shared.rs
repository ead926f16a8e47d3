//! The bus shared between the thread that drives it and the API threads that push, poll and wait.
//!
//! Why a mutex here although cores own their state: the bus is not on the packet hot path (its
//! frames are punted up by the dataplane), and API requests must block until a message or a reply
//! arrives. So [`SharedBus`] keeps the [`Bus`] behind one mutex with two condition variables: one
//! wakes the driver (new work: a push, a frame, shutdown), the other wakes API waiters (something
//! arrived or finished). Waiters sleep on the condition variable with a timeout — no polling.
//!
//! The driver ([`SharedBus::spawn_driver`]) runs the core's loop: fire timers, drain
//! `poll_transmit` into the [`BusTransport`] (frames to our own address loop straight back, so a
//! node can message itself), drain events, sleep until `poll_timeout`.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hypha_proto::addr::OverlayAddr;
use hypha_proto::time::{Clock, Instant};

use super::{
    Bus, BusConfig, BusError, Counters, Event, InboundMessage, MessageId, MessageStatus, PushError,
};

/// Where the driver sends bus frames for other nodes (the runtime wraps each in an E2E TRANSPORT
/// packet of inner type 0x01).
pub trait BusTransport: Send + 'static {
    /// Sends one bus frame to `dst`. A frame that cannot go (no route, no session) is simply lost;
    /// the bus retransmits.
    fn send(&mut self, dst: OverlayAddr, frame: &[u8]);

    /// Called after a batch of [`BusTransport::send`]s (a transport may wake its consumer once
    /// per batch rather than per frame).
    fn flush(&mut self) {}
}

/// A transport for a node without a dataplane: frames for other nodes are dropped (counted).
#[derive(Debug, Default)]
pub struct NoTransport {
    /// Frames dropped.
    pub dropped: u64,
}

impl BusTransport for NoTransport {
    fn send(&mut self, _dst: OverlayAddr, _frame: &[u8]) {
        self.dropped += 1;
    }
}

struct Inner {
    bus: Bus,
    /// Set by inputs so the driver doesn't sleep past new work.
    work: bool,
    shutdown: bool,
}

/// The bus with its clock and wake-ups; see the module documentation.
pub struct SharedBus {
    inner: Mutex<Inner>,
    driver_cv: Condvar,
    waiters_cv: Condvar,
    clock: Clock,
    local: OverlayAddr,
    start_unix: Duration,
    start: Instant,
}

impl std::fmt::Debug for SharedBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBus")
            .field("local", &self.local)
            .finish()
    }
}

/// The driver thread; dropping it stops the thread.
#[derive(Debug)]
pub struct BusDriver {
    shared: Arc<SharedBus>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for BusDriver {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.driver_cv.notify_all();
        self.shared.waiters_cv.notify_all();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!("bus driver thread panicked");
            }
        }
    }
}

impl SharedBus {
    /// A shared bus for the node at `local`.
    pub fn new(cfg: BusConfig, local: OverlayAddr) -> Arc<SharedBus> {
        let clock = Clock::new();
        let start = clock.now();
        let start_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Arc::new(SharedBus {
            inner: Mutex::new(Inner {
                bus: Bus::new(cfg, start),
                work: false,
                shutdown: false,
            }),
            driver_cv: Condvar::new(),
            waiters_cv: Condvar::new(),
            clock,
            local,
            start_unix,
            start,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the bus as it was between two calls; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node's own overlay address.
    pub fn local(&self) -> OverlayAddr {
        self.local
    }

    /// The monotonic now.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// `t` as Unix seconds.
    pub fn unix_secs(&self, t: Instant) -> u64 {
        (self.start_unix + t.saturating_duration_since(self.start)).as_secs()
    }

    /// Starts the thread that drives the bus through `transport`.
    pub fn spawn_driver(
        self: &Arc<Self>,
        transport: Box<dyn BusTransport>,
    ) -> std::io::Result<BusDriver> {
        let shared = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("hypha-bus".into())
            .spawn(move || shared.drive(transport))?;
        Ok(BusDriver {
            shared: Arc::clone(self),
            thread: Some(thread),
        })
    }

    fn drive(&self, mut transport: Box<dyn BusTransport>) {
        let mut buf = Vec::with_capacity(2048);
        let mut out: Vec<(OverlayAddr, Vec<u8>)> = Vec::new();
        let mut guard = self.lock();
        loop {
            if guard.shutdown {
                return;
            }
            guard.work = false;
            let now = self.clock.now();
            if guard.bus.poll_timeout().is_some_and(|t| t <= now) {
                guard.bus.handle_timeout(now);
            }
            let mut loopback = false;
            while let Some(dst) = guard.bus.poll_transmit(now, &mut buf) {
                if dst == self.local {
                    // Our own address: straight back in, as if it came over the network.
                    let _ = guard.bus.handle_frame(now, dst, &buf);
                    loopback = true;
                } else {
                    out.push((dst, buf.clone()));
                }
            }
            let mut notify = false;
            while let Some(e) = guard.bus.poll_event() {
                tracing::debug!(?e, "bus event");
                notify |= matches!(
                    e,
                    Event::Received { .. } | Event::Delivered { .. } | Event::Aborted { .. }
                );
            }
            if notify {
                self.waiters_cv.notify_all();
            }
            if loopback {
                continue;
            }
            if !out.is_empty() {
                drop(guard);
                for (dst, frame) in out.drain(..) {
                    transport.send(dst, &frame);
                }
                transport.flush();
                guard = self.lock();
                continue;
            }
            if guard.work || guard.shutdown {
                continue;
            }
            let wait = guard
                .bus
                .poll_timeout()
                .map(|t| t.saturating_duration_since(self.clock.now()))
                .unwrap_or(Duration::from_secs(3600));
            guard = match self.driver_cv.wait_timeout(guard, wait) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    fn wake_driver(&self, mut guard: MutexGuard<'_, Inner>) {
        guard.work = true;
        drop(guard);
        self.driver_cv.notify_one();
    }

    /// Queues a message (see [`Bus::push`]).
    pub fn push(
        &self,
        dst: OverlayAddr,
        topic: &[u8],
        payload: Vec<u8>,
        deadline: Option<Duration>,
        reply_to: Option<MessageId>,
    ) -> Result<MessageId, PushError> {
        let mut g = self.lock();
        let r = g
            .bus
            .push(self.clock.now(), dst, topic, payload, deadline, reply_to);
        self.wake_driver(g);
        r
    }

    /// Hands the bus a frame that arrived from `src` (called by the runtime).
    pub fn handle_frame(&self, src: OverlayAddr, frame: &[u8]) -> Result<(), BusError> {
        let mut g = self.lock();
        let r = g.bus.handle_frame(self.clock.now(), src, frame);
        self.wake_driver(g);
        r
    }

    /// Tells the bus that frames to `dst` can go now (see [`Bus::handle_path_up`]).
    pub fn path_up(&self, dst: OverlayAddr) {
        let mut g = self.lock();
        g.bus.handle_path_up(self.clock.now(), dst);
        self.wake_driver(g);
    }

    /// Where a message stands.
    pub fn status(&self, id: MessageId) -> Option<MessageStatus> {
        self.lock().bus.status(id)
    }

    /// The source of inbound message `id`, if we received it.
    pub fn knows_inbound(&self, id: MessageId) -> Option<OverlayAddr> {
        self.lock().bus.knows_inbound(id)
    }

    /// Counters.
    pub fn counters(&self) -> Counters {
        self.lock().bus.counters().clone()
    }

    /// The bus configuration.
    pub fn config(&self) -> BusConfig {
        self.lock().bus.config().clone()
    }

    /// Waits up to `timeout` for an inbox message with `topic` (any when `None`); takes it, or
    /// copies it with `peek`. Sleeps on a condition variable between arrivals.
    pub fn receive(
        &self,
        topic: Option<&[u8]>,
        peek: bool,
        timeout: Duration,
    ) -> Option<InboundMessage> {
        self.wait_for(timeout, |bus, now| bus.pop_inbound(now, topic, peek))
    }

    /// Waits up to `timeout` for the reply to our message `id`.
    pub fn wait_reply(&self, id: MessageId, timeout: Duration) -> Option<InboundMessage> {
        self.wait_for(timeout, |bus, now| bus.take_reply(now, id))
    }

    fn wait_for(
        &self,
        timeout: Duration,
        mut take: impl FnMut(&mut Bus, Instant) -> Option<InboundMessage>,
    ) -> Option<InboundMessage> {
        let end = std::time::Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            let now = self.clock.now();
            if let Some(m) = take(&mut g.bus, now) {
                // Reading freed inbound space: senders waiting on it may proceed.
                self.wake_driver(g);
                return Some(m);
            }
            if g.shutdown {
                return None;
            }
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            g = match self.waiters_cv.wait_timeout(g, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_message_and_reply_through_the_driver() {
        let me = OverlayAddr::new("400::1".parse().expect("literal")).expect("overlay");
        let bus = SharedBus::new(BusConfig::default(), me);
        let _driver = bus
            .spawn_driver(Box::new(NoTransport::default()))
            .expect("thread");
        let id = bus.push(me, b"t", vec![7; 5000], None, None).expect("fits");
        let m = bus
            .receive(Some(b"t"), false, Duration::from_secs(5))
            .expect("arrived");
        assert_eq!((m.id, m.src, m.payload.len()), (id, me, 5000));
        let rid = bus
            .push(me, b"t", b"re".to_vec(), None, Some(id))
            .expect("fits");
        let r = bus.wait_reply(id, Duration::from_secs(5)).expect("reply");
        assert_eq!(r.id, rid);
        let t0 = std::time::Instant::now();
        assert!(bus
            .receive(None, false, Duration::from_millis(300))
            .is_none());
        assert!(t0.elapsed() >= Duration::from_millis(300));
        assert_eq!(
            bus.status(id).map(|s| s.state),
            Some(super::super::MessageState::Delivered)
        );
    }
}
