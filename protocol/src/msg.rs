//! Messages between friends' nodes.
//!
//! Two protocols, both over one libp2p connection (TCP + Noise + Yamux):
//!
//! - [`EXCHANGE_PROTOCOL`] (`/obnam/exchange/1`): request-response for small messages.
//!   Each message is a frame: `length (u32 LE) ‖ postcard`, at most [`MAX_MESSAGE`] bytes.
//! - [`PACKS_PROTOCOL`] (`/obnam/packs/1`): a stream that carries whole packs. The client sends a
//!   [`StreamRequest`] frame. For a put the server answers `Ready` (or a refusal, so no body is
//!   sent in vain), the client sends exactly `len` raw bytes, and the server answers `Stored`
//!   once the pack is verified and durable. For a get the server answers `Data { len }`
//!   followed by exactly `len` raw bytes. Several requests
//!   may follow each other on one stream. Pack bytes are streamed, never held whole in memory.
//!
//! Every request names the owner it concerns; the receiving node authorises it in its handler:
//! the sender must be a friend, and for owner data it must have proved the owner key
//! ([`OwnerProof`]). Enums only grow at the end.

use crate::audit::Challenge;
use crate::codec::{DecodeError, decode_bounded, encode};
use crate::ids::{LookupId, OwnerId, PackId};
use crate::signed::{self, CONTEXT_OWNER_PROOF, SignatureError};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// The request-response protocol for small messages.
pub const EXCHANGE_PROTOCOL: &str = "/obnam/exchange/1";
/// The stream protocol for pack bodies.
pub const PACKS_PROTOCOL: &str = "/obnam/packs/1";
/// The largest exchange message, either way.
pub const MAX_MESSAGE: usize = 1024 * 1024;
/// The largest stream header frame.
pub const MAX_STREAM_HEADER: usize = 4096;
/// Most pack ids in one [`Request::Have`].
pub const MAX_HAVE: usize = 4096;
/// The largest head a friend stores: room for about 4,000 snapshots (each adds about 250 bytes).
pub const MAX_HEAD: usize = MAX_MESSAGE - 4096;
/// The largest key slot a friend stores.
pub const MAX_SLOT: usize = 1024;

/// A proof that the sender holds an owner's key: a signature over a nonce the receiver chose,
/// bound to both nodes' peer ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerProof {
    /// The owner.
    pub owner: OwnerId,
    /// The nonce from [`Response::Nonce`].
    pub nonce: [u8; 32],
    /// Ed25519 signature over [`OwnerProof::payload`] in [`CONTEXT_OWNER_PROOF`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl OwnerProof {
    /// The signed bytes: `owner ‖ nonce ‖ len ‖ prover peer id ‖ len ‖ verifier peer id`.
    pub fn payload(owner: &OwnerId, nonce: &[u8; 32], prover: &[u8], verifier: &[u8]) -> Vec<u8> {
        let mut p = Vec::with_capacity(64 + 2 + prover.len() + verifier.len());
        p.extend_from_slice(owner.as_bytes());
        p.extend_from_slice(nonce);
        p.push(u8::try_from(prover.len()).unwrap_or(u8::MAX));
        p.extend_from_slice(prover);
        p.push(u8::try_from(verifier.len()).unwrap_or(u8::MAX));
        p.extend_from_slice(verifier);
        p
    }

    /// Verifies the proof for the prover and verifier peer ids (as bytes).
    ///
    /// # Errors
    /// [`SignatureError`] when it does not verify.
    pub fn verify(&self, prover: &[u8], verifier: &[u8]) -> Result<(), SignatureError> {
        signed::verify_slice(
            &self.owner,
            CONTEXT_OWNER_PROOF,
            &Self::payload(&self.owner, &self.nonce, prover, verifier),
            &self.signature,
        )
    }
}

/// A request on [`EXCHANGE_PROTOCOL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A fresh nonce for an [`OwnerProof`].
    Nonce,
    /// Prove an owner key; binds the owner to the sending node.
    ProveOwner(OwnerProof),
    /// Which of these packs of `owner` do you hold?
    Have {
        /// The owner.
        owner: OwnerId,
        /// At most [`MAX_HAVE`] pack ids.
        packs: Vec<PackId>,
    },
    /// Store the owner's signed head (a higher sequence number than the stored one).
    PutHead {
        /// The owner.
        owner: OwnerId,
        /// The encoded signed head.
        head: ByteBuf,
    },
    /// The owner's stored head.
    GetHead {
        /// The owner.
        owner: OwnerId,
    },
    /// Store the owner's key slot under its lookup id.
    PutSlot {
        /// The owner.
        owner: OwnerId,
        /// Where to file it.
        lookup: LookupId,
        /// The encoded key slot.
        slot: ByteBuf,
    },
    /// The key slot filed under a lookup id.
    GetSlot {
        /// The lookup id.
        lookup: LookupId,
    },
    /// Quota and use for an owner.
    Usage {
        /// The owner.
        owner: OwnerId,
    },
    /// The owner's packs held here, in id order, after `after`, at most `limit`.
    ListPacks {
        /// The owner.
        owner: OwnerId,
        /// Continue after this pack id.
        after: Option<PackId>,
        /// At most this many (capped at [`MAX_LIST`]).
        limit: u32,
    },
    /// A recovered node becomes the owner's writing node.
    Takeover(TakeoverStatement),
    /// The owner key retires in favour of a new one (`keys rotate`): the key slot moves to
    /// the new owner, and the old owner takes no more writes.
    Successor(SuccessorStatement),
    /// Delete everything stored for a retired owner. Only its bound node may ask, and only
    /// after a [`Request::Successor`].
    DeleteOwner {
        /// The retired owner.
        owner: OwnerId,
    },
    /// Prove that you hold a range of one of the owner's packs ([`crate::audit`]). The bound node
    /// or a node that proved the owner key may ask.
    Audit {
        /// The owner.
        owner: OwnerId,
        /// The pack, the range and a fresh nonce.
        challenge: Challenge,
    },
    /// Which of the owner's packs did you drop as lost or corrupt (and not get again since)?
    Dropped {
        /// The owner.
        owner: OwnerId,
    },
    /// The sender's own newest signed address record (a libp2p signed peer record, at most
    /// [`crate::local::MAX_ADDRESS_RECORD`] bytes), pushed when its addresses change. Friends
    /// only.
    Addresses(ByteBuf),
    /// What is the newest signed address record you hold of this peer (a friend of both)?
    /// Friends only; answered [`Response::Addresses`].
    WhereIs {
        /// The peer id, as bytes.
        peer: ByteBuf,
    },
}

/// A statement, signed with the **old** owner key in
/// [`CONTEXT_SUCCESSOR`](crate::signed::CONTEXT_SUCCESSOR), that `new` succeeds `old`, and that
/// the key slot under `lookup` is now `slot` (the new master secret, wrapped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuccessorStatement {
    /// The retiring owner.
    pub old: OwnerId,
    /// The owner that succeeds it.
    pub new: OwnerId,
    /// Where the slot is filed.
    pub lookup: LookupId,
    /// The new encoded key slot.
    pub slot: ByteBuf,
    /// Ed25519 signature by `old` over [`SuccessorStatement::payload`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl SuccessorStatement {
    /// The signed bytes: `old ‖ new ‖ lookup ‖ BLAKE3(slot)`.
    pub fn payload(old: &OwnerId, new: &OwnerId, lookup: &LookupId, slot: &[u8]) -> Vec<u8> {
        let mut p = old.as_bytes().to_vec();
        p.extend_from_slice(new.as_bytes());
        p.extend_from_slice(lookup.as_bytes());
        p.extend_from_slice(blake3::hash(slot).as_bytes());
        p
    }

    /// Verifies the statement under the old owner key.
    ///
    /// # Errors
    /// [`SignatureError`] when it does not verify.
    pub fn verify(&self) -> Result<(), SignatureError> {
        signed::verify_slice(
            &self.old,
            signed::CONTEXT_SUCCESSOR,
            &Self::payload(&self.old, &self.new, &self.lookup, &self.slot),
            &self.signature,
        )
    }
}

/// Most pack ids in one [`Response::Packs`].
pub const MAX_LIST: u32 = 4096;

/// A statement, signed with the owner key in [`CONTEXT_TAKEOVER`](crate::signed::CONTEXT_TAKEOVER),
/// that `new_node` is now the owner's writing node, continuing from head `from_seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeoverStatement {
    /// The owner.
    pub owner: OwnerId,
    /// The new node's peer id, as bytes.
    #[serde(with = "serde_bytes")]
    pub new_node: Vec<u8>,
    /// The head sequence number the new node continues from.
    pub from_seq: u64,
    /// Ed25519 signature over [`TakeoverStatement::payload`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl TakeoverStatement {
    /// The signed bytes: `owner ‖ from_seq (u64 LE) ‖ new node peer id`.
    pub fn payload(owner: &OwnerId, new_node: &[u8], from_seq: u64) -> Vec<u8> {
        let mut p = owner.as_bytes().to_vec();
        p.extend_from_slice(&from_seq.to_le_bytes());
        p.extend_from_slice(new_node);
        p
    }

    /// Verifies the statement.
    ///
    /// # Errors
    /// [`SignatureError`] when it does not verify.
    pub fn verify(&self) -> Result<(), SignatureError> {
        signed::verify_slice(
            &self.owner,
            signed::CONTEXT_TAKEOVER,
            &Self::payload(&self.owner, &self.new_node, self.from_seq),
            &self.signature,
        )
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The sender is not a friend of this node.
    NotFriend,
    /// The sender has not proved the owner key.
    Unproven,
    /// The owner is bound to another node.
    BoundElsewhere,
    /// The write would exceed the quota.
    QuotaExceeded,
    /// The pack bytes do not hash to the pack id.
    BadPack,
    /// The head is not newer than the stored one.
    StaleHead,
    /// The message could not be decoded.
    Malformed,
    /// The message is larger than allowed.
    TooLarge,
    /// Too much work in progress; try again later.
    Busy,
    /// Nothing stored under that name.
    NotFound,
    /// The node failed.
    Internal,
    /// The owner key was retired by `keys rotate`: it takes no more writes.
    Retired,
}

/// A refusal, with a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// The kind.
    pub code: ErrorCode,
    /// What happened, with context.
    pub message: String,
    /// Bytes still available under the quota (for [`ErrorCode::QuotaExceeded`]).
    pub available: Option<u64>,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// A response on [`EXCHANGE_PROTOCOL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// A fresh nonce.
    Nonce([u8; 32]),
    /// Done.
    Ok,
    /// For [`Request::Have`]: one flag per pack, in order.
    Have(Vec<bool>),
    /// For [`Request::GetHead`].
    Head(Option<ByteBuf>),
    /// For [`Request::GetSlot`].
    Slot(Option<ByteBuf>),
    /// For [`Request::Usage`].
    Usage {
        /// Bytes granted.
        quota: u64,
        /// Bytes used.
        used: u64,
    },
    /// Refused.
    Error(WireError),
    /// For [`Request::ListPacks`]: pack ids and lengths.
    Packs(Vec<(PackId, u64)>),
    /// For [`Request::Audit`]: the challenge's nonce and a proof of the range
    /// ([`crate::audit::prove`]).
    Proof {
        /// The challenge's nonce, echoed.
        nonce: [u8; 32],
        /// The proof, at most [`crate::audit::MAX_PROOF`] bytes.
        proof: ByteBuf,
    },
    /// For [`Request::Dropped`]: at most [`MAX_LIST`] pack ids.
    Dropped(Vec<PackId>),
    /// For [`Request::WhereIs`]: the newest signed address record held, if any.
    Addresses(Option<ByteBuf>),
}

/// A request on [`PACKS_PROTOCOL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamRequest {
    /// Store a pack; exactly `len` raw bytes follow.
    Put {
        /// The owner.
        owner: OwnerId,
        /// The pack id (BLAKE3 of the bytes).
        pack: PackId,
        /// The pack's length.
        len: u64,
    },
    /// Send `len` bytes of a pack from `offset` (0 and the pack length for a whole pack).
    Get {
        /// The owner.
        owner: OwnerId,
        /// The pack.
        pack: PackId,
        /// Offset (a multiple of 64 KiB, or 0).
        offset: u64,
        /// Length (u64::MAX for the rest of the pack).
        len: u64,
    },
}

/// A reply on [`PACKS_PROTOCOL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamReply {
    /// The pack is stored (or was already).
    Stored {
        /// Whether it was already there.
        already: bool,
    },
    /// `len` raw bytes follow.
    Data {
        /// Their length.
        len: u64,
    },
    /// Refused; for a put, the body is not read.
    Error(WireError),
    /// For a put: the friend accepts the pack; send the `len` bytes now.
    Ready,
}

/// Encodes a frame: `length (u32 LE) ‖ postcard`.
pub fn frame<T: Serialize>(msg: &T) -> Vec<u8> {
    crate::control::frame(msg)
}

/// Decodes a message body of at most `max` bytes.
///
/// # Errors
/// A bounded [`DecodeError`].
pub fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    body: &[u8],
    max: usize,
) -> Result<T, DecodeError> {
    decode_bounded(what, body, max)
}

/// Encodes a message body (no length prefix).
pub fn body<T: Serialize>(msg: &T) -> Vec<u8> {
    encode(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};
    use proptest::prelude::*;

    #[test]
    fn golden_messages() {
        assert_eq!(body(&Request::Nonce), vec![0]);
        assert_eq!(
            body(&Request::GetHead {
                owner: OwnerId([1; 32])
            })[..2],
            [4, 1]
        );
        assert_eq!(body(&Response::Ok), vec![1]);
        assert_eq!(body(&Response::Usage { quota: 1, used: 2 }), vec![5, 1, 2]);
        let put = StreamRequest::Put {
            owner: OwnerId([0; 32]),
            pack: PackId([0; 32]),
            len: 300,
        };
        let b = body(&put);
        assert_eq!(b[0], 0);
        assert_eq!(&b[65..], &[0xac, 0x02]);
        let err = Response::Error(WireError {
            code: ErrorCode::QuotaExceeded,
            message: "x".into(),
            available: Some(7),
        });
        assert_eq!(body(&err), vec![6, 3, 1, b'x', 1, 7]);
        let audit = body(&Request::Audit {
            owner: OwnerId([0; 32]),
            challenge: Challenge {
                pack: PackId([0; 32]),
                offset: 300,
                len: 1024,
                nonce: [0; 32],
            },
        });
        assert_eq!(audit[0], 12);
        assert_eq!(&audit[65..69], &[0xac, 0x02, 0x80, 0x08]);
        assert_eq!(audit.len(), 101);
        let proof = body(&Response::Proof {
            nonce: [0; 32],
            proof: ByteBuf::from(vec![9]),
        });
        assert_eq!(proof[0], 8);
        assert_eq!(&proof[33..], &[1, 9]);
    }

    #[test]
    fn owner_proofs_bind_both_peers_and_the_nonce() {
        let k = SigningKey::from_bytes(&[3; 32]);
        let owner = OwnerId(k.verifying_key().to_bytes());
        let nonce = [5u8; 32];
        let sig = k.sign(&signed::message(
            CONTEXT_OWNER_PROOF,
            &OwnerProof::payload(&owner, &nonce, b"A", b"B"),
        ));
        let proof = OwnerProof {
            owner,
            nonce,
            signature: sig.to_bytes().to_vec(),
        };
        assert!(proof.verify(b"A", b"B").is_ok());
        assert!(
            proof.verify(b"C", b"B").is_err(),
            "replayed by another node"
        );
        assert!(
            proof.verify(b"A", b"C").is_err(),
            "replayed to another friend"
        );
        let other_nonce = OwnerProof {
            nonce: [6; 32],
            ..proof.clone()
        };
        assert!(
            other_nonce.verify(b"A", b"B").is_err(),
            "replayed with another nonce"
        );
        let cross = k.sign(&signed::message(
            signed::CONTEXT_HEAD,
            &OwnerProof::payload(&owner, &nonce, b"A", b"B"),
        ));
        let cross = OwnerProof {
            signature: cross.to_bytes().to_vec(),
            ..proof
        };
        assert!(
            cross.verify(b"A", b"B").is_err(),
            "a head signature is no owner proof"
        );
    }

    #[test]
    fn takeover_statements_bind_node_and_sequence() {
        let k = SigningKey::from_bytes(&[4; 32]);
        let owner = OwnerId(k.verifying_key().to_bytes());
        let sign = |ctx: &str, node: &[u8], seq: u64| {
            k.sign(&signed::message(
                ctx,
                &TakeoverStatement::payload(&owner, node, seq),
            ))
            .to_bytes()
            .to_vec()
        };
        let good = TakeoverStatement {
            owner,
            new_node: b"N2".to_vec(),
            from_seq: 7,
            signature: sign(signed::CONTEXT_TAKEOVER, b"N2", 7),
        };
        assert!(good.verify().is_ok());
        assert!(
            TakeoverStatement {
                new_node: b"N3".to_vec(),
                ..good.clone()
            }
            .verify()
            .is_err(),
            "another node"
        );
        assert!(
            TakeoverStatement {
                from_seq: 8,
                ..good.clone()
            }
            .verify()
            .is_err(),
            "another sequence"
        );
        let cross = TakeoverStatement {
            signature: sign(signed::CONTEXT_HEAD, b"N2", 7),
            ..good.clone()
        };
        assert!(cross.verify().is_err(), "a head signature is no takeover");
        assert_eq!(body(&Request::Takeover(good.clone()))[0], 9);
        assert_eq!(body(&Response::Packs(vec![]))[0], 7);
    }

    #[test]
    fn successor_statements_cover_both_owners_the_lookup_and_the_slot() {
        let old = SigningKey::from_bytes(&[5; 32]);
        let old_id = OwnerId(old.verifying_key().to_bytes());
        let new_id = OwnerId(SigningKey::from_bytes(&[6; 32]).verifying_key().to_bytes());
        let lookup = LookupId([7; 32]);
        let sign = |ctx: &str, slot: &[u8]| {
            old.sign(&signed::message(
                ctx,
                &SuccessorStatement::payload(&old_id, &new_id, &lookup, slot),
            ))
            .to_bytes()
            .to_vec()
        };
        let good = SuccessorStatement {
            old: old_id,
            new: new_id,
            lookup,
            slot: ByteBuf::from(b"slot".to_vec()),
            signature: sign(signed::CONTEXT_SUCCESSOR, b"slot"),
        };
        assert!(good.verify().is_ok());
        for bad in [
            SuccessorStatement {
                new: OwnerId([8; 32]),
                ..good.clone()
            },
            SuccessorStatement {
                lookup: LookupId([9; 32]),
                ..good.clone()
            },
            SuccessorStatement {
                slot: ByteBuf::from(b"other".to_vec()),
                ..good.clone()
            },
            SuccessorStatement {
                signature: sign(signed::CONTEXT_TAKEOVER, b"slot"),
                ..good.clone()
            },
            SuccessorStatement {
                signature: vec![1, 2],
                ..good.clone()
            },
        ] {
            assert!(bad.verify().is_err(), "{bad:?}");
        }
        assert_eq!(body(&Request::Successor(good))[0], 10);
        assert_eq!(body(&Request::DeleteOwner { owner: old_id })[0], 11);
        assert_eq!(body(&ErrorCode::Retired)[0], 11);
    }

    proptest! {
        #[test]
        fn requests_round_trip(owner in any::<[u8; 32]>(), packs in proptest::collection::vec(any::<[u8; 32]>(), 0..20), blob in proptest::collection::vec(any::<u8>(), 0..100)) {
            let owner = OwnerId(owner);
            for r in [
                Request::Have { owner, packs: packs.iter().copied().map(PackId).collect() },
                Request::PutHead { owner, head: ByteBuf::from(blob.clone()) },
                Request::PutSlot { owner, lookup: LookupId([1; 32]), slot: ByteBuf::from(blob.clone()) },
            ] {
                prop_assert_eq!(decode::<Request>("request", &body(&r), MAX_MESSAGE).unwrap(), r);
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode::<Request>("request", &bytes, MAX_MESSAGE);
            let _ = decode::<StreamRequest>("stream request", &bytes, MAX_STREAM_HEADER);
        }
    }
}
