//! The judges' secret: what makes the legality probes' cuts, shuffles, replaced targets
//! and asked-about positions unknowable to whoever wrote the scorer they judge.
//!
//! `$CACHEMONEY_SECRET` when set (machines that share a remote give it the same value to
//! share their re-runs; the docs' transcripts use a fixed one), else the store's own,
//! drawn from the system's randomness the first time a pipeline with a judge is loaded
//! and kept in `STORE/.secret` (readable by this user only; never pushed to a remote).
//! Recipes hold a key derived from it, not the secret itself.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};

pub const ENV: &str = "CACHEMONEY_SECRET";
pub const FILE: &str = ".secret";

/// The key the judges' parameters carry: 32 hex digits derived from the secret.
pub fn judges_key(store_dir: &Path) -> Result<String> {
    let raw = match std::env::var(ENV) {
        Ok(value) if !value.is_empty() => value.into_bytes(),
        _ => store_secret(store_dir)?,
    };
    let key = blake3::derive_key("cachemoney judges' secret v1", &raw);
    Ok(key[..16].iter().map(|b| format!("{b:02x}")).collect())
}

/// The store's secret, made on first use. Two processes racing to make it agree on one:
/// each writes its own candidate and links it into place only if none is there.
fn store_secret(store_dir: &Path) -> Result<Vec<u8>> {
    let path = store_dir.join(FILE);
    if let Ok(existing) = std::fs::read(&path) {
        if existing.len() >= 32 {
            return Ok(existing);
        }
    }
    std::fs::create_dir_all(store_dir)
        .with_context(|| format!("{}: cannot create the store directory", store_dir.display()))?;
    let mut fresh = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut fresh))
        .context("/dev/urandom: cannot draw the store's secret")?;
    let hex: String = fresh.iter().map(|b| format!("{b:02x}")).collect();
    let candidate = store_dir.join(format!("{FILE}.{}", std::process::id()));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&candidate)
            .with_context(|| format!("{}: cannot write the store's secret", candidate.display()))?;
        file.write_all(hex.as_bytes())?;
        file.sync_all()?;
    }
    let linked = std::fs::hard_link(&candidate, &path);
    let _ = std::fs::remove_file(&candidate);
    match linked {
        Ok(()) => Ok(hex.into_bytes()),
        Err(_) => std::fs::read(&path)
            .with_context(|| format!("{}: cannot read the store's secret", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_keeps_one_secret_and_another_store_has_another() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = store_secret(a.path()).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(store_secret(a.path()).unwrap(), first);
        assert_ne!(store_secret(b.path()).unwrap(), first);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(a.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
