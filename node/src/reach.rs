//! Reachability helpers for [`crate::net`]: which addresses are worth probing from outside,
//! how a connection reaches a friend (LAN, direct, hole-punched or relayed), and a wrapper that
//! keeps AutoNAT v2 from probing addresses nobody outside can dial.

use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, multiaddr::Protocol};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};
use std::net::IpAddr;
use std::task::{Context, Poll};

/// The IP address an address starts with, if any.
pub fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(a) => Some(IpAddr::V4(a)),
        Protocol::Ip6(a) => Some(IpAddr::V6(a)),
        _ => None,
    })
}

/// Whether `ip` is only meaningful inside one host or one site: loopback, unspecified,
/// RFC 1918 private, carrier-grade NAT (100.64/10), link-local, broadcast, IPv6 unique-local.
pub fn is_local_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            a.is_loopback()
                || a.is_unspecified()
                || a.is_private()
                || a.is_link_local()
                || a.is_broadcast()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            a.is_loopback()
                || a.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
        }
    }
}

/// Whether `addr` is a relayed (`p2p-circuit`) address.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// Whether a friend elsewhere could dial `addr`: an IP that is not local, and not relayed.
pub fn is_global(addr: &Multiaddr) -> bool {
    !is_relayed(addr) && ip_of(addr).is_some_and(|ip| !is_local_ip(ip))
}

/// The relay a relayed address goes through (the peer id before `p2p-circuit`).
pub fn relay_of(addr: &Multiaddr) -> Option<PeerId> {
    let mut last = None;
    for p in addr.iter() {
        match p {
            Protocol::P2p(id) => last = Some(id),
            Protocol::P2pCircuit => return last,
            _ => {}
        }
    }
    None
}

/// Whether `addr` is QUIC.
pub fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
}

/// How one connection reaches a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Path {
    /// A local address (LAN, or this machine).
    Lan,
    /// A public address, dialed or accepted directly.
    Direct,
    /// Made by hole punching (DCUtR) after a relayed connection.
    HolePunched,
    /// Through a relay.
    Relayed {
        /// The relay's peer id.
        via: Option<PeerId>,
    },
}

impl Path {
    /// Ranks paths for choosing which connections to keep: higher is better.
    pub fn rank(&self, quic: bool) -> u8 {
        match self {
            Path::Relayed { .. } => 0,
            // Prefer TCP for bulk transfer: QUIC costs more CPU per byte.
            _ if quic => 1,
            _ => 2,
        }
    }

    /// The path as `peer list` shows it.
    pub fn describe(&self, quic: bool) -> String {
        let t = if quic { "QUIC" } else { "TCP" };
        match self {
            Path::Lan => format!("LAN ({t})"),
            Path::Direct => format!("direct ({t})"),
            Path::HolePunched => format!("hole-punched ({t})"),
            Path::Relayed { via: Some(r) } => format!("relayed via {r}"),
            Path::Relayed { via: None } => "relayed".into(),
        }
    }
}

/// Classifies a connection by its remote address (`hole_punched`: DCUtR made it).
pub fn classify(remote: &Multiaddr, relayed: bool, hole_punched: bool) -> Path {
    if relayed {
        Path::Relayed {
            via: relay_of(remote),
        }
    } else if hole_punched {
        Path::HolePunched
    } else if ip_of(remote).is_some_and(is_local_ip) {
        Path::Lan
    } else {
        Path::Direct
    }
}

/// Wraps a behaviour and hides candidate external addresses that nobody outside could dial
/// (loopback, private, link-local, relayed) from it. Used for the AutoNAT v2 client, which
/// would otherwise ask a server to dial our LAN address back (it filters nothing itself).
pub struct GlobalOnly<B>(pub B);

impl<B: NetworkBehaviour> NetworkBehaviour for GlobalOnly<B> {
    type ConnectionHandler = B::ConnectionHandler;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        id: ConnectionId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.0.handle_pending_inbound_connection(id, local, remote)
    }

    fn handle_established_inbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0
            .handle_established_inbound_connection(id, peer, local, remote)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: Option<PeerId>,
        addresses: &[Multiaddr],
        role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.0
            .handle_pending_outbound_connection(id, peer, addresses, role)
    }

    fn handle_established_outbound_connection(
        &mut self,
        id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.0
            .handle_established_outbound_connection(id, peer, addr, role, port_use)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        if let FromSwarm::NewExternalAddrCandidate(c) = &event
            && !is_global(c.addr)
        {
            return;
        }
        self.0.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.0.on_connection_handler_event(peer, id, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.0.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn local_and_global_addresses() {
        for local in [
            "/ip4/127.0.0.1/tcp/1",
            "/ip4/10.0.1.2/tcp/1",
            "/ip4/192.168.1.9/udp/1/quic-v1",
            "/ip4/172.20.0.1/tcp/1",
            "/ip4/100.100.0.1/tcp/1",
            "/ip4/169.254.3.4/tcp/1",
            "/ip6/::1/tcp/1",
            "/ip6/fd00::1/tcp/1",
            "/ip6/fe80::1/tcp/1",
            "/ip4/198.51.100.1/tcp/1/p2p/12D3KooWPjceQrSwdWXPyLLeABRXmuqt69Rg3sBYbU1Nft9HyQ6X/p2p-circuit",
        ] {
            assert!(!is_global(&a(local)), "{local}");
        }
        for global in [
            "/ip4/198.51.100.1/tcp/4411",
            "/ip4/8.8.8.8/udp/1/quic-v1",
            "/ip6/2001:db8::1/tcp/1",
        ] {
            assert!(is_global(&a(global)), "{global}");
        }
    }

    #[test]
    fn paths_are_classified_and_ranked() {
        let relay: PeerId = "12D3KooWPjceQrSwdWXPyLLeABRXmuqt69Rg3sBYbU1Nft9HyQ6X"
            .parse()
            .unwrap();
        let circuit = a(&format!(
            "/ip4/198.51.100.1/tcp/4411/p2p/{relay}/p2p-circuit"
        ));
        assert_eq!(relay_of(&circuit), Some(relay));
        assert_eq!(
            classify(&circuit, true, false),
            Path::Relayed { via: Some(relay) }
        );
        assert_eq!(classify(&a("/ip4/10.0.0.2/tcp/1"), false, false), Path::Lan);
        assert_eq!(
            classify(&a("/ip4/198.51.100.9/tcp/1"), false, false),
            Path::Direct
        );
        assert_eq!(
            classify(&a("/ip4/198.51.100.9/tcp/1"), false, true),
            Path::HolePunched
        );
        assert!(Path::Direct.rank(false) > Path::Direct.rank(true));
        assert!(Path::HolePunched.rank(true) > Path::Relayed { via: None }.rank(false));
        assert!(
            Path::Relayed { via: Some(relay) }
                .describe(false)
                .contains(&relay.to_string())
        );
    }
}
