//! Configuration and directories: plain data, no behaviour.
//!
//! With `--data-dir DIR` (or `OBNAM_DATA_DIR`), everything of one node lives under `DIR`:
//! `config.toml`, the node key, the secrets file, the database, the outbox and the socket.
//! Without it, `config.toml` is in `$XDG_CONFIG_HOME/obnam` and everything else in
//! `$XDG_DATA_HOME/obnam` (mode 0700). The config file may be absent: every setting has a default.

use crate::error::NodeError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Every setting of a node. Every interval and timeout is here, so tests shorten them through
/// the config file, not through hidden switches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// libp2p listen addresses.
    pub listen: Vec<String>,
    /// Most bytes the outbox may hold; a backup that would exceed it fails with a clear error.
    pub outbox_max_bytes: u64,
    /// zstd level for chunk compression.
    pub zstd_level: i32,
    /// Threads that compress and seal chunks (0: one per core).
    pub seal_threads: usize,
    /// Finished packs that may wait for the disk at once (bounds memory).
    pub packs_in_flight: usize,
    /// Packs uploaded to one friend at once, each on its own stream (0 counts as 1).
    pub uploads_in_flight: usize,
    /// Seconds a libp2p connection may stay idle before it is closed.
    pub idle_connection_timeout_secs: u64,
    /// Seconds a backup waits for replication without progress (the friends issue).
    pub replication_timeout_secs: u64,
    /// redb page cache in MiB.
    pub db_cache_mib: usize,
    /// Enable mDNS discovery of friends on the LAN (off: it sends multicast on the LAN).
    pub mdns: bool,
    /// Ask the router for a port mapping with UPnP (off: it talks to the router).
    pub upnp: bool,
    /// Friends that hold every pack and head of this owner.
    pub replicas: u32,
    /// Seconds between replication rounds (a round also runs after a backup and on connect).
    pub replication_interval_secs: u64,
    /// Seconds one request to a friend may take (and one pack transfer).
    pub request_timeout_secs: u64,
    /// Seconds a pack stream from a friend may stay silent before it is closed.
    pub stream_idle_secs: u64,
    /// Bytes granted to a new friend unless `peer add --quota` says otherwise.
    pub default_quota: u64,
    /// Audit challenges sent to each friend per day (0: no scheduled audits).
    pub audits_per_day: u32,
    /// Seconds a connected friend has to answer an audit before it counts as failed.
    pub audit_deadline_secs: u64,
    /// Seconds between two looks at which friends are connected (their online share).
    pub presence_interval_secs: u64,
    /// Seconds a friend may stay unseen before its copies count as lost and another friend
    /// takes its place in the replica set.
    pub lost_after_secs: u64,
    /// Most bytes of packs that repair fetches back from friends per replication round.
    pub repair_bytes_per_round: u64,
    /// Bytes per second at which hosted packs are re-hashed against their ids (0: no scrub).
    pub scrub_bytes_per_sec: u64,
    /// Seconds between the end of one scrub pass and the start of the next.
    pub scrub_interval_secs: u64,
    /// Storage role: audits one node may ask of this node per minute (each re-reads a pack).
    pub audit_answers_per_minute: u32,
    /// Learn friends' other addresses from what they announce (identify). Off: dial friends only
    /// at the addresses given to `peer add` (a tunnel or a fixed port forward; the fault tests).
    pub learn_addresses: bool,
    /// Serve circuit relay v2 to friends (and only to friends), so friends behind NAT can be
    /// reached through this node. Turn it on for a node that friends can reach directly.
    pub relay_server: bool,
    /// Most seconds one relayed connection may last before the relay closes it (the friend
    /// reconnects and goes on).
    pub relay_circuit_secs: u64,
    /// Most bytes one relayed connection may carry before the relay closes it.
    pub relay_circuit_bytes: u64,
    /// Answer AutoNAT v2 probes (dial back a node's address to tell it whether it is
    /// reachable). Turn it on for a node that friends can reach directly.
    pub autonat_server: bool,
    /// Keep reservations on at most this many friend relays while this node is not known to be
    /// reachable directly (0: never use relays).
    pub max_relays: usize,
    /// Seconds between network upkeep rounds: relay reservations, tries of a direct connection
    /// to friends reached only through a relay, and the address record pushed to friends.
    pub network_upkeep_secs: u64,
    /// Seconds between AutoNAT v2 probes of this node's candidate addresses.
    pub autonat_probe_secs: u64,
    /// Seconds between two identify exchanges on a connection (addresses and observed address).
    pub identify_interval_secs: u64,
    /// Addresses friends can reach this node at that it cannot see itself (a port forward on
    /// the router), announced as they are: `["/ip4/203.0.113.5/tcp/4411"]`.
    pub external_addresses: Vec<String>,
    /// Seconds between pings on each connection (round trip for `peer list`).
    pub ping_interval_secs: u64,
    /// Seconds a ping may take; a connection whose ping fails is closed (a dead path, such as a
    /// router that changed its address, is noticed and replaced).
    pub ping_timeout_secs: u64,
    /// Seconds between two tries of hole punching to a friend still reached only through a
    /// relay (DCUtR itself tries 3 times when a relayed connection opens).
    pub hole_punch_retry_secs: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/0.0.0.0/tcp/4411".into(),
                "/ip4/0.0.0.0/udp/4411/quic-v1".into(),
            ],
            outbox_max_bytes: 100 * 1024 * 1024 * 1024,
            zstd_level: 3,
            seal_threads: 0,
            packs_in_flight: 2,
            uploads_in_flight: 2,
            idle_connection_timeout_secs: 300,
            replication_timeout_secs: 60,
            db_cache_mib: 8,
            mdns: false,
            upnp: false,
            replicas: 3,
            replication_interval_secs: 30,
            request_timeout_secs: 60,
            stream_idle_secs: 60,
            default_quota: 10 * 1024 * 1024 * 1024,
            audits_per_day: 16,
            audit_deadline_secs: 60,
            presence_interval_secs: 60,
            lost_after_secs: 14 * 86_400,
            repair_bytes_per_round: 256 * 1024 * 1024,
            scrub_bytes_per_sec: 2 * 1024 * 1024,
            scrub_interval_secs: 3600,
            audit_answers_per_minute: 10,
            learn_addresses: true,
            relay_server: false,
            relay_circuit_secs: 3600,
            relay_circuit_bytes: 16 * 1024 * 1024 * 1024,
            autonat_server: false,
            max_relays: 2,
            network_upkeep_secs: 60,
            autonat_probe_secs: 60,
            identify_interval_secs: 300,
            external_addresses: Vec::new(),
            ping_interval_secs: 15,
            ping_timeout_secs: 20,
            hole_punch_retry_secs: 600,
        }
    }
}

impl NodeConfig {
    /// Reads the config file, or the defaults when it does not exist.
    ///
    /// # Errors
    /// [`NodeError::Config`] when the file exists but cannot be read or parsed.
    pub fn load(path: &Path) -> Result<Self, NodeError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| NodeError::Config {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(NodeError::Config {
                path: path.to_owned(),
                reason: e.to_string(),
            }),
        }
    }

    /// Threads for sealing: the configured number, or one per core.
    pub fn seal_threads(&self) -> usize {
        if self.seal_threads > 0 {
            self.seal_threads
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        }
    }
}

/// Where a node keeps its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// The config file.
    pub config: PathBuf,
    /// The data directory (mode 0700).
    pub data: PathBuf,
}

impl Paths {
    /// Resolves the directories from `--data-dir` / `OBNAM_DATA_DIR`, or the XDG defaults.
    ///
    /// # Errors
    /// [`NodeError::NoHome`] when no data directory can be determined.
    pub fn resolve(data_dir: Option<&Path>) -> Result<Self, NodeError> {
        if let Some(dir) = data_dir {
            let dir = absolute(dir)?;
            return Ok(Self {
                config: dir.join("config.toml"),
                data: dir,
            });
        }
        let data = dirs::data_dir().ok_or(NodeError::NoHome)?.join("obnam");
        let config = dirs::config_dir()
            .ok_or(NodeError::NoHome)?
            .join("obnam")
            .join("config.toml");
        Ok(Self { config, data })
    }

    /// The node's libp2p key.
    pub fn node_key(&self) -> PathBuf {
        self.data.join("node.key")
    }
    /// The secrets file (master secret, key slot, owner name).
    pub fn secrets(&self) -> PathBuf {
        self.data.join("secrets")
    }
    /// The redb database.
    pub fn database(&self) -> PathBuf {
        self.data.join("index.redb")
    }
    /// The outbox of sealed packs.
    pub fn outbox(&self) -> PathBuf {
        self.data.join("outbox")
    }
    /// The lock file that keeps a second daemon off this data directory.
    pub fn lock(&self) -> PathBuf {
        self.data.join("node.lock")
    }

    /// The control socket: `<data>/node.sock` when that path fits a Unix socket address
    /// (107 bytes), otherwise a name derived from the data directory under
    /// `$XDG_RUNTIME_DIR` or the temp directory.
    pub fn socket(&self) -> PathBuf {
        let direct = self.data.join("node.sock");
        if direct.as_os_str().len() <= 107 {
            return direct;
        }
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let hash = blake3::hash(self.data.as_os_str().as_encoded_bytes());
        base.join(format!("obnam-{}.sock", &hash.to_hex()[..16]))
    }
}

fn absolute(p: &Path) -> Result<PathBuf, NodeError> {
    std::path::absolute(p).map_err(|e| NodeError::io(format!("resolving {}", p.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_data_dirs_put_the_socket_elsewhere() {
        let short = Paths::resolve(Some(Path::new("/tmp/x"))).unwrap();
        assert_eq!(short.socket(), PathBuf::from("/tmp/x/node.sock"));
        let long_dir = format!("/tmp/{}", "d".repeat(120));
        let long = Paths::resolve(Some(Path::new(&long_dir))).unwrap();
        let sock = long.socket();
        assert!(sock.as_os_str().len() <= 107, "{}", sock.display());
        assert_ne!(
            sock,
            Paths::resolve(Some(Path::new(&format!("{long_dir}2"))))
                .unwrap()
                .socket()
        );
    }

    #[test]
    fn config_defaults_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        assert_eq!(NodeConfig::load(&path).unwrap(), NodeConfig::default());
        std::fs::write(
            &path,
            "outbox_max_bytes = 5\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n",
        )
        .unwrap();
        let c = NodeConfig::load(&path).unwrap();
        assert_eq!(c.outbox_max_bytes, 5);
        assert_eq!(c.zstd_level, 3);
        std::fs::write(&path, "no_such_setting = 1\n").unwrap();
        let err = NodeConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("config.toml") && err.contains("no_such_setting"),
            "{err}"
        );
    }
}
