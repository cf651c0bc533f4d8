//! The worker's blob cache: dataset files and checkpoints fetched from the coordinator, by hash.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use cohort_proto::transfer::{self, is_plain_relative_name, TransferError};
use cohort_proto::v1::FetchBlobRequest;

use crate::client::WorkerClient;

use crate::task::BlobRef;

/// Blobs on local disk under `DIR/sha256/<hash>`; a file there has been verified.
#[derive(Debug, Clone)]
pub struct BlobCache {
    dir: PathBuf,
}

impl BlobCache {
    /// A cache rooted at `dir` (created on first use).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Where blob `sha256` lives (or will).
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join("sha256").join(sha256)
    }

    /// A scratch folder for files on their way out (checkpoints before upload).
    pub fn scratch_dir(&self) -> PathBuf {
        self.dir.join("scratch")
    }

    /// Returns the local path of `blob`, downloading and verifying it first if absent.
    pub async fn ensure(&self, client: &mut WorkerClient, blob: &BlobRef) -> Result<PathBuf, TransferError> {
        if !transfer::is_sha256_hex(&blob.sha256) {
            return Err(TransferError::Protocol(format!("not a blob name: {:?}", blob.sha256)));
        }
        let path = self.path(&blob.sha256);
        if is_complete(&path, blob.size) {
            return Ok(path);
        }
        let stream = client.fetch_blob(FetchBlobRequest { sha256: blob.sha256.clone() }).await?.into_inner();
        transfer::receive_to_file(stream, &path, Some(&blob.sha256), blob.size).await?;
        Ok(path)
    }
}

/// Why a dataset could not be laid out on disk.
#[derive(Debug, thiserror::Error)]
pub enum MaterializeError {
    /// A file name would leave the dataset folder.
    #[error("dataset file name {0:?} is not a plain relative path")]
    UnsafeName(String),
    /// Local file trouble.
    #[error("laying out the dataset in {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl BlobCache {
    /// Lays a dataset's cached blobs out under their relative names in a folder of the cache
    /// (hard links, or copies across file systems) and returns it with each file's path there.
    /// The folder is keyed by the whole file list, so an identical dataset is laid out once.
    pub fn materialize(&self, files: &[(String, PathBuf, String)]) -> Result<(PathBuf, BTreeMap<String, PathBuf>), MaterializeError> {
        let mut listing = String::new();
        for (name, _, sha256) in files {
            if !is_plain_relative_name(name) {
                return Err(MaterializeError::UnsafeName(name.clone()));
            }
            listing.push_str(&format!("{name}\0{sha256}\n"));
        }
        let key = hex::encode(Sha256::digest(listing.as_bytes()));
        let root = self.dir.join("datasets").join(&key[..16]);
        let paths: BTreeMap<String, PathBuf> = files.iter().map(|(name, _, _)| (name.clone(), root.join(name))).collect();
        if root.join(".complete").is_file() {
            return Ok((root, paths));
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| MaterializeError::Io { path, source }
        };
        let staging = self.dir.join("datasets").join(format!(".{}-{}", &key[..16], std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        for (name, cached, _) in files {
            let target = staging.join(name);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            if std::fs::hard_link(cached, &target).is_err() {
                std::fs::copy(cached, &target).map_err(io(&target))?;
            }
        }
        std::fs::create_dir_all(&staging).map_err(io(&staging))?;
        std::fs::write(staging.join(".complete"), b"").map_err(io(&staging))?;
        let _ = std::fs::remove_dir_all(&root);
        std::fs::rename(&staging, &root).map_err(io(&root))?;
        Ok((root, paths))
    }
}

fn is_complete(path: &Path, size: u64) -> bool {
    std::fs::metadata(path).map(|m| m.is_file() && m.len() == size).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_names_are_safe() {
        for good in ["a", "train/NonDemented/x.jpg", "t10k-images-idx3-ubyte.gz"] {
            assert!(is_plain_relative_name(good), "{good}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../b", "a//b", "./a", "a/", "a\\b"] {
            assert!(!is_plain_relative_name(bad), "{bad}");
        }
    }

    #[test]
    fn materializes_a_tree_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(dir.path());
        let blob = dir.path().join("blob");
        std::fs::write(&blob, b"pixels").unwrap();
        let files = vec![("train/a/x.png".to_string(), blob.clone(), "ab".repeat(32)), ("top".to_string(), blob, "cd".repeat(32))];
        let (root, paths) = cache.materialize(&files).unwrap();
        assert_eq!(std::fs::read(root.join("train/a/x.png")).unwrap(), b"pixels");
        assert_eq!(paths["top"], root.join("top"));
        assert_eq!(cache.materialize(&files).unwrap().0, root);
        let evil = vec![("../escape".to_string(), PathBuf::from("x"), "ab".repeat(32))];
        assert!(matches!(cache.materialize(&evil), Err(MaterializeError::UnsafeName(_))));
    }
}
