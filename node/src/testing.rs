//! Test helpers that speak the wire protocols badly on purpose (feature `testing`).
//!
//! [`rogue_attack`] connects to a node with its own identity and sends malformed, oversized and
//! truncated messages on both protocols, plus requests it is not entitled to, and reports what
//! came back. The node must answer each with a specific error and keep serving.

use crate::error::NodeError;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, identity::Keypair, noise, tcp, yamux};
use obnam_protocol::msg::{self, OwnerProof, Request, Response, StreamReply, StreamRequest};
use obnam_protocol::{OwnerId, PackId};
use std::time::Duration;

pub mod load;

fn key(seed: u8) -> Result<Keypair, NodeError> {
    Keypair::ed25519_from_bytes([seed; 32]).map_err(|e| NodeError::Key(e.to_string()))
}

/// The peer id of the rogue with this seed.
///
/// # Errors
/// Key errors.
pub fn rogue_peer_id(seed: u8) -> Result<String, NodeError> {
    Ok(key(seed)?.public().to_peer_id().to_string())
}

async fn exchange_raw(control: &mut libp2p_stream::Control, peer: PeerId, bytes: &[u8]) -> String {
    let mut s = match control
        .open_stream(peer, StreamProtocol::new(msg::EXCHANGE_PROTOCOL))
        .await
    {
        Ok(s) => s,
        Err(e) => return format!("open failed: {e}"),
    };
    let _ = s.write_all(bytes).await;
    let _ = s.close().await;
    let mut len = [0u8; 4];
    if let Err(e) = s.read_exact(&mut len).await {
        return format!("no answer: {e}");
    }
    let mut body = vec![0u8; (u32::from_le_bytes(len) as usize).min(msg::MAX_MESSAGE)];
    if let Err(e) = s.read_exact(&mut body).await {
        return format!("no answer: {e}");
    }
    match msg::decode::<Response>("response", &body, msg::MAX_MESSAGE) {
        Ok(Response::Error(e)) => format!("{:?}", e.code),
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("undecodable answer: {e}"),
    }
}

async fn exchange_decoded(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    bytes: &[u8],
) -> Option<Response> {
    let mut s = control
        .open_stream(peer, StreamProtocol::new(msg::EXCHANGE_PROTOCOL))
        .await
        .ok()?;
    s.write_all(bytes).await.ok()?;
    s.close().await.ok()?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.ok()?;
    let mut body = vec![0u8; (u32::from_le_bytes(len) as usize).min(msg::MAX_MESSAGE)];
    s.read_exact(&mut body).await.ok()?;
    msg::decode("response", &body, msg::MAX_MESSAGE).ok()
}

/// A put with its body: returns the final answer.
async fn put_raw(
    control: &mut libp2p_stream::Control,
    peer: PeerId,
    header: &[u8],
    body: &[u8],
) -> String {
    let mut s = match control
        .open_stream(peer, StreamProtocol::new(msg::PACKS_PROTOCOL))
        .await
    {
        Ok(s) => s,
        Err(e) => return format!("open failed: {e}"),
    };
    let _ = s.write_all(header).await;
    match crate::serve::read_frame::<StreamReply>(&mut s, msg::MAX_STREAM_HEADER).await {
        Ok(Some(StreamReply::Ready)) => {}
        Ok(Some(StreamReply::Error(e))) => return format!("{:?}", e.code),
        other => return format!("{other:?}"),
    }
    let _ = s.write_all(body).await;
    let _ = s.flush().await;
    match crate::serve::read_frame::<StreamReply>(&mut s, msg::MAX_STREAM_HEADER).await {
        Ok(Some(StreamReply::Error(e))) => format!("{:?}", e.code),
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("no answer: {e}"),
    }
}

async fn packs_raw(control: &mut libp2p_stream::Control, peer: PeerId, bytes: &[u8]) -> String {
    let mut s = match control
        .open_stream(peer, StreamProtocol::new(msg::PACKS_PROTOCOL))
        .await
    {
        Ok(s) => s,
        Err(e) => return format!("open failed: {e}"),
    };
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    match crate::serve::read_frame::<StreamReply>(&mut s, msg::MAX_STREAM_HEADER).await {
        Ok(Some(StreamReply::Error(e))) => format!("{:?}", e.code),
        Ok(other) => format!("{other:?}"),
        Err(e) => format!("no answer: {e}"),
    }
}

/// A connection to `target` (a multiaddr ending in `/p2p/<peer id>`) as the identity with this
/// seed: its stream control, the target's peer id, and the task that drives the swarm.
/// A swarm with only libp2p-stream, as the identity with this seed, on the node's transport
/// (TCP with `TCP_NODELAY`, Noise, Yamux defaults).
fn stream_swarm(seed: u8) -> Result<libp2p::Swarm<libp2p_stream::Behaviour>, NodeError> {
    stream_swarm_as(key(seed)?)
}

/// [`stream_swarm`] with this identity.
fn stream_swarm_as(key: Keypair) -> Result<libp2p::Swarm<libp2p_stream::Behaviour>, NodeError> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| NodeError::Net(e.to_string()))?
        .with_behaviour(|_| libp2p_stream::Behaviour::new())
        .map_err(|e| NodeError::Net(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build())
}

async fn connect(
    seed: u8,
    target: &str,
) -> Result<(libp2p_stream::Control, PeerId, tokio::task::JoinHandle<()>), NodeError> {
    connect_as(key(seed)?, target).await
}

/// [`connect`] with this identity.
async fn connect_as(
    key: Keypair,
    target: &str,
) -> Result<(libp2p_stream::Control, PeerId, tokio::task::JoinHandle<()>), NodeError> {
    let addr: Multiaddr = target
        .parse()
        .map_err(|e| NodeError::Usage(format!("{target}: {e}")))?;
    let peer = match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(p)) => p,
        _ => {
            return Err(NodeError::Usage(
                "the address must end in /p2p/<peer id>".into(),
            ));
        }
    };
    let mut swarm = stream_swarm_as(key)?;
    let control = swarm.behaviour().new_control();
    swarm
        .dial(addr)
        .map_err(|e| NodeError::Net(e.to_string()))?;
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { .. } => return Ok(()),
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    return Err(NodeError::Net(error.to_string()));
                }
                _ => {}
            }
        }
    })
    .await
    .map_err(|_| NodeError::Net("timed out connecting".into()))??;
    let driver = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    Ok((control, peer, driver))
}

fn runtime() -> Result<tokio::runtime::Runtime, NodeError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| NodeError::io("runtime", e))
}

/// Connects to `target` (a multiaddr ending in `/p2p/<peer id>`) as the rogue with this seed and
/// sends bad input. Returns `(case, answer)` pairs; the answer is an error code name when the
/// node refused properly.
///
/// # Errors
/// When the node cannot be reached at all.
pub fn rogue_attack(seed: u8, target: &str) -> Result<Vec<(String, String)>, NodeError> {
    let local = key(seed)?.public().to_peer_id();
    runtime()?.block_on(async {
        let (mut control, peer, driver) = connect(seed, target).await?;
        let mut out = Vec::new();
        let mut oversized = (10u32 * 1024 * 1024).to_le_bytes().to_vec();
        oversized.extend_from_slice(&[0u8; 100]);
        out.push((
            "oversized".into(),
            exchange_raw(&mut control, peer, &oversized).await,
        ));
        let mut garbage = 5u32.to_le_bytes().to_vec();
        garbage.extend_from_slice(&[0xff; 5]);
        out.push((
            "garbage".into(),
            exchange_raw(&mut control, peer, &garbage).await,
        ));
        let mut truncated = 100u32.to_le_bytes().to_vec();
        truncated.extend_from_slice(&[0u8; 10]);
        out.push((
            "truncated".into(),
            exchange_raw(&mut control, peer, &truncated).await,
        ));
        let mut bad_header = 5u32.to_le_bytes().to_vec();
        bad_header.extend_from_slice(&[0xee; 5]);
        out.push((
            "bad_stream_header".into(),
            packs_raw(&mut control, peer, &bad_header).await,
        ));
        let put = msg::frame(&StreamRequest::Put {
            owner: OwnerId([9; 32]),
            pack: PackId([9; 32]),
            len: 100,
        });
        out.push((
            "unproven_put".into(),
            packs_raw(&mut control, peer, &put).await,
        ));
        let forged = msg::frame(&Request::ProveOwner(OwnerProof {
            owner: OwnerId([9; 32]),
            nonce: [1; 32],
            signature: vec![0; 64],
        }));
        out.push((
            "forged_proof".into(),
            exchange_raw(&mut control, peer, &forged).await,
        ));
        // With an owner key of its own, proved properly, the rogue may store packs for that owner,
        // but only packs whose bytes hash to their id; a stored pack is a cheap no-op.
        let owner_key = ed25519_dalek::SigningKey::from_bytes(&[seed.wrapping_add(100); 32]);
        let owner = OwnerId(owner_key.verifying_key().to_bytes());
        let nonce = match exchange_decoded(&mut control, peer, &msg::frame(&Request::Nonce)).await {
            Some(Response::Nonce(n)) => n,
            other => return Err(NodeError::Net(format!("no nonce: {other:?}"))),
        };
        out.push(("valid_after_all_that".into(), "Nonce".into()));
        let payload = OwnerProof::payload(&owner, &nonce, &local.to_bytes(), &peer.to_bytes());
        let sig = ed25519_dalek::Signer::sign(
            &owner_key,
            &obnam_protocol::signed::message(obnam_protocol::signed::CONTEXT_OWNER_PROOF, &payload),
        );
        let proof = msg::frame(&Request::ProveOwner(OwnerProof {
            owner,
            nonce,
            signature: sig.to_bytes().to_vec(),
        }));
        out.push((
            "real_proof".into(),
            exchange_raw(&mut control, peer, &proof).await,
        ));
        let body = vec![0x5au8; 1000];
        let wrong = msg::frame(&StreamRequest::Put {
            owner,
            pack: PackId([1; 32]),
            len: body.len() as u64,
        });
        out.push((
            "wrong_hash_put".into(),
            put_raw(&mut control, peer, &wrong, &body).await,
        ));
        let good_id = PackId::of(&body);
        let good = msg::frame(&StreamRequest::Put {
            owner,
            pack: good_id,
            len: body.len() as u64,
        });
        out.push((
            "good_put".into(),
            put_raw(&mut control, peer, &good, &body).await,
        ));
        let again = msg::frame(&StreamRequest::Put {
            owner,
            pack: good_id,
            len: body.len() as u64,
        });
        out.push((
            "same_put_again".into(),
            packs_raw(&mut control, peer, &again).await,
        ));
        // Audits: a range outside the pack, a pack it does not hold, and a real one (the proof
        // must verify against the pack id).
        let challenge = |pack, offset, len| obnam_protocol::audit::Challenge {
            pack,
            offset,
            len,
            nonce: [4; 32],
        };
        let bad_range = msg::frame(&Request::Audit {
            owner,
            challenge: challenge(good_id, 900, 500),
        });
        out.push((
            "audit_bad_range".into(),
            exchange_raw(&mut control, peer, &bad_range).await,
        ));
        let unknown = msg::frame(&Request::Audit {
            owner,
            challenge: challenge(PackId([3; 32]), 0, 1024),
        });
        out.push((
            "audit_unknown_pack".into(),
            exchange_raw(&mut control, peer, &unknown).await,
        ));
        let real = challenge(good_id, 0, body.len() as u32);
        let audit = msg::frame(&Request::Audit {
            owner,
            challenge: real,
        });
        let verdict = match exchange_decoded(&mut control, peer, &audit).await {
            Some(Response::Proof { nonce, proof }) if nonce == real.nonce => {
                match obnam_protocol::audit::verify(&real, body.len() as u64, &proof) {
                    Ok(bytes) if bytes == body => "verified".to_owned(),
                    other => format!("bad proof: {other:?}"),
                }
            }
            other => format!("{other:?}"),
        };
        out.push(("audit_real".into(), verdict));
        let garbage_head = msg::frame(&Request::PutHead {
            owner,
            head: serde_bytes::ByteBuf::from(vec![1, 2, 3]),
        });
        out.push((
            "garbage_head".into(),
            exchange_raw(&mut control, peer, &garbage_head).await,
        ));
        driver.abort();
        Ok(out)
    })
}

/// Connects as a stranger (not a friend) and probes: key slots for `lookups` (in order, each
/// answer's encoded length and a hash of it), then requests a stranger may not make. Returns
/// `(case, answer)` pairs.
///
/// # Errors
/// When the node cannot be reached at all.
pub fn stranger_probe(
    seed: u8,
    target: &str,
    lookups: &[obnam_protocol::LookupId],
    owner: OwnerId,
) -> Result<Vec<(String, String)>, NodeError> {
    runtime()?.block_on(async {
        let (mut control, peer, driver) = connect(seed, target).await?;
        let mut out = Vec::new();
        for (i, lookup) in lookups.iter().enumerate() {
            let answer = match exchange_decoded(
                &mut control,
                peer,
                &msg::frame(&Request::GetSlot { lookup: *lookup }),
            )
            .await
            {
                Some(Response::Slot(Some(b))) => format!(
                    "slot {} bytes {}",
                    b.len(),
                    &blake3::hash(&b).to_hex()[..16]
                ),
                Some(Response::Error(e)) => format!("{:?}", e.code),
                other => format!("{other:?}"),
            };
            out.push((format!("lookup {i}"), answer));
        }
        out.push((
            "get_head".into(),
            exchange_raw(&mut control, peer, &msg::frame(&Request::GetHead { owner })).await,
        ));
        out.push((
            "list_packs".into(),
            exchange_raw(
                &mut control,
                peer,
                &msg::frame(&Request::ListPacks {
                    owner,
                    after: None,
                    limit: 10,
                }),
            )
            .await,
        ));
        let slot = serde_bytes::ByteBuf::from(vec![1, 1, 0]);
        out.push((
            "put_slot".into(),
            exchange_raw(
                &mut control,
                peer,
                &msg::frame(&Request::PutSlot {
                    owner,
                    lookup: obnam_protocol::LookupId([3; 32]),
                    slot,
                }),
            )
            .await,
        ));
        let get = msg::frame(&StreamRequest::Get {
            owner,
            pack: PackId([1; 32]),
            offset: 0,
            len: 10,
        });
        out.push(("get_pack".into(), packs_raw(&mut control, peer, &get).await));
        driver.abort();
        Ok(out)
    })
}

/// The throughput (bytes per second) of one libp2p stream over loopback with the node's
/// transport settings (TCP with `TCP_NODELAY`, Noise, Yamux defaults), between two swarms in
/// this process: `bytes` of incompressible data are written in 1 MiB writes and the receiver
/// acknowledges the last byte. For `bench/primitives`.
///
/// # Errors
/// When the swarms cannot be set up or the transfer fails or takes over 10 minutes.
pub fn stream_throughput(bytes: u64) -> Result<f64, NodeError> {
    const PROTO: &str = "/obnam-bench/stream/1";
    runtime()?.block_on(async {
        let mut server = stream_swarm(201)?;
        let mut client = stream_swarm(202)?;
        let server_id = *server.local_peer_id();
        let mut incoming = server
            .behaviour()
            .new_control()
            .accept(StreamProtocol::new(PROTO))
            .map_err(|e| NodeError::Net(e.to_string()))?;
        server
            .listen_on(
                "/ip4/127.0.0.1/tcp/0"
                    .parse()
                    .map_err(|e| NodeError::Net(format!("{e}")))?,
            )
            .map_err(|e| NodeError::Net(e.to_string()))?;
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = server.select_next_some().await {
                break address;
            }
        };
        let mut control = client.behaviour().new_control();
        client
            .dial(addr.with(libp2p::multiaddr::Protocol::P2p(server_id)))
            .map_err(|e| NodeError::Net(e.to_string()))?;
        let drive_server = tokio::spawn(async move {
            loop {
                server.select_next_some().await;
            }
        });
        let drive_client = tokio::spawn(async move {
            loop {
                client.select_next_some().await;
            }
        });
        let receiver = tokio::spawn(async move {
            let (_, mut s) = incoming
                .next()
                .await
                .ok_or_else(|| NodeError::Net("no inbound stream".into()))?;
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0u64;
            while got < bytes {
                let n = s
                    .read(&mut buf)
                    .await
                    .map_err(|e| NodeError::io("receiving", e))?;
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            s.write_all(&[1])
                .await
                .map_err(|e| NodeError::io("acknowledging", e))?;
            s.close().await.map_err(|e| NodeError::io("closing", e))?;
            Ok::<u64, NodeError>(got)
        });
        let transfer = async {
            let mut s = control
                .open_stream(server_id, StreamProtocol::new(PROTO))
                .await
                .map_err(|e| NodeError::Net(e.to_string()))?;
            let mut block = vec![0u8; 1 << 20];
            rand::fill(&mut block[..]);
            let started = std::time::Instant::now();
            let mut sent = 0u64;
            while sent < bytes {
                let n = (bytes - sent).min(block.len() as u64) as usize;
                s.write_all(&block[..n])
                    .await
                    .map_err(|e| NodeError::io("sending", e))?;
                sent += n as u64;
            }
            s.flush().await.map_err(|e| NodeError::io("sending", e))?;
            let mut ack = [0u8; 1];
            s.read_exact(&mut ack)
                .await
                .map_err(|e| NodeError::io("waiting for the acknowledgement", e))?;
            Ok::<f64, NodeError>(sent as f64 / started.elapsed().as_secs_f64())
        };
        let result = tokio::time::timeout(Duration::from_secs(600), transfer)
            .await
            .map_err(|_| NodeError::Net("the transfer took over 10 minutes".into()))?;
        let received = receiver.await.map_err(|e| NodeError::Net(e.to_string()))?;
        drive_server.abort();
        drive_client.abort();
        let rate = result?;
        if received? != bytes {
            return Err(NodeError::Net(
                "the receiver got fewer bytes than were sent".into(),
            ));
        }
        Ok(rate)
    })
}

/// Connects `count` strangers (identities `first..first + count`) to `target` one after another,
/// waits a moment, and sends on `kept` how many connections the node kept open (a stranger whose
/// connection is open gets a nonce; one whose connection was closed cannot reach the node, for
/// its swarm knows no address to dial again). The connections stay open until `release`
/// receives or is dropped. For the test of the node's cap on strangers' connections.
///
/// # Errors
/// When a stranger cannot connect at all.
pub fn stranger_flood(
    first: u8,
    count: u8,
    target: &str,
    kept: std::sync::mpsc::Sender<usize>,
    release: std::sync::mpsc::Receiver<()>,
) -> Result<(), NodeError> {
    runtime()?.block_on(async {
        let mut open = Vec::new();
        for seed in first..first.saturating_add(count) {
            open.push(connect(seed, target).await?);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut answered = 0;
        for (control, peer, _) in &mut open {
            if let Some(Response::Nonce(_)) =
                exchange_decoded(control, *peer, &msg::frame(&Request::Nonce)).await
            {
                answered += 1;
            }
        }
        let _ = kept.send(answered);
        let _ = tokio::task::spawn_blocking(move || release.recv()).await;
        for (_, _, driver) in open {
            driver.abort();
        }
        Ok(())
    })
}
