//! The memory a gang's ranks on one host share: a file in a tmpfs directory (`/dev/shm`) mapped
//! by every one of them.
//!
//! Only members that passed the gang's authenticated handshake learn the file's name: the host's
//! leader creates it under 128 random bits (`O_EXCL`, mode 0600, never following a link) and
//! sends the name over the authenticated ring. A member opens it only if it is a regular file of
//! its own user with mode 0600 and the expected size. The leader unlinks it as soon as every
//! member has mapped it (or given up), so that a rank dying later leaves nothing behind; the
//! mappings live on until each rank drops its [`Segment`].
//!
//! A leader killed between creating and unlinking (`kill -9` during a gang's setup) cannot
//! unlink: its file would hold tmpfs memory until the host restarts. So a leader holds an
//! exclusive `flock` on the file for as long as it owns it (the kernel drops the lock when the
//! process dies), and before creating a segment a leader removes the segments of its own user
//! in that directory whose lock no one holds ([`sweep_orphans`]).

// Shared memory and futexes are system calls on raw memory; each unsafe block says why it is sound.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where segments are created: tmpfs on every Linux host.
pub(crate) const SHM_DIR: &str = "/dev/shm";

/// Random bytes in a segment's name.
pub(crate) const NAME_BYTES: usize = 16;

/// The start of every segment's file name.
const NAME_PREFIX: &str = "cohort-collective-";

/// How old an unlocked segment must be to be swept: a leader locks its segment right after
/// creating it, so only a file this young can be unlocked and still be in use.
const ORPHAN_AGE: Duration = Duration::from_secs(60);

/// A segment's file name, from its random bytes.
pub(crate) fn file_name(random: &[u8; NAME_BYTES]) -> String {
    format!("{NAME_PREFIX}{}", hex::encode(random))
}

/// Removes the segments in `dir` that a dead leader left behind: files named like a segment,
/// owned by this user, older than [`ORPHAN_AGE`], whose lock no process holds. Returns how many
/// it removed; a file it cannot inspect is left alone.
pub(crate) fn sweep_orphans(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_str().is_some_and(|name| name.starts_with(NAME_PREFIX)) {
            continue;
        }
        let path = entry.path();
        let Ok(file) = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(&path) else { continue };
        let Ok(meta) = file.metadata() else { continue };
        let old = meta.modified().ok().and_then(|modified| modified.elapsed().ok()).is_some_and(|age| age >= ORPHAN_AGE);
        if !meta.file_type().is_file() || meta.uid() != uid || !old || file.try_lock().is_err() {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), bytes = meta.len(), "removed a shared collective segment its dead creator left behind");
                removed += 1;
            }
            Err(error) => tracing::warn!(path = %path.display(), %error, "cannot remove a leftover shared collective segment"),
        }
    }
    removed
}

/// Fresh random bytes for a segment's name, from the kernel.
pub(crate) fn random_name() -> std::io::Result<[u8; NAME_BYTES]> {
    let mut bytes = [0u8; NAME_BYTES];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// One rank's mapping of a segment.
#[derive(Debug)]
pub(crate) struct Segment {
    base: *mut u8,
    len: usize,
    /// The file's path.
    path: PathBuf,
    /// The file, locked, while this rank created it and has not unlinked it yet.
    owned: Option<File>,
}

// SAFETY: the mapping belongs to this value alone in this process; access to its contents is
// ordered by the group's barriers (see the `shm` module).
unsafe impl Send for Segment {}

impl Segment {
    /// Creates a segment of `len` bytes named `name` in `dir`, zero-filled, with its pages
    /// reserved up front (a full tmpfs fails here, instead of killing a rank with SIGBUS on its
    /// first write).
    pub(crate) fn create(dir: &Path, name: &str, len: usize) -> std::io::Result<Segment> {
        let path = dir.join(name);
        let file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&path)?;
        // Locked at once, so that a leader dying from here on leaves a file the next sweep can
        // tell from a live one; from here on, dropping `segment` removes the file.
        let locked = file.try_lock().map_err(std::io::Error::from);
        let mut segment = Segment { base: std::ptr::null_mut(), len, path, owned: Some(file) };
        locked?;
        let file = segment.owned.as_ref().expect("just created");
        // SAFETY: a valid descriptor; posix_fallocate returns its error instead of setting errno.
        let reserved = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        if reserved != 0 {
            return Err(std::io::Error::from_raw_os_error(reserved));
        }
        segment.base = map(file, len)?;
        Ok(segment)
    }

    /// Maps the segment `name` in `dir` that another rank created, after checking that it is a
    /// regular file of this user, mode 0600, of `len` bytes.
    pub(crate) fn open(dir: &Path, name: &str, len: usize) -> std::io::Result<Segment> {
        let path = dir.join(name);
        let file = OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOFOLLOW).open(&path)?;
        let meta = file.metadata()?;
        // SAFETY: geteuid cannot fail.
        let uid = unsafe { libc::geteuid() };
        let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("shared segment {name}: {what}"));
        if !meta.file_type().is_file() || meta.uid() != uid || meta.mode() & 0o777 != 0o600 {
            return Err(invalid("not a private file of this user"));
        }
        if meta.len() != len as u64 {
            return Err(invalid("unexpected size"));
        }
        Ok(Segment { base: map(&file, len)?, len, path, owned: None })
    }

    /// Removes the file (the mappings stay); a no-op on a rank that did not create it.
    pub(crate) fn unlink(&mut self) {
        // The lock goes with the file, after it is removed.
        if let Some(_locked) = self.owned.take() {
            if let Err(error) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), %error, "cannot unlink a shared collective segment");
            }
        }
    }

    /// The start of the mapping (page-aligned).
    pub(crate) fn base(&self) -> *mut u8 {
        self.base
    }

    /// The file's path (unlinked once every member has mapped it).
    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The mapping's length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// Maps `len` bytes of `file`, shared and writable.
fn map(file: &File, len: usize) -> std::io::Result<*mut u8> {
    // SAFETY: a fresh mapping of a file this process opened; nothing else in this process
    // aliases it. The file stays mapped after `file` closes.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, file.as_raw_fd(), 0) };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(base.cast())
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.unlink();
        if !self.base.is_null() {
            // SAFETY: the mapping made in `map`, unmapped once; no reference into it outlives self.
            unsafe { libc::munmap(self.base.cast(), self.len) };
        }
    }
}
