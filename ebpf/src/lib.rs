//! Hypha's XDP fast path: the eBPF program and the types of its maps.
//!
//! The program is C (`hypha_xdp.bpf.c`, see its header comment for what it does), compiled by
//! build.rs with clang and embedded here as [`PROGRAM`]; the loader is `hypha_dataplane::xdp`.
//! Why C and not Rust (aya-ebpf): that needs nightly's rust-src and an LLVM-matched bpf-linker,
//! which a fresh machine here cannot count on (issue 7). The map key and value types live in
//! `maps.h` and are mirrored in [`maps`]; both sides assert the same sizes and offsets.
#![no_std]
#![deny(missing_docs)]

pub mod maps;

/// 8-byte alignment for the embedded object: aya's ELF parser reads it in place.
#[repr(C, align(8))]
struct Aligned<B: ?Sized>(B);

static ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(
    env!("OUT_DIR"),
    "/hypha_xdp.bpf.o"
)));

/// The compiled XDP object (ELF, with BTF), aligned for `aya::EbpfLoader::load`.
pub static PROGRAM: &[u8] = &ALIGNED.0;

/// The program's name (its function, `SEC("xdp")`).
pub const PROGRAM_NAME: &str = "hypha_xdp";
/// The TC ingress program's name (`SEC("classifier")`): forwards the GSO/GRO super-packets XDP
/// passes.
pub const TC_PROGRAM_NAME: &str = "hypha_tc";
/// The `volatile const` global holding the node's UDP port (a `u16`).
pub const PORT_GLOBAL: &str = "hypha_port";
/// The allowed-peers map: [`maps::PeerKey`] → [`maps::PeerValue`].
pub const MAP_ALLOWED_PEERS: &str = "allowed_peers";
/// The transit map: [`maps::TransitKey`] → [`maps::TransitValue`].
pub const MAP_TRANSIT: &str = "transit";
/// The TC-only interfaces: ifindex (`u32`) → `u32` (1). On these the TC ingress program runs
/// without XDP in front and does all of its work (`--xdp tc`, `auto` on veth).
pub const MAP_TC_ONLY: &str = "tc_only";
/// The per-CPU counters: one entry (key 0) of [`maps::XdpCounters`].
pub const MAP_COUNTERS: &str = "counters";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_is_an_aligned_bpf_elf() {
        assert_eq!(PROGRAM.as_ptr() as usize % 8, 0);
        assert_eq!(PROGRAM.get(..4), Some(&b"\x7fELF"[..]));
        // e_machine (offset 18, little endian) = EM_BPF (247).
        assert_eq!(PROGRAM.get(18..20), Some(&[247u8, 0][..]));
        // The names the loader looks up are in the object's string tables.
        for name in [
            PROGRAM_NAME,
            TC_PROGRAM_NAME,
            PORT_GLOBAL,
            MAP_ALLOWED_PEERS,
            MAP_TRANSIT,
            MAP_COUNTERS,
            MAP_TC_ONLY,
        ] {
            assert!(
                PROGRAM.windows(name.len()).any(|w| w == name.as_bytes()),
                "{name} not in the object"
            );
        }
    }
}
