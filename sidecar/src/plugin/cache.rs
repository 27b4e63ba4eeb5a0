//! Compiled plugins on disk, so a restart or a reload does not compile
//! again.
//!
//! An entry is named `<sha256 of the .wasm>-<engine compatibility hash>.cwasm`:
//! a changed plugin or another wasmtime build (version, settings, CPU
//! features) never finds a stale entry. Its content is
//! `"VIGIECW1" || HMAC-SHA256(key, name || code) || code`, with a key made
//! once per cache directory (`cache.key`, mode 0600). Loading compiled code
//! trusts it completely (it is native code), so an entry whose MAC does not
//! verify is deleted and the plugin compiled again: a tampered file is never
//! loaded.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

const MAGIC: &[u8; 8] = b"VIGIECW1";
const KEY_FILE: &str = "cache.key";

#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    key: [u8; 32],
    /// The engine's compatibility hash, hex.
    compat: String,
}

impl Cache {
    /// Opens (creating) the directory and its key.
    pub fn open(dir: &Path, engine: &Engine) -> Result<Cache, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create: {e}"))?;
        let key_path = dir.join(KEY_FILE);
        let key = match std::fs::read(&key_path) {
            Ok(bytes) if bytes.len() == 32 => {
                let mut k = [0u8; 32];
                k.copy_from_slice(&bytes);
                k
            }
            _ => {
                let mut k = [0u8; 32];
                getrandom::fill(&mut k).map_err(|e| format!("no randomness: {e}"))?;
                write_private(&key_path, &k).map_err(|e| format!("cannot write the key: {e}"))?;
                // Entries made with another key can no longer be verified.
                for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                    if entry.path().extension().is_some_and(|x| x == "cwasm") {
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
                k
            }
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(Cache {
            dir: dir.to_owned(),
            key,
            compat: format!("{:016x}", hasher.finish()),
        })
    }

    fn name(&self, wasm: &[u8]) -> String {
        format!(
            "{}-{}.cwasm",
            hex::encode(Sha256::digest(wasm)),
            self.compat
        )
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the entry of `wasm` is (for tests that tamper with it).
    pub fn path_of(&self, wasm: &[u8]) -> PathBuf {
        self.dir.join(self.name(wasm))
    }

    fn mac(&self, name: &str, code: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(&(name.len() as u64).to_le_bytes());
        mac.update(name.as_bytes());
        mac.update(code);
        mac
    }

    /// The cached component of `wasm`: `Ok(None)` if there is none, `Err` if
    /// there was one that did not verify (it is deleted).
    pub fn load(&self, engine: &Engine, wasm: &[u8]) -> Result<Option<Component>, String> {
        let name = self.name(wasm);
        let path = self.dir.join(&name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(_) => return Ok(None),
        };
        let verified = bytes.len() > MAGIC.len() + 32
            && bytes.starts_with(MAGIC)
            && self
                .mac(&name, &bytes[MAGIC.len() + 32..])
                .verify_slice(&bytes[MAGIC.len()..MAGIC.len() + 32])
                .is_ok();
        if !verified {
            let _ = std::fs::remove_file(&path);
            return Err(format!(
                "`{}` fails its integrity check (tampered or torn); deleted",
                path.display()
            ));
        }
        deserialize(engine, &bytes[MAGIC.len() + 32..]).map(Some)
    }

    /// Writes the entry of `wasm` (atomically: a temporary file renamed).
    pub fn store(&self, wasm: &[u8], code: &[u8]) -> std::io::Result<()> {
        let name = self.name(wasm);
        let tag = self.mac(&name, code).finalize().into_bytes();
        let mut bytes = Vec::with_capacity(MAGIC.len() + 32 + code.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&tag);
        bytes.extend_from_slice(code);
        let tmp = self.dir.join(format!("{name}.{}.tmp", std::process::id()));
        write_private(&tmp, &bytes)?;
        std::fs::rename(&tmp, self.dir.join(&name))
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut f = options.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Loads compiled code produced by `engine.precompile_component`.
pub fn deserialize(engine: &Engine, code: &[u8]) -> Result<Component, String> {
    // SAFETY: wasmtime runs compiled code without checking it, so it must be
    // code this engine produced. The callers pass either what
    // `precompile_component` just returned, or a cache entry whose HMAC,
    // keyed with a secret only this cache directory holds, proves we wrote
    // it. wasmtime itself also refuses code from an incompatible engine.
    #[allow(unsafe_code)]
    let component = unsafe { Component::deserialize(engine, code) };
    component.map_err(|e| format!("cannot load compiled code: {e:#}"))
}
