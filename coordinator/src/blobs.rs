//! Blobs on the coordinator's disk, by SHA-256: `DATA_DIR/blobs/ab/abcdef…`.
//!
//! A blob path exists only once its content verified (see `cohort_proto::transfer`), so a path
//! that exists is a complete blob. Uploads in progress write hidden `.….partial` files beside
//! it; [`BlobStore::remove_partials`] clears those a killed coordinator left, and
//! [`BlobStore::check_room`] refuses an upload the quota or the disk cannot take.

use std::path::{Path, PathBuf};

use cohort_proto::transfer::{is_sha256_hex, remove_partial_files};

/// Why the store cannot take an upload.
#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    /// The upload would take the store past its quota.
    #[error("the blob store holds {stored} bytes; {incoming} more would pass its quota of {quota} bytes")]
    Quota {
        /// Bytes stored now.
        stored: u64,
        /// Bytes of the upload.
        incoming: u64,
        /// The quota.
        quota: u64,
    },
    /// The upload would leave less free disk space than the reserve.
    #[error("{path} has {free} bytes free; {incoming} more would leave less than the reserve of {reserve} bytes")]
    Disk {
        /// The folder whose file system was measured.
        path: PathBuf,
        /// Bytes free for the coordinator now.
        free: u64,
        /// Bytes of the upload.
        incoming: u64,
        /// The reserve kept free.
        reserve: u64,
    },
    /// The free space could not be measured.
    #[error("{path}: cannot measure free space: {source}")]
    Io {
        /// The folder measured.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

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

    /// Where uploads that name their hash last are received, before their name is known: the
    /// store's own folder (same file system as every blob, so the verified file is renamed into
    /// place), in hidden `.….partial` files that [`BlobStore::remove_partials`] clears and
    /// [`BlobStore::total_bytes`] never counts.
    pub fn incoming_folder(&self) -> &Path {
        &self.root
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

    /// Removes the temporary files (`.….partial`) that uploads cut off by a kill left under the
    /// store; returns how many. Call it at start-up, before any upload can be in progress: it
    /// cannot tell a live upload's file from a dead one's. A store not created yet holds none.
    pub fn remove_partials(&self) -> std::io::Result<usize> {
        let mut removed = remove_partial_files(&self.root)?;
        let prefixes = match std::fs::read_dir(&self.root) {
            Ok(prefixes) => prefixes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(error) => return Err(error),
        };
        for prefix in prefixes {
            let prefix = prefix?;
            if prefix.file_type()?.is_dir() {
                removed += remove_partial_files(&prefix.path())?;
            }
        }
        Ok(removed)
    }

    /// Checks that `incoming` more bytes fit: the store stays within `quota_bytes` (when set), and
    /// the file system holding it keeps at least `reserve_bytes` free (not checked when 0).
    pub fn check_room(&self, incoming: u64, quota_bytes: Option<u64>, reserve_bytes: u64) -> Result<(), RoomError> {
        if let Some(quota) = quota_bytes {
            let stored = self.total_bytes();
            if stored.checked_add(incoming).is_none_or(|total| total > quota) {
                return Err(RoomError::Quota { stored, incoming, quota });
            }
        }
        if reserve_bytes == 0 {
            return Ok(());
        }
        let measured = existing_ancestor(&self.root);
        let free = free_bytes(measured).map_err(|source| RoomError::Io { path: measured.to_path_buf(), source })?;
        if free.saturating_sub(incoming) < reserve_bytes {
            return Err(RoomError::Disk { path: measured.to_path_buf(), free, incoming, reserve: reserve_bytes });
        }
        Ok(())
    }
}

/// `path`, or its nearest ancestor that exists (the store's folder may not be created yet).
fn existing_ancestor(path: &Path) -> &Path {
    path.ancestors().find(|folder| folder.exists()).unwrap_or(Path::new("/"))
}

/// Bytes an unprivileged process may still write on the file system holding `path`.
#[allow(unsafe_code)]
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call, and `stats` points to
    // writable memory the size of a `statvfs`, which the call fills in whole when it returns 0.
    let status = unsafe { libc::statvfs(c_path.as_ptr(), stats.as_mut_ptr()) };
    if status != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised `stats`.
    let stats = unsafe { stats.assume_init() };
    // Both are `u64` on Linux but of other widths elsewhere.
    #[allow(clippy::unnecessary_cast)]
    let free = (stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64);
    Ok(free)
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

    #[test]
    fn partials_left_by_a_killed_upload_are_removed_and_blobs_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().join("blobs"));
        assert_eq!(store.remove_partials().unwrap(), 0, "no store yet: nothing to remove");
        let hash = "cd".repeat(32);
        let blob = store.path(&hash).unwrap();
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::write(&blob, b"whole").unwrap();
        let prefix = blob.parent().unwrap();
        std::fs::write(prefix.join(format!(".{hash}.4242.1700000000000000000.partial")), b"half").unwrap();
        std::fs::write(prefix.join(format!(".{hash}.7.1.partial")), b"other half").unwrap();
        std::fs::write(dir.path().join("blobs").join(".stray.1.2.partial"), b"x").unwrap();
        assert_eq!(store.total_bytes(), 5, "partials never count as stored");
        assert_eq!(store.remove_partials().unwrap(), 3);
        let left: Vec<_> = std::fs::read_dir(prefix).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(left, std::slice::from_ref(&blob));
        assert_eq!(store.size(&hash), Some(5));
        assert_eq!(store.remove_partials().unwrap(), 0);
    }

    #[test]
    fn uploads_past_the_quota_or_the_disk_reserve_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().join("blobs"));
        store.check_room(1 << 40, None, 0).unwrap();
        let blob = store.path(&"ef".repeat(32)).unwrap();
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::write(&blob, vec![0u8; 600]).unwrap();
        store.check_room(400, Some(1000), 0).unwrap();
        let err = store.check_room(401, Some(1000), 0).unwrap_err();
        assert!(matches!(err, RoomError::Quota { stored: 600, incoming: 401, quota: 1000 }), "{err}");
        assert!(err.to_string().contains("holds 600 bytes; 401 more would pass its quota of 1000 bytes"), "{err}");
        assert!(store.check_room(u64::MAX, Some(u64::MAX), 0).is_err(), "no overflow past the quota");

        store.check_room(1, None, 1).unwrap();
        let err = store.check_room(1, None, u64::MAX).unwrap_err();
        assert!(matches!(err, RoomError::Disk { .. }), "{err}");
        assert!(err.to_string().contains("more would leave less than the reserve of 18446744073709551615 bytes"), "{err}");
        let missing = BlobStore::new(dir.path().join("not/yet/made"));
        missing.check_room(1, Some(1), 1).unwrap();
    }
}
