//! The postcard encoding, with size bounds checked before decoding.
//!
//! postcard has no schema evolution, so every top-level format carries [`FORMAT_VERSION`] (or a
//! version enum) and is decoded with [`decode_bounded`], which refuses oversized input before it
//! allocates anything.

use serde::{Serialize, de::DeserializeOwned};

/// The version byte of every sealed envelope and on-disk format defined in this crate.
pub const FORMAT_VERSION: u8 = 1;

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input is larger than the format allows.
    #[error("{what} is {len} bytes, more than the limit of {max} bytes")]
    TooLarge {
        /// Which format.
        what: &'static str,
        /// The size seen.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The input ends early.
    #[error("{what} is truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Which format.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// The version byte is not one this build understands.
    #[error("{what} has unsupported format version {version}")]
    Version {
        /// Which format.
        what: &'static str,
        /// The version seen.
        version: u8,
    },
    /// The bytes are not a valid encoding.
    #[error("{what} is malformed: {reason}")]
    Malformed {
        /// Which format.
        what: &'static str,
        /// What the decoder said.
        reason: String,
    },
}

/// Encodes a value with postcard. Encoding into a `Vec` cannot fail for the types in this crate.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // postcard only fails to serialize into a Vec for types that serde cannot represent
    // (e.g. maps with unknown length), which this crate never defines.
    postcard::to_stdvec(value).unwrap_or_default()
}

/// Decodes a value, refusing input over `max` bytes and trailing bytes.
///
/// # Errors
/// [`DecodeError::TooLarge`] or [`DecodeError::Malformed`].
pub fn decode_bounded<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    max: usize,
) -> Result<T, DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooLarge {
            what,
            len: bytes.len(),
            max,
        });
    }
    let (value, rest) =
        postcard::take_from_bytes::<T>(bytes).map_err(|e| DecodeError::Malformed {
            what,
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed {
            what,
            reason: format!("{} trailing bytes", rest.len()),
        });
    }
    Ok(value)
}

/// Checks a leading version byte and returns the rest.
///
/// # Errors
/// [`DecodeError::Truncated`] for empty input, [`DecodeError::Version`] for another version.
pub fn split_version<'a>(what: &'static str, bytes: &'a [u8]) -> Result<&'a [u8], DecodeError> {
    match bytes.split_first() {
        None => Err(DecodeError::Truncated {
            what,
            need: 1,
            have: 0,
        }),
        Some((&FORMAT_VERSION, rest)) => Ok(rest),
        Some((&version, _)) => Err(DecodeError::Version { what, version }),
    }
}

/// Encodes a value behind a [`FORMAT_VERSION`] byte.
pub fn encode_versioned<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    out.extend_from_slice(&encode(value));
    out
}

/// Decodes a value written by [`encode_versioned`].
///
/// # Errors
/// As [`split_version`] and [`decode_bounded`].
pub fn decode_versioned<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
    max: usize,
) -> Result<T, DecodeError> {
    decode_bounded(what, split_version(what, bytes)?, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_input_is_refused_before_decoding() {
        let err = decode_bounded::<u32>("thing", &[0u8; 10], 4).unwrap_err();
        assert_eq!(
            err,
            DecodeError::TooLarge {
                what: "thing",
                len: 10,
                max: 4
            }
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&7u32);
        bytes.push(0);
        assert!(matches!(
            decode_bounded::<u32>("thing", &bytes, 100),
            Err(DecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn wrong_version_is_named() {
        let err = decode_versioned::<u32>("thing", &[9, 1], 100).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Version {
                what: "thing",
                version: 9
            }
        );
        assert_eq!(
            decode_versioned::<u32>("thing", &encode_versioned(&5u32), 100),
            Ok(5)
        );
    }
}
