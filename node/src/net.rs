//! The libp2p side of the node: one task owns the `Swarm`.
//!
//! Transport: TCP + Noise + Yamux. Behaviours: connection limits (first, to bound the handshake
//! work a stranger can cause), identify and ping. mDNS stays off (the friends issue adds it as
//! an opt-in). The exchange protocol with friends is added by the friends issue; this module
//! already gives the node its identity and listen addresses, which `obnam id` reports.

use crate::error::NodeError;
use futures::StreamExt;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, connection_limits, identify, identity::Keypair, noise, ping, tcp, yamux,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The node's behaviours.
#[allow(missing_docs)]
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

/// What the rest of the node may know of the network.
#[derive(Clone)]
pub struct NetInfo {
    /// Our peer id.
    pub peer_id: PeerId,
    addrs: Arc<Mutex<Vec<Multiaddr>>>,
}

impl NetInfo {
    /// The addresses we listen on now.
    pub fn addrs(&self) -> Vec<Multiaddr> {
        self.addrs.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

/// Starts the swarm and listens on `listen`. Returns once every address is bound.
///
/// # Errors
/// [`NodeError::Net`] for an unparsable or unbindable address.
pub async fn start(
    key: Keypair,
    listen: &[String],
    idle_timeout: Duration,
) -> Result<(NetInfo, tokio::task::JoinHandle<()>), NodeError> {
    let peer_id = key.public().to_peer_id();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| NodeError::Net(format!("setting up TCP: {e}")))?
        .with_behaviour(|key| Behaviour {
            limits: connection_limits::Behaviour::new(
                connection_limits::ConnectionLimits::default()
                    .with_max_pending_incoming(Some(16))
                    .with_max_established_incoming(Some(64))
                    .with_max_established_per_peer(Some(2)),
            ),
            identify: identify::Behaviour::new(identify::Config::new(
                "/obnam/id/1".into(),
                key.public(),
            )),
            ping: ping::Behaviour::default(),
        })
        .map_err(|e| NodeError::Net(format!("setting up behaviours: {e}")))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle_timeout))
        .build();
    let mut pending = 0usize;
    for a in listen {
        let addr: Multiaddr = a
            .parse()
            .map_err(|e| NodeError::Net(format!("listen address {a:?}: {e}")))?;
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NodeError::Net(format!("cannot listen on {addr}: {e}")))?;
        pending += 1;
    }
    let addrs = Arc::new(Mutex::new(Vec::new()));
    // Wait until every listener reported an address (or failed), so `obnam id` is complete.
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    let mut bound = std::collections::HashSet::new();
    while bound.len() < pending {
        tokio::select! {
            _ = &mut deadline => break,
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::NewListenAddr { listener_id, address } => {
                    bound.insert(listener_id);
                    if let Ok(mut a) = addrs.lock() { a.push(address); }
                }
                SwarmEvent::ListenerError { error, .. } | SwarmEvent::ListenerClosed { reason: Err(error), .. } => {
                    return Err(NodeError::Net(format!("listener failed: {error}")));
                }
                _ => {}
            }
        }
    }
    let info = NetInfo {
        peer_id,
        addrs: Arc::clone(&addrs),
    };
    let task = tokio::spawn(async move {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::NewListenAddr { address, .. } => {
                    tracing::info!(%address, "listening");
                    if let Ok(mut a) = addrs.lock() {
                        a.push(address);
                    }
                }
                SwarmEvent::ExpiredListenAddr { address, .. } => {
                    if let Ok(mut a) = addrs.lock() {
                        a.retain(|x| x != &address);
                    }
                }
                SwarmEvent::IncomingConnectionError {
                    send_back_addr,
                    error,
                    ..
                } => {
                    tracing::debug!(%send_back_addr, %error, "incoming connection failed");
                }
                other => tracing::trace!(?other, "swarm event"),
            }
        }
    });
    Ok((info, task))
}
