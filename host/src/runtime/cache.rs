//! The on-disk cache of compiled components, so a restart does not recompile every plugin.
//!
//! An entry is named by a SHA-256 over the component's bytes and the engine's
//! precompile-compatibility hash (wasmtime version, target, compiler settings), so a changed
//! component or an upgraded host simply misses. Its content is the artifact from
//! `Engine::precompile_component` followed by a SHA-256 of that artifact: loading native code
//! from disk is `unsafe`, and the trailing digest makes a truncated or bit-flipped file a
//! cache miss instead of undefined behaviour. A missing, unreadable or corrupt entry is
//! recompiled and rewritten, never an error; writes go to a temporary file that is renamed
//! into place, so readers never see a partial entry.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

const DIGEST_LEN: usize = 32;

/// A directory of compiled components for one engine configuration.
pub(crate) struct ComponentCache {
    dir: PathBuf,
    /// SHA-256 state already fed with the engine's compatibility hash; cloned per lookup.
    engine_key: Sha256,
}

/// Feeds `Hash` output into a SHA-256, since wasmtime exposes its compatibility key only as
/// `impl Hash`.
struct Sha256Hasher<'a>(&'a mut Sha256);

impl Hasher for Sha256Hasher<'_> {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        // Never used: the digest is read from the `Sha256` itself.
        0
    }
}

impl ComponentCache {
    pub(crate) fn new(dir: PathBuf, engine: &Engine) -> ComponentCache {
        let mut engine_key = Sha256::new();
        engine_key.update(b"pgstream-component-cache-v1\0");
        engine
            .precompile_compatibility_hash()
            .hash(&mut Sha256Hasher(&mut engine_key));
        ComponentCache { dir, engine_key }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds (or would hold) the compiled form of `component_bytes`.
    pub(crate) fn artifact_path(&self, component_bytes: &[u8]) -> PathBuf {
        let mut key = self.engine_key.clone();
        key.update(component_bytes);
        let name: String = key
            .finalize()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        self.dir.join(format!("{name}.cwasm"))
    }

    /// Loads the compiled component from the cache, or compiles it and stores the result.
    /// Only a compile failure is an error.
    pub(crate) fn load_or_compile(
        &self,
        engine: &Engine,
        component_bytes: &[u8],
    ) -> wasmtime::Result<Component> {
        let path = self.artifact_path(component_bytes);
        match self.read_entry(engine, &path) {
            Ok(Some(component)) => {
                tracing::debug!(path = %path.display(), "loaded compiled component from cache");
                return Ok(component);
            }
            Ok(None) => {}
            Err(reason) => {
                tracing::warn!(path = %path.display(), %reason, "ignoring unusable cache entry; recompiling");
            }
        }

        let artifact = engine.precompile_component(component_bytes)?;
        // SAFETY: `artifact` was produced by `precompile_component` of this very engine a
        // moment ago; it is not read from anywhere else.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(engine, &artifact)? };
        if let Err(error) = self.write_entry(&path, &artifact) {
            tracing::warn!(path = %path.display(), %error, "cannot write compiled component to cache");
        }
        Ok(component)
    }

    /// `Ok(None)` when there is no entry; `Err` with a reason when there is one but it is
    /// unusable.
    fn read_entry(&self, engine: &Engine, path: &Path) -> Result<Option<Component>, String> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(format!("cannot read: {error}")),
        };
        let Some(split) = bytes.len().checked_sub(DIGEST_LEN) else {
            return Err(format!("only {} bytes long", bytes.len()));
        };
        let (artifact, digest) = bytes.split_at(split);
        if Sha256::digest(artifact).as_slice() != digest {
            return Err("checksum mismatch".to_owned());
        }
        // SAFETY: the artifact was written by `write_entry` from `precompile_component` output
        // (the digest above proves it is byte for byte what was written), and wasmtime checks
        // that it was compiled by a compatible engine. The cache directory is trusted like the
        // host binary itself (see `EngineOptions::cache_dir`).
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(engine, artifact) };
        component
            .map(Some)
            .map_err(|error| format!("cannot deserialize: {error}"))
    }

    fn write_entry(&self, path: &Path, artifact: &[u8]) -> std::io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos());
        // Unique per process and moment, so concurrent writers never share a temporary file.
        let temporary = self
            .dir
            .join(format!(".{}.{nanos}.tmp", std::process::id()));
        let written = (|| {
            let mut file = fs::File::create(&temporary)?;
            file.write_all(artifact)?;
            file.write_all(&Sha256::digest(artifact))?;
            file.sync_all()?;
            fs::rename(&temporary, path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&temporary);
        }
        written
    }
}
