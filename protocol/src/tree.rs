//! Trees: the directory listings of a snapshot.
//!
//! A [`Tree`] lists one directory's entries, sorted by name bytes. It is encoded with
//! [`Tree::to_bytes`], then chunked and sealed exactly like file data, so a friend cannot tell a
//! tree from a file. A directory entry points at its subtree by the chunk ids of that encoding.
//!
//! Names, symlink targets and paths are raw bytes: Linux file names need not be UTF-8.

use crate::codec::{DecodeError, decode_versioned, encode_versioned};
use crate::ids::ChunkId;
use serde::{Deserialize, Serialize};

/// The largest encoded tree accepted (after its chunks are joined).
pub const MAX_TREE_LEN: usize = 512 * 1024 * 1024;

/// What kind of file an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file; `content` lists its data chunks.
    File,
    /// A directory; `content` lists the chunks of its encoded [`Tree`].
    Dir,
    /// A symbolic link; `target` holds the link text.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A character device; `rdev` holds the device number.
    CharDevice,
    /// A block device; `rdev` holds the device number.
    BlockDevice,
    /// A Unix socket (recorded, not restored).
    Socket,
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The file name, as bytes.
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    /// The kind of file.
    pub kind: EntryKind,
    /// Permission bits (including setuid, setgid and sticky).
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Size in bytes (regular files; 0 otherwise).
    pub size: u64,
    /// Symlink target bytes (symlinks only).
    #[serde(with = "serde_bytes")]
    pub target: Vec<u8>,
    /// Hard-link group within the snapshot: entries with the same group are one inode.
    pub hardlink: Option<u64>,
    /// Device number (devices only).
    pub rdev: u64,
    /// Data chunks (files) or subtree chunks (directories), in order.
    pub content: Vec<ChunkId>,
}

impl Entry {
    /// An entry with the given name and kind and every other field zero.
    pub fn new(name: Vec<u8>, kind: EntryKind) -> Self {
        Self {
            name,
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            size: 0,
            target: Vec::new(),
            hardlink: None,
            rdev: 0,
            content: Vec::new(),
        }
    }
}

/// One directory's listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Tree {
    /// Entries sorted by name bytes.
    pub entries: Vec<Entry>,
}

impl Tree {
    /// Encodes the tree behind a version byte.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }

    /// Decodes a tree and checks that its names are valid and sorted without duplicates.
    ///
    /// # Errors
    /// A bounded [`DecodeError`], or `Malformed` for bad names.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let tree: Tree = decode_versioned("tree", bytes, MAX_TREE_LEN)?;
        for pair in tree.entries.windows(2) {
            if pair[0].name >= pair[1].name {
                return Err(DecodeError::Malformed {
                    what: "tree",
                    reason: "entries not sorted".into(),
                });
            }
        }
        for e in &tree.entries {
            if e.name.is_empty()
                || e.name == b"."
                || e.name == b".."
                || e.name.contains(&b'/')
                || e.name.contains(&0)
            {
                return Err(DecodeError::Malformed {
                    what: "tree",
                    reason: format!("invalid entry name {:?}", String::from_utf8_lossy(&e.name)),
                });
            }
        }
        Ok(tree)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn golden_tree_bytes() {
        let mut e = Entry::new(b"a".to_vec(), EntryKind::Symlink);
        e.mode = 0o777;
        e.mtime_ns = -1;
        e.target = b"b".to_vec();
        let tree = Tree { entries: vec![e] };
        assert_eq!(
            hex::encode(tree.to_bytes()),
            // version, 1 entry, name "a", kind 2, mode 0o777 (varint), uid, gid, mtime -1 (zigzag),
            // size, target "b", no hard link, rdev, no content
            "0101016102ff03000001000162000000"
        );
        assert_eq!(Tree::from_bytes(&tree.to_bytes()).unwrap(), tree);
    }

    #[test]
    fn names_that_escape_the_directory_are_refused() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0"] {
            let tree = Tree {
                entries: vec![Entry::new(bad.to_vec(), EntryKind::File)],
            };
            assert!(Tree::from_bytes(&tree.to_bytes()).is_err(), "{bad:?}");
        }
        let unsorted = Tree {
            entries: vec![
                Entry::new(b"b".to_vec(), EntryKind::File),
                Entry::new(b"a".to_vec(), EntryKind::File),
            ],
        };
        assert!(Tree::from_bytes(&unsorted.to_bytes()).is_err());
    }

    fn entry() -> impl Strategy<Value = Entry> {
        (
            proptest::collection::vec(1u8..=255, 1..20),
            0usize..7,
            any::<u32>(),
            any::<(u32, u32, i64, u64)>(),
            proptest::collection::vec(any::<u8>(), 0..20),
            any::<Option<u64>>(),
            proptest::collection::vec(any::<[u8; 32]>(), 0..4),
        )
            .prop_map(
                |(name, kind, mode, (uid, gid, mtime_ns, size), target, hardlink, content)| Entry {
                    name: name
                        .into_iter()
                        .map(|b| if b == b'/' { b'x' } else { b })
                        .collect(),
                    kind: [
                        EntryKind::File,
                        EntryKind::Dir,
                        EntryKind::Symlink,
                        EntryKind::Fifo,
                        EntryKind::CharDevice,
                        EntryKind::BlockDevice,
                        EntryKind::Socket,
                    ][kind],
                    mode,
                    uid,
                    gid,
                    mtime_ns,
                    size,
                    target,
                    hardlink,
                    rdev: size ^ 7,
                    content: content.into_iter().map(ChunkId).collect(),
                },
            )
    }

    proptest! {
        #[test]
        fn trees_round_trip(mut entries in proptest::collection::vec(entry(), 0..10)) {
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            entries.dedup_by(|a, b| a.name == b.name);
            entries.retain(|e| e.name != b"." && e.name != b"..");
            let tree = Tree { entries };
            prop_assert_eq!(Tree::from_bytes(&tree.to_bytes()).unwrap(), tree);
        }
    }
}
