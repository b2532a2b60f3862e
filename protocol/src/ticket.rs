//! Tickets: one copy-pasteable string that introduces a node to a friend.
//!
//! ```text
//! ticket = "obnam1" ‖ base32 (RFC 4648, lowercase, no padding) of postcard(TicketV1)
//! ```
//! A `TicketV1` holds the peer id and the node's addresses, as bytes.

use crate::codec::{DecodeError, decode_bounded, encode};
use libp2p_identity::PeerId;
use multiaddr::Multiaddr;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// The prefix of a version-1 ticket.
pub const PREFIX_V1: &str = "obnam1";
const MAX_TICKET_BYTES: usize = 4096;

/// A node's peer id and addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The node's peer id.
    pub peer_id: PeerId,
    /// Addresses the node listens on or was seen at.
    pub addrs: Vec<Multiaddr>,
}

#[derive(Serialize, Deserialize)]
struct TicketV1 {
    #[serde(with = "serde_bytes")]
    peer_id: Vec<u8>,
    addrs: Vec<ByteBuf>,
}

fn encoding() -> data_encoding::Encoding {
    let mut spec = data_encoding::Specification::new();
    spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
    // A fixed, valid specification: 32 symbols, no padding.
    spec.encoding()
        .unwrap_or_else(|_| data_encoding::BASE32_NOPAD.clone())
}

impl Ticket {
    /// Encodes the ticket as text.
    pub fn encode(&self) -> String {
        let v1 = TicketV1 {
            peer_id: self.peer_id.to_bytes(),
            addrs: self
                .addrs
                .iter()
                .map(|a| ByteBuf::from(a.to_vec()))
                .collect(),
        };
        format!("{PREFIX_V1}{}", encoding().encode(&encode(&v1)))
    }

    /// Decodes a ticket.
    ///
    /// # Errors
    /// `Malformed` for an unknown prefix or anything else that is not a valid ticket.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        let what = "ticket";
        let text = text.trim();
        let Some(body) = text.strip_prefix(PREFIX_V1) else {
            return Err(DecodeError::Malformed {
                what,
                reason: format!("does not start with {PREFIX_V1:?}"),
            });
        };
        if body.len() > MAX_TICKET_BYTES * 2 {
            return Err(DecodeError::TooLarge {
                what,
                len: body.len(),
                max: MAX_TICKET_BYTES * 2,
            });
        }
        let bytes = encoding()
            .decode(body.to_ascii_lowercase().as_bytes())
            .map_err(|e| DecodeError::Malformed {
                what,
                reason: e.to_string(),
            })?;
        let v1: TicketV1 = decode_bounded(what, &bytes, MAX_TICKET_BYTES)?;
        let peer_id = PeerId::from_bytes(&v1.peer_id).map_err(|e| DecodeError::Malformed {
            what,
            reason: format!("peer id: {e}"),
        })?;
        let addrs = v1
            .addrs
            .into_iter()
            .map(|a| Multiaddr::try_from(a.into_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DecodeError::Malformed {
                what,
                reason: format!("address: {e}"),
            })?;
        Ok(Self { peer_id, addrs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed() -> Ticket {
        let key = libp2p_identity::Keypair::ed25519_from_bytes([5u8; 32]).unwrap();
        Ticket {
            peer_id: key.public().to_peer_id(),
            addrs: vec!["/ip4/127.0.0.1/tcp/4411".parse().unwrap()],
        }
    }

    #[test]
    fn golden_ticket() {
        let t = fixed();
        let text = t.encode();
        assert!(text.starts_with("obnam1"));
        assert_eq!(Ticket::decode(&text).unwrap(), t);
        assert_eq!(
            Ticket::decode(&text.to_uppercase().replacen("OBNAM1", "obnam1", 1)).unwrap(),
            t
        );
        assert_eq!(text, GOLDEN);
    }

    const GOLDEN: &str =
        "obnam1eyacicabciqg46q43uu3bn4p2e5pjrkzr7x7j3zks4lg4pfg6lspx7gnqbifx4ibbach6aaaaedbcoy";

    #[test]
    fn bad_tickets_are_refused() {
        assert!(Ticket::decode("obnam2abc").is_err());
        assert!(Ticket::decode("obnam1!!!").is_err());
        assert!(Ticket::decode("obnam1aaaa").is_err());
    }
}
