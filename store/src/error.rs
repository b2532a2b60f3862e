//! The store's error type. redb's errors are mapped here and never leave the crate as such.

use obnam_protocol::DecodeError;
use std::path::PathBuf;

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database file could not be opened.
    #[error("cannot open the index database {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The database was written by an incompatible version of obnam.
    #[error(
        "the index database has schema version {found:?}, which this obnam does not understand"
    )]
    Schema {
        /// The schema version found.
        found: String,
    },
    /// A stored record does not decode.
    #[error("{what} in the index database is damaged")]
    Corrupt {
        /// Which record.
        what: String,
        /// The decoder's complaint.
        #[source]
        source: DecodeError,
    },
    /// redb failed.
    #[error("index database error")]
    Db(#[source] redb::Error),
}

macro_rules! from_redb {
    ($($t:ty),*) => {
        $(impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        })*
    };
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);
