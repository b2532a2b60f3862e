//! Messages between `obnam` (the client) and `obnam-node` over the local Unix socket.
//!
//! ```text
//! frame = length (u32 little-endian) ‖ postcard(message)
//! ```
//! The client sends one [`Request`] per connection. The node answers with any number of
//! [`Event`]s (progress, notices, warnings, listing entries) and ends with exactly one
//! [`Event::Done`] or [`Event::Failed`].

use crate::codec::{DecodeError, decode_bounded, encode};
use crate::ids::{OwnerId, SnapshotId};
use crate::tree::EntryKind;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// The largest control frame either side accepts.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// What the client asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The node's peer id, addresses and ticket.
    Id,
    /// Create the owner's keys.
    Init(InitRequest),
    /// Check that a passphrase opens the owner's key slot.
    CheckPassphrase {
        /// The passphrase to check.
        passphrase: String,
    },
    /// Back up paths.
    Backup(BackupRequest),
    /// List snapshots.
    Snapshots,
    /// List a snapshot's tree.
    Ls(LsRequest),
    /// Restore a snapshot.
    Restore(RestoreRequest),
    /// The node's state.
    Status,
    /// Make a node a friend.
    PeerAdd(PeerAddRequest),
    /// List friends.
    PeerList,
    /// Stop being friends with a node.
    PeerRemove {
        /// Its peer id.
        peer_id: String,
    },
    /// Recover the owner's keys from a friend's key slot (a new machine).
    Recover {
        /// The owner name.
        name: String,
        /// The passphrase.
        passphrase: String,
    },
    /// Rebuild the local index from the friends.
    IndexRebuild,
    /// Re-wrap the master secret under a new passphrase.
    ChangePassphrase {
        /// The current passphrase.
        old: String,
        /// The new passphrase.
        new: String,
        /// Accept a new passphrase that the strength check rejects.
        weak_ok: bool,
    },
    /// `obnam keys rotate`.
    RotateKeys {
        /// The current passphrase (it wraps the new master secret too).
        passphrase: String,
    },
    /// `obnam verify`: audit every friend now.
    Verify {
        /// Also download this percentage of our packs (1-100) from every friend that holds
        /// them, and decrypt and check them.
        sample_percent: Option<u32>,
    },
}

/// The result of a recovery or an index rebuild.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverReply {
    /// The owner name.
    pub name: String,
    /// The owner key.
    pub owner: OwnerId,
    /// The head adopted.
    pub head_seq: u64,
    /// Snapshots known.
    pub snapshots: u64,
    /// Packs found at friends.
    pub packs: u64,
    /// Chunks indexed.
    pub chunks: u64,
    /// Directories whose file-cache record was seeded from the newest snapshot.
    pub seeded_dirs: u64,
    /// Friends learned from the head.
    pub friends_added: Vec<String>,
    /// Friends that accepted this node as the owner's writer.
    pub took_over: Vec<String>,
    /// Stale friends, forks, unreadable packs.
    pub warnings: Vec<String>,
}

/// `obnam peer add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddRequest {
    /// A ticket, or a bare peer id.
    pub who: String,
    /// Extra addresses.
    pub addrs: Vec<String>,
    /// Bytes granted to the friend (None: the configured default).
    pub quota: Option<u64>,
    /// Display name.
    pub name: Option<String>,
    /// Household.
    pub household: Option<String>,
}

/// A friend in `peer list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Its peer id.
    pub peer_id: String,
    /// Display name.
    pub name: String,
    /// Household.
    pub household: String,
    /// Connected now.
    pub online: bool,
    /// Known addresses.
    pub addrs: Vec<String>,
    /// Bytes granted to it.
    pub quota_given: u64,
    /// Bytes of its owners' packs stored here.
    pub used_by_them: u64,
    /// Bytes of our packs stored there.
    pub used_by_us: u64,
    /// Whether it holds our key slot.
    pub holds_slot: bool,
    /// The last problem with it, if any.
    pub last_error: Option<String>,
    /// Audits and presence.
    pub audits: FriendAudits,
    /// How it is reached now, when online: "LAN (TCP)", "direct (QUIC)", "hole-punched (TCP)",
    /// "relayed via <peer id>".
    pub path: Option<String>,
    /// The remote address of that connection.
    pub path_addr: Option<String>,
    /// The last ping round trip, in microseconds.
    pub rtt_us: Option<u64>,
    /// Addresses from its newest signed address record (and the record's sequence number).
    pub record_addrs: Vec<String>,
    /// The sequence number of that record.
    pub record_seq: Option<u64>,
}

/// `obnam init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitRequest {
    /// The owner name (part of the Argon2id salt).
    pub name: String,
    /// The passphrase.
    pub passphrase: String,
    /// Accept a passphrase that the strength check rejects.
    pub weak_ok: bool,
}

/// `obnam backup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BackupRequest {
    /// Absolute paths to back up.
    pub paths: Vec<ByteBuf>,
    /// Glob patterns to exclude.
    pub excludes: Vec<String>,
    /// Files of glob patterns to exclude, one a line.
    pub exclude_files: Vec<ByteBuf>,
    /// Skip directories that hold a valid CACHEDIR.TAG.
    pub exclude_caches: bool,
    /// Stay on the file system of each path.
    pub one_file_system: bool,
    /// Tags for the snapshot.
    pub tags: Vec<String>,
    /// Seconds to wait for replication without progress (0: the configured default).
    pub timeout_secs: u64,
    /// Read every file, ignoring the file cache.
    pub force: bool,
}

/// `obnam ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LsRequest {
    /// Snapshot id, prefix of at least 8 characters, or `latest`.
    pub snapshot: String,
    /// Original absolute path to list below (everything when absent).
    pub path: Option<ByteBuf>,
}

/// `obnam restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreRequest {
    /// Snapshot id, prefix, or `latest`.
    pub snapshot: String,
    /// Absolute target directory.
    pub target: ByteBuf,
    /// Original absolute paths to restore (everything when empty).
    pub paths: Vec<ByteBuf>,
    /// Restore into a non-empty target.
    pub force: bool,
}

/// What the node sends back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// Progress of long work.
    Progress(Progress),
    /// Something the user should know now ("waiting for another backup").
    Notice(String),
    /// A problem that did not stop the work (a skipped file).
    Warning(String),
    /// One listing entry of `ls`.
    Entry(LsEntry),
    /// The work is done.
    Done(Reply),
    /// The work failed.
    Failed(ControlError),
}

/// Progress counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Progress {
    /// Files done.
    pub files: u64,
    /// Plaintext bytes done.
    pub bytes: u64,
    /// Files in all, when known.
    pub total_files: Option<u64>,
    /// Bytes in all, when known.
    pub total_bytes: Option<u64>,
    /// The path being worked on.
    pub current: String,
}

/// A failure, as the client shows it: a stable kind and a sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlError {
    /// A stable, machine-readable kind (`not_initialized`, `wrong_passphrase`, …).
    pub kind: String,
    /// What went wrong, with context.
    pub message: String,
}

/// The result of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// For [`Request::Id`].
    Id(IdReply),
    /// For [`Request::Init`].
    Init(InitReply),
    /// For [`Request::CheckPassphrase`]: the passphrase is right.
    PassphraseOk {
        /// The owner name.
        name: String,
    },
    /// For [`Request::Backup`].
    Backup(BackupReport),
    /// For [`Request::Snapshots`], oldest first.
    Snapshots(Vec<SnapshotInfo>),
    /// For [`Request::Ls`], after the entries.
    Ls {
        /// The snapshot listed.
        snapshot: SnapshotId,
        /// Entries sent.
        entries: u64,
    },
    /// For [`Request::Restore`].
    Restore(RestoreReport),
    /// For [`Request::Status`].
    Status(Box<StatusReply>),
    /// For [`Request::PeerAdd`].
    PeerAdded(Box<PeerInfo>),
    /// For [`Request::PeerList`].
    Peers(Vec<PeerInfo>),
    /// For [`Request::PeerRemove`].
    PeerRemoved {
        /// The former friend.
        peer_id: String,
    },
    /// For [`Request::Recover`] and [`Request::IndexRebuild`].
    Recovered(RecoverReply),
    /// For [`Request::ChangePassphrase`].
    PassphraseChanged {
        /// The owner name.
        name: String,
        /// Friends that still hold the old slot until they are reached.
        pending: Vec<String>,
    },
    /// For [`Request::RotateKeys`].
    KeysRotated {
        /// The retired owner key.
        old_owner: OwnerId,
        /// The new owner key.
        new_owner: OwnerId,
        /// Snapshots re-encrypted.
        snapshots: u64,
        /// Plaintext bytes sealed again.
        new_bytes: u64,
        /// Sealed bytes written to the outbox.
        stored_bytes: u64,
    },
    /// For [`Request::Verify`].
    Verified(VerifyReport),
}

/// A friend's audits and presence, as `status` and `peer list` show them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FriendAudits {
    /// Audits passed.
    pub passed: u64,
    /// Audits failed.
    pub failed: u64,
    /// When the last audit ended, nanoseconds since the Unix epoch.
    pub last_audit_ns: Option<i64>,
    /// Whether the last audit passed.
    pub last_passed: Option<bool>,
    /// When the last failed audit ended.
    pub last_failure_ns: Option<i64>,
    /// Why it failed.
    pub last_failure: Option<String>,
    /// Share of the last 30 days (as far as this node was running) that the friend was
    /// connected, in thousandths.
    pub online_permille_30d: Option<u32>,
    /// When the friend was last connected.
    pub last_seen_ns: Option<i64>,
}

/// A friend's audits in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FriendHealthInfo {
    /// Its peer id.
    pub peer_id: String,
    /// Display name.
    pub name: String,
    /// Connected now.
    pub online: bool,
    /// Audits and presence.
    pub audits: FriendAudits,
}

/// One audit of `obnam verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditInfo {
    /// The friend's peer id.
    pub peer_id: String,
    /// The friend's name.
    pub name: String,
    /// The challenged pack.
    pub pack: Option<String>,
    /// Why this pack: `newest`, `root` or `random` for audits; `sample` for a downloaded copy.
    pub kind: String,
    /// `passed`, `failed` or `unreachable` (not counted: the friend is offline or busy).
    pub outcome: String,
    /// Details of a failure or of unreachability.
    pub detail: Option<String>,
}

/// The result of `obnam verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VerifyReport {
    /// Every audit made.
    pub audits: Vec<AuditInfo>,
    /// Audits passed.
    pub passed: u64,
    /// Audits failed.
    pub failed: u64,
    /// Audits that could not be made.
    pub unreachable: u64,
}

/// The node's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdReply {
    /// libp2p peer id.
    pub peer_id: String,
    /// Listen addresses.
    pub addrs: Vec<String>,
    /// A ticket for friends.
    pub ticket: String,
}

/// The result of `init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitReply {
    /// The owner name.
    pub name: String,
    /// The owner's public key.
    pub owner: OwnerId,
}

/// A file that was skipped or failed, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileProblem {
    /// The path (lossy text).
    pub path: String,
    /// What went wrong.
    pub error: String,
}

/// The result of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupReport {
    /// The new snapshot.
    pub snapshot: SnapshotId,
    /// Regular files in the snapshot.
    pub files: u64,
    /// Files skipped because they could not be read.
    pub failed_files: u64,
    /// Plaintext bytes of the snapshot's files.
    pub bytes: u64,
    /// Plaintext bytes of chunks not stored before.
    pub new_bytes: u64,
    /// Regular files not read again because the file cache showed them unchanged.
    pub cached_files: u64,
    /// Sealed bytes this backup added to the outbox.
    pub stored_bytes: u64,
    /// Friends holding the whole snapshot.
    pub replicas: u32,
    /// The skipped files.
    pub problems: Vec<FileProblem>,
    /// Bytes sent to friends while the command waited.
    pub sent_bytes: u64,
    /// The head sequence number that lists this snapshot.
    pub head_seq: u64,
    /// Replica-set members that do not hold the snapshot yet (empty when replication is done).
    pub pending: Vec<String>,
}

/// A snapshot in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Its id.
    pub id: SnapshotId,
    /// Start time, nanoseconds since the Unix epoch.
    pub time_ns: i64,
    /// Host name.
    pub host: String,
    /// Paths backed up (lossy text).
    pub paths: Vec<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Regular files.
    pub files: u64,
    /// Plaintext bytes.
    pub bytes: u64,
    /// How well friends hold it.
    pub health: SnapshotHealth,
}

/// How well friends hold a snapshot's packs: exactly the packs that hold its chunks and trees,
/// as the backup recorded them (or, after a recovery or key rotation, as its trees say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SnapshotHealth {
    /// The snapshot's packs are not known yet (a recovered or rotated snapshot whose trees the
    /// node has not read yet, or could not read); the figures below are then all zero.
    pub unknown: bool,
    /// Friends that hold every one of those packs.
    pub friends_holding_all: u32,
    /// Sealed bytes of those packs.
    pub pack_bytes: u64,
    /// Of them, bytes that only one friend holds.
    pub single_friend_bytes: u64,
    /// Of them, bytes that no friend holds (still in the outbox, or lost).
    pub unheld_bytes: u64,
}

/// One entry of `ls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LsEntry {
    /// Original absolute path, as bytes.
    pub path: ByteBuf,
    /// Kind of file.
    pub kind: EntryKind,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Symlink target.
    pub target: ByteBuf,
}

/// The result of a restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// The snapshot restored.
    pub snapshot: SnapshotId,
    /// Regular files written.
    pub files: u64,
    /// Directories created.
    pub dirs: u64,
    /// Other entries (links, FIFOs, devices).
    pub others: u64,
    /// Plaintext bytes written.
    pub bytes: u64,
    /// Entries that could not be restored.
    pub problems: Vec<FileProblem>,
}

/// The node's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    /// The data directory.
    pub data_dir: String,
    /// libp2p peer id.
    pub peer_id: String,
    /// The owner name, once initialised.
    pub owner_name: Option<String>,
    /// Snapshots known.
    pub snapshots: u64,
    /// Time of the newest snapshot.
    pub last_backup_ns: Option<i64>,
    /// Packs waiting in the outbox.
    pub outbox_packs: u64,
    /// Bytes waiting in the outbox.
    pub outbox_bytes: u64,
    /// The outbox cap.
    pub outbox_max_bytes: u64,
    /// Whether a backup is running.
    pub backup_running: bool,
    /// Friends configured.
    pub friends: u64,
    /// Friends connected now.
    pub friends_online: u64,
    /// The configured number of replicas.
    pub replicas: u32,
    /// Friends holding every pack and the newest head.
    pub replicated_to: u32,
    /// Whether fewer friends than `replicas` hold everything.
    pub under_replicated: bool,
    /// Replica-set members still missing something.
    pub waiting: Vec<String>,
    /// Owners whose data this node stores for friends.
    pub hosted_owners: u64,
    /// Bytes stored for friends.
    pub hosted_bytes: u64,
    /// Friends that do not hold our current key slot yet (after a passphrase change, they still
    /// hold the old one).
    pub slot_pending: Vec<String>,
    /// While a key rotation retires the old key: the friends that have not yet switched to the
    /// new key or deleted the old key's data.
    pub rotation_pending: Vec<String>,
    /// Each friend's audits and presence.
    pub friend_health: Vec<FriendHealthInfo>,
    /// How well friends hold the newest snapshot (none before the first).
    pub latest_snapshot_health: Option<Box<SnapshotHealth>>,
    /// Sealed bytes of our own packs (what each replica holds).
    pub own_pack_bytes: u64,
    /// Bytes of packs stored at friends since the node started (uploads that friends kept).
    pub sent_bytes: u64,
    /// Bytes of packs fetched back from friends for repair since the node started.
    pub repaired_bytes: u64,
}

/// Encodes a frame: length prefix and postcard body.
pub fn frame<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = encode(msg);
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Checks a frame's length prefix before the body is read.
///
/// # Errors
/// [`DecodeError::TooLarge`] over [`MAX_FRAME`].
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(DecodeError::TooLarge {
            what: "control frame",
            len,
            max: MAX_FRAME,
        });
    }
    Ok(len)
}

/// Decodes a frame body.
///
/// # Errors
/// A bounded [`DecodeError`].
pub fn decode_body<T: serde::de::DeserializeOwned>(
    what: &'static str,
    body: &[u8],
) -> Result<T, DecodeError> {
    decode_bounded(what, body, MAX_FRAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_frames() {
        assert_eq!(frame(&Request::Status), vec![1, 0, 0, 0, 7]);
        assert_eq!(frame(&Request::Id), vec![1, 0, 0, 0, 0]);
        let f = frame(&Event::Notice("hi".into()));
        assert_eq!(f, vec![4, 0, 0, 0, 1, 2, b'h', b'i']);
        let body = &f[4..];
        assert_eq!(
            decode_body::<Event>("event", body).unwrap(),
            Event::Notice("hi".into())
        );
    }

    #[test]
    fn oversized_frames_are_refused() {
        assert!(frame_len((MAX_FRAME as u32 + 1).to_le_bytes()).is_err());
        assert_eq!(frame_len(5u32.to_le_bytes()), Ok(5));
    }

    #[test]
    fn requests_round_trip() {
        let reqs = vec![
            Request::Backup(BackupRequest {
                paths: vec![ByteBuf::from(b"/a\xff".to_vec())],
                excludes: vec!["*.o".into()],
                tags: vec!["x".into()],
                ..Default::default()
            }),
            Request::Restore(RestoreRequest {
                snapshot: "latest".into(),
                target: ByteBuf::from(b"/t".to_vec()),
                paths: vec![],
                force: true,
            }),
            Request::Init(InitRequest {
                name: "n".into(),
                passphrase: "p".into(),
                weak_ok: false,
            }),
        ];
        for r in reqs {
            assert_eq!(
                decode_body::<Request>("request", &frame(&r)[4..]).unwrap(),
                r
            );
        }
    }
}
