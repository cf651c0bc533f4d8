//! Blobs on the coordinator's disk, by SHA-256: `DATA_DIR/blobs/ab/abcdef…`.
//!
//! A blob path exists only once its content verified (see `cohort_proto::transfer`), so a path
//! that exists is a complete blob.

use std::path::PathBuf;

use cohort_proto::transfer::is_sha256_hex;

/// The blob folder.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// A store rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Where blob `sha256` lives; `None` when the name is not a SHA-256 (so no name can escape
    /// the folder).
    pub fn path(&self, sha256: &str) -> Option<PathBuf> {
        if !is_sha256_hex(sha256) {
            return None;
        }
        Some(self.root.join(&sha256[..2]).join(sha256))
    }

    /// The stored size of a blob, if present.
    pub fn size(&self, sha256: &str) -> Option<u64> {
        let path = self.path(sha256)?;
        std::fs::metadata(path).ok().filter(|m| m.is_file()).map(|m| m.len())
    }

    /// Total bytes stored.
    pub fn total_bytes(&self) -> u64 {
        let Ok(prefixes) = std::fs::read_dir(&self.root) else {
            return 0;
        };
        prefixes
            .flatten()
            .filter_map(|p| std::fs::read_dir(p.path()).ok())
            .flat_map(|files| files.flatten())
            .filter(|f| !f.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hashes_name_blobs() {
        let store = BlobStore::new("/data/blobs");
        let hash = "ab".repeat(32);
        assert_eq!(store.path(&hash).unwrap(), PathBuf::from(format!("/data/blobs/ab/{hash}")));
        assert!(store.path("../../etc/passwd").is_none());
        assert!(store.path(&"AB".repeat(32)).is_none());
        assert!(store.path("abc").is_none());
    }
}
