/* SPDX-License-Identifier: Apache-2.0 OR GPL-2.0 */
/*
 * Hypha XDP fast path: the map key/value types, shared with user space.
 *
 * ebpf/src/maps.rs mirrors every struct here with #[repr(C)]; both sides pin
 * sizes and field offsets to the same literal numbers (_Static_assert here,
 * const asserts and a test there), so a change on one side fails the build
 * of the other. No implicit padding anywhere: every struct is made of u8/u16
 * arrays and fields in an order that needs none.
 */
#ifndef HYPHA_XDP_MAPS_H
#define HYPHA_XDP_MAPS_H

#include <linux/types.h>
#include <stddef.h>

/* Address families in keys and values (not AF_*: those are libc's). */
#define HYPHA_FAMILY_V4 4
#define HYPHA_FAMILY_V6 6

/* Underlay frame types (first byte of every datagram, WIRE.md). */
#define HYPHA_FRAME_DATA 0x01
#define HYPHA_FRAME_LINK_INIT 0x02
#define HYPHA_FRAME_LINK_RESP 0x03
#define HYPHA_FRAME_LINK_FINISH 0x04
#define HYPHA_DATA_HEADER_LEN 48
#define HYPHA_DATA_HOP_LIMIT_OFF 1
#define HYPHA_DATA_DST_OFF 32

/* Map sizes. */
#define HYPHA_MAX_PEERS 4096
#define HYPHA_MAX_TRANSIT 65536

/*
 * allowed_peers key: a neighbour's underlay address and UDP port.
 * IPv4 addresses sit in addr[0..4], the rest zero.
 */
struct peer_key {
	__u8 addr[16];
	__u16 port;   /* host byte order */
	__u16 family; /* HYPHA_FAMILY_V4 or _V6 */
};
_Static_assert(sizeof(struct peer_key) == 20, "peer_key size");
_Static_assert(offsetof(struct peer_key, addr) == 0, "peer_key.addr");
_Static_assert(offsetof(struct peer_key, port) == 16, "peer_key.port");
_Static_assert(offsetof(struct peer_key, family) == 18, "peer_key.family");

/* allowed_peers value: reserved flags (0 today). */
struct peer_value {
	__u32 flags;
};
_Static_assert(sizeof(struct peer_value) == 4, "peer_value size");

/* transit key: the upper 64 bits of a destination overlay address, as on the wire. */
struct transit_key {
	__u8 prefix[8];
};
_Static_assert(sizeof(struct transit_key) == 8, "transit_key size");

/*
 * transit value: where a /64 goes next. The outer packet is rewritten to
 * src:port (our underlay address towards that neighbour, our port) ->
 * addr:port of the neighbour. IPv4 addresses in [0..4].
 */
struct transit_value {
	__u8 addr[16];     /* next hop's underlay address */
	__u8 src[16];      /* our underlay source address towards it */
	__u16 port;        /* next hop's UDP port, host byte order */
	__u16 family;      /* HYPHA_FAMILY_V4 or _V6 (also of src) */
};
_Static_assert(sizeof(struct transit_value) == 36, "transit_value size");
_Static_assert(offsetof(struct transit_value, addr) == 0, "transit_value.addr");
_Static_assert(offsetof(struct transit_value, src) == 16, "transit_value.src");
_Static_assert(offsetof(struct transit_value, port) == 32, "transit_value.port");
_Static_assert(offsetof(struct transit_value, family) == 34, "transit_value.family");

/*
 * Counters: one per-CPU array entry (key 0) holding this struct, so
 * `bpftool map dump` prints every counter by name. Packets are counted once,
 * under the action and reason that decided them.
 */
struct xdp_counters {
	__u64 pass_not_ours;     /* not UDP to our port (or not IPv4/IPv6) */
	__u64 malformed;         /* truncated headers, IP options, fragments: passed */
	__u64 drop_unknown_peer; /* to our port from a non-peer: dropped */
	__u64 pass_handshake;    /* LINK_INIT/RESP/FINISH from a non-peer: passed */
	__u64 pass;              /* from a peer, not transit (ours, control, no /64 entry) */
	__u64 pass_hop_limit;    /* transit with hop limit <= 1: user space sends ICMPv6 */
	__u64 pass_family;       /* next hop's family differs from the packet's */
	__u64 pass_no_neigh;     /* fib lookup: neighbour not resolved */
	__u64 pass_fib_other;    /* fib lookup: any other failure */
	__u64 redirect;          /* transit: bpf_redirect to another interface */
	__u64 tx;                /* transit: XDP_TX back out of the same interface */
	__u64 pass_gso;          /* transit GSO/GRO super-packet: left to the TC program */
	__u64 gso_redirect;      /* TC: super-packet forwarded with bpf_redirect */
	__u64 gso_pass;          /* TC: super-packet to our port left to user space */
	__u64 gso_drop;          /* TC: super-packet dropped (a rewrite helper failed) */
};
#define HYPHA_XDP_COUNTERS 15
_Static_assert(sizeof(struct xdp_counters) == HYPHA_XDP_COUNTERS * 8, "xdp_counters size");
_Static_assert(offsetof(struct xdp_counters, pass_not_ours) == 0, "counter 0");
_Static_assert(offsetof(struct xdp_counters, malformed) == 8, "counter 1");
_Static_assert(offsetof(struct xdp_counters, drop_unknown_peer) == 16, "counter 2");
_Static_assert(offsetof(struct xdp_counters, pass_handshake) == 24, "counter 3");
_Static_assert(offsetof(struct xdp_counters, pass) == 32, "counter 4");
_Static_assert(offsetof(struct xdp_counters, pass_hop_limit) == 40, "counter 5");
_Static_assert(offsetof(struct xdp_counters, pass_family) == 48, "counter 6");
_Static_assert(offsetof(struct xdp_counters, pass_no_neigh) == 56, "counter 7");
_Static_assert(offsetof(struct xdp_counters, pass_fib_other) == 64, "counter 8");
_Static_assert(offsetof(struct xdp_counters, redirect) == 72, "counter 9");
_Static_assert(offsetof(struct xdp_counters, tx) == 80, "counter 10");
_Static_assert(offsetof(struct xdp_counters, pass_gso) == 88, "counter 11");
_Static_assert(offsetof(struct xdp_counters, gso_redirect) == 96, "counter 12");
_Static_assert(offsetof(struct xdp_counters, gso_pass) == 104, "counter 13");
_Static_assert(offsetof(struct xdp_counters, gso_drop) == 112, "counter 14");

#endif
