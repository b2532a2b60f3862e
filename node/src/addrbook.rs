//! Signed address records: how friends find each other again after an address changes.
//!
//! A node describes where it can be reached in a libp2p signed peer record: its addresses and
//! a sequence number (seconds since the epoch), signed with its node key. It pushes the record
//! to its friends whenever its addresses change (`Request::Addresses`), friends keep the newest
//! one of each friend in redb (`addr-book-0`), and a node that cannot reach a friend at any
//! known address asks its other friends for their newest record of it (`Request::WhereIs`).
//! Every record is checked here before it is kept or used: the signature, the peer id it names
//! and its size. A friend can hand on a record of another friend, but cannot forge one.

use crate::error::NodeError;
use libp2p::core::{PeerRecord, SignedEnvelope};
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use obnam_protocol::local::{AddressRecord, MAX_ADDRESS_RECORD};

/// Most addresses one record may list.
pub const MAX_RECORD_ADDRS: usize = 32;

/// A checked record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Whose record it is (the signer).
    pub peer: PeerId,
    /// Its sequence number.
    pub seq: u64,
    /// Its addresses.
    pub addrs: Vec<Multiaddr>,
    /// The record as it is stored and sent on.
    pub record: AddressRecord,
}

/// Makes and signs this node's record of `addrs` (at most [`MAX_RECORD_ADDRS`] are kept).
///
/// # Errors
/// [`NodeError::Key`] when signing fails.
pub fn make(key: &Keypair, mut addrs: Vec<Multiaddr>) -> Result<Checked, NodeError> {
    addrs.truncate(MAX_RECORD_ADDRS);
    let rec = PeerRecord::new(key, addrs.clone())
        .map_err(|e| NodeError::Key(format!("signing the address record: {e}")))?;
    let envelope = rec.to_signed_envelope().into_protobuf_encoding();
    Ok(Checked {
        peer: rec.peer_id(),
        seq: rec.seq(),
        addrs,
        record: AddressRecord {
            seq: rec.seq(),
            envelope: envelope.into(),
        },
    })
}

/// Checks a signed record received from the network or read from the address book.
///
/// # Errors
/// [`NodeError::Net`] naming what is wrong: too large, not a signed peer record, a bad
/// signature, or too many addresses.
pub fn open(envelope: &[u8]) -> Result<Checked, NodeError> {
    if envelope.len() > MAX_ADDRESS_RECORD {
        return Err(NodeError::Net(format!(
            "address record of {} bytes is over the limit of {MAX_ADDRESS_RECORD}",
            envelope.len()
        )));
    }
    let env = SignedEnvelope::from_protobuf_encoding(envelope)
        .map_err(|e| NodeError::Net(format!("address record is not a signed envelope: {e}")))?;
    let rec = PeerRecord::from_signed_envelope(env)
        .map_err(|e| NodeError::Net(format!("address record does not verify: {e}")))?;
    if rec.addresses().len() > MAX_RECORD_ADDRS {
        return Err(NodeError::Net(format!(
            "address record lists {} addresses, more than {MAX_RECORD_ADDRS}",
            rec.addresses().len()
        )));
    }
    Ok(Checked {
        peer: rec.peer_id(),
        seq: rec.seq(),
        addrs: rec.addresses().to_vec(),
        record: AddressRecord {
            seq: rec.seq(),
            envelope: envelope.to_vec().into(),
        },
    })
}

/// The address upkeep task: every `interval`, and shortly after this node's addresses change,
/// it asks the event loop to renew relay reservations and retry direct connections, pushes this
/// node's record to every connected friend that does not hold it yet, and asks connected
/// friends for the newest record of each friend that could not be reached.
pub async fn run(
    net: crate::net::Net,
    server: std::sync::Arc<crate::serve::Server>,
    store: obnam_store::Store,
    interval: std::time::Duration,
) {
    use obnam_protocol::msg::{Request, Response};
    use std::collections::HashMap;
    // Which record (by sequence number) each friend has been sent in this run.
    let mut pushed: HashMap<PeerId, u64> = HashMap::new();
    let mut last: Option<Checked> = None;
    let mut asked: HashMap<PeerId, std::time::Instant> = HashMap::new();
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = net.addrs_changed.notified() => {
                // Let a burst of changes settle (and the record's clock, in seconds, move on).
                tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
            }
        }
        if net.upkeep().await.is_err() {
            return;
        }
        let friends: Vec<PeerId> = match store.friends() {
            Ok(f) => f
                .iter()
                .filter_map(|f| PeerId::from_bytes(&f.peer_id).ok())
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "address upkeep: cannot read friends");
                continue;
            }
        };
        // This node's record, made again when its addresses changed.
        let mut addrs = net.addrs();
        addrs.sort();
        let changed = last.as_ref().is_none_or(|l| {
            let mut old = l.addrs.clone();
            old.sort();
            old != addrs
        });
        if changed {
            match net.own_record() {
                Ok(rec) if last.as_ref().is_none_or(|l| rec.seq > l.seq) => last = Some(rec),
                Ok(_) => {} // same second as the last one: next round
                Err(e) => {
                    tracing::warn!(error = %e.full_message(), "cannot sign the address record")
                }
            }
        }
        if let Some(rec) = &last {
            for peer in friends.iter().filter(|p| net.is_connected(p)) {
                if pushed.get(peer) == Some(&rec.seq) {
                    continue;
                }
                let req = Request::Addresses(rec.record.envelope.clone());
                match tokio::time::timeout(interval, net.request(*peer, req)).await {
                    Ok(Ok(Response::Ok)) => {
                        pushed.insert(*peer, rec.seq);
                    }
                    other => tracing::debug!(%peer, ?other, "address record not taken"),
                }
            }
        }
        // Friends that could not be reached: ask the others for their newest record.
        let now = std::time::Instant::now();
        let mut lost: Vec<PeerId> = net.take_unreachable();
        lost.retain(|p| friends.contains(p) && !net.is_connected(p));
        lost.retain(|p| {
            asked
                .get(p)
                .is_none_or(|t| now.duration_since(*t) >= interval)
        });
        for whom in lost {
            asked.insert(whom, now);
            for peer in friends
                .iter()
                .filter(|p| **p != whom && net.is_connected(p))
            {
                let req = Request::WhereIs {
                    peer: whom.to_bytes().into(),
                };
                let Ok(Ok(Response::Addresses(Some(env)))) =
                    tokio::time::timeout(interval, net.request(*peer, req)).await
                else {
                    continue;
                };
                let checked = match open(&env) {
                    Ok(c) if c.peer == whom => c,
                    Ok(c) => {
                        tracing::warn!(%peer, asked = %whom, got = %c.peer, "a friend answered with another peer's address record");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e.full_message(), "a friend answered with a bad address record");
                        continue;
                    }
                };
                let server = std::sync::Arc::clone(&server);
                let learned =
                    tokio::task::spawn_blocking(move || server.learn_addresses(checked)).await;
                if let Ok(Ok(true)) = learned {
                    tracing::info!(friend = %whom, from = %peer, "learned a friend's new addresses from another friend");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_opens_and_names_its_signer() {
        let key = Keypair::generate_ed25519();
        let addrs: Vec<Multiaddr> = vec!["/ip4/198.51.100.7/tcp/4411".parse().unwrap()];
        let made = make(&key, addrs.clone()).unwrap();
        let opened = open(&made.record.envelope).unwrap();
        assert_eq!(opened.peer, key.public().to_peer_id());
        assert_eq!(opened.addrs, addrs);
        assert_eq!(opened.seq, made.seq);
    }

    #[test]
    fn a_changed_record_is_refused() {
        let key = Keypair::generate_ed25519();
        let made = make(&key, vec!["/ip4/198.51.100.7/tcp/4411".parse().unwrap()]).unwrap();
        let mut bytes = made.record.envelope.to_vec();
        // Flip one bit of the address inside the signed payload.
        let at = bytes
            .windows(4)
            .position(|w| w == [198, 51, 100, 7])
            .unwrap();
        bytes[at + 3] ^= 1;
        let err = open(&bytes).unwrap_err().to_string();
        assert!(err.contains("does not verify"), "{err}");
        assert!(open(b"not a record").is_err());
        assert!(
            open(&vec![0u8; MAX_ADDRESS_RECORD + 1])
                .unwrap_err()
                .to_string()
                .contains("over the limit")
        );
    }
}
