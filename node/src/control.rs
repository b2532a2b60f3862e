//! The control socket: how `obnam` talks to `obnam-node`.
//!
//! The server accepts at most [`MAX_CONNECTIONS`] connections at once. Each connection carries
//! one [`Request`] and receives [`Event`]s until a final `Done` or `Failed` (framing in
//! [`obnam_protocol::control`]). Work runs on blocking threads; its events travel through a
//! bounded channel (progress is dropped when the client reads slowly, warnings are not).
//! A client that disconnects does not stop a running backup.

use crate::backup::{self, Events};
use crate::config::Paths;
use crate::error::NodeError;
use crate::keys;
use crate::net::NetInfo;
use crate::repo::Repo;
use crate::restore;
use obnam_protocol::control::{
    self, ControlError, Event, IdReply, InitReply, Reply, Request, SnapshotInfo, StatusReply,
};
use obnam_protocol::ticket::Ticket;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Mutex, Semaphore, mpsc};

/// Most control connections served at once.
pub const MAX_CONNECTIONS: usize = 32;

/// What the control server needs.
pub struct Daemon {
    /// The repository.
    pub repo: Repo,
    /// The network.
    pub net: NetInfo,
    /// Held by the running backup.
    pub backup_lock: Mutex<()>,
}

struct ChanEvents(mpsc::Sender<Event>);

impl Events for ChanEvents {
    fn send(&self, event: Event) {
        match event {
            Event::Progress(_) => {
                let _ = self.0.try_send(event);
            }
            other => {
                let _ = self.0.blocking_send(other);
            }
        }
    }
}

async fn read_frame<T: serde::de::DeserializeOwned>(
    r: &mut (impl AsyncReadExt + Unpin),
    what: &'static str,
) -> Result<Option<T>, NodeError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(NodeError::Control(format!("reading {what}: {e}"))),
    }
    let len = control::frame_len(len).map_err(|e| NodeError::Control(e.to_string()))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .await
        .map_err(|e| NodeError::Control(format!("reading {what}: {e}")))?;
    control::decode_body(what, &body)
        .map(Some)
        .map_err(|e| NodeError::Control(e.to_string()))
}

/// Accepts control connections until the listener fails.
pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let daemon = Arc::clone(&daemon);
        tokio::spawn(async move {
            handle(stream, daemon).await;
            drop(permit);
        });
    }
}

async fn handle(stream: UnixStream, daemon: Arc<Daemon>) {
    let (mut rd, mut wr) = stream.into_split();
    let req: Request = match read_frame(&mut rd, "control request").await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            let ev = Event::Failed(ControlError {
                kind: "bad_request".into(),
                message: e.to_string(),
            });
            let _ = wr.write_all(&control::frame(&ev)).await;
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let result = dispatch(&daemon, req, tx.clone()).await;
        let ev = match result {
            Ok(reply) => Event::Done(reply),
            Err(e) => Event::Failed(ControlError {
                kind: e.kind().into(),
                message: e.full_message(),
            }),
        };
        let _ = tx.send(ev).await;
    });
    let mut client_gone = false;
    while let Some(ev) = rx.recv().await {
        if !client_gone && wr.write_all(&control::frame(&ev)).await.is_err() {
            // Keep draining: the work goes on without its client.
            client_gone = true;
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NodeError::Control(format!("worker failed: {e}")))?
}

async fn dispatch(
    daemon: &Arc<Daemon>,
    req: Request,
    tx: mpsc::Sender<Event>,
) -> Result<Reply, NodeError> {
    let repo = daemon.repo.clone();
    match req {
        Request::Id => {
            let addrs = daemon.net.addrs();
            let ticket = Ticket { peer_id: daemon.net.peer_id, addrs: addrs.clone() }.encode();
            Ok(Reply::Id(IdReply {
                peer_id: daemon.net.peer_id.to_string(),
                addrs: addrs.iter().map(ToString::to_string).collect(),
                ticket,
            }))
        }
        Request::Init(init) => {
            blocking(move || {
                let path = repo.paths.secrets();
                if let Ok(existing) = keys::load_secrets(&path) {
                    return Err(NodeError::AlreadyInitialized { name: existing.name.clone() });
                }
                if init.name.trim().is_empty() {
                    return Err(NodeError::Usage("the owner name must not be empty".into()));
                }
                if init.passphrase.is_empty() {
                    return Err(NodeError::WeakPassphrase { reason: "it is empty".into() });
                }
                if !init.weak_ok {
                    keys::check_strength(&init.passphrase, &init.name)?;
                }
                let owner = keys::init(&path, &init.name, &init.passphrase)?;
                tracing::info!(name = %owner.name, owner = %owner.keys.owner_id(), "owner keys created");
                Ok(Reply::Init(InitReply { name: owner.name.clone(), owner: owner.keys.owner_id() }))
            })
            .await
        }
        Request::CheckPassphrase { passphrase } => {
            blocking(move || keys::check_passphrase(&repo.paths.secrets(), &passphrase).map(|name| Reply::PassphraseOk { name })).await
        }
        Request::Backup(req) => {
            // Fail fast on a bad secrets file rather than after waiting for the lock.
            let check = repo.clone();
            blocking(move || check.owner().map(|_| ())).await?;
            let _guard = match daemon.backup_lock.try_lock() {
                Ok(g) => g,
                Err(_) => {
                    let _ = tx.send(Event::Notice("another backup is running on this node; waiting for it to finish".into())).await;
                    daemon.backup_lock.lock().await
                }
            };
            let events = ChanEvents(tx);
            blocking(move || backup::backup(&repo, &req, &events).map(Reply::Backup)).await
        }
        Request::Snapshots => blocking(move || {
            repo.owner()?;
            let list = repo
                .store
                .snapshots()?
                .into_iter()
                .map(|(id, r)| SnapshotInfo {
                    id,
                    time_ns: r.time_ns,
                    host: r.host.clone(),
                    paths: r.paths_lossy(),
                    tags: r.tags.clone(),
                    files: r.files,
                    bytes: r.bytes,
                })
                .collect();
            Ok(Reply::Snapshots(list))
        })
        .await,
        Request::Ls(req) => {
            let events = ChanEvents(tx);
            blocking(move || restore::ls(&repo, &req, &events).map(|(snapshot, entries)| Reply::Ls { snapshot, entries })).await
        }
        Request::Restore(req) => {
            let events = ChanEvents(tx);
            blocking(move || restore::restore(&repo, &req, &events).map(Reply::Restore)).await
        }
        Request::Status => {
            let running = daemon.backup_lock.try_lock().is_err();
            let peer_id = daemon.net.peer_id.to_string();
            blocking(move || {
                let owner_name = match keys::load_secrets(&repo.paths.secrets()) {
                    Ok(s) => Some(s.name.clone()),
                    Err(NodeError::NotInitialized) => None,
                    Err(e) => return Err(e),
                };
                let snaps = repo.store.snapshots()?;
                let usage = repo.store.outbox_usage()?;
                Ok(Reply::Status(StatusReply {
                    data_dir: repo.paths.data.display().to_string(),
                    peer_id,
                    owner_name,
                    snapshots: snaps.len() as u64,
                    last_backup_ns: snaps.last().map(|(_, r)| r.time_ns),
                    outbox_packs: usage.packs,
                    outbox_bytes: usage.bytes,
                    outbox_max_bytes: repo.config.outbox_max_bytes,
                    backup_running: running,
                    friends: 0,
                }))
            })
            .await
        }
    }
}

/// The client side: one request per connection.
pub struct Client {
    stream: UnixStream,
}

impl Client {
    /// Connects to the node of a data directory.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] with how to start the node.
    pub async fn connect(paths: &Paths, explicit_data_dir: bool) -> Result<Self, NodeError> {
        let socket = paths.socket();
        match UnixStream::connect(&socket).await {
            Ok(stream) => Ok(Self { stream }),
            Err(_) => Err(NodeError::NotRunning {
                data_dir: paths.data.clone(),
                socket,
                hint: if explicit_data_dir {
                    format!(" --data-dir {}", paths.data.display())
                } else {
                    String::new()
                },
            }),
        }
    }

    /// Sends a request and passes every event to `on_event` until the final reply.
    ///
    /// # Errors
    /// The node's [`ControlError`], or a `control` error when the connection breaks.
    pub async fn request(
        mut self,
        req: &Request,
        mut on_event: impl FnMut(Event),
    ) -> Result<Reply, ControlError> {
        let broken = |e: String| ControlError {
            kind: "control".into(),
            message: e,
        };
        self.stream
            .write_all(&control::frame(req))
            .await
            .map_err(|e| broken(format!("sending request: {e}")))?;
        loop {
            let ev: Option<Event> = read_frame(&mut self.stream, "control event")
                .await
                .map_err(|e| broken(e.to_string()))?;
            match ev {
                None => {
                    return Err(broken(
                        "the node closed the connection before answering (did it stop?)".into(),
                    ));
                }
                Some(Event::Done(reply)) => return Ok(reply),
                Some(Event::Failed(err)) => return Err(err),
                Some(other) => on_event(other),
            }
        }
    }
}

/// Sends one request to the node of `paths` and waits for the reply, on a private runtime.
/// For synchronous callers (the `obnam` program), which then need no async runtime of their own.
///
/// # Errors
/// [`ControlError`] with kind `not_running` when no node answers, or the node's error.
pub fn call(
    paths: &Paths,
    explicit_data_dir: bool,
    req: &Request,
    on_event: impl FnMut(Event),
) -> Result<Reply, ControlError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ControlError {
            kind: "io".into(),
            message: format!("cannot start the client runtime: {e}"),
        })?;
    let started = std::time::Instant::now();
    tracing::debug!(socket = %paths.socket().display(), "connecting to obnam-node");
    let result = runtime.block_on(async {
        let client = Client::connect(paths, explicit_data_dir)
            .await
            .map_err(|e| ControlError {
                kind: e.kind().into(),
                message: e.to_string(),
            })?;
        client.request(req, on_event).await
    });
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        ok = result.is_ok(),
        "request finished"
    );
    result
}

/// Binds the control socket with mode 0600, replacing a stale socket file.
///
/// # Errors
/// [`NodeError::Io`].
pub fn bind(path: &Path) -> Result<UnixListener, NodeError> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| NodeError::io(format!("creating {}", dir.display()), e))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| NodeError::io(format!("binding control socket {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| NodeError::io(format!("securing control socket {}", path.display()), e))?;
    Ok(listener)
}

/// The socket path of a data directory (for messages).
pub fn socket_for(paths: &Paths) -> PathBuf {
    paths.socket()
}
