//! Replays the kept fuzz inputs as ordinary tests: one test per cargo-fuzz target (`fuzz/`).
//!
//! `tests/fuzz-regressions/<target>/` holds, for each target,
//! - `crash-*`: inputs that once crashed the target; each must now pass without a panic;
//! - `valid-*`: valid encodings made with this crate's own encoders (listed in [`valid`]); each
//!   must decode. They also seed the fuzzer's corpus (`bench/fuzz`).
//!
//! Every input goes through `obnam_protocol::fuzzing`, the same calls as the fuzz targets. The
//! `valid-*` files must equal what [`valid`] builds; after a deliberate format change, write
//! them again with `OBNAM_WRITE_FUZZ_SEEDS=1 cargo test -p obnam-protocol --test
//! fuzz_regressions`.

use ed25519_dalek::{Signer, SigningKey};
use obnam_protocol::audit::{self, Challenge};
use obnam_protocol::control::{self, BackupRequest, Event, Progress, Reply};
use obnam_protocol::envelope::{self, NONCE_LEN, TAG_LEN};
use obnam_protocol::fuzzing::{self, PROVER, VERIFIER, with_selector};
use obnam_protocol::ids::{ChunkId, LookupId, OwnerId, PackId, SnapshotId};
use obnam_protocol::keyslot::{KeySlot, SecretsFile};
use obnam_protocol::local::{
    CachedFile, ChunkLoc, DayPresence, DirCache, FriendHealth, PackRecord, PackSetDelta,
};
use obnam_protocol::msg::{
    self, OwnerProof, Request, Response, StreamReply, StreamRequest, SuccessorStatement,
};
use obnam_protocol::pack::{PackIndex, PackIndexEntry, PackTrailer};
use obnam_protocol::signed::{self, CONTEXT_HEAD, CONTEXT_OWNER_PROOF, CONTEXT_SUCCESSOR};
use obnam_protocol::snapshot::{
    ChunkerParams, FriendRecord, Head, HeadBody, SignedHead, SnapshotEntry, SnapshotRecord,
};
use obnam_protocol::ticket::Ticket;
use obnam_protocol::tree::{Entry, EntryKind, Tree};
use serde_bytes::ByteBuf;
use std::path::{Path, PathBuf};

fn dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-regressions")
        .join(target)
}

fn key(b: u8) -> (SigningKey, OwnerId) {
    let k = SigningKey::from_bytes(&[b; 32]);
    let owner = OwnerId(k.verifying_key().to_bytes());
    (k, owner)
}

fn sealed(len: usize, fill: u8) -> Vec<u8> {
    envelope::assemble(&[fill; NONCE_LEN], &vec![fill; len + TAG_LEN])
}

fn record(host: &str) -> SnapshotRecord {
    SnapshotRecord {
        time_ns: 1_700_000_000_000_000_000,
        host: host.into(),
        paths: vec![ByteBuf::from(b"/home/\xffu".to_vec())],
        tags: vec!["daily".into()],
        root: vec![ChunkId([2; 32]), ChunkId([3; 32])],
        files: 10,
        dirs: 2,
        bytes: 12_345,
        failed_files: 1,
        chunker: ChunkerParams::DEFAULT,
    }
}

fn signed_head(b: u8, seq: u64) -> Vec<u8> {
    let (k, owner) = key(b);
    let head = Head {
        owner,
        seq,
        prev: (seq > 1).then_some([9; 32]),
        sealed_body: sealed(100, b),
    }
    .to_bytes();
    let signature = k
        .sign(&signed::message(CONTEXT_HEAD, &head))
        .to_bytes()
        .to_vec();
    SignedHead { head, signature }.to_bytes()
}

fn slot() -> Vec<u8> {
    KeySlot {
        version: 1,
        sealed_secret: sealed(32, 4),
    }
    .to_bytes()
}

fn proof(case: u8, offset: u64, len: u32) -> (Challenge, Vec<u8>) {
    let (challenge, size) = fuzzing::audit_challenge(case, offset, len);
    let data = fuzzing::audit_pack(size);
    let proof = audit::prove(&challenge, size, &data[..], &data[..]).unwrap();
    (challenge, proof)
}

fn entry(name: &[u8], kind: EntryKind) -> Entry {
    let mut e = Entry::new(name.to_vec(), kind);
    e.mode = 0o644;
    e.mtime_ns = -5;
    e
}

/// Valid encodings for each target, made with this crate's encoders.
fn valid(target: &str) -> Vec<(&'static str, Vec<u8>)> {
    let (k, owner) = key(1);
    match target {
        "wire_request" => {
            let nonce = [7; 32];
            let proof = OwnerProof {
                owner,
                nonce,
                signature: k
                    .sign(&signed::message(
                        CONTEXT_OWNER_PROOF,
                        &OwnerProof::payload(&owner, &nonce, PROVER, VERIFIER),
                    ))
                    .to_bytes()
                    .to_vec(),
            };
            assert!(proof.verify(PROVER, VERIFIER).is_ok());
            let (_, new) = key(2);
            let lookup = LookupId([3; 32]);
            let successor = SuccessorStatement {
                old: owner,
                new,
                lookup,
                slot: ByteBuf::from(slot()),
                signature: k
                    .sign(&signed::message(
                        CONTEXT_SUCCESSOR,
                        &SuccessorStatement::payload(&owner, &new, &lookup, &slot()),
                    ))
                    .to_bytes()
                    .to_vec(),
            };
            assert!(successor.verify().is_ok());
            vec![
                ("valid-prove-owner", msg::body(&Request::ProveOwner(proof))),
                (
                    "valid-put-head",
                    msg::body(&Request::PutHead {
                        owner,
                        head: ByteBuf::from(signed_head(1, 3)),
                    }),
                ),
                ("valid-successor", msg::body(&Request::Successor(successor))),
            ]
        }
        "wire_response" => {
            let (challenge, proof) = proof(0, 0, audit::MAX_RANGE);
            vec![
                (
                    "valid-head",
                    msg::body(&Response::Head(Some(ByteBuf::from(signed_head(1, 1))))),
                ),
                (
                    "valid-slot",
                    msg::body(&Response::Slot(Some(ByteBuf::from(slot())))),
                ),
                (
                    "valid-proof",
                    msg::body(&Response::Proof {
                        nonce: challenge.nonce,
                        proof: ByteBuf::from(proof),
                    }),
                ),
                (
                    "valid-packs",
                    msg::body(&Response::Packs(vec![(PackId([1; 32]), 65536)])),
                ),
            ]
        }
        "stream_header" => vec![
            (
                "valid-put",
                with_selector(
                    0,
                    &msg::body(&StreamRequest::Put {
                        owner,
                        pack: PackId([2; 32]),
                        len: 8 << 20,
                    }),
                ),
            ),
            (
                "valid-get",
                with_selector(
                    0,
                    &msg::body(&StreamRequest::Get {
                        owner,
                        pack: PackId([2; 32]),
                        offset: 65536,
                        len: u64::MAX,
                    }),
                ),
            ),
            (
                "valid-data",
                with_selector(1, &msg::body(&StreamReply::Data { len: 300 })),
            ),
        ],
        "pack_index" => {
            let index = PackIndex {
                entries: vec![
                    PackIndexEntry {
                        chunk: ChunkId([1; 32]),
                        offset: 0,
                        len: 300,
                    },
                    PackIndexEntry {
                        chunk: ChunkId([2; 32]),
                        offset: 300,
                        len: 1 << 20,
                    },
                ],
            };
            let trailer = PackTrailer {
                index_offset: 300 + (1 << 20),
                index_len: 200,
            };
            let mut trailer_input = (2u64 << 20).to_le_bytes().to_vec();
            trailer_input.extend_from_slice(&trailer.to_bytes());
            vec![
                ("valid-index", with_selector(0, &index.to_bytes())),
                ("valid-trailer", with_selector(1, &trailer_input)),
                ("valid-sealed", with_selector(2, &sealed(16, 9))),
            ]
        }
        "tree" => {
            let mut file = entry(b"a.txt", EntryKind::File);
            file.size = 5;
            file.content = vec![ChunkId([4; 32])];
            file.hardlink = Some(1);
            let mut dir = entry(b"d\xff", EntryKind::Dir);
            dir.content = vec![ChunkId([5; 32])];
            let mut link = entry(b"l", EntryKind::Symlink);
            link.target = b"../a.txt".to_vec();
            vec![
                ("valid-empty", Tree::default().to_bytes()),
                (
                    "valid-three",
                    Tree {
                        entries: vec![file, dir, link],
                    }
                    .to_bytes(),
                ),
                (
                    "valid-device",
                    Tree {
                        entries: vec![Entry {
                            rdev: 0x0801,
                            ..entry(b"sda1", EntryKind::BlockDevice)
                        }],
                    }
                    .to_bytes(),
                ),
            ]
        }
        "head" => {
            let body = HeadBody {
                snapshots: vec![SnapshotEntry {
                    id: SnapshotId([6; 32]),
                    record: record("h"),
                }],
                friends: vec![FriendRecord {
                    peer_id: vec![0, 36, 8, 1],
                    name: "bob".into(),
                    addrs: vec![ByteBuf::from(vec![4, 127, 0, 0, 1])],
                }],
                chunker: ChunkerParams::DEFAULT,
            };
            vec![
                ("valid-signed-head", with_selector(0, &signed_head(1, 2))),
                ("valid-head-body", with_selector(1, &body.to_bytes())),
                (
                    "valid-snapshot-record",
                    with_selector(2, &record("laptop").to_bytes()),
                ),
            ]
        }
        "ticket" => {
            let peer = libp2p_identity::Keypair::ed25519_from_bytes([5u8; 32])
                .unwrap()
                .public()
                .to_peer_id();
            let t = Ticket {
                peer_id: peer,
                addrs: vec![
                    "/ip4/127.0.0.1/tcp/4411".parse().unwrap(),
                    "/ip6/::1/tcp/4411".parse().unwrap(),
                ],
            };
            let bare = Ticket {
                peer_id: peer,
                addrs: vec![],
            };
            vec![
                ("valid-ticket", t.encode().into_bytes()),
                (
                    "valid-ticket-spaces-upper",
                    format!(
                        " {} \n",
                        bare.encode().to_uppercase().replacen("OBNAM1", "obnam1", 1)
                    )
                    .into_bytes(),
                ),
            ]
        }
        "control" => vec![
            (
                "valid-backup",
                with_selector(
                    0,
                    &control::frame(&control::Request::Backup(BackupRequest {
                        paths: vec![ByteBuf::from(b"/home".to_vec())],
                        excludes: vec!["*.o".into()],
                        tags: vec!["t".into()],
                        timeout_secs: 60,
                        ..Default::default()
                    }))[4..],
                ),
            ),
            (
                "valid-progress",
                with_selector(
                    1,
                    &control::frame(&Event::Progress(Progress {
                        files: 3,
                        bytes: 4,
                        total_files: Some(5),
                        total_bytes: None,
                        current: "/home/x".into(),
                    }))[4..],
                ),
            ),
            (
                "valid-passphrase-changed",
                with_selector(
                    2,
                    &control::frame(&Reply::PassphraseChanged {
                        name: "alice".into(),
                        pending: vec!["12D3Koo".into()],
                    })[4..],
                ),
            ),
        ],
        "audit_proof" => [(0u8, 0u64, 4096u32), (1, 123_456, 2000), (2, 7 << 20, 4096)]
            .into_iter()
            .zip(["valid-small-pack", "valid-mid-pack", "valid-largest-pack"])
            .map(|((case, offset, len), name)| {
                let (c, p) = proof(case, offset, len);
                assert_eq!((c.offset, c.len), (offset, len));
                (name, fuzzing::audit_input(case, offset, len, &p))
            })
            .collect(),
        "local_records" => {
            let health = FriendHealth {
                audits_passed: 3,
                audits_failed: 1,
                last_audit_ns: 1_700_000_000_000_000_000,
                last_passed: true,
                last_failure: "proof does not verify".into(),
                days: vec![DayPresence {
                    day: 19_675,
                    observed_secs: 600,
                    online_secs: 300,
                }],
                ..FriendHealth::default()
            };
            let cache = DirCache {
                stat_ns: 5_000_000_000,
                seeded: false,
                files: vec![CachedFile {
                    name: b"f".to_vec(),
                    dev: 1,
                    ino: 2,
                    size: 3,
                    mtime_ns: 4,
                    ctime_ns: 5,
                    chunks: vec![ChunkId([8; 32])],
                }],
                dirs: vec![ByteBuf::from(b"sub".to_vec())],
            };
            let loc = ChunkLoc {
                pack: PackId([9; 32]),
                offset: 4,
                len: 5,
            };
            vec![
                (
                    "valid-pack-record",
                    with_selector(
                        0,
                        &PackRecord {
                            len: 65536,
                            chunks: 2,
                            created_ns: 1,
                            in_outbox: true,
                        }
                        .to_bytes(),
                    ),
                ),
                ("valid-friend-health", with_selector(3, &health.to_bytes())),
                ("valid-dir-cache", with_selector(5, &cache.to_bytes())),
                ("valid-chunk-loc", with_selector(6, &loc.to_bytes())),
                (
                    "valid-pack-set-delta",
                    with_selector(
                        7,
                        &PackSetDelta {
                            base: Some(SnapshotId([4; 32])),
                            added: vec![PackId([1; 32]), PackId([2; 32])],
                            removed: vec![PackId([3; 32])],
                        }
                        .to_bytes(),
                    ),
                ),
            ]
        }
        "key_slot" => vec![
            ("valid-slot", with_selector(0, &slot())),
            (
                "valid-secrets-file",
                with_selector(
                    1,
                    &SecretsFile {
                        name: "alice".into(),
                        master: vec![3; 32],
                        slot: slot(),
                        lookup: LookupId([5; 32]),
                    }
                    .to_bytes(),
                ),
            ),
            ("valid-sealed-chunk", with_selector(2, &sealed(1000, 6))),
        ],
        other => panic!("no valid inputs for {other}"),
    }
}

/// Replays every kept input of `target`, then checks the `valid-*` files against [`valid`].
fn replay(target: &str) {
    let dir = dir(target);
    let write = std::env::var_os("OBNAM_WRITE_FUZZ_SEEDS").is_some();
    let built = valid(target);
    assert!(built.len() >= 2, "{target}: too few valid inputs");
    for (name, bytes) in &built {
        let out = fuzzing::run(target, bytes);
        assert!(out.is_ok(), "{target}/{name} does not decode: {out:?}");
        let path = dir.join(name);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, bytes).unwrap();
        }
        let kept = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (OBNAM_WRITE_FUZZ_SEEDS=1 writes it)",
                path.display()
            )
        });
        assert!(
            kept == *bytes,
            "{} differs from what the encoders make now (OBNAM_WRITE_FUZZ_SEEDS=1 rewrites it)",
            path.display()
        );
    }
    let mut replayed = 0;
    for file in std::fs::read_dir(&dir).unwrap() {
        let path = file.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let data = std::fs::read(&path).unwrap();
        let out = std::panic::catch_unwind(|| fuzzing::run(target, &data))
            .unwrap_or_else(|_| panic!("{target}/{name} panics"));
        if name.starts_with("valid-") {
            assert!(
                built.iter().any(|(n, _)| *n == name),
                "{target}/{name} is not made by valid()"
            );
            assert!(out.is_ok(), "{target}/{name} does not decode: {out:?}");
        } else {
            assert!(
                name.starts_with("crash-"),
                "{target}/{name}: kept inputs are named crash-* or valid-*"
            );
        }
        replayed += 1;
    }
    assert!(
        replayed >= built.len(),
        "{target}: {replayed} inputs replayed"
    );
}

macro_rules! replay_tests {
    ($($target:ident),* $(,)?) => {
        $(
            #[test]
            fn $target() {
                replay(stringify!($target));
            }
        )*

        #[test]
        fn every_fuzz_target_is_replayed() {
            assert_eq!(fuzzing::TARGETS, [$(stringify!($target)),*]);
            let on_disk: std::collections::BTreeSet<String> =
                std::fs::read_dir(dir("")).unwrap()
                    .map(|d| d.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
            let named: std::collections::BTreeSet<String> =
                fuzzing::TARGETS.iter().map(|t| t.to_string()).collect();
            assert_eq!(on_disk, named);
            // And every target has a [[bin]] in the fuzz crate.
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/Cargo.toml");
            let bins: std::collections::BTreeSet<String> = std::fs::read_to_string(manifest)
                .unwrap()
                .lines()
                .filter_map(|l| l.strip_prefix("name = \""))
                .filter_map(|l| l.strip_suffix('"'))
                .filter(|n| *n != "obnam-fuzz")
                .map(str::to_string)
                .collect();
            assert_eq!(bins, named);
        }
    };
}

replay_tests!(
    wire_request,
    wire_response,
    stream_header,
    pack_index,
    tree,
    head,
    ticket,
    control,
    audit_proof,
    local_records,
    key_slot,
);
