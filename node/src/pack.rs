//! Building and reading packs (layout in [`obnam_protocol::pack`]).

use crate::error::NodeError;
use crate::keys::Keys;
use crate::seal::{open_blob, seal_blob};
use obnam_protocol::envelope::{DOMAIN_PACK_INDEX, DOMAIN_PACK_TRAILER};
use obnam_protocol::pack::{PackIndex, PackIndexEntry, PackTrailer, TRAILER_LEN, padding_for};
use obnam_protocol::{ChunkId, PackId};

/// Where a [`PackBuilder`] puts a pack's bytes, front to back.
pub trait PackOut {
    /// Appends `bytes`.
    ///
    /// # Errors
    /// When the bytes cannot be taken (a stage after this one stopped).
    fn put(&mut self, bytes: &[u8]) -> Result<(), NodeError>;
}

impl PackOut for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), NodeError> {
        self.extend_from_slice(bytes);
        Ok(())
    }
}

/// Sealed chunks collected into one pack, written to `O` as they come (a `Vec` holds the
/// whole pack; the backup pipeline streams it to the disk in windows).
#[derive(Default)]
pub struct PackBuilder<O: PackOut = Vec<u8>> {
    out: O,
    len: u64,
    index: PackIndex,
    plain: u64,
}

/// A finished pack, ready to be written.
pub struct FinishedPack {
    /// BLAKE3 of `bytes`.
    pub id: PackId,
    /// The sealed pack.
    pub bytes: Vec<u8>,
    /// Its chunks.
    pub entries: Vec<PackIndexEntry>,
}

impl PackBuilder {
    /// An empty pack, built in memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Seals the index, pads and appends the trailer (see [`PackBuilder::finish_into`]).
    ///
    /// # Errors
    /// [`NodeError::Key`] if sealing fails.
    pub fn finish(self, keys: &Keys) -> Result<FinishedPack, NodeError> {
        let (bytes, _, entries) = self.finish_into(keys)?;
        Ok(FinishedPack {
            id: PackId::of(&bytes),
            bytes,
            entries,
        })
    }
}

impl<O: PackOut> PackBuilder<O> {
    /// An empty pack written to `out`.
    pub fn to(out: O) -> Self {
        Self {
            out,
            len: 0,
            index: PackIndex::default(),
            plain: 0,
        }
    }

    /// Appends a sealed chunk.
    ///
    /// # Errors
    /// When the output refuses the bytes.
    pub fn add(&mut self, id: ChunkId, sealed: &[u8], plain_len: u64) -> Result<(), NodeError> {
        // Packs are closed at 8 MiB of chunks, far below u32::MAX.
        let offset = u32::try_from(self.len).unwrap_or(u32::MAX);
        let len = u32::try_from(sealed.len()).unwrap_or(u32::MAX);
        self.out.put(sealed)?;
        self.len += sealed.len() as u64;
        self.index.entries.push(PackIndexEntry {
            chunk: id,
            offset,
            len,
        });
        self.plain += plain_len;
        Ok(())
    }

    /// Bytes of sealed chunks so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Number of chunks so far.
    pub fn count(&self) -> usize {
        self.index.entries.len()
    }

    /// Whether no chunk was added.
    pub fn is_empty(&self) -> bool {
        self.index.entries.is_empty()
    }

    /// Seals the index, pads with random bytes and appends the sealed trailer. Returns the
    /// output, the pack's length and its chunks.
    ///
    /// # Errors
    /// [`NodeError::Key`] if sealing fails, or the output's error.
    pub fn finish_into(mut self, keys: &Keys) -> Result<(O, u64, Vec<PackIndexEntry>), NodeError> {
        let sealed_index = seal_blob(keys, DOMAIN_PACK_INDEX, &[], &self.index.to_bytes())?;
        let trailer = PackTrailer {
            index_offset: self.len,
            index_len: sealed_index.len() as u64,
        };
        self.out.put(&sealed_index)?;
        self.len += sealed_index.len() as u64;
        let mut pad = vec![0u8; padding_for(self.len + TRAILER_LEN as u64) as usize];
        rand::fill(&mut pad[..]);
        self.out.put(&pad)?;
        self.len += pad.len() as u64;
        let sealed_trailer = seal_blob(keys, DOMAIN_PACK_TRAILER, &[], &trailer.to_bytes())?;
        debug_assert_eq!(sealed_trailer.len(), TRAILER_LEN);
        self.out.put(&sealed_trailer)?;
        self.len += sealed_trailer.len() as u64;
        Ok((self.out, self.len, self.index.entries))
    }
}

/// Reads a pack's sealed index, given a way to read byte ranges of it and its length.
///
/// # Errors
/// [`NodeError::Authentication`] or [`NodeError::Corrupt`] naming the pack.
pub fn read_index(
    keys: &Keys,
    pack: &PackId,
    len: u64,
    read: impl Fn(u64, usize) -> Result<Vec<u8>, NodeError>,
) -> Result<PackIndex, NodeError> {
    let auth = || NodeError::Authentication {
        what: format!("pack {pack}"),
    };
    if len < TRAILER_LEN as u64 {
        return Err(NodeError::Authentication {
            what: format!("pack {pack} (too short)"),
        });
    }
    let sealed_trailer = read(len - TRAILER_LEN as u64, TRAILER_LEN)?;
    let trailer_bytes =
        open_blob(keys, DOMAIN_PACK_TRAILER, &[], &sealed_trailer).map_err(|_| auth())?;
    let trailer = PackTrailer::from_bytes(&trailer_bytes, len).map_err(|e| NodeError::Corrupt {
        what: format!("pack {pack}"),
        source: e,
    })?;
    // from_bytes bounds index_len by MAX_INDEX_LEN.
    let sealed_index = read(trailer.index_offset, trailer.index_len as usize)?;
    let index_bytes = open_blob(keys, DOMAIN_PACK_INDEX, &[], &sealed_index).map_err(|_| auth())?;
    PackIndex::from_bytes(&index_bytes).map_err(|e| NodeError::Corrupt {
        what: format!("index of pack {pack}"),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MasterSecret;
    use crate::seal::{open_chunk, seal_chunk};
    use obnam_protocol::pack::PACK_ALIGN;

    #[test]
    fn packs_are_padded_and_indexed() {
        let keys = Keys::derive(&MasterSecret::generate());
        let mut b = PackBuilder::new();
        let mut ids = vec![];
        for i in 0..5u8 {
            let data = vec![i; 1000 + i as usize];
            let id = keys.chunk_id(&data);
            b.add(
                id,
                &seal_chunk(&keys, &id, &data, 3).unwrap(),
                data.len() as u64,
            )
            .unwrap();
            ids.push((id, data));
        }
        let pack = b.finish(&keys).unwrap();
        assert_eq!(pack.bytes.len() as u64 % PACK_ALIGN, 0);
        assert_eq!(pack.id, PackId::of(&pack.bytes));
        let bytes = pack.bytes.clone();
        let read = |off: u64, len: usize| Ok(bytes[off as usize..off as usize + len].to_vec());
        let index = read_index(&keys, &pack.id, bytes.len() as u64, read).unwrap();
        assert_eq!(index.entries, pack.entries);
        for (e, (id, data)) in index.entries.iter().zip(&ids) {
            let sealed = &bytes[e.offset as usize..(e.offset + e.len) as usize];
            assert_eq!(&open_chunk(&keys, id, sealed).unwrap(), data);
        }
        // Another owner cannot read the index.
        let other = Keys::derive(&MasterSecret::generate());
        let read = |off: u64, len: usize| Ok(bytes[off as usize..off as usize + len].to_vec());
        assert!(matches!(
            read_index(&other, &pack.id, bytes.len() as u64, read),
            Err(NodeError::Authentication { .. })
        ));
    }
}
