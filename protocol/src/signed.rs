//! Domain-separated Ed25519 signatures.
//!
//! Every signature obnam makes covers `"obnam-sig-v1" ‖ 0 ‖ len(context) ‖ context ‖ payload`.
//! Each kind of statement has its own context string, so a signature made for one kind never
//! verifies as another. Signing needs the owner key and happens in `obnam-node`; verifying needs
//! only the public key and happens here.

use crate::ids::OwnerId;
use ed25519_dalek::{Signature, VerifyingKey};

/// Context of an owner's head.
pub const CONTEXT_HEAD: &str = "obnam head v1";
/// Context of a proof that a node holds an owner key (used between friends).
pub const CONTEXT_OWNER_PROOF: &str = "obnam owner proof v1";
/// Context of a takeover statement (a recovered node becomes the owner's writer).
pub const CONTEXT_TAKEOVER: &str = "obnam takeover v1";
/// Context of a successor statement (an owner key hands over to a new one: `keys rotate`).
pub const CONTEXT_SUCCESSOR: &str = "obnam successor v1";
/// Length of a signature.
pub const SIGNATURE_LEN: usize = 64;

const PREFIX: &[u8] = b"obnam-sig-v1\0";

/// Why a signature was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SignatureError {
    /// The owner id is not a valid Ed25519 public key.
    #[error("owner id {0} is not a valid Ed25519 public key")]
    BadKey(OwnerId),
    /// The signature does not verify under this key and context.
    #[error("signature by {owner} does not verify in context {context:?}")]
    Invalid {
        /// The claimed signer.
        owner: OwnerId,
        /// The context it was checked under.
        context: &'static str,
    },
}

/// The exact bytes signed for `payload` under `context`.
pub fn message(context: &str, payload: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(PREFIX.len() + 1 + context.len() + payload.len());
    msg.extend_from_slice(PREFIX);
    // Contexts are short constants; their length byte keeps context and payload apart.
    msg.push(u8::try_from(context.len()).unwrap_or(u8::MAX));
    msg.extend_from_slice(context.as_bytes());
    msg.extend_from_slice(payload);
    msg
}

/// Verifies a signature given as bytes of any length (a wrong length does not verify).
///
/// # Errors
/// [`SignatureError`] when it does not verify.
pub fn verify_slice(
    owner: &OwnerId,
    context: &'static str,
    payload: &[u8],
    signature: &[u8],
) -> Result<(), SignatureError> {
    let sig: &[u8; SIGNATURE_LEN] = signature.try_into().map_err(|_| SignatureError::Invalid {
        owner: *owner,
        context,
    })?;
    verify(owner, context, payload, sig)
}

/// Verifies a signature by `owner` over `payload` under `context`.
///
/// # Errors
/// [`SignatureError`] when the key is invalid or the signature does not verify.
pub fn verify(
    owner: &OwnerId,
    context: &'static str,
    payload: &[u8],
    signature: &[u8; SIGNATURE_LEN],
) -> Result<(), SignatureError> {
    let key =
        VerifyingKey::from_bytes(owner.as_bytes()).map_err(|_| SignatureError::BadKey(*owner))?;
    let sig = Signature::from_bytes(signature);
    key.verify_strict(&message(context, payload), &sig)
        .map_err(|_| SignatureError::Invalid {
            owner: *owner,
            context,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_message_layout() {
        assert_eq!(message("ab", b"xy"), b"obnam-sig-v1\0\x02abxy".to_vec());
    }

    #[test]
    fn contexts_are_distinct() {
        let all = [
            CONTEXT_HEAD,
            CONTEXT_OWNER_PROOF,
            CONTEXT_TAKEOVER,
            CONTEXT_SUCCESSOR,
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
