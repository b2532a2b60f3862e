//! Key material: the master secret, the key slot that wraps it, and the keys derived from it.
//!
//! See [`obnam_protocol::keyslot`] for the hierarchy. This module is the only place that turns a
//! passphrase into keys, and `obnam-node` is the only crate that holds them.

use crate::error::NodeError;
use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ed25519_dalek::{Signer, SigningKey};
use obnam_protocol::envelope::{self, DOMAIN_KEY_SLOT, NONCE_LEN, Sealed};
use obnam_protocol::keyslot::{self, KeySlot, MASTER_LEN, SLOT_VERSION, SecretsFile};
use obnam_protocol::{ChunkId, LookupId, OwnerId, signed};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use zeroize::{Zeroize, Zeroizing};

/// The owner's 256-bit master secret.
#[derive(Clone)]
pub struct MasterSecret(Zeroizing<[u8; MASTER_LEN]>);

impl MasterSecret {
    /// A fresh random secret.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; MASTER_LEN]);
        rand::fill(&mut bytes[..]);
        Self(bytes)
    }

    fn from_slice(b: &[u8]) -> Result<Self, NodeError> {
        let arr: [u8; MASTER_LEN] = b
            .try_into()
            .map_err(|_| NodeError::Key("master secret is not 32 bytes".into()))?;
        Ok(Self(Zeroizing::new(arr)))
    }
}

/// The result of stretching a passphrase: the key that wraps the slot, and the lookup id.
pub struct Stretched {
    wrap: Zeroizing<[u8; 32]>,
    /// Where friends file the slot.
    pub lookup: LookupId,
}

/// Runs Argon2id over the passphrase with the salt of `name`, at the cost fixed for
/// `slot_version`. Takes about a second and 256 MiB.
///
/// # Errors
/// [`NodeError::Key`] for an unknown slot version or an Argon2 failure.
pub fn stretch(passphrase: &str, name: &str, slot_version: u8) -> Result<Stretched, NodeError> {
    let p = keyslot::argon2_params(slot_version)
        .ok_or_else(|| NodeError::Key(format!("unknown key slot version {slot_version}")))?;
    let params = Params::new(p.m_kib, p.t, p.p, Some(32))
        .map_err(|e| NodeError::Key(format!("argon2 parameters: {e}")))?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(passphrase.as_bytes(), &keyslot::salt(name), &mut out[..])
        .map_err(|e| NodeError::Key(format!("argon2: {e}")))?;
    let wrap = Zeroizing::new(blake3::derive_key(keyslot::CTX_WRAP, &out[..]));
    let lookup = LookupId(blake3::derive_key(keyslot::CTX_LOOKUP, &out[..]));
    Ok(Stretched { wrap, lookup })
}

/// Wraps the master secret in a new key slot.
///
/// # Errors
/// [`NodeError::Key`] if encryption fails.
pub fn wrap(master: &MasterSecret, stretched: &Stretched) -> Result<KeySlot, NodeError> {
    let cipher = XChaCha20Poly1305::new(&(*stretched.wrap).into());
    let mut nonce = [0u8; NONCE_LEN];
    rand::fill(&mut nonce[..]);
    let aad = envelope::blob_aad(DOMAIN_KEY_SLOT, &[SLOT_VERSION]);
    let ct = cipher
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: &master.0[..],
                aad: &aad,
            },
        )
        .map_err(|_| NodeError::Key("sealing the key slot failed".into()))?;
    Ok(KeySlot {
        version: SLOT_VERSION,
        sealed_secret: envelope::assemble(&nonce, &ct),
    })
}

/// Opens a key slot with a stretched passphrase.
///
/// # Errors
/// [`NodeError::WrongPassphrase`] when the slot does not open.
pub fn unwrap(
    slot: &KeySlot,
    stretched: &Stretched,
    name: &str,
) -> Result<MasterSecret, NodeError> {
    let sealed =
        Sealed::parse("key slot", &slot.sealed_secret).map_err(|e| NodeError::Corrupt {
            what: "key slot".into(),
            source: e,
        })?;
    let cipher = XChaCha20Poly1305::new(&(*stretched.wrap).into());
    let aad = envelope::blob_aad(DOMAIN_KEY_SLOT, &[slot.version]);
    let plain = cipher
        .decrypt(
            &XNonce::from(*sealed.nonce),
            Payload {
                msg: sealed.ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| NodeError::WrongPassphrase {
            name: name.to_owned(),
        })?;
    let plain = Zeroizing::new(plain);
    MasterSecret::from_slice(&plain)
}

/// Refuses passphrases that zxcvbn scores below 3 (about 10^10 guesses).
///
/// # Errors
/// [`NodeError::WeakPassphrase`] with zxcvbn's feedback.
pub fn check_strength(passphrase: &str, name: &str) -> Result<(), NodeError> {
    if passphrase.is_empty() {
        return Err(NodeError::WeakPassphrase {
            reason: "it is empty".into(),
        });
    }
    let entropy = zxcvbn::zxcvbn(passphrase, &[name, "obnam", "backup"]);
    if (entropy.score() as u8) >= 3 {
        return Ok(());
    }
    let mut reason = format!("estimated {} guesses", entropy.guesses());
    if let Some(fb) = entropy.feedback()
        && let Some(w) = fb.warning()
    {
        reason = format!("{w}; {reason}");
    }
    Err(NodeError::WeakPassphrase { reason })
}

/// The keys derived from the master secret.
pub struct Keys {
    chunk_id_key: Zeroizing<[u8; 32]>,
    data: XChaCha20Poly1305,
    gear_seed: u64,
    owner: SigningKey,
}

impl Keys {
    /// Derives every key from the master secret, each with its own context.
    pub fn derive(master: &MasterSecret) -> Self {
        let chunk_id_key = Zeroizing::new(blake3::derive_key(keyslot::CTX_CHUNK_ID, &master.0[..]));
        let mut data_key = Zeroizing::new(blake3::derive_key(keyslot::CTX_DATA, &master.0[..]));
        let data = XChaCha20Poly1305::new(&(*data_key).into());
        data_key.zeroize();
        let mut gear = blake3::derive_key(keyslot::CTX_GEAR, &master.0[..]);
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&gear[..8]);
        gear.zeroize();
        let mut owner_bytes = Zeroizing::new(blake3::derive_key(keyslot::CTX_OWNER, &master.0[..]));
        let owner = SigningKey::from_bytes(&owner_bytes);
        owner_bytes.zeroize();
        Self {
            chunk_id_key,
            data,
            gear_seed: u64::from_le_bytes(seed),
            owner,
        }
    }

    /// The id of a chunk: BLAKE3 keyed with the chunk-id key.
    pub fn chunk_id(&self, plaintext: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.chunk_id_key, plaintext).as_bytes())
    }

    /// The secret FastCDC gear seed.
    pub fn gear_seed(&self) -> u64 {
        self.gear_seed
    }

    /// The data cipher.
    pub fn cipher(&self) -> &XChaCha20Poly1305 {
        &self.data
    }

    /// The owner's public key.
    pub fn owner_id(&self) -> OwnerId {
        OwnerId(self.owner.verifying_key().to_bytes())
    }

    /// Signs `payload` under `context` with the owner key.
    pub fn sign(&self, context: &str, payload: &[u8]) -> [u8; 64] {
        self.owner
            .sign(&signed::message(context, payload))
            .to_bytes()
    }
}

/// The unlocked owner: name, slot, derived keys.
pub struct Owner {
    /// The owner name.
    pub name: String,
    /// The encoded key slot.
    pub slot: Vec<u8>,
    /// Where friends file the slot.
    pub lookup: LookupId,
    /// The derived keys.
    pub keys: Keys,
}

/// Creates the owner's keys and writes the secrets file (mode 0400).
///
/// # Errors
/// [`NodeError::AlreadyInitialized`] if a secrets file exists, I/O errors otherwise.
pub fn init(path: &Path, name: &str, passphrase: &str) -> Result<Owner, NodeError> {
    if path.exists() {
        let existing = load_secrets(path)?;
        return Err(NodeError::AlreadyInitialized {
            name: existing.name.clone(),
        });
    }
    let master = MasterSecret::generate();
    let stretched = stretch(passphrase, name, SLOT_VERSION)?;
    let slot = wrap(&master, &stretched)?.to_bytes();
    let file = SecretsFile {
        name: name.to_owned(),
        master: master.0.to_vec(),
        slot: slot.clone(),
        lookup: stretched.lookup,
    };
    write_secrets(path, &file)?;
    Ok(Owner {
        name: name.to_owned(),
        slot,
        lookup: stretched.lookup,
        keys: Keys::derive(&master),
    })
}

/// Writes the secrets file of a recovered owner (master secret from a friend's key slot).
///
/// # Errors
/// [`NodeError::AlreadyInitialized`] or I/O errors.
pub fn write_recovered(
    path: &Path,
    name: &str,
    master: &MasterSecret,
    slot: Vec<u8>,
    lookup: LookupId,
) -> Result<Owner, NodeError> {
    if path.exists() {
        let existing = load_secrets(path)?;
        return Err(NodeError::AlreadyInitialized {
            name: existing.name.clone(),
        });
    }
    let file = SecretsFile {
        name: name.to_owned(),
        master: master.0.to_vec(),
        slot: slot.clone(),
        lookup,
    };
    write_secrets(path, &file)?;
    Ok(Owner {
        name: name.to_owned(),
        slot,
        lookup,
        keys: Keys::derive(master),
    })
}

fn write_secrets(path: &Path, file: &SecretsFile) -> Result<(), NodeError> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let bytes = Zeroizing::new(file.to_bytes());
    let ctx = || format!("writing secrets file {}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(&tmp)
        .map_err(|e| NodeError::io(ctx(), e))?;
    f.write_all(&bytes).map_err(|e| NodeError::io(ctx(), e))?;
    f.sync_all().map_err(|e| NodeError::io(ctx(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| NodeError::io(ctx(), e))?;
    crate::outbox::sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Reads the secrets file, refusing it when group or others may read it.
///
/// # Errors
/// [`NodeError::NotInitialized`], [`NodeError::InsecureSecrets`], or a decode error.
pub fn load_secrets(path: &Path) -> Result<SecretsFile, NodeError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(NodeError::NotInitialized);
        }
        Err(e) => return Err(NodeError::io(format!("reading {}", path.display()), e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(NodeError::InsecureSecrets {
            path: path.to_owned(),
            mode,
        });
    }
    let bytes = Zeroizing::new(
        std::fs::read(path).map_err(|e| NodeError::io(format!("reading {}", path.display()), e))?,
    );
    SecretsFile::from_bytes(&bytes).map_err(|e| NodeError::Corrupt {
        what: format!("secrets file {}", path.display()),
        source: e,
    })
}

/// Loads the owner from the secrets file.
///
/// # Errors
/// As [`load_secrets`].
pub fn load_owner(path: &Path) -> Result<Owner, NodeError> {
    let file = load_secrets(path)?;
    let master = MasterSecret::from_slice(&file.master)?;
    Ok(Owner {
        name: file.name.clone(),
        slot: file.slot.clone(),
        lookup: file.lookup,
        keys: Keys::derive(&master),
    })
}

/// Re-wraps the master secret under a new passphrase and rewrites the secrets file. Nothing
/// else changes: the derived keys stay the same, so no data is re-uploaded.
///
/// # Errors
/// [`NodeError::WrongPassphrase`] for a wrong current passphrase, I/O errors.
pub fn change_passphrase(path: &Path, old: &str, new: &str) -> Result<Owner, NodeError> {
    check_passphrase(path, old)?;
    let file = load_secrets(path)?;
    let master = MasterSecret::from_slice(&file.master)?;
    let stretched = stretch(new, &file.name, SLOT_VERSION)?;
    let slot = wrap(&master, &stretched)?.to_bytes();
    let updated = SecretsFile {
        name: file.name.clone(),
        master: file.master.clone(),
        slot: slot.clone(),
        lookup: stretched.lookup,
    };
    write_secrets(path, &updated)?;
    Ok(Owner {
        name: file.name.clone(),
        slot,
        lookup: stretched.lookup,
        keys: Keys::derive(&master),
    })
}

/// Where `keys rotate` keeps the next master secret until the switch.
pub fn next_path(secrets: &Path) -> std::path::PathBuf {
    secrets.with_file_name("secrets.next")
}

/// Where the retired owner's secrets stay until every friend has deleted its data.
pub fn retired_path(secrets: &Path) -> std::path::PathBuf {
    secrets.with_file_name("secrets.retired")
}

/// The next owner for `keys rotate`: a new master secret (or the one a rotation that was
/// interrupted left in `secrets.next`), wrapped under `passphrase`, written to `secrets.next`
/// before any data is sealed with it.
///
/// # Errors
/// I/O and key errors.
pub fn prepare_next(secrets: &Path, passphrase: &str) -> Result<Owner, NodeError> {
    let file = load_secrets(secrets)?;
    let next = next_path(secrets);
    let master = if next.exists() {
        MasterSecret::from_slice(&load_secrets(&next)?.master)?
    } else {
        MasterSecret::generate()
    };
    let stretched = stretch(passphrase, &file.name, SLOT_VERSION)?;
    let slot = wrap(&master, &stretched)?.to_bytes();
    write_secrets(
        &next,
        &SecretsFile {
            name: file.name.clone(),
            master: master.0.to_vec(),
            slot: slot.clone(),
            lookup: stretched.lookup,
        },
    )?;
    Ok(Owner {
        name: file.name,
        slot,
        lookup: stretched.lookup,
        keys: Keys::derive(&master),
    })
}

/// Copies a secrets file (mode 0400, durable).
///
/// # Errors
/// As [`load_secrets`], and I/O errors.
pub fn copy_secrets(from: &Path, to: &Path) -> Result<(), NodeError> {
    write_secrets(to, &load_secrets(from)?)
}

/// Checks a passphrase against the slot in the secrets file.
///
/// # Errors
/// [`NodeError::WrongPassphrase`] when it does not open the slot.
pub fn check_passphrase(path: &Path, passphrase: &str) -> Result<String, NodeError> {
    let file = load_secrets(path)?;
    let slot = KeySlot::from_bytes(&file.slot).map_err(|e| NodeError::Corrupt {
        what: "key slot".into(),
        source: e,
    })?;
    let stretched = stretch(passphrase, &file.name, slot.version)?;
    let master = unwrap(&slot, &stretched, &file.name)?;
    if master.0[..] != file.master[..] {
        return Err(NodeError::Key(
            "the key slot and the secrets file hold different master secrets".into(),
        ));
    }
    Ok(file.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_round_trip_and_wrong_passphrase() {
        let master = MasterSecret::generate();
        let s = stretch("correct horse battery staple", "alice", 1).unwrap();
        let slot = wrap(&master, &s).unwrap();
        let back = unwrap(&slot, &s, "alice").unwrap();
        assert_eq!(back.0[..], master.0[..]);
        let wrong = stretch("correct horse battery stapler", "alice", 1).unwrap();
        assert!(matches!(
            unwrap(&slot, &wrong, "alice"),
            Err(NodeError::WrongPassphrase { .. })
        ));
        // The same passphrase under another name is another key and another lookup id.
        let other_name = stretch("correct horse battery staple", "bob", 1).unwrap();
        assert_ne!(other_name.lookup, s.lookup);
        assert!(unwrap(&slot, &other_name, "bob").is_err());
    }

    #[test]
    fn derived_keys_are_separate() {
        let m = MasterSecret(Zeroizing::new([1u8; 32]));
        let k = Keys::derive(&m);
        let id = k.chunk_id(b"x");
        assert_ne!(
            id,
            ChunkId(*blake3::hash(b"x").as_bytes()),
            "chunk ids must be keyed"
        );
        let m2 = MasterSecret(Zeroizing::new([2u8; 32]));
        let k2 = Keys::derive(&m2);
        assert_ne!(k.chunk_id(b"x"), k2.chunk_id(b"x"));
        assert_ne!(k.gear_seed(), k2.gear_seed());
        assert_ne!(k.owner_id(), k2.owner_id());
    }

    #[test]
    fn signatures_do_not_cross_contexts() {
        let k = Keys::derive(&MasterSecret::generate());
        let sig = k.sign(signed::CONTEXT_HEAD, b"payload");
        assert!(signed::verify(&k.owner_id(), signed::CONTEXT_HEAD, b"payload", &sig).is_ok());
        assert!(signed::verify(&k.owner_id(), signed::CONTEXT_TAKEOVER, b"payload", &sig).is_err());
        assert!(signed::verify(&k.owner_id(), signed::CONTEXT_HEAD, b"payloaD", &sig).is_err());
    }

    #[test]
    fn weak_passphrases_are_refused() {
        assert!(check_strength("password", "alice").is_err());
        assert!(check_strength("alice123", "alice").is_err());
        assert!(check_strength("", "alice").is_err());
        assert!(check_strength("violet tractor sings under 9 quiet lamps", "alice").is_ok());
    }

    #[test]
    fn secrets_file_mode_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets");
        assert!(matches!(load_owner(&path), Err(NodeError::NotInitialized)));
        let owner = init(&path, "alice", "violet tractor sings under 9 quiet lamps").unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o400
        );
        assert_eq!(
            load_owner(&path).unwrap().keys.owner_id(),
            owner.keys.owner_id()
        );
        assert!(matches!(
            init(&path, "alice", "x"),
            Err(NodeError::AlreadyInitialized { .. })
        ));
        assert_eq!(
            check_passphrase(&path, "violet tractor sings under 9 quiet lamps").unwrap(),
            "alice"
        );
        assert!(matches!(
            check_passphrase(&path, "wrong"),
            Err(NodeError::WrongPassphrase { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o440)).unwrap();
        let err = load_owner(&path).err().unwrap();
        assert!(
            matches!(err, NodeError::InsecureSecrets { mode: 0o440, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 400"));
    }
}

#[cfg(test)]
mod golden {
    use super::*;

    // These values freeze the key hierarchy: if one changes, chunk ids, owner keys or slot
    // lookups of existing backups would silently change with it.
    #[test]
    fn golden_key_derivation() {
        let k = Keys::derive(&MasterSecret(Zeroizing::new([7u8; 32])));
        assert_eq!(
            k.chunk_id(b"hello").to_hex(),
            "cabef2e511c89bdd4f1bb315f636905c9052dd6eebae20bddeeee4ba41464c89"
        );
        assert_eq!(
            k.owner_id().to_hex(),
            "76de96d35acc7757f882b90fe5ea57aa9cb1b2352ab925e85c44735794d034cf"
        );
        assert_eq!(k.gear_seed(), 6859266657801946273);
    }

    #[test]
    fn golden_stretch() {
        let s = stretch("correct horse battery staple", "alice", 1).unwrap();
        assert_eq!(
            s.lookup.to_hex(),
            "8122a27946058c79c29d8f40974a1c4cf8a02c5114f5e47d6912a3c07490ce4f"
        );
    }
}
