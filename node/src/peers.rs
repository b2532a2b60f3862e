//! Talking to friends as a client: proving the owner key, uploading and fetching packs.

use crate::error::NodeError;
use crate::keys::Keys;
use crate::net::Net;
use crate::serve::{IO_CHUNK, read_frame, wire_error, write_frame};
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::PeerId;
use obnam_protocol::msg::{
    ErrorCode, MAX_STREAM_HEADER, OwnerProof, Request, Response, StreamReply, StreamRequest,
    WireError,
};
use obnam_protocol::signed::CONTEXT_OWNER_PROOF;
use obnam_protocol::{OwnerId, PackId};
use std::path::Path;

/// Runs a transfer with a time limit per attempt, and tries again (up to `attempts` times, with
/// a short backoff) when it failed for a transient network reason: libp2p-stream drops a stream
/// when the friend's accept queue is momentarily full. Refusals are not retried.
///
/// # Errors
/// The last attempt's error; a timed-out attempt is a [`NodeError::Net`] naming `what`.
pub async fn with_retries<T, Fut>(
    attempts: usize,
    limit: std::time::Duration,
    what: &str,
    mut f: impl FnMut() -> Fut,
) -> Result<T, NodeError>
where
    Fut: std::future::Future<Output = Result<T, NodeError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = match tokio::time::timeout(limit, f()).await {
            Ok(r) => r,
            Err(_) => Err(NodeError::Net(format!("{what} took longer than {limit:?}"))),
        };
        match result {
            Err(NodeError::Net(m)) if attempt < attempts.max(1) && !m.contains("refused") => {
                tracing::debug!(attempt, error = %m, "{what}: trying again");
                tokio::time::sleep(std::time::Duration::from_millis(100 * attempt as u64)).await;
            }
            other => return other,
        }
    }
}

/// Proves the owner key to `peer` (nonce, then a signature bound to both peer ids).
///
/// # Errors
/// [`NodeError::Net`] naming the friend and its refusal.
pub async fn prove(net: &Net, peer: PeerId, keys: &Keys) -> Result<(), NodeError> {
    let nonce = match net.request(peer, Request::Nonce).await? {
        Response::Nonce(n) => n,
        Response::Error(e) => return Err(wire_error(&peer, &e)),
        other => {
            return Err(NodeError::Net(format!(
                "friend {peer} answered {other:?} to a nonce request"
            )));
        }
    };
    let owner = keys.owner_id();
    let payload = OwnerProof::payload(&owner, &nonce, &net.peer_id.to_bytes(), &peer.to_bytes());
    let signature = keys.sign(CONTEXT_OWNER_PROOF, &payload).to_vec();
    match net
        .request(
            peer,
            Request::ProveOwner(OwnerProof {
                owner,
                nonce,
                signature,
            }),
        )
        .await?
    {
        Response::Ok => Ok(()),
        Response::Error(e) => Err(wire_error(&peer, &e)),
        other => Err(NodeError::Net(format!(
            "friend {peer} answered {other:?} to an owner proof"
        ))),
    }
}

/// Sends a request that concerns owner data; proves the owner key once if the friend asks.
///
/// # Errors
/// [`NodeError::Net`].
pub async fn owner_request(
    net: &Net,
    peer: PeerId,
    keys: &Keys,
    req: Request,
) -> Result<Response, NodeError> {
    let first = net.request(peer, req.clone()).await?;
    if let Response::Error(WireError {
        code: ErrorCode::Unproven,
        ..
    }) = first
    {
        prove(net, peer, keys).await?;
        return net.request(peer, req).await;
    }
    Ok(first)
}

/// What became of an upload.
#[derive(Debug)]
pub enum Upload {
    /// Stored now.
    Stored,
    /// The friend had it already.
    Already,
    /// Refused.
    Refused(WireError),
}

/// Streams one pack file to a friend over an open pack stream (one long-lived stream carries
/// all the packs of a replication round; each is acknowledged before the next).
///
/// # Errors
/// [`NodeError::Net`] or [`NodeError::Io`] when the transfer breaks.
pub async fn upload(
    stream: &mut libp2p::Stream,
    peer: PeerId,
    owner: OwnerId,
    pack: PackId,
    path: &Path,
) -> Result<Upload, NodeError> {
    // One blocking task reads the pack (direct I/O where possible) a piece ahead of the
    // network: reading each piece only after the last was sent left both the disk and the
    // connection idle half the time.
    let owned = path.to_owned();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(READ_AHEAD);
    let (len_tx, len_rx) = tokio::sync::oneshot::channel::<std::io::Result<u64>>();
    // Detached: it stops at its next piece once `rx` is dropped (on any return).
    tokio::task::spawn_blocking(move || {
        let opened = crate::outbox::PackReader::open(&owned).and_then(|r| {
            let len = r.file_len()?;
            Ok((r, len))
        });
        let (mut reader, len) = match opened {
            Ok(x) => x,
            Err(e) => {
                let _ = len_tx.send(Err(e));
                return;
            }
        };
        if len_tx.send(Ok(len)).is_err() {
            return;
        }
        let mut left = len;
        while left > 0 {
            let n = UPLOAD_PIECE.min(usize::try_from(left).unwrap_or(UPLOAD_PIECE));
            let piece = reader.read_next(n).map(|()| reader.piece().to_vec());
            let failed = piece.is_err();
            if tx.blocking_send(piece).is_err() || failed {
                return;
            }
            left -= n as u64;
        }
    });
    let len = len_rx
        .await
        .map_err(|e| NodeError::io(format!("opening pack {pack}"), std::io::Error::other(e)))?
        .map_err(|e| NodeError::io(format!("opening pack {pack}"), e))?;
    let broken =
        |e: std::io::Error| NodeError::Net(format!("sending pack {} to {peer}: {e}", pack.short()));
    write_frame(stream, &StreamRequest::Put { owner, pack, len })
        .await
        .map_err(broken)?;
    let reply: Option<StreamReply> = read_frame(stream, MAX_STREAM_HEADER)
        .await
        .map_err(|e| NodeError::Net(format!("{peer}: {e}")))?;
    match reply {
        Some(StreamReply::Ready) => {}
        Some(StreamReply::Stored { .. }) => return Ok(Upload::Already),
        Some(StreamReply::Error(e)) => return Ok(Upload::Refused(e)),
        other => {
            return Err(NodeError::Net(format!(
                "friend {peer} answered {other:?} to a put"
            )));
        }
    }
    let mut left = len;
    while left > 0 {
        let piece = rx
            .recv()
            .await
            .ok_or_else(|| {
                NodeError::io(
                    format!("reading pack {pack}"),
                    std::io::Error::other("the reader stopped"),
                )
            })?
            .map_err(|e| NodeError::io(format!("reading pack {pack}"), e))?;
        stream.write_all(&piece).await.map_err(broken)?;
        left = left.saturating_sub(piece.len() as u64);
    }
    stream.flush().await.map_err(broken)?;
    let reply: Option<StreamReply> = read_frame(stream, MAX_STREAM_HEADER)
        .await
        .map_err(|e| NodeError::Net(format!("{peer}: {e}")))?;
    match reply {
        Some(StreamReply::Stored { already: false }) => Ok(Upload::Stored),
        Some(StreamReply::Stored { already: true }) => Ok(Upload::Already),
        Some(StreamReply::Error(e)) => Ok(Upload::Refused(e)),
        other => Err(NodeError::Net(format!(
            "friend {peer} answered {other:?} after a pack body"
        ))),
    }
}

/// The pieces an upload reads from disk at a time, and how many it reads ahead of the network.
const UPLOAD_PIECE: usize = 1024 * 1024;
const READ_AHEAD: usize = 2;

/// Opens a pack stream and asks for `len` bytes of `pack` from `offset`, proving the owner key
/// once if the friend asks. Returns the stream, positioned at the data, and the data's length.
///
/// # Errors
/// [`NodeError::Net`] naming the friend and its refusal.
async fn open_get(
    net: &Net,
    peer: PeerId,
    keys: &Keys,
    pack: PackId,
    offset: u64,
    len: u64,
) -> Result<(libp2p::Stream, u64), NodeError> {
    let owner = keys.owner_id();
    for attempt in 0..2 {
        let mut stream = net.open_stream(peer).await?;
        let broken =
            |e: String| NodeError::Net(format!("fetching pack {} from {peer}: {e}", pack.short()));
        write_frame(
            &mut stream,
            &StreamRequest::Get {
                owner,
                pack,
                offset,
                len,
            },
        )
        .await
        .map_err(|e| broken(e.to_string()))?;
        let reply: Option<StreamReply> = read_frame(&mut stream, MAX_STREAM_HEADER)
            .await
            .map_err(broken)?;
        match reply {
            Some(StreamReply::Data { len: got })
                if got <= len && got <= obnam_protocol::pack::MAX_PACK_LEN =>
            {
                return Ok((stream, got));
            }
            Some(StreamReply::Data { len: got }) => {
                return Err(broken(format!(
                    "{got} bytes is more than asked for or than any pack"
                )));
            }
            Some(StreamReply::Error(WireError {
                code: ErrorCode::Unproven,
                ..
            })) if attempt == 0 => prove(net, peer, keys).await?,
            Some(StreamReply::Error(e)) => return Err(wire_error(&peer, &e)),
            other => return Err(broken(format!("unexpected answer {other:?}"))),
        }
    }
    Err(NodeError::Net(format!(
        "friend {peer} kept asking for an owner proof"
    )))
}

/// Fetches a whole pack from a friend into `dest` (created), returning its BLAKE3 hash.
/// Runs on the calling thread: call it from a blocking thread through `Handle::block_on`, so
/// hashing stays off the async workers.
///
/// # Errors
/// [`NodeError::Net`] naming the friend, or [`NodeError::Io`].
pub async fn fetch(
    net: &Net,
    peer: PeerId,
    keys: &Keys,
    pack: PackId,
    dest: &Path,
) -> Result<PackId, NodeError> {
    let (mut stream, len) = open_get(net, peer, keys, pack, 0, u64::MAX).await?;
    let broken = |e: std::io::Error| {
        NodeError::Net(format!("fetching pack {} from {peer}: {e}", pack.short()))
    };
    let mut out = std::fs::File::create(dest)
        .map_err(|e| NodeError::io(format!("creating {}", dest.display()), e))?;
    let mut hasher = blake3::Hasher::new();
    let mut left = len;
    let mut buf = vec![0u8; IO_CHUNK];
    while left > 0 {
        let n = IO_CHUNK.min(usize::try_from(left).unwrap_or(IO_CHUNK));
        stream.read_exact(&mut buf[..n]).await.map_err(broken)?;
        hasher.update(&buf[..n]);
        std::io::Write::write_all(&mut out, &buf[..n])
            .map_err(|e| NodeError::io(format!("writing {}", dest.display()), e))?;
        left -= n as u64;
    }
    let _ = stream.close().await;
    Ok(PackId(*hasher.finalize().as_bytes()))
}

/// Fetches `len` bytes of a pack from `offset` (a multiple of 64 KiB) into memory. For small
/// ranges only: pack trailers and indexes.
///
/// # Errors
/// [`NodeError::Net`] naming the friend.
pub async fn fetch_range(
    net: &Net,
    peer: PeerId,
    keys: &Keys,
    pack: PackId,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, NodeError> {
    if len > obnam_protocol::pack::MAX_INDEX_LEN as u64 + obnam_protocol::pack::PACK_ALIGN {
        return Err(NodeError::Usage(format!(
            "refusing to fetch {len} bytes of pack {pack} into memory"
        )));
    }
    let (mut stream, got) = open_get(net, peer, keys, pack, offset, len).await?;
    let mut buf = vec![0u8; usize::try_from(got).unwrap_or(0)];
    stream.read_exact(&mut buf).await.map_err(|e| {
        NodeError::Net(format!(
            "fetching part of pack {} from {peer}: {e}",
            pack.short()
        ))
    })?;
    let _ = stream.close().await;
    Ok(buf)
}
