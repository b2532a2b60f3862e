//! The libp2p side of the node. One task owns the `Swarm` ([`EventLoop`]); everything else uses
//! the cloneable [`Net`] handle, which sends [`Command`]s over a bounded channel and receives
//! replies on oneshot channels.
//!
//! Transport: TCP + Noise + Yamux. Behaviours, in order: connection limits (first, to bound the
//! handshake work a stranger can cause), identify, ping, the exchange protocol
//! (request-response with the bounded postcard [`ExchangeCodec`]) and pack streams
//! (libp2p-stream). mDNS and UPnP are opt-in (`mdns = true`, `upnp = true` in the config): both
//! send traffic beyond this machine, so they are off by default and in every test.
//!
//! Inbound requests are answered by [`crate::serve`] on blocking threads; at most
//! [`MAX_INBOUND`] run at once and the rest are answered `Busy` at once. Inbound pack streams
//! are accepted by a trivial loop that spawns a handler per stream (libp2p-stream drops streams
//! when its accept loop is slow).

use crate::error::NodeError;
use crate::reach::{self, GlobalOnly, Path};
use crate::serve::Server;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::core::multiaddr::Protocol;
use libp2p::core::transport::ListenerId;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, autonat, connection_limits, dcutr, identify,
    identity::Keypair, mdns, noise, ping, relay, tcp, yamux,
};
use obnam_protocol::msg::{self, ErrorCode, MAX_MESSAGE, Request, Response, WireError};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Inbound exchange requests handled at once; more are answered `Busy`.
pub const MAX_INBOUND: usize = 64;
/// Inbound pack streams handled at once.
pub const MAX_STREAMS: usize = 16;
/// Inbound connections at once, friends and strangers together. A storage node may serve
/// a hundred owners uploading at once; each connection holds at most
/// [`MAX_STREAMS_PER_CONNECTION`] exchange streams and its Yamux windows.
pub const MAX_CONNECTIONS: u32 = 256;
/// Inbound connections from nodes that are not friends, at once: strangers may only look up
/// key slots and prove owner keys, so a few dozen are plenty, and they cannot crowd out friends.
pub const MAX_STRANGER_CONNECTIONS: usize = 32;
/// Exchange streams per connection at once: with the connection limits this bounds the memory
/// a peer can make us hold in request buffers before any handler runs.
pub const MAX_STREAMS_PER_CONNECTION: usize = 8;

/// An inbound request as decoded: valid, or refused with a reason before any handler runs.
#[derive(Debug)]
pub enum Inbound {
    /// A well-formed request.
    Valid(Request),
    /// Malformed, truncated or oversized.
    Invalid(ErrorCode, String),
}

/// The exchange codec: `length (u32 LE) ‖ postcard`, bounded at [`MAX_MESSAGE`] both ways.
/// A malformed request becomes [`Inbound::Invalid`], so the sender still gets an error answer.
#[derive(Clone, Default)]
pub struct ExchangeCodec;

async fn read_len<T: futures::AsyncRead + Unpin + Send>(io: &mut T) -> std::io::Result<usize> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    Ok(u32::from_le_bytes(len) as usize)
}

impl request_response::Codec for ExchangeCodec {
    type Protocol = StreamProtocol;
    type Request = Inbound;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Inbound>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let len = match read_len(io).await {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(Inbound::Invalid(
                    ErrorCode::Malformed,
                    "truncated request: no length prefix".into(),
                ));
            }
            Err(e) => return Err(e),
        };
        if len > MAX_MESSAGE {
            return Ok(Inbound::Invalid(
                ErrorCode::TooLarge,
                format!("request of {len} bytes is over the limit of {MAX_MESSAGE}"),
            ));
        }
        let mut body = vec![0u8; len];
        match io.read_exact(&mut body).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(Inbound::Invalid(
                    ErrorCode::Malformed,
                    format!("truncated request: expected {len} bytes"),
                ));
            }
            Err(e) => return Err(e),
        }
        Ok(
            match msg::decode::<Request>("request", &body, MAX_MESSAGE) {
                Ok(r) => Inbound::Valid(r),
                Err(e) => Inbound::Invalid(ErrorCode::Malformed, e.to_string()),
            },
        )
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Response>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let len = read_len(io).await?;
        if len > MAX_MESSAGE {
            return Err(std::io::Error::other(format!(
                "response of {len} bytes is over the limit"
            )));
        }
        let mut body = vec![0u8; len];
        io.read_exact(&mut body).await?;
        msg::decode("response", &body, MAX_MESSAGE).map_err(std::io::Error::other)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Inbound,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        let Inbound::Valid(req) = req else {
            return Err(std::io::Error::other("refusing to send an invalid request"));
        };
        io.write_all(&msg::frame(&req)).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Response,
    ) -> std::io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        io.write_all(&msg::frame(&res)).await?;
        io.close().await
    }
}

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    rr: request_response::Behaviour<ExchangeCodec>,
    stream: libp2p_stream::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    upnp: Toggle<libp2p::upnp::tokio::Behaviour>,
    relay_client: relay::client::Behaviour,
    relay: Toggle<relay::Behaviour>,
    dcutr: dcutr::Behaviour,
    autonat: GlobalOnly<autonat::v2::client::Behaviour>,
    autonat_server: Toggle<autonat::v2::server::Behaviour>,
}

/// The circuit relay v2 hop protocol: a friend that announces it serves relays.
const HOP_PROTOCOL: &str = "/libp2p/circuit/relay/0.2.0/hop";

/// One open connection to a peer, as `peer list` describes it.
#[derive(Debug, Clone)]
struct Conn {
    remote: Multiaddr,
    path: Path,
    quic: bool,
}

/// What the event loop knows of the connections to one peer.
#[derive(Debug, Clone, Default)]
struct PeerConns {
    conns: HashMap<ConnectionId, Conn>,
    rtt: Option<Duration>,
}

/// How a peer is reached now, for `peer list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPath {
    /// The best open connection's path, e.g. "direct (TCP)" or "relayed via 12D3…".
    pub path: String,
    /// Its remote address.
    pub addr: String,
    /// The last ping round trip.
    pub rtt: Option<Duration>,
}

/// What the event loop is asked to do.
pub enum Command {
    /// Send an exchange request.
    Request {
        /// To whom.
        peer: PeerId,
        /// What.
        req: Request,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Response, NodeError>>,
    },
    /// Remember addresses of a peer and dial it.
    AddAddrs {
        /// The peer.
        peer: PeerId,
        /// Its addresses.
        addrs: Vec<Multiaddr>,
    },
    /// Network upkeep: relay reservations, and tries of a direct connection to friends that
    /// are reached only through a relay.
    Upkeep,
    /// Answer once a connection to `peer` is open, dialing it unless a dial is under way.
    Connect {
        /// The peer.
        peer: PeerId,
        /// `Ok` once connected; the dial's error when every dial to it failed.
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
}

/// The handle the rest of the node uses. Cheap to clone.
#[derive(Clone)]
pub struct Net {
    /// Our peer id.
    pub peer_id: PeerId,
    tx: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    addrs: Arc<Mutex<Vec<Multiaddr>>>,
    external: Arc<Mutex<Vec<Multiaddr>>>,
    connected: Arc<Mutex<HashSet<PeerId>>>,
    paths: Arc<Mutex<HashMap<PeerId, PeerConns>>>,
    unreachable: Arc<Mutex<HashSet<PeerId>>>,
    /// Woken when this node's own addresses change (listen, external or relayed).
    pub addrs_changed: Arc<tokio::sync::Notify>,
    key: Keypair,
    /// How long [`Net::connect`] waits for a connection.
    connect_timeout: Duration,
}

impl Net {
    /// Where this node can be reached now: the addresses it listens on (relayed ones
    /// included) and the external addresses confirmed by AutoNAT or set in the config.
    pub fn addrs(&self) -> Vec<Multiaddr> {
        let mut all = self.addrs.lock().map(|a| a.clone()).unwrap_or_default();
        for a in self.external.lock().map(|a| a.clone()).unwrap_or_default() {
            if !all.contains(&a) {
                all.push(a);
            }
        }
        all
    }

    /// This node's own signed address record of [`Net::addrs`].
    ///
    /// # Errors
    /// [`NodeError::Key`] when signing fails.
    pub fn own_record(&self) -> Result<crate::addrbook::Checked, NodeError> {
        crate::addrbook::make(&self.key, self.addrs())
    }

    /// How `peer` is reached now (its best open connection), if connected.
    pub fn path(&self, peer: &PeerId) -> Option<PeerPath> {
        let paths = self.paths.lock().ok()?;
        let pc = paths.get(peer)?;
        let best = pc
            .conns
            .values()
            .max_by_key(|c| (c.path.rank(c.quic), c.path == Path::HolePunched))?;
        Some(PeerPath {
            path: best.path.describe(best.quic),
            addr: best.remote.to_string(),
            rtt: pc.rtt,
        })
    }

    /// Friends that could not be dialed at any known address since the last call.
    pub fn take_unreachable(&self) -> Vec<PeerId> {
        self.unreachable
            .lock()
            .map(|mut u| u.drain().collect())
            .unwrap_or_default()
    }

    /// Asks the event loop for a network upkeep round.
    ///
    /// # Errors
    /// [`NodeError::Shutdown`].
    pub async fn upkeep(&self) -> Result<(), NodeError> {
        self.tx
            .send(Command::Upkeep)
            .await
            .map_err(|_| NodeError::Shutdown)
    }

    /// Whether a connection to `peer` is open now.
    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.connected
            .lock()
            .map(|c| c.contains(peer))
            .unwrap_or(false)
    }

    /// Sends an exchange request and waits for the answer. Dials when needed.
    /// Cancel-safe for the caller; the request may still reach the peer.
    ///
    /// # Errors
    /// [`NodeError::Net`] when the peer cannot be reached or does not answer.
    pub async fn request(&self, peer: PeerId, req: Request) -> Result<Response, NodeError> {
        self.connect(peer).await?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Request { peer, req, reply })
            .await
            .map_err(|_| NodeError::Shutdown)?;
        rx.await.map_err(|_| NodeError::Shutdown)?
    }

    /// Remembers a peer's addresses and dials it.
    ///
    /// # Errors
    /// [`NodeError::Shutdown`].
    pub async fn add_addrs(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<(), NodeError> {
        self.tx
            .send(Command::AddAddrs { peer, addrs })
            .await
            .map_err(|_| NodeError::Shutdown)
    }

    /// Opens a pack stream to `peer`.
    ///
    /// # Errors
    /// [`NodeError::Net`].
    pub async fn open_stream(&self, peer: PeerId) -> Result<libp2p::Stream, NodeError> {
        let mut control = self.control.clone();
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.connect(peer).await?;
            match control
                .open_stream(peer, StreamProtocol::new(msg::PACKS_PROTOCOL))
                .await
            {
                Ok(s) => return Ok(s),
                // The connection it picked closed under it (a better one replaced it, or the
                // peer went away): once more on whatever connection is open then.
                Err(libp2p_stream::OpenStreamError::Io(e)) if attempt < 2 => {
                    tracing::debug!(%peer, error = %e, "opening a pack stream failed; trying again");
                }
                Err(e) => {
                    return Err(NodeError::Net(format!(
                        "opening a pack stream to {peer}: {e}"
                    )));
                }
            }
        }
    }

    /// Waits until a connection to `peer` is open, dialing it if needed.
    ///
    /// The libp2p-stream and request-response behaviours dial by themselves, but they fail every
    /// pending stream and request of a peer on *any* failed dial to it, including a dial skipped
    /// because another one is under way. Connecting here first, through one dial at a time, keeps
    /// them from ever dialing.
    ///
    /// # Errors
    /// [`NodeError::Net`] when every dial failed or none connected in time.
    pub async fn connect(&self, peer: PeerId) -> Result<(), NodeError> {
        if peer == self.peer_id || self.is_connected(&peer) {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Connect { peer, reply })
            .await
            .map_err(|_| NodeError::Shutdown)?;
        match tokio::time::timeout(self.connect_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(NodeError::Shutdown),
            Err(_) => Err(NodeError::Net(format!(
                "connecting to {peer}: no connection within {:?}",
                self.connect_timeout
            ))),
        }
    }
}

/// Network settings.
pub struct NetConfig {
    /// Listen addresses.
    pub listen: Vec<String>,
    /// Idle-connection timeout.
    pub idle_timeout: Duration,
    /// Timeout of one exchange request.
    pub request_timeout: Duration,
    /// Enable mDNS.
    pub mdns: bool,
    /// Enable UPnP port mapping on the router.
    pub upnp: bool,
    /// Learn peers' addresses from identify.
    pub learn_addresses: bool,
    /// Serve circuit relay v2 to friends.
    pub relay_server: bool,
    /// Most seconds of one relayed connection.
    pub relay_circuit: Duration,
    /// Most bytes of one relayed connection.
    pub relay_circuit_bytes: u64,
    /// Answer AutoNAT v2 probes.
    pub autonat_server: bool,
    /// Friend relays to keep reservations on while not reachable directly.
    pub max_relays: usize,
    /// Between AutoNAT v2 probes.
    pub autonat_probe: Duration,
    /// Between identify exchanges.
    pub identify_interval: Duration,
    /// Addresses this node is known to be reachable at (a port forward), announced as they are.
    pub external: Vec<String>,
    /// Between pings.
    pub ping_interval: Duration,
    /// Between hole-punch tries to a friend reached only through a relay.
    pub hole_punch_retry: Duration,
    /// A ping that takes longer fails, and its connection is closed.
    pub ping_timeout: Duration,
}

/// Starts the swarm and listens. Returns once every address is bound.
///
/// # Errors
/// [`NodeError::Net`] for an unparsable or unbindable address.
pub async fn start(
    key: Keypair,
    cfg: NetConfig,
    server: Arc<Server>,
) -> Result<(Net, tokio::task::JoinHandle<()>), NodeError> {
    let peer_id = key.public().to_peer_id();
    let mdns_on = cfg.mdns;
    let upnp_on = cfg.upnp;
    let learn_addresses = cfg.learn_addresses;
    let request_timeout = cfg.request_timeout;
    let net_key = key.clone();
    let relay_server = cfg.relay_server;
    let autonat_server = cfg.autonat_server;
    let (relay_circuit, relay_circuit_bytes) = (cfg.relay_circuit, cfg.relay_circuit_bytes);
    let (autonat_probe, identify_interval) = (cfg.autonat_probe, cfg.identify_interval);
    let ping_config = ping::Config::new()
        .with_interval(cfg.ping_interval)
        .with_timeout(cfg.ping_timeout);
    let friends_only = {
        let server = Arc::clone(&server);
        move |peer: PeerId, _: &Multiaddr, _: std::time::Instant| server.is_friend(&peer)
    };
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| NodeError::Net(format!("setting up TCP: {e}")))?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| NodeError::Net(format!("setting up the relay client: {e}")))?
        .with_behaviour(|key, relay_client| {
            let mdns = if mdns_on {
                mdns::tokio::Behaviour::new(mdns::Config::default(), key.public().to_peer_id()).ok()
            } else {
                None
            };
            let relay = relay_server.then(|| {
                // Friends only: a reservation, and the source of a circuit, must be a friend
                // (checked on every request, so `peer add` and `peer remove` count at once).
                // The limits are raised from libp2p's 2 minutes and 128 KiB, which end a pack
                // transfer, and stay finite.
                let mut c = relay::Config {
                    max_circuit_duration: relay_circuit,
                    max_circuit_bytes: relay_circuit_bytes,
                    max_circuits: 64,
                    max_circuits_per_peer: 8,
                    ..relay::Config::default()
                };
                c.reservation_rate_limiters
                    .push(Box::new(friends_only.clone()));
                c.circuit_src_rate_limiters
                    .push(Box::new(friends_only.clone()));
                relay::Behaviour::new(key.public().to_peer_id(), c)
            });
            Behaviour {
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_pending_incoming(Some(16))
                        .with_max_established_incoming(Some(MAX_CONNECTIONS))
                        // A relayed connection, a hole-punched one and a direct one may meet.
                        .with_max_established_per_peer(Some(4)),
                ),
                identify: identify::Behaviour::new(
                    identify::Config::new("/obnam/id/1".into(), key.public())
                        .with_interval(identify_interval)
                        .with_push_listen_addr_updates(true)
                        // Off, identify neither caches nor offers peers' announced addresses.
                        .with_cache_size(if learn_addresses { 100 } else { 0 }),
                ),
                ping: ping::Behaviour::new(ping_config),
                rr: request_response::Behaviour::with_codec(
                    ExchangeCodec,
                    [(
                        StreamProtocol::new(msg::EXCHANGE_PROTOCOL),
                        ProtocolSupport::Full,
                    )],
                    request_response::Config::default()
                        .with_request_timeout(request_timeout)
                        .with_max_concurrent_streams(MAX_STREAMS_PER_CONNECTION),
                ),
                stream: libp2p_stream::Behaviour::new(),
                mdns: Toggle::from(mdns),
                upnp: Toggle::from(upnp_on.then(libp2p::upnp::tokio::Behaviour::default)),
                relay_client,
                relay: Toggle::from(relay),
                dcutr: dcutr::Behaviour::new(key.public().to_peer_id()),
                autonat: GlobalOnly(autonat::v2::client::Behaviour::new(
                    rand::make_rng::<rand::rngs::StdRng>(),
                    autonat::v2::client::Config::default().with_probe_interval(autonat_probe),
                )),
                autonat_server: Toggle::from(
                    autonat_server.then(autonat::v2::server::Behaviour::default),
                ),
            }
        })
        .map_err(|e| NodeError::Net(format!("setting up behaviours: {e}")))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(cfg.idle_timeout))
        .build();
    if let Some(r) = swarm.behaviour_mut().relay.as_mut() {
        // A relay refuses reservations until it knows an external address of its own; the user
        // who turned it on says friends can reach this node.
        r.set_status(Some(relay::Status::Enable));
    }
    let external = Arc::new(Mutex::new(Vec::new()));
    for a in &cfg.external {
        let addr: Multiaddr = a
            .parse()
            .map_err(|e| NodeError::Net(format!("external address {a:?}: {e}")))?;
        swarm.add_external_address(addr.clone());
        if let Ok(mut e) = external.lock() {
            e.push(addr);
        }
    }
    let mut pending = 0usize;
    for a in &cfg.listen {
        let addr: Multiaddr = a
            .parse()
            .map_err(|e| NodeError::Net(format!("listen address {a:?}: {e}")))?;
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NodeError::Net(format!("cannot listen on {addr}: {e}")))?;
        pending += 1;
    }
    let addrs = Arc::new(Mutex::new(Vec::new()));
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    let mut bound = HashSet::new();
    while bound.len() < pending {
        tokio::select! {
            _ = &mut deadline => break,
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::NewListenAddr { listener_id, address } => {
                    bound.insert(listener_id);
                    if cfg.relay_server && cfg.external.is_empty() {
                        swarm.add_external_address(address.clone());
                    }
                    if let Ok(mut a) = addrs.lock() { a.push(address); }
                }
                SwarmEvent::ListenerError { error, .. } | SwarmEvent::ListenerClosed { reason: Err(error), .. } => {
                    return Err(NodeError::Net(format!("listener failed: {error}")));
                }
                _ => {}
            }
        }
    }
    let mut control = swarm.behaviour().stream.new_control();
    let mut incoming = control
        .accept(StreamProtocol::new(msg::PACKS_PROTOCOL))
        .map_err(|e| NodeError::Net(format!("accepting pack streams: {e}")))?;
    let stream_slots = Arc::new(Semaphore::new(MAX_STREAMS));
    {
        let server = Arc::clone(&server);
        tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                // Beyond MAX_STREAMS at once, a stream is dropped (closed) rather than queued: a
                // peer that opens streams and sends nothing cannot make us hold more.
                let Ok(permit) = Arc::clone(&stream_slots).try_acquire_owned() else {
                    tracing::debug!(%peer, "too many pack streams; dropping one");
                    continue;
                };
                let server = Arc::clone(&server);
                tokio::spawn(async move {
                    server.handle_stream(peer, stream).await;
                    drop(permit);
                });
            }
        });
    }
    let (tx, rx) = mpsc::channel(256);
    let connected = Arc::new(Mutex::new(HashSet::new()));
    let paths = Arc::new(Mutex::new(HashMap::new()));
    let unreachable = Arc::new(Mutex::new(HashSet::new()));
    let addrs_changed = Arc::new(tokio::sync::Notify::new());
    let net = Net {
        peer_id,
        tx,
        control,
        addrs: Arc::clone(&addrs),
        external: Arc::clone(&external),
        connected: Arc::clone(&connected),
        paths: Arc::clone(&paths),
        unreachable: Arc::clone(&unreachable),
        addrs_changed: Arc::clone(&addrs_changed),
        key: net_key,
        connect_timeout: request_timeout,
    };
    let (resp_tx, resp_rx) = mpsc::channel(MAX_INBOUND);
    let ev = EventLoop {
        swarm,
        rx,
        resp_tx,
        resp_rx,
        server,
        pending: HashMap::new(),
        inbound: Arc::new(Semaphore::new(MAX_INBOUND)),
        addrs,
        connected,
        strangers: HashSet::new(),
        learn_addresses,
        external,
        paths,
        unreachable,
        addrs_changed,
        relay_server: cfg.relay_server,
        max_relays: cfg.max_relays,
        relays: HashMap::new(),
        reservations: HashMap::new(),
        reserved_here: HashSet::new(),
        hole_punch_retry: cfg.hole_punch_retry,
        last_punch: HashMap::new(),
        punching: HashSet::new(),
        punch_conns: HashMap::new(),
        announce_listen: cfg.relay_server && cfg.external.is_empty(),
        reserve_backoff: HashMap::new(),
        relayed_at: HashMap::new(),
        direct_addrs: HashMap::new(),
        dialing: HashMap::new(),
        connect_waiters: HashMap::new(),
    };
    Ok((net, tokio::spawn(ev.run())))
}

type Responder = (ResponseChannel<Response>, Response);

/// Owns the swarm.
pub struct EventLoop {
    swarm: libp2p::Swarm<Behaviour>,
    rx: mpsc::Receiver<Command>,
    resp_tx: mpsc::Sender<Responder>,
    resp_rx: mpsc::Receiver<Responder>,
    server: Arc<Server>,
    pending: HashMap<OutboundRequestId, oneshot::Sender<Result<Response, NodeError>>>,
    inbound: Arc<Semaphore>,
    addrs: Arc<Mutex<Vec<Multiaddr>>>,
    connected: Arc<Mutex<HashSet<PeerId>>>,
    /// Inbound connections from strangers, at most [`MAX_STRANGER_CONNECTIONS`].
    strangers: HashSet<libp2p::swarm::ConnectionId>,
    learn_addresses: bool,
    external: Arc<Mutex<Vec<Multiaddr>>>,
    paths: Arc<Mutex<HashMap<PeerId, PeerConns>>>,
    unreachable: Arc<Mutex<HashSet<PeerId>>>,
    addrs_changed: Arc<tokio::sync::Notify>,
    /// A relay server serves others and reserves nowhere itself.
    relay_server: bool,
    max_relays: usize,
    /// Friends that serve relays, and where we reach them directly.
    relays: HashMap<PeerId, Multiaddr>,
    /// Our reservations, by relay.
    reservations: HashMap<PeerId, ListenerId>,
    /// Friends holding a reservation at our relay.
    reserved_here: HashSet<PeerId>,
    /// Between two hole-punch tries to a friend reached only through a relay.
    hole_punch_retry: Duration,
    /// When hole punching to a friend was last tried again (or first seen relayed-only).
    last_punch: HashMap<PeerId, std::time::Instant>,
    /// Friends a relayed connection is being opened to, to punch again.
    punching: HashSet<PeerId>,
    /// Those extra relayed connections, and when they opened.
    punch_conns: HashMap<ConnectionId, std::time::Instant>,
    /// A relay server with no `external_addresses`: its listen addresses are announced instead.
    announce_listen: bool,
    /// Relays that refused a reservation: when to ask again, and refusals in a row.
    reserve_backoff: HashMap<PeerId, (std::time::Instant, u32)>,
    /// When a relayed connection to a peer last opened: a direct one within a minute of it is
    /// the hole punch (or a direct retry), whichever side dialed.
    relayed_at: HashMap<PeerId, std::time::Instant>,
    /// Direct (not relayed) addresses of friends, to try again while only a relay reaches them.
    direct_addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// Dials under way, whoever started them.
    dialing: HashMap<ConnectionId, PeerId>,
    /// [`Command::Connect`] callers waiting for a connection to a peer.
    connect_waiters: HashMap<PeerId, Vec<oneshot::Sender<Result<(), NodeError>>>>,
}

impl EventLoop {
    async fn run(mut self) {
        loop {
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                Some((channel, response)) = self.resp_rx.recv() => {
                    let _ = self.swarm.behaviour_mut().rr.send_response(channel, response);
                }
                ev = self.swarm.select_next_some() => self.on_event(ev),
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Request { peer, req, reply } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .rr
                    .send_request(&peer, Inbound::Valid(req));
                self.pending.insert(id, reply);
            }
            Command::AddAddrs { peer, addrs } => {
                for a in &addrs {
                    self.swarm.add_peer_address(peer, a.clone());
                    self.remember_direct(peer, a);
                }
                // A dial skipped for one under way would fail the streams and requests waiting
                // on that one (see `Net::connect`), so none is started then.
                if !self.swarm.is_connected(&peer) && !self.is_dialing(&peer) {
                    // Dial with the addresses themselves: behaviours forget an address after a
                    // failed dial, and a friend that was away comes back at the same one.
                    let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                        .addresses(addrs)
                        .condition(
                            libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing,
                        )
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        tracing::debug!(%peer, error = %e, "dial failed");
                    }
                }
            }
            Command::Upkeep => {
                self.reserve();
                self.try_direct();
            }
            Command::Connect { peer, reply } => {
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                self.connect_waiters.entry(peer).or_default().push(reply);
                if self.is_dialing(&peer) {
                    return;
                }
                let addrs = self.direct_addrs.get(&peer).cloned().unwrap_or_default();
                let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                    .addresses(addrs)
                    .extend_addresses_through_behaviour()
                    .condition(libp2p::swarm::dial_opts::PeerCondition::DisconnectedAndNotDialing)
                    .build();
                match self.swarm.dial(opts) {
                    Ok(()) | Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {}
                    Err(e) => self.wake_waiters(peer, Err(format!("{e}"))),
                }
            }
        }
    }

    fn is_dialing(&self, peer: &PeerId) -> bool {
        self.dialing.values().any(|p| p == peer)
    }

    /// Answers the [`Command::Connect`] callers waiting for `peer`.
    fn wake_waiters(&mut self, peer: PeerId, result: Result<(), String>) {
        for w in self.connect_waiters.remove(&peer).unwrap_or_default() {
            let _ = w.send(
                result
                    .clone()
                    .map_err(|e| NodeError::Net(format!("connecting to {peer}: {e}"))),
            );
        }
    }

    /// Remembers a direct address of a friend (at most 8 per friend, newest last).
    fn remember_direct(&mut self, peer: PeerId, addr: &Multiaddr) {
        if reach::is_relayed(addr) {
            return;
        }
        let list = self.direct_addrs.entry(peer).or_default();
        list.retain(|a| a != addr);
        list.push(addr.clone());
        if list.len() > 8 {
            list.remove(0);
        }
    }

    /// Reachable directly: a relay server, or an external address confirmed by AutoNAT or
    /// configured (relayed addresses do not count; they never enter `external`).
    fn reachable(&self) -> bool {
        self.relay_server || self.external.lock().is_ok_and(|e| !e.is_empty())
    }

    /// Keeps reservations on up to `max_relays` friend relays while this node is not known to
    /// be reachable directly.
    fn reserve(&mut self) {
        if self.reachable() || self.max_relays == 0 {
            return;
        }
        let server = Arc::clone(&self.server);
        self.relays.retain(|peer, _| server.is_friend(peer));
        let now = std::time::Instant::now();
        let candidates: Vec<(PeerId, Multiaddr)> = self
            .relays
            .iter()
            .filter(|(p, _)| !self.reservations.contains_key(p))
            .filter(|(p, _)| self.reserve_backoff.get(p).is_none_or(|(at, _)| *at <= now))
            .map(|(p, a)| (*p, a.clone()))
            .collect();
        for (relay, addr) in candidates {
            if self.reservations.len() >= self.max_relays {
                break;
            }
            let circuit = addr.with(Protocol::P2p(relay)).with(Protocol::P2pCircuit);
            match self.swarm.listen_on(circuit.clone()) {
                Ok(id) => {
                    tracing::info!(%relay, address = %circuit, "reserving a relay slot at a friend");
                    self.reservations.insert(relay, id);
                }
                Err(e) => tracing::debug!(%relay, error = %e, "cannot reserve at relay"),
            }
        }
        let held: Vec<PeerId> = self.reservations.keys().copied().collect();
        for relay in held {
            self.both_transports(relay);
        }
    }

    /// Keeps a direct TCP and a direct QUIC connection to a relay we hold a reservation at, so
    /// that identify on each tells us our public address for both transports: DCUtR can only
    /// punch holes for the transports it has such an address of (QUIC first, then TCP).
    fn both_transports(&mut self, relay: PeerId) {
        let (mut tcp, mut quic) = (false, false);
        if let Ok(p) = self.paths.lock()
            && let Some(pc) = p.get(&relay)
        {
            for c in pc.conns.values() {
                if !matches!(c.path, Path::Relayed { .. }) {
                    if c.quic {
                        quic = true;
                    } else {
                        tcp = true;
                    }
                }
            }
        }
        let addrs = self.direct_addrs.get(&relay).cloned().unwrap_or_default();
        for (missing, want_quic) in [(!tcp, false), (!quic, true)] {
            if !missing {
                continue;
            }
            let Some(addr) = addrs
                .iter()
                .rev()
                .find(|a| reach::is_quic(a) == want_quic)
                .cloned()
            else {
                continue;
            };
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(relay)
                .addresses(vec![addr])
                .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
                .build();
            let _ = self.swarm.dial(opts);
        }
    }

    /// Friends reached only through a relay: try their direct addresses again.
    fn try_direct(&mut self) {
        let relayed_only: Vec<PeerId> = match self.paths.lock() {
            Ok(p) => p
                .iter()
                .filter(|(_, pc)| {
                    !pc.conns.is_empty()
                        && pc
                            .conns
                            .values()
                            .all(|c| matches!(c.path, Path::Relayed { .. }))
                })
                .map(|(p, _)| *p)
                .collect(),
            Err(_) => return,
        };
        let now = std::time::Instant::now();
        // Extra relayed connections made to punch again have done their work after 30 s.
        let done: Vec<ConnectionId> = self
            .punch_conns
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= Duration::from_secs(30))
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            self.punch_conns.remove(&id);
            self.swarm.close_connection(id);
        }
        for peer in relayed_only.iter().copied() {
            self.punch_again(peer, now);
        }
        for peer in relayed_only {
            let Some(addrs) = self.direct_addrs.get(&peer).cloned() else {
                continue;
            };
            if addrs.is_empty() {
                continue;
            }
            tracing::debug!(%peer, "trying a direct connection to a friend reached through a relay");
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(libp2p::swarm::dial_opts::PeerCondition::NotDialing)
                .build();
            let _ = self.swarm.dial(opts);
        }
    }

    /// A friend still reached only through a relay, `hole_punch_retry` after the last try:
    /// opens a second relayed connection to it, which makes its side (the reservation holder)
    /// run DCUtR again. The extra connection is closed 30 s later (`try_direct`).
    fn punch_again(&mut self, peer: PeerId, now: std::time::Instant) {
        let last = *self.last_punch.entry(peer).or_insert(now);
        if now.duration_since(last) < self.hole_punch_retry {
            return;
        }
        // A circuit address we dialed (the listener side sees only `/p2p/<peer>`).
        let circuit = self.paths.lock().ok().and_then(|p| {
            p.get(&peer).and_then(|pc| {
                pc.conns
                    .values()
                    .map(|c| &c.remote)
                    .find(|a| reach::is_relayed(a) && reach::ip_of(a).is_some())
                    .cloned()
            })
        });
        let Some(addr) = circuit else { return };
        self.last_punch.insert(peer, now);
        tracing::info!(%peer, "trying hole punching again through a new relayed connection");
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
            .addresses(vec![addr])
            .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %e, "cannot open another relayed connection");
        } else {
            self.punching.insert(peer);
        }
    }

    fn set_path(&mut self, peer: PeerId, id: ConnectionId, conn: Conn) {
        if let Ok(mut p) = self.paths.lock() {
            p.entry(peer).or_default().conns.insert(id, conn);
        }
        self.prune(peer);
    }

    /// Once a better connection to `peer` is open, closes the worse ones: relayed ones when a
    /// direct one is open, QUIC ones when a TCP one is (TCP costs less CPU per byte for bulk
    /// transfer). Connections of the same rank are left alone, so both ends never close both.
    fn prune(&mut self, peer: PeerId) {
        // Between a relay and the friends that reserve at it both transports stay open (see
        // `both_transports`); only relayed connections give way there.
        let keep_both = self.relays.contains_key(&peer) || self.reserved_here.contains(&peer);
        let close: Vec<ConnectionId> = match self.paths.lock() {
            Ok(p) => match p.get(&peer) {
                Some(pc) => {
                    let best = pc
                        .conns
                        .values()
                        .map(|c| c.path.rank(c.quic && !keep_both))
                        .max()
                        .unwrap_or(0);
                    pc.conns
                        .iter()
                        .filter(|(_, c)| c.path.rank(c.quic && !keep_both) < best)
                        .map(|(id, _)| *id)
                        .collect()
                }
                None => Vec::new(),
            },
            Err(_) => Vec::new(),
        };
        for id in close {
            tracing::debug!(%peer, "closing a connection now that a better one is open");
            self.swarm.close_connection(id);
        }
    }

    fn note_addrs_changed(&self) {
        self.addrs_changed.notify_one();
    }

    fn on_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                if self.announce_listen && !reach::is_relayed(&address) {
                    // A relay hands its external addresses to friends in every reservation; its
                    // owner, who turned it on without naming any, says friends reach it here.
                    self.swarm.add_external_address(address.clone());
                }
                if let Ok(mut a) = self.addrs.lock()
                    && !a.contains(&address)
                {
                    a.push(address);
                }
                self.note_addrs_changed();
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                if let Ok(mut a) = self.addrs.lock() {
                    a.retain(|x| x != &address);
                }
                self.note_addrs_changed();
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
                ..
            } => {
                if let Ok(mut a) = self.addrs.lock() {
                    a.retain(|x| !addresses.contains(x));
                }
                let relay = self
                    .reservations
                    .iter()
                    .find(|(_, id)| **id == listener_id)
                    .map(|(p, _)| *p);
                if let Some(relay) = relay {
                    // Reserved again at an upkeep round: at once after a closed connection, and
                    // after 2, 4, 8 … up to 300 s after refusals in a row, so a relay that does
                    // not (yet) count us as a friend is not hammered into its rate limits.
                    self.reservations.remove(&relay);
                    tracing::info!(%relay, ?reason, "relay reservation closed");
                    if reason.is_err() {
                        let (_, fails) = self
                            .reserve_backoff
                            .get(&relay)
                            .copied()
                            .unwrap_or((std::time::Instant::now(), 0));
                        let wait = Duration::from_secs((2u64 << fails.min(8)).min(300));
                        self.reserve_backoff
                            .insert(relay, (std::time::Instant::now() + wait, fails + 1));
                    }
                }
                self.note_addrs_changed();
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "external address confirmed");
                if let Ok(mut e) = self.external.lock()
                    && !e.contains(&address)
                    && !reach::is_relayed(&address)
                {
                    e.push(address);
                }
                self.note_addrs_changed();
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                if let Ok(mut e) = self.external.lock() {
                    e.retain(|x| x != &address);
                }
                self.note_addrs_changed();
            }
            SwarmEvent::Dialing {
                peer_id: Some(peer),
                connection_id,
            } => {
                self.dialing.insert(connection_id, peer);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                self.dialing.remove(&connection_id);
                self.wake_waiters(peer_id, Ok(()));
                if endpoint.is_listener() && !self.server.is_friend(&peer_id) {
                    if self.strangers.len() >= MAX_STRANGER_CONNECTIONS {
                        tracing::debug!(peer = %peer_id, "too many connections from strangers; closing one");
                        self.swarm.close_connection(connection_id);
                        return;
                    }
                    self.strangers.insert(connection_id);
                }
                let relayed = endpoint.is_relayed();
                let remote = endpoint.get_remote_address().clone();
                // A direct connection that opens while the peer is reached through a relay is
                // the upgrade: DCUtR's hole punch (it names only one of the connections it
                // makes), or a direct retry.
                let now = std::time::Instant::now();
                if relayed {
                    self.relayed_at.insert(peer_id, now);
                }
                self.relayed_at
                    .retain(|_, t| now.duration_since(*t) < Duration::from_secs(60));
                let upgrade = !relayed
                    && (self.relayed_at.contains_key(&peer_id)
                        || self.paths.lock().ok().is_some_and(|p| {
                            p.get(&peer_id).is_some_and(|pc| {
                                pc.conns
                                    .values()
                                    .any(|c| matches!(c.path, Path::Relayed { .. }))
                            })
                        }));
                let path = reach::classify(&remote, relayed, upgrade);
                tracing::debug!(peer = %peer_id, %remote, ?path, "connected");
                if let Ok(mut c) = self.connected.lock() {
                    c.insert(peer_id);
                }
                if endpoint.is_dialer() && !relayed && self.server.is_friend(&peer_id) {
                    self.remember_direct(peer_id, &remote);
                }
                let quic = reach::is_quic(&remote);
                if relayed && self.punching.remove(&peer_id) {
                    self.punch_conns.insert(connection_id, now);
                }
                self.set_path(peer_id, connection_id, Conn { remote, path, quic });
                self.server.on_connected(peer_id);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                endpoint,
                ..
            } => {
                tracing::debug!(peer = %peer_id, remote = %endpoint.get_remote_address(), ?cause, "connection closed");
                self.strangers.remove(&connection_id);
                self.punch_conns.remove(&connection_id);
                if let Ok(mut p) = self.paths.lock()
                    && let Some(pc) = p.get_mut(&peer_id)
                {
                    pc.conns.remove(&connection_id);
                    if pc.conns.is_empty() {
                        p.remove(&peer_id);
                    }
                }
                if num_established == 0 {
                    tracing::debug!(peer = %peer_id, "disconnected");
                    if let Ok(mut c) = self.connected.lock() {
                        c.remove(&peer_id);
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                connection_id,
            } => {
                tracing::debug!(%peer, %error, "outgoing connection failed");
                self.dialing.remove(&connection_id);
                if !self.swarm.is_connected(&peer) && !self.is_dialing(&peer) {
                    self.wake_waiters(peer, Err(error.to_string()));
                }
                if !self.swarm.is_connected(&peer)
                    && self.server.is_friend(&peer)
                    && let Ok(mut u) = self.unreachable.lock()
                {
                    u.insert(peer);
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: None,
                connection_id,
                ..
            } => {
                self.dialing.remove(&connection_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rr(ev)) => self.on_rr(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                connection_id,
                info,
                ..
            })) => {
                if !self.server.is_friend(&peer_id) {
                    return;
                }
                // Learn where a friend listens, so we can reach it again after it restarts.
                if self.learn_addresses {
                    for a in &info.listen_addrs {
                        self.swarm.add_peer_address(peer_id, a.clone());
                        if reach::is_global(a) {
                            self.remember_direct(peer_id, a);
                        }
                    }
                }
                // A friend that serves relays, reached directly: a candidate for a reservation.
                let serves_relay = info.protocols.iter().any(|p| p.as_ref() == HOP_PROTOCOL);
                let direct = self.paths.lock().ok().and_then(|p| {
                    p.get(&peer_id)
                        .and_then(|pc| pc.conns.get(&connection_id))
                        .filter(|c| !matches!(c.path, Path::Relayed { .. }))
                        .map(|c| c.remote.clone())
                });
                if serves_relay && let Some(addr) = direct {
                    let addr: Multiaddr = addr
                        .iter()
                        .filter(|p| !matches!(p, Protocol::P2p(_)))
                        .collect();
                    let known = self.relays.insert(peer_id, addr).is_some();
                    if !known {
                        self.reserve();
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(id) => {
                    tracing::info!(peer = %remote_peer_id, "hole punching made a direct connection");
                    let conn = self.paths.lock().ok().and_then(|p| {
                        p.get(&remote_peer_id)
                            .and_then(|pc| pc.conns.get(&id).cloned())
                    });
                    if let Some(mut c) = conn {
                        c.path = Path::HolePunched;
                        self.set_path(remote_peer_id, id, c);
                    }
                }
                Err(e) => {
                    tracing::info!(peer = %remote_peer_id, error = %e, "hole punching failed; staying on the relay");
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            })) => {
                if let Ok(mut p) = self.paths.lock()
                    && let Some(pc) = p.get_mut(&peer)
                {
                    pc.rtt = Some(rtt);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(e),
            })) => {
                if !matches!(e, ping::Failure::Unsupported) {
                    tracing::info!(%peer, error = %e, "ping failed; closing the connection");
                    self.swarm.close_connection(connection);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(ev)) => {
                tracing::debug!(?ev, "relay client");
                if let relay::client::Event::ReservationReqAccepted { relay_peer_id, .. } = ev {
                    self.reserve_backoff.remove(&relay_peer_id);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Relay(ev)) => {
                tracing::debug!(?ev, "relay");
                match ev {
                    relay::Event::ReservationReqAccepted { src_peer_id, .. } => {
                        self.reserved_here.insert(src_peer_id);
                    }
                    relay::Event::ReservationClosed { src_peer_id }
                    | relay::Event::ReservationTimedOut { src_peer_id } => {
                        self.reserved_here.remove(&src_peer_id);
                    }
                    _ => {}
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Autonat(ev)) => {
                tracing::debug!(address = %ev.tested_addr, server = %ev.server, ok = ev.result.is_ok(), "AutoNAT probe");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (peer, addr) in list {
                    self.swarm.add_peer_address(peer, addr);
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

    fn on_rr(&mut self, ev: request_response::Event<Inbound, Response>) {
        match ev {
            request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let Ok(permit) = Arc::clone(&self.inbound).try_acquire_owned() else {
                    let busy = Response::Error(WireError {
                        code: ErrorCode::Busy,
                        message: "too many requests in progress".into(),
                        available: None,
                    });
                    let _ = self.swarm.behaviour_mut().rr.send_response(channel, busy);
                    return;
                };
                let server = Arc::clone(&self.server);
                let tx = self.resp_tx.clone();
                tokio::spawn(async move {
                    let response =
                        tokio::task::spawn_blocking(move || server.handle_request(peer, request))
                            .await
                            .unwrap_or_else(|e| {
                                Response::Error(WireError {
                                    code: ErrorCode::Internal,
                                    message: format!("handler failed: {e}"),
                                    available: None,
                                })
                            });
                    let _ = tx.send((channel, response)).await;
                    drop(permit);
                });
            }
            request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.pending.remove(&request_id) {
                    let _ = reply.send(Err(NodeError::Net(format!(
                        "request to {peer} failed: {error}"
                    ))));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}
