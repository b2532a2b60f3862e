//! The address book: the newest signed address record of each friend (`addr-book-0`).
//!
//! A record is a libp2p signed peer record (an envelope signed by the friend's node key, holding
//! its addresses and a sequence number). The store does not check signatures: the node checks a
//! record before it offers it here, and the store keeps it only when its sequence number is
//! higher than the one it holds, so an old record sent again never replaces a newer one.

use crate::Store;
use crate::error::StoreError;
use crate::hosted::corrupt;
use obnam_protocol::local::AddressRecord;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

/// peer id bytes → [`AddressRecord`].
pub(crate) const ADDR_BOOK: TableDefinition<&[u8], &[u8]> = TableDefinition::new("addr-book-0");

impl Store {
    /// The newest record held for `peer`, if any.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn address_record(&self, peer: &[u8]) -> Result<Option<AddressRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(ADDR_BOOK)?;
        match t.get(peer)? {
            None => Ok(None),
            Some(v) => AddressRecord::from_bytes(v.value())
                .map(Some)
                .map_err(corrupt("address record".into())),
        }
    }

    /// Keeps `record` for `peer` if it is newer than the one held. Returns whether it was kept.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn put_address_record(
        &self,
        peer: &[u8],
        record: &AddressRecord,
    ) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        let kept = {
            let mut t = tx.open_table(ADDR_BOOK)?;
            let held = match t.get(peer)? {
                None => None,
                Some(v) => Some(
                    AddressRecord::from_bytes(v.value())
                        .map_err(corrupt("address record".into()))?
                        .seq,
                ),
            };
            if held.is_some_and(|seq| seq >= record.seq) {
                false
            } else {
                t.insert(peer, record.to_bytes().as_slice())?;
                true
            }
        };
        tx.commit()?;
        Ok(kept)
    }

    /// Every record held, by peer id bytes.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn address_records(&self) -> Result<Vec<(Vec<u8>, AddressRecord)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(ADDR_BOOK)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            let rec =
                AddressRecord::from_bytes(v.value()).map_err(corrupt("address record".into()))?;
            out.push((k.value().to_vec(), rec));
        }
        Ok(out)
    }

    /// Forgets the record of a former friend.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn remove_address_record(&self, peer: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(ADDR_BOOK)?.remove(peer)?;
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, byte: u8) -> AddressRecord {
        AddressRecord {
            seq,
            envelope: vec![byte; 10].into(),
        }
    }

    #[test]
    fn only_newer_records_replace_held_ones() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let store = Store::open(&dir.path().join("db.redb"), &crate::StoreOptions::default())?;
        assert_eq!(store.address_record(b"peer")?, None);
        assert!(store.put_address_record(b"peer", &rec(5, 1))?);
        assert!(!store.put_address_record(b"peer", &rec(5, 2))?);
        assert!(!store.put_address_record(b"peer", &rec(4, 3))?);
        assert_eq!(store.address_record(b"peer")?, Some(rec(5, 1)));
        assert!(store.put_address_record(b"peer", &rec(6, 4))?);
        assert_eq!(
            store.address_records()?,
            vec![(b"peer".to_vec(), rec(6, 4))]
        );
        store.remove_address_record(b"peer")?;
        assert_eq!(store.address_record(b"peer")?, None);
        Ok(())
    }
}
