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
use crate::serve::Server;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent, behaviour::toggle::Toggle};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, connection_limits, identify, identity::Keypair, mdns, noise,
    ping, tcp, yamux,
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
}

/// The handle the rest of the node uses. Cheap to clone.
#[derive(Clone)]
pub struct Net {
    /// Our peer id.
    pub peer_id: PeerId,
    tx: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    addrs: Arc<Mutex<Vec<Multiaddr>>>,
    connected: Arc<Mutex<HashSet<PeerId>>>,
}

impl Net {
    /// The addresses we listen on now.
    pub fn addrs(&self) -> Vec<Multiaddr> {
        self.addrs.lock().map(|a| a.clone()).unwrap_or_default()
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
        control
            .open_stream(peer, StreamProtocol::new(msg::PACKS_PROTOCOL))
            .await
            .map_err(|e| NodeError::Net(format!("opening a pack stream to {peer}: {e}")))
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
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| NodeError::Net(format!("setting up TCP: {e}")))?
        .with_behaviour(|key| {
            let mdns = if mdns_on {
                mdns::tokio::Behaviour::new(mdns::Config::default(), key.public().to_peer_id()).ok()
            } else {
                None
            };
            Behaviour {
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_pending_incoming(Some(16))
                        .with_max_established_incoming(Some(MAX_CONNECTIONS))
                        .with_max_established_per_peer(Some(2)),
                ),
                identify: identify::Behaviour::new(
                    identify::Config::new("/obnam/id/1".into(), key.public())
                        // Off, identify neither caches nor offers peers' announced addresses.
                        .with_cache_size(if learn_addresses { 100 } else { 0 }),
                ),
                ping: ping::Behaviour::default(),
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
            }
        })
        .map_err(|e| NodeError::Net(format!("setting up behaviours: {e}")))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(cfg.idle_timeout))
        .build();
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
    let net = Net {
        peer_id,
        tx,
        control,
        addrs: Arc::clone(&addrs),
        connected: Arc::clone(&connected),
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
                }
                if !self.swarm.is_connected(&peer) {
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
        }
    }

    fn on_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                if let Ok(mut a) = self.addrs.lock() {
                    a.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                if let Ok(mut a) = self.addrs.lock() {
                    a.retain(|x| x != &address);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                if endpoint.is_listener() && !self.server.is_friend(&peer_id) {
                    if self.strangers.len() >= MAX_STRANGER_CONNECTIONS {
                        tracing::debug!(peer = %peer_id, "too many connections from strangers; closing one");
                        self.swarm.close_connection(connection_id);
                        return;
                    }
                    self.strangers.insert(connection_id);
                }
                tracing::debug!(peer = %peer_id, "connected");
                if let Ok(mut c) = self.connected.lock() {
                    c.insert(peer_id);
                }
                self.server.on_connected(peer_id);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                self.strangers.remove(&connection_id);
                if num_established == 0 {
                    tracing::debug!(peer = %peer_id, "disconnected");
                    if let Ok(mut c) = self.connected.lock() {
                        c.remove(&peer_id);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rr(ev)) => self.on_rr(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                // Learn where a peer listens, so we can reach it again after it restarts.
                if self.learn_addresses && self.server.is_friend(&peer_id) {
                    for a in info.listen_addrs {
                        self.swarm.add_peer_address(peer_id, a);
                    }
                }
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
