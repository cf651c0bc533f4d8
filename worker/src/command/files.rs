//! A command attempt's folders, and its checkpoints as single blobs.
//!
//! Each attempt gets a fresh run folder under the worker's cache, removed when the attempt ends:
//! `work/` (the `[command] files`, copied, and the program's working directory),
//! `checkpoint/` (`COHORT_CHECKPOINT_DIR`), `resume/` (`COHORT_RESUME_DIR`, on a retry) and
//! `tmp/` (`TMPDIR`).
//!
//! A checkpoint is the checkpoint folder's regular files packed into one bundle: a magic line,
//! then for each file its name's length (u32 LE), name, size (u64 LE) and bytes. Names are plain
//! relative paths (no root, no `..`); symbolic links and other special files are never followed
//! or packed; sizes are bounded on the way in and out.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use cohort_proto::transfer::is_plain_relative_name;
use sha2::{Digest, Sha256};

/// The first bytes of a checkpoint bundle.
const MAGIC: &[u8] = b"cohort-checkpoint-bundle 1\n";

/// The most bytes of files one checkpoint may hold.
pub const MAX_CHECKPOINT_BYTES: u64 = 4 << 30;

/// The most files one checkpoint may hold.
pub const MAX_CHECKPOINT_FILES: usize = 10_000;

/// The longest file name in a checkpoint.
const MAX_NAME_BYTES: usize = 1024;

/// Why files could not be laid out or packed.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The program's files broke a rule (a limit, a name): its fault.
    #[error("{0}")]
    Refused(String),
    /// Local disk trouble: the machine's fault.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FilesError {
    let path = path.to_path_buf();
    move |source| FilesError::Io { what, path, source }
}

/// The folders of one attempt.
#[derive(Debug, Clone)]
pub struct RunDirs {
    /// The attempt's root (removed with everything in it).
    pub root: PathBuf,
    /// The working directory.
    pub work: PathBuf,
    /// `COHORT_CHECKPOINT_DIR`.
    pub checkpoint: PathBuf,
    /// `COHORT_RESUME_DIR`.
    pub resume: PathBuf,
    /// `TMPDIR`.
    pub tmp: PathBuf,
}

impl RunDirs {
    /// Creates fresh folders under `root` (anything there before is removed first).
    pub fn create(root: PathBuf) -> Result<Self, FilesError> {
        let _ = std::fs::remove_dir_all(&root);
        let dirs =
            Self { work: root.join("work"), checkpoint: root.join("checkpoint"), resume: root.join("resume"), tmp: root.join("tmp"), root };
        for dir in [&dirs.work, &dirs.checkpoint, &dirs.tmp] {
            std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        }
        Ok(dirs)
    }

    /// Removes the attempt's folders.
    pub fn remove(&self) {
        if let Err(error) = std::fs::remove_dir_all(&self.root) {
            if error.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.root.display(), %error, "command run folder not removed");
            }
        }
    }
}

/// Copies `files` (relative name → local path) into `into`, refusing names that would leave it.
/// Copies, not links: the program may change its files without touching the worker's cache.
pub fn copy_files(files: &[(String, PathBuf)], into: &Path) -> Result<(), FilesError> {
    for (name, source) in files {
        if !is_plain_relative_name(name) {
            return Err(FilesError::Refused(format!("command file name {name:?} is not a plain relative path")));
        }
        let target = into.join(name);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        std::fs::copy(source, &target).map_err(io("copying to", &target))?;
    }
    Ok(())
}

/// A folder's regular files as (relative name, path), and the names of what was skipped.
type Listing = (Vec<(String, PathBuf)>, Vec<String>);

/// The regular files under `dir`, as (relative name, path), sorted; symbolic links and special
/// files are skipped (returned second, by name), never followed.
fn list(dir: &Path) -> Result<Listing, FilesError> {
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    while let Some((folder, prefix)) = pending.pop() {
        for entry in std::fs::read_dir(&folder).map_err(io("reading", &folder))? {
            let entry = entry.map_err(io("reading", &folder))?;
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            let kind = entry.file_type().map_err(io("reading", &entry.path()))?;
            if kind.is_dir() {
                pending.push((entry.path(), format!("{name}/")));
            } else if kind.is_file() {
                files.push((name, entry.path()));
            } else {
                skipped.push(name);
            }
        }
    }
    files.sort();
    Ok((files, skipped))
}

/// Packs the regular files of `dir` into the bundle `out`; returns the bundle's SHA-256 (hex),
/// or `None` when `dir` holds no file. Refuses more than [`MAX_CHECKPOINT_BYTES`] or
/// [`MAX_CHECKPOINT_FILES`].
pub fn pack(dir: &Path, out: &Path) -> Result<Option<String>, FilesError> {
    let (files, skipped) = list(dir)?;
    if !skipped.is_empty() {
        tracing::warn!(skipped = ?skipped, "checkpoint entries that are not regular files are not uploaded");
    }
    if files.is_empty() {
        return Ok(None);
    }
    if files.len() > MAX_CHECKPOINT_FILES {
        return Err(FilesError::Refused(format!(
            "COHORT_CHECKPOINT_DIR holds {} files, more than the limit of {MAX_CHECKPOINT_FILES}",
            files.len()
        )));
    }
    let mut total = 0u64;
    for (name, path) in &files {
        total += std::fs::symlink_metadata(path).map_err(io("reading", path))?.len();
        if name.len() > MAX_NAME_BYTES || !is_plain_relative_name(name) {
            return Err(FilesError::Refused(format!(
                "checkpoint file name {name:?} is not a plain relative path of at most {MAX_NAME_BYTES} bytes"
            )));
        }
    }
    if total > MAX_CHECKPOINT_BYTES {
        return Err(FilesError::Refused(format!(
            "COHORT_CHECKPOINT_DIR holds {total} bytes, more than the limit of {MAX_CHECKPOINT_BYTES}"
        )));
    }
    let file = std::fs::File::create(out).map_err(io("writing", out))?;
    let mut writer = HashingWriter { inner: BufWriter::new(file), hash: Sha256::new() };
    let write_error = io("writing", out);
    let result = (|| -> std::io::Result<()> {
        writer.write_all(MAGIC)?;
        for (name, path) in &files {
            let mut source = std::fs::File::open(path)?;
            let size = source.metadata()?.len();
            writer.write_all(&(name.len() as u32).to_le_bytes())?;
            writer.write_all(name.as_bytes())?;
            writer.write_all(&size.to_le_bytes())?;
            // Exactly the size written in the header, even if the program is still writing.
            let copied = std::io::copy(&mut Read::take(&mut source, size), &mut writer)?;
            if copied < size {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("{name} shrank while it was packed")));
            }
        }
        writer.inner.flush()
    })();
    result.map_err(write_error)?;
    Ok(Some(hex::encode(writer.hash.finalize())))
}

struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hash.update(&buf[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Unpacks a bundle into `into` (a fresh folder), refusing names that would leave it and more
/// than [`MAX_CHECKPOINT_BYTES`].
pub fn unpack(bundle: &Path, into: &Path) -> Result<(), FilesError> {
    let corrupt = |message: &str| FilesError::Refused(format!("checkpoint bundle {}: {message}", bundle.display()));
    std::fs::create_dir_all(into).map_err(io("creating", into))?;
    let file = std::fs::File::open(bundle).map_err(io("reading", bundle))?;
    let mut reader = BufReader::new(file);
    let mut magic = vec![0u8; MAGIC.len()];
    reader.read_exact(&mut magic).map_err(|_| corrupt("not a checkpoint bundle"))?;
    if magic != MAGIC {
        return Err(corrupt("not a checkpoint bundle"));
    }
    let mut total = 0u64;
    let mut count = 0usize;
    loop {
        let mut length = [0u8; 4];
        match reader.read_exact(&mut length) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(error) => return Err(io("reading", bundle)(error)),
        }
        let length = u32::from_le_bytes(length) as usize;
        if length > MAX_NAME_BYTES {
            return Err(corrupt("a file name is too long"));
        }
        let mut name = vec![0u8; length];
        reader.read_exact(&mut name).map_err(|_| corrupt("truncated"))?;
        let name = String::from_utf8(name).map_err(|_| corrupt("a file name is not UTF-8"))?;
        if !is_plain_relative_name(&name) {
            return Err(corrupt(&format!("file name {name:?} is not a plain relative path")));
        }
        let mut size = [0u8; 8];
        reader.read_exact(&mut size).map_err(|_| corrupt("truncated"))?;
        let size = u64::from_le_bytes(size);
        total = total.saturating_add(size);
        count += 1;
        if total > MAX_CHECKPOINT_BYTES || count > MAX_CHECKPOINT_FILES {
            return Err(corrupt("larger than the checkpoint limits"));
        }
        let target = into.join(&name);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        // create_new: a name given twice (or a link planted meanwhile) is never written through.
        let out = std::fs::OpenOptions::new().write(true).create_new(true).open(&target).map_err(io("writing", &target))?;
        let mut out = BufWriter::new(out);
        let copied = std::io::copy(&mut Read::take(&mut reader, size), &mut out).map_err(io("writing", &target))?;
        if copied < size {
            return Err(corrupt("truncated"));
        }
        out.flush().map_err(io("writing", &target))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_folder_round_trips_and_links_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        std::fs::create_dir_all(source.join("sub")).unwrap();
        std::fs::write(source.join("model.pt"), b"weights").unwrap();
        std::fs::write(source.join("sub/state.json"), b"{}").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", source.join("leak")).unwrap();
        let bundle = dir.path().join("bundle");
        let hash = pack(&source, &bundle).unwrap().unwrap();
        assert_eq!(pack(&source, &dir.path().join("again")).unwrap().unwrap(), hash, "same files, same bundle");
        let target = dir.path().join("target");
        unpack(&bundle, &target).unwrap();
        assert_eq!(std::fs::read(target.join("model.pt")).unwrap(), b"weights");
        assert_eq!(std::fs::read(target.join("sub/state.json")).unwrap(), b"{}");
        assert!(!target.join("leak").exists(), "a symlink is neither followed nor packed");
        let empty = dir.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        assert!(pack(&empty, &dir.path().join("none")).unwrap().is_none());
    }

    #[test]
    fn a_bundle_naming_a_path_outside_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("evil");
        let mut bytes = MAGIC.to_vec();
        let name = b"../escaped";
        bytes.extend((name.len() as u32).to_le_bytes());
        bytes.extend(name);
        bytes.extend(1u64.to_le_bytes());
        bytes.push(b'x');
        std::fs::write(&bundle, bytes).unwrap();
        let error = unpack(&bundle, &dir.path().join("into")).unwrap_err().to_string();
        assert!(error.contains("not a plain relative path"), "{error}");
        assert!(!dir.path().join("escaped").exists());
        let error = copy_files(&[("/etc/x".into(), bundle.clone())], dir.path()).unwrap_err().to_string();
        assert!(error.contains("not a plain relative path"), "{error}");
    }
}
