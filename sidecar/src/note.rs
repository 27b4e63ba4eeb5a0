//! Keys and signed statements: ed25519 key files, C2SP signed notes
//! (<https://c2sp.org/signed-note>) and C2SP checkpoints
//! (<https://c2sp.org/tlog-checkpoint>).
//!
//! A signed note is a text of lines, each ending in `\n`, then an empty line,
//! then one line per signature: `— <key name> <base64(key id || signature)>`.
//! The key id is the first 4 bytes of SHA-256(`<name>\n` || 0x01 || public key),
//! so keys rotate without a format change. This module knows nothing of
//! decisions or ledgers: text in, signed text out, and back.

use std::io::Write as _;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum NoteError {
    #[error("cannot read key file `{path}`: {source}")]
    ReadKey {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write key file `{path}`: {source}")]
    WriteKey {
        path: String,
        source: std::io::Error,
    },
    #[error("key file `{0}` is not an ed25519 private key written by `vigie keygen`")]
    BadKeyFile(String),
    #[error("invalid public key `{0}`: expected `<name>+<hex key id>+<base64 key>` as `vigie keygen` prints it")]
    BadPublicKey(String),
    #[error("malformed note: {0}")]
    Malformed(String),
    #[error("no valid signature by `{0}`")]
    BadSignature(String),
    #[error("the system random generator failed: {0}")]
    Random(String),
}

/// An ed25519 signing key with the name it signs under.
pub struct KeyPair {
    pub name: String,
    key: SigningKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A public key that verifies a name's signatures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub name: String,
    pub key: VerifyingKey,
}

fn key_id(name: &str, public: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n\x01");
    h.update(public.as_bytes());
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

impl KeyPair {
    pub fn generate(name: &str) -> Result<KeyPair, NoteError> {
        if name.is_empty() || name.contains(['+', ' ', '\n']) {
            return Err(NoteError::Malformed(format!(
                "a key name cannot be empty or hold `+`, spaces or newlines: `{name}`"
            )));
        }
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| NoteError::Random(e.to_string()))?;
        Ok(KeyPair {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// The key file format: `PRIVATE+KEY+<name>+<hex key id>+<base64(0x01 || seed)>`
    /// (the note package's vkey/skey encoding).
    pub fn encode(&self) -> String {
        let mut raw = vec![0x01];
        raw.extend_from_slice(self.key.as_bytes());
        format!(
            "PRIVATE+KEY+{}+{}+{}",
            self.name,
            hex::encode(key_id(&self.name, &self.key.verifying_key())),
            B64.encode(raw)
        )
    }

    pub fn decode(text: &str, origin: &str) -> Result<KeyPair, NoteError> {
        let bad = || NoteError::BadKeyFile(origin.to_owned());
        let rest = text.trim().strip_prefix("PRIVATE+KEY+").ok_or_else(bad)?;
        // Names and key ids hold no `+`; base64 may.
        let mut parts = rest.splitn(3, '+');
        let name = parts.next().ok_or_else(bad)?;
        let _id = parts.next().ok_or_else(bad)?;
        let b64 = parts.next().ok_or_else(bad)?;
        let raw = B64.decode(b64).map_err(|_| bad())?;
        let seed: [u8; 32] = match raw.as_slice() {
            [0x01, seed @ ..] => seed.try_into().map_err(|_| bad())?,
            _ => return Err(bad()),
        };
        Ok(KeyPair {
            name: name.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Reads the key at `path`, or creates one (mode 0600) if there is none.
    /// Returns whether it was created.
    pub fn load_or_create(path: &Path, name: &str) -> Result<(KeyPair, bool), NoteError> {
        let display = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Ok((KeyPair::decode(&text, &display)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate(name)?;
                key.write(path)?;
                Ok((key, true))
            }
            Err(source) => Err(NoteError::ReadKey {
                path: display,
                source,
            }),
        }
    }

    /// Writes the private key, readable by the owner only.
    pub fn write(&self, path: &Path) -> Result<(), NoteError> {
        let err = |source| NoteError::WriteKey {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(err)?;
        writeln!(f, "{}", self.encode()).map_err(err)?;
        f.sync_all().map_err(err)
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Signs a note text (which must end with `\n`) and returns the whole note.
    pub fn sign_note(&self, text: &str) -> String {
        let sig = self.key.sign(text.as_bytes());
        let mut raw = key_id(&self.name, &self.key.verifying_key()).to_vec();
        raw.extend_from_slice(&sig.to_bytes());
        format!("{text}\n\u{2014} {} {}\n", self.name, B64.encode(raw))
    }
}

impl PublicKey {
    /// `<name>+<hex key id>+<base64(0x01 || key)>`, the note package's vkey.
    pub fn encode(&self) -> String {
        let mut raw = vec![0x01];
        raw.extend_from_slice(self.key.as_bytes());
        format!(
            "{}+{}+{}",
            self.name,
            hex::encode(key_id(&self.name, &self.key)),
            B64.encode(raw)
        )
    }

    pub fn decode(text: &str) -> Result<PublicKey, NoteError> {
        let bad = || NoteError::BadPublicKey(text.to_owned());
        // Names and key ids hold no `+`; base64 may.
        let mut parts = text.trim().splitn(3, '+');
        let name = parts.next().ok_or_else(bad)?;
        let id = parts.next().ok_or_else(bad)?;
        let b64 = parts.next().ok_or_else(bad)?;
        let raw = B64.decode(b64).map_err(|_| bad())?;
        let bytes: [u8; 32] = match raw.as_slice() {
            [0x01, k @ ..] => k.try_into().map_err(|_| bad())?,
            _ => return Err(bad()),
        };
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| bad())?;
        if hex::encode(key_id(name, &key)) != id {
            return Err(bad());
        }
        Ok(PublicKey {
            name: name.to_owned(),
            key,
        })
    }

    /// Verifies a signed note and returns its text (without signatures).
    pub fn open<'a>(&self, note: &'a str) -> Result<&'a str, NoteError> {
        let split = note
            .find("\n\n")
            .ok_or_else(|| NoteError::Malformed("no empty line before the signatures".into()))?;
        let text = &note[..split + 1];
        let want_id = key_id(&self.name, &self.key);
        for line in note[split + 2..].lines() {
            let Some(rest) = line.strip_prefix("\u{2014} ") else {
                return Err(NoteError::Malformed(format!("bad signature line `{line}`")));
            };
            let Some((name, b64)) = rest.rsplit_once(' ') else {
                continue;
            };
            if name != self.name {
                continue;
            }
            let Ok(raw) = B64.decode(b64) else {
                continue;
            };
            if raw.len() != 68 || raw[..4] != want_id {
                continue;
            }
            let Ok(sig) = Signature::from_slice(&raw[4..]) else {
                continue;
            };
            if self.key.verify(text.as_bytes(), &sig).is_ok() {
                return Ok(text);
            }
        }
        Err(NoteError::BadSignature(self.name.clone()))
    }
}

/// A C2SP checkpoint body: origin, tree size, root hash.
pub fn checkpoint_text(origin: &str, size: u64, root: &[u8; 32]) -> String {
    format!("{origin}\n{size}\n{}\n", B64.encode(root))
}

/// Parses a checkpoint body into (origin, size, root).
pub fn parse_checkpoint(text: &str) -> Result<(String, u64, [u8; 32]), NoteError> {
    let mut lines = text.lines();
    let bad = |what: &str| NoteError::Malformed(format!("checkpoint: {what}"));
    let origin = lines.next().ok_or_else(|| bad("no origin"))?.to_owned();
    let size = lines
        .next()
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| bad("no tree size"))?;
    let root = lines
        .next()
        .and_then(|l| B64.decode(l).ok())
        .and_then(|r| <[u8; 32]>::try_from(r.as_slice()).ok())
        .ok_or_else(|| bad("no root hash"))?;
    Ok((origin, size, root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_verify_and_tampering_does_not() {
        let k = KeyPair::generate("sidecar-a").unwrap();
        let note = k.sign_note("vigie-batch/v1\nfirst 1\nlast 9\n");
        let public = PublicKey::decode(&k.public().encode()).unwrap();
        assert_eq!(
            public.open(&note).unwrap(),
            "vigie-batch/v1\nfirst 1\nlast 9\n"
        );
        let forged = note.replace("last 9", "last 8");
        assert!(public.open(&forged).is_err());
        let other = KeyPair::generate("sidecar-a").unwrap().public();
        assert!(
            other.open(&note).is_err(),
            "another key under the same name"
        );
    }

    #[test]
    fn key_files_round_trip_with_owner_only_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k/sidecar.key");
        let (a, created) = KeyPair::load_or_create(&path, "s1").unwrap();
        assert!(created);
        let (b, created) = KeyPair::load_or_create(&path, "s1").unwrap();
        assert!(!created);
        assert_eq!(a.public(), b.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert!(PublicKey::decode("s1+00000000+AAAA").is_err());
    }

    #[test]
    fn checkpoints_round_trip() {
        let text = checkpoint_text("vigie-ledger/test", 42, &[7; 32]);
        assert_eq!(
            parse_checkpoint(&text).unwrap(),
            ("vigie-ledger/test".into(), 42, [7; 32])
        );
    }
}
