//! veth links between two nodes, their addresses, and packet loss.
//!
//! Loss: this kernel has no `sch_netem`, so loss is an nftables rule in the namespace that
//! *receives* the packets: table `inet hytest`, one base chain per interface hooked at
//! `prerouting` (priority -300, before conntrack, so it also drops forwarded traffic) with
//! `iifname "IF" numgen random mod 10000 < N drop`. Only IPv4 and IPv6 packets are dropped; ARP is
//! not, so neighbour resolution does not add its own retries to the statistics.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::ns;
use crate::Shared;

/// Options for [`TestNet::link`](crate::TestNet::link). Build with struct syntax and
/// `..Default::default()`, or with the `with_*` methods.
///
/// ```
/// # use hypha_testnet::LinkOpts;
/// let lossy_into_b = LinkOpts::default().with_loss_to_b(10.0);
/// let both_ways = LinkOpts { loss_to_a: 5.0, loss_to_b: 5.0, ..Default::default() };
/// # let _ = (lossy_into_b, both_ways);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkOpts {
    /// Percent (0–100, fractional allowed to 0.01) of IP packets dropped on arrival at end `a`,
    /// i.e. travelling b → a. The rule sits in a's namespace.
    pub loss_to_a: f64,
    /// Percent of IP packets dropped on arrival at end `b` (travelling a → b), in b's namespace.
    pub loss_to_b: f64,
    /// MTU of both ends; the kernel default (1500) when `None`.
    pub mtu: Option<u32>,
    /// One-way delay added to every frame in each direction (so RTT grows by twice this). The two
    /// ends are then joined through a hidden middle namespace whose user-space bridge holds each
    /// frame for this long (this kernel has no netem). `None`: a direct veth pair.
    pub delay: Option<Duration>,
}

impl LinkOpts {
    /// Same loss (percent) in both directions.
    pub fn with_loss(mut self, percent: f64) -> Self {
        self.loss_to_a = percent;
        self.loss_to_b = percent;
        self
    }

    /// Loss (percent) of packets arriving at end `a`.
    pub fn with_loss_to_a(mut self, percent: f64) -> Self {
        self.loss_to_a = percent;
        self
    }

    /// Loss (percent) of packets arriving at end `b`.
    pub fn with_loss_to_b(mut self, percent: f64) -> Self {
        self.loss_to_b = percent;
        self
    }

    /// MTU of both ends.
    pub fn with_mtu(mut self, mtu: u32) -> Self {
        self.mtu = Some(mtu);
        self
    }

    /// One-way delay in each direction (see [`LinkOpts::delay`]).
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
}

/// One end of a link: the interface in one node's namespace and its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEnd {
    pub(crate) node: String,
    pub(crate) netns: String,
    pub(crate) ifname: String,
    pub(crate) ipv4: Ipv4Addr,
    pub(crate) ipv6: Ipv6Addr,
}

impl LinkEnd {
    /// The node's name as given to `add_node` (e.g. `"a"`).
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The namespace the interface lives in.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The interface name inside that namespace.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The IPv4 address of this end (`10.H.L.1` or `.2`, prefix /24, `H.L` = link index).
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    /// The IPv6 address of this end (`fd00:0:0:INDEX::1` or `::2`, prefix /64).
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    /// IPv4 prefix length of the link subnet (24).
    pub fn ipv4_prefix_len(&self) -> u8 {
        V4_PREFIX
    }

    /// IPv6 prefix length of the link subnet (64).
    pub fn ipv6_prefix_len(&self) -> u8 {
        V6_PREFIX
    }

    /// The address of the given family: `ip(true)` is IPv6, `ip(false)` IPv4.
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.ipv6)
        } else {
            IpAddr::V4(self.ipv4)
        }
    }
}

const V4_PREFIX: u8 = 24;
const V6_PREFIX: u8 = 64;

/// Which end of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The first node passed to `link`.
    A,
    /// The second node passed to `link`.
    B,
}

/// A veth link between two nodes, made by [`TestNet::link`](crate::TestNet::link). Cheap to clone;
/// the link lives until the `TestNet` is dropped.
#[derive(Clone)]
pub struct Link {
    pub(crate) shared: Arc<Shared>,
    pub(crate) index: u32,
    pub(crate) a: LinkEnd,
    pub(crate) b: LinkEnd,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("index", &self.index)
            .field("a", &self.a)
            .field("b", &self.b)
            .finish()
    }
}

/// Addresses of link number `index`: (a's v4, b's v4, a's v6, b's v6).
pub(crate) fn link_addrs(index: u32) -> Result<(Ipv4Addr, Ipv4Addr, Ipv6Addr, Ipv6Addr)> {
    let idx = u16::try_from(index)
        .map_err(|_| Error::InvalidArgument(format!("too many links ({index})")))?;
    let [hi, lo] = idx.to_be_bytes();
    Ok((
        Ipv4Addr::new(10, hi, lo, 1),
        Ipv4Addr::new(10, hi, lo, 2),
        Ipv6Addr::new(0xfd00, 0, 0, idx, 0, 0, 0, 1),
        Ipv6Addr::new(0xfd00, 0, 0, idx, 0, 0, 0, 2),
    ))
}

/// Puts the addresses on an end and brings it up.
pub(crate) fn configure_end(end: &LinkEnd, mtu: Option<u32>) -> Result<()> {
    let ns = &end.netns;
    let ifname = &end.ifname;
    if let Some(mtu) = mtu {
        let mtu = mtu.to_string();
        ns::host_ok(["ip", "-n", ns, "link", "set", ifname, "mtu", &mtu])?;
    }
    let v4 = format!("{}/{V4_PREFIX}", end.ipv4);
    let v6 = format!("{}/{V6_PREFIX}", end.ipv6);
    ns::host_ok(["ip", "-n", ns, "addr", "add", &v4, "dev", ifname])?;
    ns::host_ok([
        "ip", "-n", ns, "-6", "addr", "add", &v6, "dev", ifname, "nodad",
    ])?;
    ns::host_ok(["ip", "-n", ns, "link", "set", ifname, "up"])?;
    Ok(())
}

/// Installs (or replaces, or with 0 removes) the loss rule for packets arriving on `end`.
pub(crate) fn set_loss_rule(end: &LinkEnd, percent: f64) -> Result<()> {
    if !(0.0..=100.0).contains(&percent) {
        return Err(Error::InvalidArgument(format!(
            "loss {percent} % is outside 0..=100"
        )));
    }
    let chain = format!("in_{}", end.ifname.replace(['-', '.'], "_"));
    let mut script = format!(
        "add table inet hytest\n\
         add chain inet hytest {chain} {{ type filter hook prerouting priority -300; policy accept; }}\n\
         flush chain inet hytest {chain}\n"
    );
    // Per ten-thousand so that fractional percentages work.
    let per_10k = (percent * 100.0).round() as u32;
    if per_10k > 0 {
        script.push_str(&format!(
            "add rule inet hytest {chain} iifname \"{}\" numgen random mod 10000 < {per_10k} counter drop\n",
            end.ifname
        ));
    }
    ns::nft_script(&end.netns, &script)
}

impl Link {
    /// The end in the first node passed to `link`.
    pub fn a(&self) -> &LinkEnd {
        &self.a
    }

    /// The end in the second node passed to `link`.
    pub fn b(&self) -> &LinkEnd {
        &self.b
    }

    /// The end on `side`.
    pub fn end(&self, side: Side) -> &LinkEnd {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }

    /// The link's number within its `TestNet` (0, 1, …); it picks the subnets.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Cuts (`false`) or restores (`true`) the link by setting both interfaces down or up, like
    /// pulling a cable: carrier goes away and the kernel marks routes over it `linkdown`.
    /// Addresses survive (the harness sets `keep_addr_on_down` for IPv6). For a silent black hole
    /// with the carrier kept, use `set_loss(.., 100.0)` on both sides instead.
    pub fn set_up(&self, up: bool) -> Result<()> {
        if self.shared.is_torn_down() {
            return Err(Error::InvalidArgument(
                "the TestNet has been dropped".into(),
            ));
        }
        let state = if up { "up" } else { "down" };
        for end in [&self.a, &self.b] {
            ns::host_ok(["ip", "-n", &end.netns, "link", "set", &end.ifname, state])?;
        }
        Ok(())
    }

    /// Sets the loss (percent, 0 removes the rule) of packets arriving at `side`.
    pub fn set_loss(&self, side: Side, percent: f64) -> Result<()> {
        if self.shared.is_torn_down() {
            return Err(Error::InvalidArgument(
                "the TestNet has been dropped".into(),
            ));
        }
        set_loss_rule(self.end(side), percent)
    }
}
