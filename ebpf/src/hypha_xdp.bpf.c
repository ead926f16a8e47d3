// SPDX-License-Identifier: Apache-2.0 OR GPL-2.0
/*
 * Hypha XDP fast path (DESIGN.md "XDP fast path", issue 7).
 *
 * Runs on the underlay interface(s) before the kernel stack. For UDP to the
 * node's port (IPv4 or IPv6, no IP options or extension headers):
 *  - from an address:port not in `allowed_peers`: link-handshake frames
 *    (LINK_INIT/RESP/FINISH) pass to the control plane, which rate-limits
 *    and checks them; everything else is dropped here;
 *  - a DATA frame whose destination /64 is in `transit`: the hop limit is
 *    decremented (hop limit <= 1 passes, so user space sends the ICMPv6
 *    error), the outer addresses and ports are rewritten to the next hop,
 *    checksums fixed incrementally (RFC 1624), and the frame leaves through
 *    bpf_fib_lookup + bpf_redirect (XDP_TX on the same interface) without
 *    ever reaching user space;
 *  - a transit GSO/GRO super-packet (longer than the ingress MTU) passes to the TC
 *    ingress program below (`hypha_tc`), which forwards it as an skb;
 *  - anything else passes.
 * Every packet is counted once in `counters` under the reason that decided it; the TC
 * program counts the super-packets it sees again under gso_*.
 *
 * On interfaces in `tc_only` (`--xdp tc`, and `auto` on veth) XDP is not attached and the TC
 * program does all of the above itself, on skbs, under the same counter names: generic XDP
 * would linearise (copy) every GSO super-packet before running, only to pass it to TC (this
 * program copies just the transit ones it rewrites, once).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "maps.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* The node's UDP port; the loader overrides it (aya `override_global`). */
volatile const __u16 hypha_port = 9651;
/* TTL / hop limit of rewritten outer packets (they leave as if sent by us). */
#define OUTER_TTL 64

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, HYPHA_MAX_PEERS);
	__type(key, struct peer_key);
	__type(value, struct peer_value);
} allowed_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, HYPHA_MAX_TRANSIT);
	__type(key, struct transit_key);
	__type(value, struct transit_value);
} transit SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct xdp_counters);
} counters SEC(".maps");

/* Interfaces (by ifindex) where the TC ingress program runs alone (`--xdp tc`, auto on veth): it
 * then does everything the XDP program does, for single datagrams as well as super-packets. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} tc_only SEC(".maps");

#define COUNT(c, field) \
	do { \
		if (c) \
			(c)->field++; \
	} while (0)

/* RFC 1624 eqn. 3 accumulation: adds ~old + new for one 16-bit word. */
static __always_inline __u32 csum_step(__u32 acc, __u16 old, __u16 new)
{
	return acc + (__u16)~old + new;
}

static __always_inline __u16 csum_finish(__u16 check, __u32 acc)
{
	acc += (__u16)~check;
	acc = (acc & 0xffff) + (acc >> 16);
	acc = (acc & 0xffff) + (acc >> 16);
	return (__u16)~acc;
}

/* Adds the difference between `n` 16-bit words at `old` and at `new`. */
static __always_inline __u32 csum_words(__u32 acc, const __u16 *old, const __u16 *new, int n)
{
#pragma clang loop unroll(full)
	for (int i = 0; i < 8; i++) {
		if (i < n)
			acc = csum_step(acc, old[i], new[i]);
	}
	return acc;
}

/* Is the frame longer than the ingress device's MTU lets one frame be? Then it is a GSO/GRO
 * super-packet (generic mode sees the whole skb: a sender's UDP_SEGMENT batch crossing a veth,
 * or a UDP GRO aggregate), carrying several datagrams of the same flow back to back. */
static __always_inline int is_super_packet(struct xdp_md *ctx)
{
	__u32 mtu_len = 0;
	return bpf_check_mtu(ctx, 0, &mtu_len, 0, 0) == BPF_MTU_CHK_RET_FRAG_NEEDED;
}

/* Returns the XDP action for a DATA frame from a peer. `udp` and the 48-byte
 * header after it are within bounds (checked by the caller). */
/* bpf_fib_lookup towards the next hop; tot_len 0 skips the MTU check. */
static __always_inline long fib_v4(struct xdp_md *ctx, struct bpf_fib_lookup *fib, struct iphdr *ip,
				   const struct transit_value *nh, __u16 tot_len)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET;
	fib->tos = ip->tos;
	fib->l4_protocol = IPPROTO_UDP;
	fib->tot_len = tot_len;
	fib->ifindex = ctx->ingress_ifindex;
	__builtin_memcpy(&fib->ipv4_src, nh->src, 4);
	__builtin_memcpy(&fib->ipv4_dst, nh->addr, 4);
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}

static __always_inline long fib_v6(struct xdp_md *ctx, struct bpf_fib_lookup *fib,
				   const struct transit_value *nh, __u16 tot_len)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET6;
	fib->l4_protocol = IPPROTO_UDP;
	fib->tot_len = tot_len;
	fib->ifindex = ctx->ingress_ifindex;
	__builtin_memcpy(fib->ipv6_src, nh->src, 16);
	__builtin_memcpy(fib->ipv6_dst, nh->addr, 16);
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}

static __always_inline int transit_v4(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *ip,
				      struct udphdr *udp, __u8 *hdr, const struct transit_value *nh,
				      struct xdp_counters *c)
{
	if (nh->family != HYPHA_FAMILY_V4) {
		COUNT(c, pass_family);
		return XDP_PASS;
	}
	struct bpf_fib_lookup fib;
	long rc = fib_v4(ctx, &fib, ip, nh, bpf_ntohs(ip->tot_len));
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED && is_super_packet(ctx)) {
		COUNT(c, pass_gso);
		return XDP_PASS;
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		COUNT(c, pass_no_neigh);
		return XDP_PASS;
	}
	if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
		COUNT(c, pass_fib_other);
		return XDP_PASS;
	}

	__u16 new_addrs[4];
	__builtin_memcpy(new_addrs, nh->src, 4);
	__builtin_memcpy(&new_addrs[2], nh->addr, 4);
	__u16 new_ports[2] = { udp->dest, bpf_htons(nh->port) };
	__u16 old_first = *(__u16 *)hdr;
	__u8 new_first_b[2] = { hdr[0], hdr[HYPHA_DATA_HOP_LIMIT_OFF] - 1 };
	__u16 new_first;
	__builtin_memcpy(&new_first, new_first_b, 2);

	/* IPv4 header checksum: addresses and the TTL/protocol word. */
	__u16 *ttl_word = (__u16 *)&ip->ttl;
	__u8 new_ttl_b[2] = { OUTER_TTL, ip->protocol };
	__u16 new_ttl;
	__builtin_memcpy(&new_ttl, new_ttl_b, 2);
	__u32 acc = csum_words(0, (__u16 *)&ip->saddr, new_addrs, 4);
	__u32 ip_acc = csum_step(acc, *ttl_word, new_ttl);
	ip->check = csum_finish(ip->check, ip_acc);

	/* UDP checksum (0 = none over IPv4): pseudo-header addresses, ports, hop limit. */
	if (udp->check) {
		acc = csum_words(acc, (__u16 *)&udp->source, new_ports, 2);
		acc = csum_step(acc, old_first, new_first);
		__u16 check = csum_finish(udp->check, acc);
		udp->check = check ? check : 0xffff;
	}

	__builtin_memcpy(&ip->saddr, nh->src, 4);
	__builtin_memcpy(&ip->daddr, nh->addr, 4);
	ip->ttl = OUTER_TTL;
	udp->source = new_ports[0];
	udp->dest = new_ports[1];
	hdr[HYPHA_DATA_HOP_LIMIT_OFF] = new_first_b[1];
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);

	if (fib.ifindex == ctx->ingress_ifindex) {
		COUNT(c, tx);
		return XDP_TX;
	}
	COUNT(c, redirect);
	return bpf_redirect(fib.ifindex, 0);
}

static __always_inline int transit_v6(struct xdp_md *ctx, struct ethhdr *eth, struct ipv6hdr *ip6,
				      struct udphdr *udp, __u8 *hdr, const struct transit_value *nh,
				      struct xdp_counters *c)
{
	if (nh->family != HYPHA_FAMILY_V6) {
		COUNT(c, pass_family);
		return XDP_PASS;
	}
	struct bpf_fib_lookup fib;
	long rc = fib_v6(ctx, &fib, nh, bpf_ntohs(ip6->payload_len) + sizeof(struct ipv6hdr));
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED && is_super_packet(ctx)) {
		COUNT(c, pass_gso);
		return XDP_PASS;
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		COUNT(c, pass_no_neigh);
		return XDP_PASS;
	}
	if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
		COUNT(c, pass_fib_other);
		return XDP_PASS;
	}

	__u16 new_src[8], new_dst[8];
	__builtin_memcpy(new_src, nh->src, 16);
	__builtin_memcpy(new_dst, nh->addr, 16);
	__u16 new_ports[2] = { udp->dest, bpf_htons(nh->port) };
	__u16 old_first = *(__u16 *)hdr;
	__u8 new_first_b[2] = { hdr[0], hdr[HYPHA_DATA_HOP_LIMIT_OFF] - 1 };
	__u16 new_first;
	__builtin_memcpy(&new_first, new_first_b, 2);

	__u32 acc = csum_words(0, (__u16 *)&ip6->saddr, new_src, 8);
	acc = csum_words(acc, (__u16 *)&ip6->daddr, new_dst, 8);
	acc = csum_words(acc, (__u16 *)&udp->source, new_ports, 2);
	acc = csum_step(acc, old_first, new_first);
	__u16 check = csum_finish(udp->check, acc);
	udp->check = check ? check : 0xffff;

	__builtin_memcpy(&ip6->saddr, nh->src, 16);
	__builtin_memcpy(&ip6->daddr, nh->addr, 16);
	ip6->hop_limit = OUTER_TTL;
	udp->source = new_ports[0];
	udp->dest = new_ports[1];
	hdr[HYPHA_DATA_HOP_LIMIT_OFF] = new_first_b[1];
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);

	if (fib.ifindex == ctx->ingress_ifindex) {
		COUNT(c, tx);
		return XDP_TX;
	}
	COUNT(c, redirect);
	return bpf_redirect(fib.ifindex, 0);
}

SEC("xdp")
int hypha_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;
	struct xdp_counters *c = bpf_map_lookup_elem(&counters, &zero);

	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end) {
		COUNT(c, malformed);
		return XDP_PASS;
	}

	struct peer_key pk;
	__builtin_memset(&pk, 0, sizeof(pk));
	struct iphdr *ip = NULL;
	struct ipv6hdr *ip6 = NULL;
	struct udphdr *udp;

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end) {
			COUNT(c, malformed);
			return XDP_PASS;
		}
		if (ip->protocol != IPPROTO_UDP) {
			COUNT(c, pass_not_ours);
			return XDP_PASS;
		}
		udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > data_end) {
			COUNT(c, malformed);
			return XDP_PASS;
		}
		if (udp->dest != bpf_htons(hypha_port)) {
			COUNT(c, pass_not_ours);
			return XDP_PASS;
		}
		/* IP options or fragments: leave them to the kernel. */
		if (ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff))) {
			COUNT(c, malformed);
			return XDP_PASS;
		}
		__builtin_memcpy(pk.addr, &ip->saddr, 4);
		pk.family = HYPHA_FAMILY_V4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end) {
			COUNT(c, malformed);
			return XDP_PASS;
		}
		if (ip6->nexthdr != IPPROTO_UDP) {
			COUNT(c, pass_not_ours);
			return XDP_PASS;
		}
		udp = (void *)(ip6 + 1);
		if ((void *)(udp + 1) > data_end) {
			COUNT(c, malformed);
			return XDP_PASS;
		}
		if (udp->dest != bpf_htons(hypha_port)) {
			COUNT(c, pass_not_ours);
			return XDP_PASS;
		}
		__builtin_memcpy(pk.addr, &ip6->saddr, 16);
		pk.family = HYPHA_FAMILY_V6;
	} else {
		COUNT(c, pass_not_ours);
		return XDP_PASS;
	}
	pk.port = bpf_ntohs(udp->source);

	__u8 *hdr = (void *)(udp + 1);
	__u8 frame = 0;
	if ((void *)(hdr + 1) <= data_end)
		frame = hdr[0];

	if (!bpf_map_lookup_elem(&allowed_peers, &pk)) {
		if (frame == HYPHA_FRAME_LINK_INIT || frame == HYPHA_FRAME_LINK_RESP ||
		    frame == HYPHA_FRAME_LINK_FINISH) {
			COUNT(c, pass_handshake);
			return XDP_PASS;
		}
		COUNT(c, drop_unknown_peer);
		return XDP_DROP;
	}

	if (frame != HYPHA_FRAME_DATA || (void *)(hdr + HYPHA_DATA_HEADER_LEN) > data_end) {
		COUNT(c, pass);
		return XDP_PASS;
	}
	struct transit_key tk;
	__builtin_memcpy(tk.prefix, hdr + HYPHA_DATA_DST_OFF, 8);
	struct transit_value *nh = bpf_map_lookup_elem(&transit, &tk);
	if (!nh) {
		COUNT(c, pass);
		return XDP_PASS;
	}
	if (hdr[HYPHA_DATA_HOP_LIMIT_OFF] <= 1) {
		COUNT(c, pass_hop_limit);
		return XDP_PASS;
	}
	if (ip)
		return transit_v4(ctx, eth, ip, udp, hdr, nh, c);
	if (ip6)
		return transit_v6(ctx, eth, ip6, udp, hdr, nh, c);
	COUNT(c, malformed);
	return XDP_PASS;
}

/*
 * The TC ingress half: bulk transit in super-packets.
 *
 * A GSO/GRO super-packet (a sender's UDP_SEGMENT batch crossing a veth, or a UDP GRO aggregate)
 * is one skb carrying up to 64 (or 128) datagrams of one flow back to back, each with its own
 * DATA header. Generic XDP sees it as one frame longer than the MTU: bpf_fib_lookup refuses it
 * (FRAG_NEEDED), and the kernel would refuse to redirect it anyway (generic XDP redirect checks
 * the skb length against the target's MTU), so XDP passes it (`pass_gso`) and this program,
 * which runs right after on the same interface, forwards it as the skb it is:
 *  - every segment (at gso_size steps) must be a DATA frame to the same /64 with hop limit > 1,
 *    or the whole super-packet goes up to user space, which handles each datagram alone;
 *  - bpf_fib_lookup with tot_len 0 checks the skb against the egress MTU the GSO-aware way
 *    (is_skb_forwardable: each segment must fit);
 *  - addresses, ports and every segment's hop limit are rewritten with the skb checksum helpers,
 *    which know a CHECKSUM_PARTIAL skb (only pseudo-header changes go into its seed);
 *  - bpf_redirect to the egress device, where GSO splits it (or the device does).
 * Frames that are not super-packets are XDP's and pass here untouched and uncounted, except on
 * a `tc_only` interface, where there is no XDP: there this program drops non-peers (handshake
 * frames excepted), forwards a single transit datagram as a one-segment super-packet (hop limit
 * fixed in the checksum too, which a non-partial skb needs) and counts it all under XDP's names.
 */
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define HYPHA_MAX_SEGS 128
#define ETH_LEN 14

struct seg_ctx {
	struct __sk_buff *skb;
	__u32 off;      /* first segment's DATA header */
	__u32 end;      /* end of the UDP payload */
	__u32 step;     /* gso_size */
	__u64 prefix;   /* the first segment's destination /64, as on the wire */
	int bad;        /* a segment that is not transit to the same /64 with hop limit > 1 */
	int rewrite;    /* second pass: decrement each hop limit */
};

static long seg_visit(__u32 i, void *data)
{
	struct seg_ctx *s = data;
	__u32 off = s->off + i * s->step;
	if (off >= s->end)
		return 1;
	__u8 first[2];
	if (bpf_skb_load_bytes(s->skb, off, first, 2)) {
		s->bad = 1;
		return 1;
	}
	if (s->rewrite) {
		__u8 hop = first[1] - 1;
		/* The hop limit is payload, which a CHECKSUM_PARTIAL skb's seed doesn't cover (UDP
		 * GSO skbs are always partial; GRO makes its aggregates partial too). */
		if (bpf_skb_store_bytes(s->skb, off + HYPHA_DATA_HOP_LIMIT_OFF, &hop, 1, 0))
			s->bad = 1;
		return 0;
	}
	__u64 prefix;
	if (first[0] != HYPHA_FRAME_DATA || first[1] <= 1 ||
	    bpf_skb_load_bytes(s->skb, off + HYPHA_DATA_DST_OFF, &prefix, 8) || prefix != s->prefix) {
		s->bad = 1;
		return 1;
	}
	return 0;
}

SEC("classifier")
int hypha_tc(struct __sk_buff *skb)
{
	__u32 step = skb->gso_size;
	__u32 ifindex = skb->ingress_ifindex;
	/* Alone on this interface: everything is ours to decide. Behind XDP: only super-packets. */
	int full = bpf_map_lookup_elem(&tc_only, &ifindex) != NULL;
	if (!step && !full)
		return TC_ACT_OK;
	__u32 zero = 0;
	struct xdp_counters *c = bpf_map_lookup_elem(&counters, &zero);

	struct peer_key pk;
	__builtin_memset(&pk, 0, sizeof(pk));
	__u32 l4;
	int v6;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, ETH_LEN, &ip, sizeof(ip))) {
			if (full)
				COUNT(c, malformed);
			return TC_ACT_OK;
		}
		if (ip.protocol != IPPROTO_UDP) {
			if (full)
				COUNT(c, pass_not_ours);
			return TC_ACT_OK;
		}
		if (ip.ihl != 5 || (ip.frag_off & bpf_htons(0x3fff))) {
			if (full)
				COUNT(c, malformed);
			return TC_ACT_OK;
		}
		__builtin_memcpy(pk.addr, &ip.saddr, 4);
		pk.family = HYPHA_FAMILY_V4;
		l4 = ETH_LEN + sizeof(struct iphdr);
		v6 = 0;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, ETH_LEN, &ip6, sizeof(ip6))) {
			if (full)
				COUNT(c, malformed);
			return TC_ACT_OK;
		}
		if (ip6.nexthdr != IPPROTO_UDP) {
			if (full)
				COUNT(c, pass_not_ours);
			return TC_ACT_OK;
		}
		__builtin_memcpy(pk.addr, &ip6.saddr, 16);
		pk.family = HYPHA_FAMILY_V6;
		l4 = ETH_LEN + sizeof(struct ipv6hdr);
		v6 = 1;
	} else {
		if (full)
			COUNT(c, pass_not_ours);
		return TC_ACT_OK;
	}
	struct udphdr udp;
	if (bpf_skb_load_bytes(skb, l4, &udp, sizeof(udp))) {
		if (full)
			COUNT(c, malformed);
		return TC_ACT_OK;
	}
	if (udp.dest != bpf_htons(hypha_port)) {
		if (full)
			COUNT(c, pass_not_ours);
		return TC_ACT_OK;
	}
	pk.port = bpf_ntohs(udp.source);
	__u32 payload = l4 + sizeof(struct udphdr);
	__u8 first[2] = { 0, 0 };
	int have_first = !bpf_skb_load_bytes(skb, payload, first, 2);
	if (!bpf_map_lookup_elem(&allowed_peers, &pk)) {
		if (!full) {
			/* XDP already dropped these unless it isn't attached here. */
			COUNT(c, gso_pass);
			return TC_ACT_OK;
		}
		__u8 frame = have_first ? first[0] : 0;
		if (frame == HYPHA_FRAME_LINK_INIT || frame == HYPHA_FRAME_LINK_RESP ||
		    frame == HYPHA_FRAME_LINK_FINISH) {
			COUNT(c, pass_handshake);
			return TC_ACT_OK;
		}
		COUNT(c, drop_unknown_peer);
		return TC_ACT_SHOT;
	}

	struct seg_ctx s = {
		.skb = skb,
		.off = payload,
		.end = skb->len,
		.step = step,
	};
	if (!step) {
		/* One datagram (TC alone): one segment, counted under XDP's names. */
		if (!have_first || first[0] != HYPHA_FRAME_DATA ||
		    s.end < s.off + HYPHA_DATA_HEADER_LEN ||
		    bpf_skb_load_bytes(skb, s.off + HYPHA_DATA_DST_OFF, &s.prefix, 8)) {
			COUNT(c, pass);
			return TC_ACT_OK;
		}
		s.step = s.end - s.off;
		struct transit_key tk1;
		__builtin_memcpy(tk1.prefix, &s.prefix, 8);
		if (!bpf_map_lookup_elem(&transit, &tk1)) {
			COUNT(c, pass);
			return TC_ACT_OK;
		}
		if (first[1] <= 1) {
			COUNT(c, pass_hop_limit);
			return TC_ACT_OK;
		}
	} else if (bpf_skb_load_bytes(skb, s.off + HYPHA_DATA_DST_OFF, &s.prefix, 8)) {
		COUNT(c, gso_pass);
		return TC_ACT_OK;
	}
	struct transit_key tk;
	__builtin_memcpy(tk.prefix, &s.prefix, 8);
	struct transit_value *nh = bpf_map_lookup_elem(&transit, &tk);
	if (!step && nh && nh->family != (v6 ? HYPHA_FAMILY_V6 : HYPHA_FAMILY_V4)) {
		COUNT(c, pass_family);
		return TC_ACT_OK;
	}
	if (!nh || nh->family != (v6 ? HYPHA_FAMILY_V6 : HYPHA_FAMILY_V4) ||
	    (s.end - s.off + s.step - 1) / s.step > HYPHA_MAX_SEGS) {
		COUNT(c, gso_pass);
		return TC_ACT_OK;
	}
	if (step) {
		bpf_loop(HYPHA_MAX_SEGS, seg_visit, &s, 0);
		if (s.bad) {
			COUNT(c, gso_pass);
			return TC_ACT_OK;
		}
	}

	struct bpf_fib_lookup fib = {};
	fib.l4_protocol = IPPROTO_UDP;
	fib.tot_len = 0; /* GSO-aware MTU check of the skb against the egress device */
	fib.ifindex = ifindex;
	if (v6) {
		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_src, nh->src, 16);
		__builtin_memcpy(fib.ipv6_dst, nh->addr, 16);
	} else {
		fib.family = AF_INET;
		__builtin_memcpy(&fib.ipv4_src, nh->src, 4);
		__builtin_memcpy(&fib.ipv4_dst, nh->addr, 4);
	}
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
		if (step)
			COUNT(c, gso_pass);
		else if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
			COUNT(c, pass_no_neigh);
		else
			COUNT(c, pass_fib_other);
		return TC_ACT_OK;
	}

	/* Rewrite. From here on a failure leaves a half-rewritten packet: drop it. */
	__u32 csum_off = l4 + offsetof(struct udphdr, check);
	__u32 mangled = v6 ? 0 : BPF_F_MARK_MANGLED_0;
	long err = 0;
	if (step) {
		/* Writing into a nonlinear skb makes it writable up to the write's end first
		 * (skb_ensure_writable -> __pskb_pull_tail), growing the head by just that much: one
		 * store per segment at rising offsets re-copied the whole head each time (measured:
		 * quadratic, pskb_expand_head + memcpy the top of the profile). Pull it all once. */
		if (bpf_skb_pull_data(skb, skb->len)) {
			COUNT(c, gso_pass);
			return TC_ACT_OK;
		}
		s.rewrite = 1;
		bpf_loop(HYPHA_MAX_SEGS, seg_visit, &s, 0);
		err = s.bad;
	} else {
		/* The hop limit is payload: a CHECKSUM_PARTIAL skb's seed doesn't cover it (the
		 * helper then changes nothing), a complete checksum does. */
		__u8 new_first[2] = { first[0], first[1] - 1 };
		__u16 old_w, new_w;
		__builtin_memcpy(&old_w, first, 2);
		__builtin_memcpy(&new_w, new_first, 2);
		err |= bpf_l4_csum_replace(skb, csum_off, old_w, new_w, 2 | mangled);
		err |= bpf_skb_store_bytes(skb, payload + HYPHA_DATA_HOP_LIMIT_OFF, &new_first[1], 1,
					   0);
	}
	__u16 ports[2] = { udp.dest, bpf_htons(nh->port) };
	if (v6) {
		__u32 addrs[8];
		__builtin_memcpy(addrs, nh->src, 16);
		__builtin_memcpy(&addrs[4], nh->addr, 16);
		__u32 old[8];
		err |= bpf_skb_load_bytes(skb, ETH_LEN + offsetof(struct ipv6hdr, saddr), old, 32);
		__s64 diff = bpf_csum_diff(old, 32, addrs, 32, 0);
		err |= bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR);
		err |= bpf_skb_store_bytes(skb, ETH_LEN + offsetof(struct ipv6hdr, saddr), addrs, 32, 0);
		__u8 hl = OUTER_TTL;
		err |= bpf_skb_store_bytes(skb, ETH_LEN + offsetof(struct ipv6hdr, hop_limit), &hl, 1, 0);
	} else {
		__u32 addrs[2];
		__builtin_memcpy(addrs, nh->src, 4);
		__builtin_memcpy(&addrs[1], nh->addr, 4);
		__u32 old[2];
		err |= bpf_skb_load_bytes(skb, ETH_LEN + offsetof(struct iphdr, saddr), old, 8);
		__s64 diff = bpf_csum_diff(old, 8, addrs, 8, 0);
		err |= bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | mangled);
		err |= bpf_l3_csum_replace(skb, ETH_LEN + offsetof(struct iphdr, check), 0, diff, 0);
		err |= bpf_skb_store_bytes(skb, ETH_LEN + offsetof(struct iphdr, saddr), addrs, 8, 0);
		__u8 ttl_old;
		err |= bpf_skb_load_bytes(skb, ETH_LEN + offsetof(struct iphdr, ttl), &ttl_old, 1);
		err |= bpf_l3_csum_replace(skb, ETH_LEN + offsetof(struct iphdr, check),
					   bpf_htons((__u16)ttl_old << 8), bpf_htons(OUTER_TTL << 8), 2);
		__u8 ttl = OUTER_TTL;
		err |= bpf_skb_store_bytes(skb, ETH_LEN + offsetof(struct iphdr, ttl), &ttl, 1, 0);
	}
	/* Ports are not in the pseudo-header (a partial seed ignores them; the helper knows). */
	__u32 old_ports, new_ports;
	__builtin_memcpy(&new_ports, ports, 4);
	err |= bpf_skb_load_bytes(skb, l4, &old_ports, 4);
	err |= bpf_l4_csum_replace(skb, csum_off, old_ports, new_ports, 4 | mangled);
	err |= bpf_skb_store_bytes(skb, l4, &new_ports, 4, 0);
	err |= bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), fib.dmac, ETH_ALEN, 0);
	err |= bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_source), fib.smac, ETH_ALEN, 0);
	if (err) {
		COUNT(c, gso_drop);
		return TC_ACT_SHOT;
	}
	if (step)
		COUNT(c, gso_redirect);
	else
		COUNT(c, redirect);
	return bpf_redirect(fib.ifindex, 0);
}

/* bpf_fib_lookup and bpf_redirect are GPL-only helpers; this file is dual-licensed (SPDX line). */
char LICENSE[] SEC("license") = "GPL";
