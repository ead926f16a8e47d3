//! Unit tests of the router through its public API: packets built by hand go in, packets and
//! events that come out are parsed and checked.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use hypha_proto::babel::{
    AckReq, Hello, Ihu, Packet, PacketBuilder, RouteRequest, SeqnoRequest, Tlv, Update,
};

use super::*;

const T0: Instant = Instant::from_secs(1000);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn key(n: u8) -> [u8; 32] {
    [n; 32]
}

fn addr(n: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, n))
}

fn rid(n: u8) -> RouterId {
    RouterId([n; 8])
}

fn pkt(tlvs: &[Tlv]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut b = PacketBuilder::new(&mut buf, 65_000);
    for t in tlvs {
        b.push(t).unwrap();
    }
    b.finish();
    buf
}

fn hello(seqno: u16) -> Tlv {
    Tlv::Hello(Hello {
        flags: 0,
        seqno,
        interval: 100,
        timestamp: None,
    })
}

fn ihu(addr: Option<IpAddr>) -> Tlv {
    Tlv::Ihu(Ihu {
        rxcost: 96,
        interval: 300,
        addr,
        timestamp: None,
    })
}

fn update(
    prefix: Prefix,
    router_id: RouterId,
    seqno: u16,
    metric: u16,
    k: Option<[u8; 32]>,
) -> Tlv {
    Tlv::Update(Update {
        prefix: Some(prefix),
        v4_via_v6: false,
        interval: 400,
        seqno,
        metric,
        router_id: Some(router_id),
        next_hop: None,
        origin_key: k,
    })
}

fn p2p() -> InterfaceConfig {
    InterfaceConfig::point_to_point()
        .with_intervals(Duration::from_secs(1), Duration::from_secs(4))
        .with_rtt(None)
}

fn router(seed: u64, filter: RouteFilter) -> Router {
    Router::new(
        RouterConfig::new([1, 2, 3, 4], seed).with_filter(filter),
        T0,
    )
}

/// Two Hellos and an IHU from `from` on `iface`: its link cost becomes 96.
fn bring_up(r: &mut Router, now: Instant, iface: InterfaceId, from: IpAddr) {
    r.handle_packet(now, iface, from, &pkt(&[hello(1), ihu(None)]))
        .unwrap();
    r.handle_packet(now, iface, from, &pkt(&[hello(2), ihu(None)]))
        .unwrap();
}

/// Everything the router sends at `now`, parsed.
fn drain(r: &mut Router, now: Instant) -> Vec<(Transmit, Vec<Tlv>)> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while let Some(t) = r.poll_transmit(now, &mut buf) {
        let p = Packet::new_checked(&buf[..]).unwrap();
        out.push((t, p.tlvs().map(Result::unwrap).collect()));
    }
    out
}

fn events(r: &mut Router) -> Vec<Event> {
    std::iter::from_fn(|| r.poll_event()).collect()
}

#[test]
fn malformed_input_is_counted_and_the_rest_processed() {
    let mut r = router(1, RouteFilter::Any);
    let i = InterfaceId(0);
    r.add_interface(T0, i, p2p());
    assert_eq!(
        r.handle_packet(T0, InterfaceId(9), addr(1), &pkt(&[hello(1)])),
        Err(Error::UnknownInterface(InterfaceId(9)))
    );
    assert_eq!(
        r.handle_packet(T0, i, addr(1), &[43, 2, 0, 0]),
        Err(Error::InvalidMessage(InvalidMessage::BadMagic(43)))
    );
    // A Hello, a TLV of unknown type, a Hello with an unknown mandatory sub-TLV, then a truncated
    // TLV.
    let mut p = pkt(&[hello(1)]);
    p.extend_from_slice(&[200, 1, 0]);
    p.extend_from_slice(&[4, 9, 0, 0, 0, 2, 0, 100, 130, 1, 0]);
    p.extend_from_slice(&[8, 20, 2]);
    let body = u16::try_from(p.len() - 4).unwrap();
    p[2..4].copy_from_slice(&body.to_be_bytes());
    assert_eq!(
        r.handle_packet(T0, i, addr(1), &p),
        Err(Error::InvalidMessage(InvalidMessage::TlvTruncated {
            kind: 8
        }))
    );
    let c = r.counters();
    assert_eq!(c.packets_received, 2);
    assert_eq!(c.packets_invalid, 1);
    assert_eq!(c.tlvs_unknown, 1);
    assert_eq!(c.tlvs_ignored, 1);
    assert_eq!(c.tlvs_invalid, 1);
    // The good Hello counted.
    let n = r.neighbours().next().unwrap();
    assert_eq!(n.reach, 0x8000);
    assert_eq!(n.key.addr, addr(1));
}

#[test]
fn two_routers_exchange_routes() {
    let (ka, kb) = (key(1), key(2));
    let (pa, pb) = (overlay_subnet(&ka), overlay_subnet(&kb));
    let (aa, ab) = (
        IpAddr::V6(overlay_address(&ka)),
        IpAddr::V6(overlay_address(&kb)),
    );
    let mut a = router(1, RouteFilter::Overlay);
    let mut b = router(2, RouteFilter::Overlay);
    let i = InterfaceId(7);
    a.add_interface(T0, i, p2p());
    b.add_interface(T0, i, p2p());
    a.originate(T0, pa, Some(ka));
    b.originate(T0, pb, Some(kb));
    let mut now = T0;
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    for _ in 0..200 {
        // Deliver each packet to the other router at once.
        let mut buf = Vec::new();
        while let Some(t) = a.poll_transmit(now, &mut buf) {
            assert_eq!(
                t,
                Transmit {
                    iface: i,
                    dst: Destination::Multicast
                }
            );
            b.handle_packet(now, i, aa, &buf).unwrap();
        }
        while b.poll_transmit(now, &mut buf).is_some() {
            a.handle_packet(now, i, ab, &buf).unwrap();
        }
        ea.extend(events(&mut a));
        eb.extend(events(&mut b));
        let next = [a.poll_timeout(), b.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
            .unwrap();
        now = next.max(now + ms(1));
        a.handle_timeout(now);
        b.handle_timeout(now);
        if now > T0 + Duration::from_secs(3) {
            break;
        }
    }
    assert!(ea.contains(&Event::NeighbourUp { iface: i, addr: ab }));
    assert!(eb.contains(&Event::NeighbourUp { iface: i, addr: aa }));
    assert!(ea.contains(&Event::Install {
        prefix: pb,
        iface: i,
        next_hop: ab,
        metric: 96
    }));
    assert!(eb.contains(&Event::Install {
        prefix: pa,
        iface: i,
        next_hop: aa,
        metric: 96
    }));
    let r = a.selected_route(&pb).unwrap();
    assert_eq!(r.origin_key, Some(&kb));
    assert_eq!(r.router_id, b.router_id());
    assert_eq!(r.refmetric, 0);
    assert!(r.feasible && r.selected);
    // Split horizon: neither announced the other's route back over the only link, so B holds
    // just A's route, and A, having announced nothing learnt, has no feasibility distance yet.
    assert_eq!(b.routes().count(), 1);
    assert_eq!(a.sources().count(), 0);
    assert_eq!(a.xroutes().next().unwrap().prefix, pa);
}

#[test]
fn overlay_filter_refuses_prefixes_the_key_does_not_own() {
    let mut r = router(3, RouteFilter::Overlay);
    let i = InterfaceId(0);
    r.add_interface(T0, i, p2p());
    bring_up(&mut r, T0, i, addr(1));
    let good = overlay_subnet(&key(5));
    let stolen = overlay_subnet(&key(6));
    let e = r.handle_packet(
        T0,
        i,
        addr(1),
        &pkt(&[
            update(stolen, rid(5), 1, 0, Some(key(5))),
            update(good, rid(5), 1, 0, Some(key(5))),
        ]),
    );
    assert_eq!(
        e,
        Err(Error::PeerMisbehaved(PeerMisbehaved::KeyDoesNotOwnPrefix {
            prefix: stolen
        }))
    );
    assert_eq!(r.counters().updates_filtered, 1);
    let routes: Vec<_> = r.routes().map(|v| v.prefix).collect();
    assert_eq!(routes, vec![good]);
    assert!(r.selected_route(&good).is_some());
    let outside: Prefix = "2001:db8::/64".parse().unwrap();
    let e = r.handle_packet(T0, i, addr(1), &pkt(&[update(outside, rid(5), 1, 0, None)]));
    assert_eq!(
        e,
        Err(Error::PeerMisbehaved(PeerMisbehaved::ForbiddenPrefix {
            prefix: outside
        }))
    );
}

#[test]
fn own_seqno_bumps_are_rate_limited() {
    let mut r = router(4, RouteFilter::Any);
    let i = InterfaceId(0);
    r.add_interface(T0, i, p2p());
    let p: Prefix = "2001:db8::/64".parse().unwrap();
    r.originate(T0, p, None);
    bring_up(&mut r, T0, i, addr(1));
    drain(&mut r, T0);
    let s0 = r.seqno();
    let me = r.router_id();
    let req = |seqno: SeqNo| {
        pkt(&[Tlv::SeqnoRequest(SeqnoRequest {
            prefix: p,
            seqno: seqno.0,
            hop_count: 5,
            router_id: me,
        })])
    };
    let first = req(s0.plus(1));
    r.handle_packet(T0, i, addr(1), &first).unwrap();
    assert_eq!(r.seqno(), s0.plus(1));
    let sent = drain(&mut r, T0 + ms(50));
    let upd = sent
        .iter()
        .flat_map(|(_, t)| t)
        .find_map(|t| match t {
            Tlv::Update(u) if u.prefix == Some(p) => Some(*u),
            _ => None,
        })
        .expect("an Update answers the request");
    assert_eq!(upd.seqno, s0.plus(1).0);
    assert_eq!(upd.router_id, Some(me));
    // Asked again at once: deferred to one bump interval after the first.
    let second = req(s0.plus(2));
    r.handle_packet(T0 + ms(100), i, addr(1), &second).unwrap();
    assert_eq!(r.seqno(), s0.plus(1));
    assert!(r.poll_timeout().unwrap() <= T0 + Duration::from_secs(1));
    r.handle_timeout(T0 + Duration::from_secs(1));
    assert_eq!(r.seqno(), s0.plus(2));
    assert_eq!(r.counters().seqno_bumps, 2);
    // A request for an old seqno gets an Update but no bump.
    let old = req(s0);
    r.handle_packet(T0 + Duration::from_secs(5), i, addr(1), &old)
        .unwrap();
    assert_eq!(r.seqno(), s0.plus(2));
}

/// §3.8.1.2 and §3.8.2: a seqno request we cannot answer is forwarded along the selected route
/// with one hop less; unanswered, it is retried through the next neighbour with a route; an
/// Update with the seqno satisfies it.
#[test]
fn seqno_requests_are_forwarded_and_retried_elsewhere() {
    let mut r = router(5, RouteFilter::Any);
    let (i1, i2, i3) = (InterfaceId(1), InterfaceId(2), InterfaceId(3));
    for i in [i1, i2, i3] {
        r.add_interface(T0, i, p2p());
        bring_up(&mut r, T0, i, addr(i.0 as u16));
    }
    let p: Prefix = "2001:db8:5::/48".parse().unwrap();
    let origin = rid(9);
    r.handle_packet(T0, i1, addr(1), &pkt(&[update(p, origin, 5, 100, None)]))
        .unwrap();
    r.handle_packet(T0, i2, addr(2), &pkt(&[update(p, origin, 5, 200, None)]))
        .unwrap();
    assert_eq!(r.selected_route(&p).unwrap().neighbour.iface, i1);
    drain(&mut r, T0 + Duration::from_secs(1));
    let now = T0 + Duration::from_secs(2);
    let req = pkt(&[Tlv::SeqnoRequest(SeqnoRequest {
        prefix: p,
        seqno: 6,
        hop_count: 10,
        router_id: origin,
    })]);
    r.handle_packet(now, i3, addr(3), &req).unwrap();
    // Again from the same requester: a duplicate, not forwarded twice.
    r.handle_packet(now, i3, addr(3), &req).unwrap();
    assert_eq!(r.counters().seqno_requests_forwarded, 1);
    assert_eq!(r.counters().seqno_requests_duplicate, 1);
    let fwd = |out: &[(Transmit, Vec<Tlv>)]| -> Vec<(InterfaceId, Destination, u8)> {
        out.iter()
            .flat_map(|(t, tlvs)| {
                tlvs.iter().filter_map(move |x| match x {
                    Tlv::SeqnoRequest(s) if s.prefix == p && s.seqno == 6 => {
                        Some((t.iface, t.dst, s.hop_count))
                    }
                    _ => None,
                })
            })
            .collect()
    };
    let out = drain(&mut r, now + ms(50));
    assert_eq!(fwd(&out), vec![(i1, Destination::Unicast(addr(1)), 9)]);
    // No answer within the request timeout: retried through neighbour 2.
    let later = now + r.config().request_timeout;
    r.handle_timeout(later);
    let out = drain(&mut r, later + ms(50));
    assert_eq!(fwd(&out), vec![(i2, Destination::Unicast(addr(2)), 9)]);
    // Neighbour 2 answers: the request is done, nothing more is sent.
    r.handle_packet(later, i2, addr(2), &pkt(&[update(p, origin, 6, 200, None)]))
        .unwrap();
    let end = later + r.config().request_timeout * 3;
    r.handle_timeout(end);
    assert!(fwd(&drain(&mut r, end + ms(50))).is_empty());
}

/// §3.8.2.1: when only unfeasible routes are left, ask for a newer seqno.
#[test]
fn starvation_sends_a_seqno_request() {
    let mut r = router(6, RouteFilter::Any);
    let (i1, i2) = (InterfaceId(1), InterfaceId(2));
    for i in [i1, i2] {
        r.add_interface(T0, i, p2p());
        bring_up(&mut r, T0, i, addr(i.0 as u16));
    }
    let p: Prefix = "2001:db8:6::/48".parse().unwrap();
    let origin = rid(8);
    r.handle_packet(T0, i1, addr(1), &pkt(&[update(p, origin, 5, 100, None)]))
        .unwrap();
    // Announce it (on interface 2): the feasibility distance becomes (5, 196).
    drain(&mut r, T0 + ms(100));
    assert_eq!(r.sources().next().unwrap().metric, 196);
    // Neighbour 2 offers the same source with a bigger metric: unfeasible.
    r.handle_packet(T0, i2, addr(2), &pkt(&[update(p, origin, 5, 300, None)]))
        .unwrap();
    assert!(!r.routes().any(|v| v.neighbour.iface == i2));
    // Neighbour 1 retracts: no feasible route is left.
    r.handle_packet(
        T0,
        i1,
        addr(1),
        &pkt(&[update(p, origin, 5, INFINITY, None)]),
    )
    .unwrap();
    assert!(r.selected_route(&p).is_none());
    // The unfeasible one came before neighbour 1's retraction and was not kept; it comes again.
    r.handle_packet(T0, i2, addr(2), &pkt(&[update(p, origin, 5, 300, None)]))
        .unwrap();
    let out = drain(&mut r, T0 + ms(100));
    let asked = out.iter().any(|(t, tlvs)| {
        t.dst == Destination::Unicast(addr(2))
            && tlvs
                .iter()
                .any(|x| matches!(x, Tlv::SeqnoRequest(s) if s.seqno == 6 && s.router_id == origin))
    });
    assert!(asked, "{out:?}");
    let retracted = out.iter().any(|(_, tlvs)| {
        tlvs.iter()
            .any(|x| matches!(x, Tlv::Update(u) if u.prefix == Some(p) && u.metric == INFINITY))
    });
    assert!(retracted, "the lost route is retracted: {out:?}");
    // The answer (seqno 6) makes the route feasible and selected.
    r.handle_packet(T0, i2, addr(2), &pkt(&[update(p, origin, 6, 300, None)]))
        .unwrap();
    assert_eq!(r.selected_route(&p).unwrap().neighbour.iface, i2);
}

#[test]
fn acks_requests_and_wildcard_retractions() {
    let mut r = router(7, RouteFilter::Any);
    let i = InterfaceId(0);
    r.add_interface(T0, i, p2p());
    bring_up(&mut r, T0, i, addr(1));
    drain(&mut r, T0 + ms(100));
    let now = T0 + Duration::from_secs(2);
    let p: Prefix = "10.1.0.0/16".parse().unwrap();
    let q: Prefix = "2001:db8:7::/48".parse().unwrap();
    let mine: Prefix = "2001:db8:8::/48".parse().unwrap();
    r.originate(now, mine, None);
    drain(&mut r, now + ms(100));
    r.handle_packet(
        now,
        i,
        addr(1),
        &pkt(&[
            Tlv::AckReq(AckReq {
                opaque: 0xbeef,
                interval: 100,
            }),
            Tlv::RouteRequest(RouteRequest { prefix: Some(q) }),
        ]),
    )
    .unwrap();
    let out = drain(&mut r, now + ms(100));
    assert!(out.iter().any(
        |(t, tlvs)| t.dst == Destination::Unicast(addr(1)) && tlvs.contains(&Tlv::Ack(0xbeef))
    ));
    // A specific request for an unknown prefix is answered with a retraction.
    assert!(out.iter().any(|(_, tlvs)| tlvs
        .iter()
        .any(|x| matches!(x, Tlv::Update(u) if u.prefix == Some(q) && u.metric == INFINITY))));
    // A v4-via-v6 route (no IPv4 next hop on an overlay link) and a v6 route from the neighbour.
    let mut v4 = match update(p, rid(3), 1, 10, None) {
        Tlv::Update(u) => u,
        _ => unreachable!(),
    };
    v4.v4_via_v6 = true;
    r.handle_packet(
        now,
        i,
        addr(1),
        &pkt(&[Tlv::Update(v4), update(q, rid(3), 1, 10, None)]),
    )
    .unwrap();
    assert_eq!(r.selected_route(&p).unwrap().next_hop, addr(1));
    assert!(r.selected_route(&q).is_some());
    let ev = events(&mut r);
    assert!(ev.contains(&Event::Install {
        prefix: p,
        iface: i,
        next_hop: addr(1),
        metric: 106
    }));
    // A plain IPv4 (AE 1) route from an IPv6 neighbour without a Next Hop TLV has no next hop.
    let e = r.handle_packet(
        now,
        i,
        addr(1),
        &pkt(&[update("10.2.0.0/16".parse().unwrap(), rid(3), 1, 10, None)]),
    );
    assert!(matches!(
        e,
        Err(Error::PeerMisbehaved(PeerMisbehaved::NoNextHop { .. }))
    ));
    // Updates for our own prefix are ignored.
    r.handle_packet(now, i, addr(1), &pkt(&[update(mine, rid(3), 1, 10, None)]))
        .unwrap();
    assert_eq!(r.counters().updates_for_own_prefix, 1);
    // Wildcard retraction: both routes go.
    let wild = Tlv::Update(Update {
        prefix: None,
        v4_via_v6: false,
        interval: 400,
        seqno: 0,
        metric: INFINITY,
        router_id: None,
        next_hop: None,
        origin_key: None,
    });
    r.handle_packet(now, i, addr(1), &pkt(&[wild])).unwrap();
    assert!(r.selected_route(&p).is_none());
    assert!(r.selected_route(&q).is_none());
    let ev = events(&mut r);
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::Uninstall { prefix, .. } if *prefix == q)));
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::Uninstall { prefix, .. } if *prefix == p)));
    // Events are level-triggered: nothing more to report.
    assert_eq!(r.poll_event(), None);
}

#[test]
fn lab_mode_ipv4_routes_carry_a_next_hop_and_ihus_are_addressed() {
    let mut r = router(8, RouteFilter::Any);
    let i = InterfaceId(0);
    let me: IpAddr = "192.0.2.1".parse().unwrap();
    let cfg = InterfaceConfig::broadcast(vec![addr(100), me])
        .with_intervals(Duration::from_secs(1), Duration::from_secs(4))
        .with_rtt(None);
    r.add_interface(T0, i, cfg);
    let p: Prefix = "198.51.100.0/24".parse().unwrap();
    r.originate(T0, p, None);
    // An IHU for another router on the LAN does not count.
    r.handle_packet(T0, i, addr(1), &pkt(&[hello(1), ihu(Some(addr(55)))]))
        .unwrap();
    assert_eq!(r.counters().ihus_not_for_us, 1);
    r.handle_packet(T0, i, addr(1), &pkt(&[hello(2), ihu(Some(addr(100)))]))
        .unwrap();
    assert_eq!(r.neighbours().next().unwrap().cost, 96);
    let out = drain(&mut r, T0 + ms(100));
    let tlvs: Vec<Tlv> = out.iter().flat_map(|(_, t)| t.clone()).collect();
    let u = tlvs
        .iter()
        .find_map(|t| match t {
            Tlv::Update(u) if u.prefix == Some(p) => Some(*u),
            _ => None,
        })
        .unwrap();
    assert_eq!(u.next_hop, Some(me));
    assert!(!u.v4_via_v6);
    assert_eq!(u.metric, 0);
    // Our IHUs name the neighbour (AE 3 for a link-local address).
    assert!(tlvs
        .iter()
        .any(|t| matches!(t, Tlv::Ihu(h) if h.addr == Some(addr(1)) && h.rxcost == 96)));
    assert!(out.iter().all(|(t, _)| t.dst == Destination::Multicast));
}

#[test]
fn tables_are_bounded() {
    let mut cfg = RouterConfig::new([0; 4], 9).with_filter(RouteFilter::Any);
    cfg.max_neighbours = 2;
    cfg.max_routes = 1;
    let mut r = Router::new(cfg, T0);
    let i = InterfaceId(0);
    r.add_interface(T0, i, InterfaceConfig::broadcast(Vec::new()));
    bring_up(&mut r, T0, i, addr(1));
    bring_up(&mut r, T0, i, addr(2));
    assert_eq!(
        r.handle_packet(T0, i, addr(3), &pkt(&[hello(1)])),
        Err(Error::TooManyNeighbours)
    );
    assert_eq!(r.counters().neighbours_refused, 1);
    let a: Prefix = "2001:db8:a::/48".parse().unwrap();
    let b: Prefix = "2001:db8:b::/48".parse().unwrap();
    r.handle_packet(
        T0,
        i,
        addr(1),
        &pkt(&[update(a, rid(1), 1, 0, None), update(b, rid(1), 1, 0, None)]),
    )
    .unwrap();
    assert_eq!(r.routes().count(), 1);
    assert_eq!(r.counters().routes_refused, 1);
}

#[test]
fn neighbour_loss_expires_routes_and_reports_down() {
    let mut r = router(10, RouteFilter::Any);
    let i = InterfaceId(0);
    r.add_interface(T0, i, p2p());
    bring_up(&mut r, T0, i, addr(1));
    let p: Prefix = "2001:db8:c::/48".parse().unwrap();
    r.handle_packet(T0, i, addr(1), &pkt(&[update(p, rid(1), 1, 0, None)]))
        .unwrap();
    let ev = events(&mut r);
    assert!(ev.contains(&Event::NeighbourUp {
        iface: i,
        addr: addr(1)
    }));
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::Install { prefix, .. } if *prefix == p)));
    // Silence: Hellos are missed, the link cost goes infinite, the route is lost.
    let mut now = T0;
    while now < T0 + Duration::from_secs(5) {
        now = r.poll_timeout().unwrap().max(now + ms(1));
        r.handle_timeout(now);
        drain(&mut r, now);
    }
    let ev = events(&mut r);
    assert!(ev.contains(&Event::NeighbourDown {
        iface: i,
        addr: addr(1)
    }));
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::Uninstall { prefix, .. } if *prefix == p)));
    // Much later the neighbour and its routes are gone altogether.
    while now < T0 + Duration::from_secs(60) {
        now = r.poll_timeout().unwrap().max(now + ms(1));
        r.handle_timeout(now);
        drain(&mut r, now);
    }
    assert_eq!(r.neighbours().count(), 0);
    assert_eq!(r.routes().count(), 0);
    r.remove_interface(now, i);
    assert!(drain(&mut r, now + Duration::from_secs(10)).is_empty());
}

#[test]
fn rtt_from_timestamps_raises_the_cost() {
    let mut r = router(11, RouteFilter::Any);
    let i = InterfaceId(0);
    r.add_interface(T0, i, p2p().with_rtt(Some(RttConfig::default())));
    // Our Hello goes out at T0 with our timestamp.
    let out = drain(&mut r, T0);
    let t1 = out
        .iter()
        .flat_map(|(_, t)| t)
        .find_map(|t| match t {
            Tlv::Hello(h) => h.timestamp,
            _ => None,
        })
        .unwrap();
    assert_eq!(t1, T0.as_micros() as u32);
    // The neighbour got it 30 ms later (its clock: 5_000_000), answered 10 ms after that (its
    // clock 5_010_000); we receive at T0 + 70 ms: RTT = 70 − 10 = 60 ms.
    let ts_hello = |seqno, ts| {
        Tlv::Hello(Hello {
            flags: 0,
            seqno,
            interval: 100,
            timestamp: Some(ts),
        })
    };
    let ihu_ts = Tlv::Ihu(Ihu {
        rxcost: 96,
        interval: 300,
        addr: None,
        timestamp: Some((t1, 5_000_000)),
    });
    r.handle_packet(T0 + ms(60), i, addr(1), &pkt(&[ts_hello(1, 4_990_000)]))
        .unwrap();
    r.handle_packet(
        T0 + ms(70),
        i,
        addr(1),
        &pkt(&[ts_hello(2, 5_010_000), ihu_ts]),
    )
    .unwrap();
    let n = r.neighbours().next().unwrap();
    // First sample counted double (babeld): 120 ms, which is the full penalty.
    assert_eq!(n.rtt, Some(ms(120)));
    assert_eq!(n.cost, 96 + 150);
}

#[test]
fn stray_neighbours_are_swept_and_unknown_requests_bounded() {
    let mut r = router(12, RouteFilter::Any);
    let i = InterfaceId(0);
    r.add_interface(T0, i, p2p());
    drain(&mut r, T0);
    // Many requests for prefixes we know nothing about, without a Hello.
    let reqs: Vec<Tlv> = (0..200u16)
        .map(|n| {
            Tlv::RouteRequest(RouteRequest {
                prefix: Some(
                    Prefix::new(IpAddr::V6(Ipv6Addr::new(0x2001, n, 0, 0, 0, 0, 0, 0)), 32)
                        .unwrap(),
                ),
            })
        })
        .collect();
    r.handle_packet(T0, i, addr(9), &pkt(&reqs)).unwrap();
    assert_eq!(r.counters().output_dropped, 200 - 64);
    let answered: usize = drain(&mut r, T0 + ms(100))
        .iter()
        .map(|(_, t)| t.iter().filter(|x| matches!(x, Tlv::Update(_))).count())
        .sum();
    assert_eq!(answered, 64);
    assert_eq!(r.neighbours().count(), 1);
    r.handle_timeout(T0 + Duration::from_secs(2));
    assert_eq!(r.neighbours().count(), 0);
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// Arbitrary bodies (behind a valid header) from two neighbours, interleaved with timers,
        /// never make the router panic, and it keeps producing well-formed packets.
        #[test]
        fn arbitrary_packets_never_panic(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 1..20),
            filter_any in any::<bool>(),
        ) {
            let filter = if filter_any { RouteFilter::Any } else { RouteFilter::Overlay };
            let mut r = router(13, filter);
            let (i, j) = (InterfaceId(0), InterfaceId(1));
            r.add_interface(T0, i, p2p());
            r.add_interface(T0, j, InterfaceConfig::broadcast(vec![addr(100)]));
            bring_up(&mut r, T0, i, addr(1));
            let mut now = T0;
            for (n, body) in bodies.iter().enumerate() {
                let mut p = vec![42, 2];
                p.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
                p.extend_from_slice(body);
                let iface = if n % 2 == 0 { i } else { j };
                let _ = r.handle_packet(now, iface, addr(1 + (n % 3) as u16), &p);
                now += ms(300);
                r.handle_timeout(now);
                for (_, tlvs) in drain(&mut r, now) {
                    prop_assert!(!tlvs.is_empty());
                }
                while r.poll_event().is_some() {}
            }
        }
    }

    fn any_tlv() -> impl Strategy<Value = Tlv> {
        let prefix = (0u16..4).prop_map(|n| {
            Prefix::new(
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, n, 0, 0, 0, 0, 0)),
                48,
            )
            .unwrap()
        });
        let metric = prop_oneof![Just(0u16), Just(50), Just(300), Just(INFINITY)];
        prop_oneof![
            (0u16..6).prop_map(hello),
            Just(ihu(None)),
            (prefix.clone(), 1u8..4, 0u16..6, metric).prop_map(|(p, r, s, m)| update(
                p,
                rid(r),
                s,
                m,
                None
            )),
            (prefix.clone(), 1u8..4, 0u16..6, 1u8..5).prop_map(|(p, r, s, h)| {
                Tlv::SeqnoRequest(SeqnoRequest {
                    prefix: p,
                    seqno: s,
                    hop_count: h,
                    router_id: rid(r),
                })
            }),
            prefix.prop_map(|p| Tlv::RouteRequest(RouteRequest { prefix: Some(p) })),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(150))]
        /// Random but well-formed Babel traffic from three neighbours on two interfaces, with
        /// timers in between: after every step at most one route per prefix is selected, it is
        /// feasible with a finite metric, and the FIB built from the events matches the selection.
        #[test]
        fn selection_invariants_hold(
            steps in proptest::collection::vec((0u16..3, proptest::collection::vec(any_tlv(), 1..6), 0u64..1500), 1..40),
        ) {
            let mut r = router(14, RouteFilter::Any);
            let mine: Prefix = "2001:db8:3::/48".parse().unwrap();
            for i in 0..2 {
                r.add_interface(T0, InterfaceId(i), p2p());
            }
            r.originate(T0, mine, None);
            let mut fib = std::collections::BTreeMap::new();
            let mut now = T0;
            for (who, tlvs, wait) in steps {
                let iface = InterfaceId(u32::from(who.min(1)));
                let _ = r.handle_packet(now, iface, addr(who + 1), &pkt(&tlvs));
                now += ms(wait);
                r.handle_timeout(now);
                drain(&mut r, now);
                while let Some(e) = r.poll_event() {
                    match e {
                        Event::Install { prefix, next_hop, .. } => {
                            fib.insert(prefix, next_hop);
                        }
                        Event::Uninstall { prefix, .. } => {
                            prop_assert!(fib.remove(&prefix).is_some());
                        }
                        _ => {}
                    }
                }
                let mut selected = std::collections::BTreeMap::new();
                for v in r.routes() {
                    if v.selected {
                        prop_assert!(selected.insert(v.prefix, v.next_hop).is_none());
                        prop_assert!(v.feasible && v.metric < INFINITY, "{v:?}");
                    }
                }
                prop_assert!(!selected.contains_key(&mine));
                prop_assert_eq!(&fib, &selected);
            }
        }
    }
}

/// The per-entry sizes docs/babel.md and the module docs quote.
#[test]
fn memory_per_entry_is_as_documented() {
    use std::mem::size_of;
    let route = size_of::<route::Route>();
    let neighbour = size_of::<neighbour::Neighbour>() + size_of::<NeighbourKey>();
    let source = size_of::<source::Source>() + size_of::<(Prefix, RouterId)>();
    println!("route {route} B, neighbour {neighbour} B, source {source} B");
    assert!(route <= 128, "route {route}");
    assert!(neighbour <= 192, "neighbour {neighbour}");
    assert!(source <= 64, "source {source}");
}

#[test]
fn routes_about_to_expire_are_requested_and_route_requests_can_be_sent() {
    let mut r = router(15, RouteFilter::Any);
    let i = InterfaceId(0);
    r.add_interface(T0, i, p2p());
    bring_up(&mut r, T0, i, addr(1));
    let p: Prefix = "2001:db8:f::/48".parse().unwrap();
    // Interval 4 s: expires after 14 s; asked for 4 s before that.
    r.handle_packet(T0, i, addr(1), &pkt(&[update(p, rid(1), 1, 0, None)]))
        .unwrap();
    let asked = |out: &[(Transmit, Vec<Tlv>)]| {
        out.iter().any(|(t, tlvs)| {
            t.dst == Destination::Unicast(addr(1))
                && tlvs.contains(&Tlv::RouteRequest(RouteRequest { prefix: Some(p) }))
        })
    };
    // Keep the neighbour alive meanwhile.
    let mut now = T0;
    let mut seq = 3;
    let mut when = None;
    while now < T0 + Duration::from_secs(12) {
        now += ms(500);
        seq += 1;
        if seq % 2 == 0 {
            r.handle_packet(now, i, addr(1), &pkt(&[hello(seq / 2 + 2), ihu(None)]))
                .unwrap();
        }
        r.handle_timeout(now);
        if asked(&drain(&mut r, now + ms(10))) && when.is_none() {
            when = Some(now - T0);
        }
    }
    let when = when.expect("a Route Request before expiry");
    assert!(
        when >= Duration::from_secs(10) && when <= Duration::from_secs(11),
        "{when:?}"
    );
    assert!(r.selected_route(&p).is_some());
    // The command: a multicast request on every interface.
    let q: Prefix = "2001:db8:e::/48".parse().unwrap();
    r.request_route(now, q);
    let out = drain(&mut r, now + ms(50));
    assert!(out.iter().any(|(t, tlvs)| t.dst == Destination::Multicast
        && tlvs.contains(&Tlv::RouteRequest(RouteRequest { prefix: Some(q) }))));
}
