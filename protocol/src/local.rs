//! Records a node keeps in its own redb index (never sent to anyone).

use crate::codec::{DecodeError, decode_versioned, encode_versioned};
use crate::ids::{PackId, SnapshotId};
use serde::{Deserialize, Serialize};

/// Where a chunk of ours is: its pack, and the sealed chunk's offset and length in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLoc {
    /// The pack.
    pub pack: PackId,
    /// Offset of the sealed chunk.
    pub offset: u32,
    /// Length of the sealed chunk.
    pub len: u32,
}

/// Encoded length of a [`ChunkLoc`].
pub const CHUNK_LOC_LEN: usize = 40;

impl ChunkLoc {
    /// Fixed 40-byte encoding: pack id, then offset and length little-endian.
    pub fn to_bytes(&self) -> [u8; CHUNK_LOC_LEN] {
        let mut out = [0u8; CHUNK_LOC_LEN];
        out[..32].copy_from_slice(self.pack.as_bytes());
        out[32..36].copy_from_slice(&self.offset.to_le_bytes());
        out[36..].copy_from_slice(&self.len.to_le_bytes());
        out
    }
    /// Decodes the fixed encoding.
    pub fn from_bytes(b: &[u8; CHUNK_LOC_LEN]) -> Self {
        let mut pack = [0u8; 32];
        pack.copy_from_slice(&b[..32]);
        let mut off = [0u8; 4];
        off.copy_from_slice(&b[32..36]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&b[36..]);
        Self {
            pack: PackId(pack),
            offset: u32::from_le_bytes(off),
            len: u32::from_le_bytes(len),
        }
    }
}

/// What the node knows of one of its own packs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRecord {
    /// Length of the sealed pack in bytes.
    pub len: u64,
    /// Number of chunks in it.
    pub chunks: u32,
    /// When it was written, nanoseconds since the Unix epoch.
    pub created_ns: i64,
    /// Whether the pack file is still in the outbox.
    pub in_outbox: bool,
}

impl PackRecord {
    /// Encodes the record.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }
    /// Decodes the record.
    ///
    /// # Errors
    /// A bounded [`DecodeError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_versioned("pack record", bytes, 256)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_chunk_loc() {
        let loc = ChunkLoc {
            pack: PackId([3; 32]),
            offset: 1,
            len: 0x0201,
        };
        let b = loc.to_bytes();
        assert_eq!(&b[..32], &[3; 32]);
        assert_eq!(&b[32..], &[1, 0, 0, 0, 1, 2, 0, 0]);
        assert_eq!(ChunkLoc::from_bytes(&b), loc);
    }

    #[test]
    fn golden_pack_record() {
        let r = PackRecord {
            len: 65536,
            chunks: 2,
            created_ns: 1,
            in_outbox: true,
        };
        assert_eq!(r.to_bytes(), vec![1, 0x80, 0x80, 0x04, 2, 2, 1]);
        assert_eq!(PackRecord::from_bytes(&r.to_bytes()).unwrap(), r);
    }
}

/// A friend, as this node remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Friend {
    /// The friend's peer id, as bytes.
    #[serde(with = "serde_bytes")]
    pub peer_id: Vec<u8>,
    /// A display name.
    pub name: String,
    /// Household: replicas prefer friends in different households.
    pub household: String,
    /// Known addresses, as multiaddr bytes.
    pub addrs: Vec<serde_bytes::ByteBuf>,
    /// Bytes this node grants the friend.
    pub quota_given: u64,
    /// When the friend was added.
    pub added_ns: i64,
}

impl Friend {
    /// Encodes the record.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }
    /// Decodes the record.
    ///
    /// # Errors
    /// A bounded [`DecodeError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_versioned("friend record", bytes, 64 * 1024)
    }
}

/// An owner whose data this node hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostedOwner {
    /// The node (peer id bytes) that proved the owner key and may read and write.
    #[serde(with = "serde_bytes")]
    pub bound_peer: Vec<u8>,
    /// Logical bytes of the owner's packs stored here.
    pub used: u64,
    /// Packs stored.
    pub packs: u64,
}

impl HostedOwner {
    /// Encodes the record.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }
    /// Decodes the record.
    ///
    /// # Errors
    /// A bounded [`DecodeError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_versioned("hosted owner", bytes, 1024)
    }
}

/// Days of presence kept per friend.
pub const PRESENCE_DAYS: usize = 30;

/// One day of a friend's presence, as this node saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DayPresence {
    /// Days since the Unix epoch (UTC).
    pub day: u32,
    /// Seconds this node was running and looking.
    pub observed_secs: u32,
    /// Seconds of those that the friend was connected.
    pub online_secs: u32,
}

/// How a friend has kept our data: audits and presence (the integrity issue).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FriendHealth {
    /// Audits the friend passed.
    pub audits_passed: u64,
    /// Audits the friend failed (a wrong or missing answer, or none in time while online).
    pub audits_failed: u64,
    /// When the last audit ended, nanoseconds since the Unix epoch (0: never).
    pub last_audit_ns: i64,
    /// Whether the last audit passed.
    pub last_passed: bool,
    /// When the last failed audit ended (0: never).
    pub last_failure_ns: i64,
    /// Why the last failed audit failed.
    pub last_failure: String,
    /// Audits sent so far: picks the next challenge's kind on the schedule.
    pub audits_sent: u64,
    /// When the friend was last connected (0: never).
    pub last_seen_ns: i64,
    /// The last [`PRESENCE_DAYS`] days of presence, oldest first.
    pub days: Vec<DayPresence>,
    /// Since when the friend answers `NotFriend` (it removed us; 0: it accepts us).
    pub refused_since_ns: i64,
    /// Audits in a row that a connected friend left unanswered (busy, or the connection
    /// dropped); [`MAX_UNANSWERED`] of them count as a failed audit.
    pub unanswered: u32,
}

/// Unanswered audits in a row that count as a failure.
pub const MAX_UNANSWERED: u32 = 5;
/// Longest failure reason kept in a [`FriendHealth`] record.
pub const MAX_REASON: usize = 300;

impl FriendHealth {
    /// Encodes the record.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }
    /// Decodes the record.
    ///
    /// # Errors
    /// A bounded [`DecodeError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_versioned("friend health", bytes, 4096)
    }

    /// Counts `secs` seconds of looking at `now_ns`, online or not.
    pub fn note_presence(&mut self, now_ns: i64, secs: u32, online: bool) {
        let day = u32::try_from(now_ns.max(0) / 86_400_000_000_000).unwrap_or(u32::MAX);
        if online {
            self.last_seen_ns = now_ns;
        }
        if self.days.last().is_none_or(|d| d.day != day) {
            self.days.push(DayPresence {
                day,
                ..DayPresence::default()
            });
        }
        // Keep the last PRESENCE_DAYS days up to today. A day after today (a record read back
        // from a damaged index, or a clock set back) is dropped; `d.day + PRESENCE_DAYS`
        // overflowed for days near u32::MAX (found by the `local_records` fuzz target).
        self.days.retain(|d| {
            day.checked_sub(d.day)
                .is_some_and(|age| age < PRESENCE_DAYS as u32)
        });
        if let Some(d) = self.days.last_mut() {
            d.observed_secs = d.observed_secs.saturating_add(secs);
            if online {
                d.online_secs = d.online_secs.saturating_add(secs);
            }
        }
    }

    /// The share of observed time in the last [`PRESENCE_DAYS`] days that the friend was
    /// online, or `None` before any observation.
    pub fn online_fraction(&self) -> Option<f64> {
        let observed: u64 = self.days.iter().map(|d| u64::from(d.observed_secs)).sum();
        let online: u64 = self.days.iter().map(|d| u64::from(d.online_secs)).sum();
        (observed > 0).then(|| online as f64 / observed as f64)
    }
}

/// What this node has sent a friend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PeerState {
    /// Sequence number of our head that the friend holds.
    pub head_seq: u64,
    /// Whether the friend holds our current key slot.
    pub slot_pushed: bool,
    /// Whether the friend refused a pack for lack of quota.
    pub quota_refused: bool,
    /// Bytes of our packs the friend holds.
    pub used_by_us: u64,
}

impl PeerState {
    /// Encodes the record.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }
    /// Decodes the record.
    ///
    /// # Errors
    /// A bounded [`DecodeError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_versioned("peer state", bytes, 1024)
    }
}

/// A friend's newest signed address record (`addr-book-0`): its sequence number, and the
/// signed envelope as the friend made it (a libp2p signed peer record; the node checks the
/// signature before it stores one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AddressRecord {
    /// The record's sequence number (higher is newer).
    pub seq: u64,
    /// The signed envelope.
    pub envelope: serde_bytes::ByteBuf,
}

/// Largest encoded [`AddressRecord`] kept or accepted.
pub const MAX_ADDRESS_RECORD: usize = 8192;

impl AddressRecord {
    /// Encodes the record.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }
    /// Decodes the record.
    ///
    /// # Errors
    /// A bounded [`DecodeError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_versioned("address record", bytes, MAX_ADDRESS_RECORD + 64)
    }
}

/// Which packs one snapshot uses (`snapshot-packs-0`), as the change from the snapshot just
/// before it. `base` names that snapshot; `None` means `added` is the whole set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PackSetDelta {
    /// The snapshot this one is a change from, or `None` for a whole set.
    pub base: Option<SnapshotId>,
    /// Packs this snapshot uses that `base` does not, sorted.
    pub added: Vec<PackId>,
    /// Packs `base` uses that this snapshot does not, sorted.
    pub removed: Vec<PackId>,
}

/// Largest encoded [`PackSetDelta`]: two million packs (16 TiB of 8 MiB packs).
pub const MAX_PACK_SET_DELTA: usize = 2_000_000 * 32 + 64;

impl PackSetDelta {
    /// Encodes the record.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }
    /// Decodes the record.
    ///
    /// # Errors
    /// A bounded [`DecodeError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_versioned("snapshot pack set", bytes, MAX_PACK_SET_DELTA)
    }

    /// The change that turns `base_set` (the packs of `base`, or nothing) into `set`; both sorted
    /// and without duplicates.
    pub fn between(base: Option<(SnapshotId, &[PackId])>, set: &[PackId]) -> Self {
        let Some((id, old)) = base else {
            return Self {
                base: None,
                added: set.to_vec(),
                removed: Vec::new(),
            };
        };
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < set.len() {
            match (old.get(i), set.get(j)) {
                (Some(a), Some(b)) if a == b => {
                    i += 1;
                    j += 1;
                }
                (Some(a), Some(b)) if a < b => {
                    removed.push(*a);
                    i += 1;
                }
                (Some(a), None) => {
                    removed.push(*a);
                    i += 1;
                }
                (_, Some(b)) => {
                    added.push(*b);
                    j += 1;
                }
                (None, None) => break,
            }
        }
        Self {
            base: Some(id),
            added,
            removed,
        }
    }

    /// Applies the change to `set` (sorted, without duplicates; the base's packs).
    pub fn apply(&self, set: &mut Vec<PackId>) {
        if self.base.is_none() {
            set.clear();
        }
        set.retain(|p| self.removed.binary_search(p).is_err());
        set.extend_from_slice(&self.added);
        set.sort_unstable();
        set.dedup();
    }
}

#[cfg(test)]
mod friend_tests {
    use super::*;

    #[test]
    fn pack_set_deltas_rebuild_the_set() {
        let p = |b: u8| PackId([b; 32]);
        let a = vec![p(1), p(2), p(5)];
        let b = vec![p(2), p(3), p(5), p(9)];
        let whole = PackSetDelta::between(None, &a);
        assert_eq!(whole.added, a);
        let d = PackSetDelta::between(Some((SnapshotId([7; 32]), &a)), &b);
        assert_eq!(d.base, Some(SnapshotId([7; 32])));
        assert_eq!(d.added, vec![p(3), p(9)]);
        assert_eq!(d.removed, vec![p(1)]);
        let mut set = Vec::new();
        whole.apply(&mut set);
        assert_eq!(set, a);
        d.apply(&mut set);
        assert_eq!(set, b);
        let back = PackSetDelta::from_bytes(&d.to_bytes()).unwrap();
        assert_eq!(back, d);
        assert!(PackSetDelta::from_bytes(&[1, 1]).is_err());
        // A whole set replaces whatever was there.
        whole.apply(&mut set);
        assert_eq!(set, a);
    }

    #[test]
    fn presence_keeps_thirty_days_and_counts_the_online_share() {
        let day = 86_400_000_000_000i64;
        let mut h = FriendHealth::default();
        assert_eq!(h.online_fraction(), None);
        h.note_presence(10 * day, 60, true);
        h.note_presence(10 * day + 60_000_000_000, 60, false);
        assert_eq!(h.online_fraction(), Some(0.5));
        assert_eq!(h.last_seen_ns, 10 * day);
        for d in 11..=45 {
            h.note_presence(d * day, 100, d % 4 == 0);
        }
        assert_eq!(h.days.len(), PRESENCE_DAYS);
        assert_eq!(h.days[0].day, 16);
        let online = (16..=45).filter(|d| d % 4 == 0).count() as f64;
        assert_eq!(h.online_fraction(), Some(online / 30.0));
        let back = FriendHealth::from_bytes(&h.to_bytes()).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn presence_drops_days_after_today_without_overflow() {
        let day = 86_400_000_000_000i64;
        let mut h = FriendHealth {
            days: vec![
                DayPresence {
                    day: 9,
                    observed_secs: 5,
                    online_secs: 5,
                },
                DayPresence {
                    day: u32::MAX,
                    observed_secs: 7,
                    online_secs: 0,
                },
            ],
            ..FriendHealth::default()
        };
        h.note_presence(10 * day, 60, false);
        let days: Vec<u32> = h.days.iter().map(|d| d.day).collect();
        assert_eq!(days, [9, 10]);
        assert_eq!(h.online_fraction(), Some(5.0 / 65.0));
    }

    #[test]
    fn golden_friend_and_owner_records() {
        let f = Friend {
            peer_id: vec![1, 2],
            name: "b".into(),
            household: "h".into(),
            addrs: vec![],
            quota_given: 1,
            added_ns: 0,
        };
        assert_eq!(f.to_bytes(), vec![1, 2, 1, 2, 1, b'b', 1, b'h', 0, 1, 0]);
        assert_eq!(Friend::from_bytes(&f.to_bytes()).unwrap(), f);
        let o = HostedOwner {
            bound_peer: vec![9],
            used: 2,
            packs: 1,
        };
        assert_eq!(o.to_bytes(), vec![1, 1, 9, 2, 1]);
        let s = PeerState {
            head_seq: 3,
            slot_pushed: true,
            quota_refused: false,
            used_by_us: 0,
        };
        assert_eq!(s.to_bytes(), vec![1, 3, 1, 0, 0]);
    }
}

/// How much older than the stat a change time must be before a file-cache record is trusted.
/// Larger than any file-system timestamp granularity we expect (1 s on ext3 and some network
/// file systems, one clock tick on the rest): a file changed after the stat then always shows
/// a newer ctime.
pub const FILE_CACHE_MARGIN_NS: i64 = 2_000_000_000;

/// The file-cache record of one directory: what the last backup (or an index rebuild) saw of
/// each regular file in it. A file whose metadata still matches is not read again.
///
/// Stored in the node's own redb under [`dir_cache_key`]; never sent to anyone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DirCache {
    /// When the stats were taken (before the first one), nanoseconds since the Unix epoch.
    /// A file is trusted only if its ctime is older than this by [`FILE_CACHE_MARGIN_NS`].
    pub stat_ns: i64,
    /// Seeded by an index rebuild from a snapshot: device, inode and ctime are unknown, so
    /// size and mtime must match and the ctime must predate the seed.
    pub seeded: bool,
    /// Regular files, sorted by name.
    pub files: Vec<CachedFile>,
    /// Names of subdirectories, sorted, so records below a vanished one can be removed.
    pub dirs: Vec<serde_bytes::ByteBuf>,
}

/// One regular file in a [`DirCache`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedFile {
    /// File name within the directory.
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    /// Device number (0 when seeded).
    pub dev: u64,
    /// Inode number (0 when seeded).
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds.
    pub mtime_ns: i64,
    /// Change time, nanoseconds (0 when seeded).
    pub ctime_ns: i64,
    /// The file's chunks, in order.
    pub chunks: Vec<crate::ChunkId>,
}

/// The stat fields the file cache compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds.
    pub mtime_ns: i64,
    /// Change time, nanoseconds.
    pub ctime_ns: i64,
}

/// Largest [`DirCache`] record decoded (a directory of about a million files).
pub const MAX_DIR_CACHE: usize = 512 * 1024 * 1024;

impl DirCache {
    /// Encodes the record.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }
    /// Decodes the record.
    ///
    /// # Errors
    /// A bounded [`DecodeError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_versioned("directory cache", bytes, MAX_DIR_CACHE)
    }

    /// The chunks of `name` if the record may be trusted for a file with `stat`: the same size
    /// and mtime and, unless seeded, the same device, inode and ctime; and in every case a
    /// ctime older than the record by [`FILE_CACHE_MARGIN_NS`].
    pub fn lookup(&self, name: &[u8], stat: &FileStat) -> Option<&[crate::ChunkId]> {
        let i = self
            .files
            .binary_search_by(|f| f.name.as_slice().cmp(name))
            .ok()?;
        let f = &self.files[i];
        let same = f.size == stat.size
            && f.mtime_ns == stat.mtime_ns
            && (self.seeded
                || (f.dev == stat.dev && f.ino == stat.ino && f.ctime_ns == stat.ctime_ns));
        let settled = stat.ctime_ns < self.stat_ns.saturating_sub(FILE_CACHE_MARGIN_NS);
        (same && settled).then_some(f.chunks.as_slice())
    }
}

/// The key of a directory's [`DirCache`]: each component of the absolute path, preceded by a
/// zero byte (`/` is the empty key). Every directory below `dir` then has a key that starts
/// with `dir_cache_key(dir) + [0]`, so a subtree is one key range.
pub fn dir_cache_key<'a>(components: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut key = Vec::new();
    for c in components {
        key.push(0);
        key.extend_from_slice(c);
    }
    key
}

#[cfg(test)]
mod dir_cache_tests {
    use super::*;
    use crate::ChunkId;

    fn rec(seeded: bool) -> DirCache {
        DirCache {
            stat_ns: 10_000_000_000,
            seeded,
            files: vec![CachedFile {
                name: b"a".to_vec(),
                dev: 1,
                ino: 2,
                size: 3,
                mtime_ns: 4,
                ctime_ns: 5,
                chunks: vec![ChunkId([7; 32])],
            }],
            dirs: vec![],
        }
    }

    const STAT: FileStat = FileStat {
        dev: 1,
        ino: 2,
        size: 3,
        mtime_ns: 4,
        ctime_ns: 5,
    };

    #[test]
    fn an_unchanged_settled_file_hits() {
        assert_eq!(
            rec(false).lookup(b"a", &STAT),
            Some(&[ChunkId([7; 32])][..])
        );
        assert_eq!(rec(false).lookup(b"b", &STAT), None);
    }

    #[test]
    fn any_changed_field_misses() {
        let r = rec(false);
        for s in [
            FileStat { dev: 9, ..STAT },
            FileStat { ino: 9, ..STAT },
            FileStat { size: 9, ..STAT },
            FileStat {
                mtime_ns: 9,
                ..STAT
            },
            FileStat {
                ctime_ns: 9,
                ..STAT
            },
        ] {
            assert_eq!(r.lookup(b"a", &s), None, "{s:?}");
        }
    }

    #[test]
    fn a_file_changed_just_before_the_stat_is_not_trusted() {
        let mut r = rec(false);
        r.stat_ns = STAT.ctime_ns + FILE_CACHE_MARGIN_NS;
        assert_eq!(r.lookup(b"a", &STAT), None);
        r.stat_ns += 1;
        assert!(r.lookup(b"a", &STAT).is_some());
    }

    #[test]
    fn a_seed_ignores_device_inode_and_ctime_but_not_size_or_mtime() {
        let r = rec(true);
        let moved = FileStat {
            dev: 8,
            ino: 9,
            ctime_ns: 6,
            ..STAT
        };
        assert!(r.lookup(b"a", &moved).is_some());
        assert_eq!(r.lookup(b"a", &FileStat { size: 4, ..moved }), None);
        assert_eq!(
            r.lookup(
                b"a",
                &FileStat {
                    mtime_ns: 5,
                    ..moved
                }
            ),
            None
        );
        // A file changed after the seed has a newer ctime.
        let late = FileStat {
            ctime_ns: r.stat_ns,
            ..moved
        };
        assert_eq!(r.lookup(b"a", &late), None);
    }

    #[test]
    fn golden_dir_cache_and_keys() {
        let r = rec(false);
        let bytes = r.to_bytes();
        assert_eq!(&bytes[..2], &[1, 0x80]);
        assert_eq!(DirCache::from_bytes(&bytes).unwrap(), r);
        assert_eq!(dir_cache_key([]), Vec::<u8>::new());
        assert_eq!(dir_cache_key([&b"home"[..], b"u"]), b"\0home\0u".to_vec());
    }
}
