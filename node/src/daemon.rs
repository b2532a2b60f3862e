//! `obnam-node start`: the daemon's life cycle.
//!
//! Order: directories (0700) → config → exclusive lock on the data directory → node key
//! (created on first start, mode 0600) → database → adopt packs left by a crash → libp2p →
//! control socket → serve until SIGINT or SIGTERM → remove the socket.

use crate::config::{NodeConfig, Paths};
use crate::control::{self, Daemon};
use crate::error::NodeError;
use crate::net;
use crate::repo::Repo;
use libp2p::identity::Keypair;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What a started node reports once it serves.
#[derive(Debug, Clone)]
pub struct Ready {
    /// Its peer id.
    pub peer_id: String,
    /// Its listen addresses.
    pub addrs: Vec<String>,
    /// Its control socket.
    pub socket: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
}

/// Called once the node serves.
pub type OnReady = Box<dyn FnOnce(&Ready) + Send>;

/// Options of `obnam-node start`.
#[derive(Default)]
pub struct StartOptions {
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--listen` addresses, replacing the config's.
    pub listen: Vec<String>,
    /// Called once the control socket accepts connections.
    pub on_ready: Option<OnReady>,
}

fn load_or_create_key(path: &Path) -> Result<Keypair, NodeError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                NodeError::Key(format!("node key {} is not 32 bytes", path.display()))
            })?;
            Keypair::ed25519_from_bytes(arr)
                .map_err(|e| NodeError::Key(format!("node key {}: {e}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = zeroize::Zeroizing::new([0u8; 32]);
            rand::fill(&mut secret[..]);
            let ctx = || format!("writing node key {}", path.display());
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| NodeError::io(ctx(), e))?;
            f.write_all(&secret[..])
                .map_err(|e| NodeError::io(ctx(), e))?;
            f.sync_all().map_err(|e| NodeError::io(ctx(), e))?;
            Keypair::ed25519_from_bytes(*secret).map_err(|e| NodeError::Key(e.to_string()))
        }
        Err(e) => Err(NodeError::io(
            format!("reading node key {}", path.display()),
            e,
        )),
    }
}

/// Allocations from this size on get pages of their own (see [`limit_malloc_arenas`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 4 * 1024 * 1024;

/// Caps glibc's malloc arenas at one per core (at least 2) and fixes its mmap threshold at
/// 4 MiB, unless `MALLOC_ARENA_MAX` is set in the environment. By default glibc gives threads that
/// allocate at the same time arenas of their own, up to 8 per core, and each keeps the memory
/// freed into it: the backup pipeline's threads then held tens of MiB more at their peak than
/// they use, and large freed blocks stayed in the arenas too (measured with heaptrack and
/// `bench/scale`: 1 M files, 157 MiB → 71 MiB; docs/performance.md). Must run before
/// the process starts other threads.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // The user's own glibc setting wins.
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
            return;
        }
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = i32::try_from(cores.clamp(2, 64)).unwrap_or(2);
        // SAFETY: `mallopt` only sets a malloc tunable and takes no pointers; it is called
        // before this process starts any other thread.
        #[allow(unsafe_code)]
        let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
        if ok != 1 {
            tracing::debug!(arenas, "mallopt(M_ARENA_MAX) was refused");
        }
        // Blocks of 4 MiB and more (pack buffers) come from mmap and go back to the system
        // when freed, instead of staying in an arena; a fixed threshold also stops glibc from
        // raising it after the first large free. A lower one (256 KiB, which took the chunk
        // buffers too) cost a third of the pipeline's rate in page faults and unmaps.
        // SAFETY: as above.
        #[allow(unsafe_code)]
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        if ok != 1 {
            tracing::debug!("mallopt(M_MMAP_THRESHOLD) was refused");
        }
    }
}

/// Hands the pages of free memory inside malloc's arenas back to the system (`malloc_trim`).
/// glibc returns only the top of an arena by itself; the holes that freed buffers leave in the
/// middle stay resident. Called once per pack written, it lowered the node's peak RSS in an
/// initial backup of the medium dataset from 83-85 to 73-77 MiB.
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` takes no pointers and only releases pages malloc holds free.
        #[allow(unsafe_code)]
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Runs the daemon on its own multi-threaded runtime until SIGINT or SIGTERM (for the
/// `obnam-node` program, which then needs no runtime of its own).
///
/// # Errors
/// As [`run`].
pub fn run_blocking(opts: StartOptions) -> Result<(), NodeError> {
    limit_malloc_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| NodeError::io("starting the runtime", e))?;
    runtime.block_on(run(opts))
}

/// Runs the daemon until SIGINT or SIGTERM.
///
/// # Errors
/// Start-up failures: another node on the data directory, a bad config, an unbindable address.
pub async fn run(mut opts: StartOptions) -> Result<(), NodeError> {
    let paths = Paths::resolve(opts.data_dir.as_deref())?;
    std::fs::create_dir_all(&paths.data)
        .map_err(|e| NodeError::io(format!("creating {}", paths.data.display()), e))?;
    std::fs::set_permissions(&paths.data, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| NodeError::io(format!("securing {}", paths.data.display()), e))?;
    let mut config = NodeConfig::load(&paths.config)?;
    if !opts.listen.is_empty() {
        config.listen = opts.listen.clone();
    }
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(paths.lock())
        .map_err(|e| NodeError::io(format!("opening {}", paths.lock().display()), e))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|_| NodeError::AlreadyRunning {
            path: paths.data.clone(),
        })?;
    let key = load_or_create_key(&paths.node_key())?;
    // Packs fetched by an operation that was interrupted.
    let _ = std::fs::remove_dir_all(paths.data.join("cache"));
    let repo = {
        let paths = paths.clone();
        let config = config.clone();
        tokio::task::spawn_blocking(move || -> Result<Repo, NodeError> {
            let repo = Repo::open(paths, config)?;
            match repo.owner() {
                Ok(owner) => {
                    repo.adopt_orphans(&owner.keys)?;
                }
                Err(NodeError::NotInitialized) => {}
                Err(e) => tracing::warn!(error = %e.full_message(), "owner keys unavailable"),
            }
            Ok(repo)
        })
        .await
        .map_err(|e| NodeError::Control(format!("start-up worker failed: {e}")))??
    };
    let local_peer = key.public().to_peer_id();
    let wake = Arc::new(tokio::sync::Notify::new());
    // Fake key slots for unknown lookup ids are keyed by a secret derived from the node key, so
    // they are stable across restarts and differ between nodes.
    let node_secret = zeroize::Zeroizing::new(
        std::fs::read(paths.node_key()).map_err(|e| NodeError::io("reading the node key", e))?,
    );
    let probe_secret = blake3::derive_key("obnam 2026-11 key slot probe answers v1", &node_secret);
    let mut server = crate::serve::Server::new(
        repo.store.clone(),
        paths.data.join("hosted"),
        local_peer,
        probe_secret,
        Box::new({
            let wake = Arc::clone(&wake);
            move |_| wake.notify_one()
        }),
    );
    server.stream_idle = Duration::from_secs(config.stream_idle_secs.max(1));
    server.audits_per_minute = config.audit_answers_per_minute;
    server.remove_partial_bodies();
    let server = Arc::new(server);
    crate::scrub::start(
        Arc::clone(&server),
        repo.store.clone(),
        config.scrub_bytes_per_sec,
        Duration::from_secs(config.scrub_interval_secs.max(1)),
    );
    let net_config = net::NetConfig {
        listen: config.listen.clone(),
        idle_timeout: Duration::from_secs(config.idle_connection_timeout_secs),
        request_timeout: Duration::from_secs(config.request_timeout_secs),
        mdns: config.mdns,
        upnp: config.upnp,
        learn_addresses: config.learn_addresses,
        relay_server: config.relay_server,
        relay_circuit: Duration::from_secs(config.relay_circuit_secs.max(1)),
        relay_circuit_bytes: config.relay_circuit_bytes,
        autonat_server: config.autonat_server,
        max_relays: config.max_relays,
        autonat_probe: Duration::from_secs(config.autonat_probe_secs.max(1)),
        identify_interval: Duration::from_secs(config.identify_interval_secs.max(1)),
        external: config.external_addresses.clone(),
        ping_interval: Duration::from_secs(config.ping_interval_secs.max(1)),
        ping_timeout: Duration::from_secs(config.ping_timeout_secs.max(1)),
        hole_punch_retry: Duration::from_secs(config.hole_punch_retry_secs.max(1)),
    };
    let (net, net_task) = net::start(key, net_config, Arc::clone(&server)).await?;
    // With `learn_addresses = false` friends are dialed only at their `peer add` addresses:
    // records are still kept, never dialed.
    if config.learn_addresses {
        let net = net.clone();
        let handle = tokio::runtime::Handle::current();
        let _ = server.on_addresses.set(Box::new(move |peer, addrs| {
            let net = net.clone();
            handle.spawn(async move {
                let _ = net.add_addrs(peer, addrs).await;
            });
        }));
    }
    // Friends' addresses from their signed records, before the first replication round dials.
    let addr_task = tokio::spawn(crate::addrbook::run(
        net.clone(),
        Arc::clone(&server),
        repo.store.clone(),
        Duration::from_secs(config.network_upkeep_secs.max(1)),
    ));
    let _ = repo.remote.set(crate::repo::Remote::new(
        net.clone(),
        tokio::runtime::Handle::current(),
        Arc::clone(&wake),
    ));
    let replicator = crate::replication::Replicator::new(repo.clone(), net.clone(), wake);
    let replication_task = tokio::spawn(
        Arc::clone(&replicator).run(Duration::from_secs(config.replication_interval_secs.max(1))),
    );
    let auditor = crate::audit::Auditor::new(repo.clone(), net.clone(), Arc::clone(&replicator));
    let audit_task = tokio::spawn(Arc::clone(&auditor).run());
    let socket = paths.socket();
    let listener = control::bind(&socket)?;
    tracing::info!(peer_id = %net.peer_id, socket = %socket.display(), data_dir = %paths.data.display(), "obnam-node started");
    if let Some(ready) = opts.on_ready.take() {
        ready(&Ready {
            peer_id: net.peer_id.to_string(),
            addrs: net.addrs().iter().map(ToString::to_string).collect(),
            socket: socket.clone(),
            data_dir: paths.data.clone(),
        });
    }
    let daemon = Arc::new(Daemon {
        repo,
        net,
        replicator,
        auditor,
        backup_lock: tokio::sync::Mutex::new(()),
    });
    let server = tokio::spawn(control::serve(listener, daemon));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| NodeError::io("installing the SIGTERM handler", e))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; stopping"),
        _ = term.recv() => tracing::info!("terminated; stopping"),
    }
    server.abort();
    net_task.abort();
    replication_task.abort();
    audit_task.abort();
    addr_task.abort();
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
