//! The memory a gang's ranks on one host share: a file in a tmpfs directory (`/dev/shm`) mapped
//! by every one of them.
//!
//! Only members that passed the gang's authenticated handshake learn the file's name: the host's
//! leader creates it under 128 random bits (`O_EXCL`, mode 0600, never following a link) and
//! sends the name over the authenticated ring. A member opens it only if it is a regular file of
//! its own user with mode 0600 and the expected size. The leader unlinks it as soon as every
//! member has mapped it (or given up), so that a rank dying later leaves nothing behind; the
//! mappings live on until each rank drops its [`Segment`].

// Shared memory and futexes are system calls on raw memory; each unsafe block says why it is sound.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Where segments are created: tmpfs on every Linux host.
pub(crate) const SHM_DIR: &str = "/dev/shm";

/// Random bytes in a segment's name.
pub(crate) const NAME_BYTES: usize = 16;

/// A segment's file name, from its random bytes.
pub(crate) fn file_name(random: &[u8; NAME_BYTES]) -> String {
    format!("cohort-collective-{}", hex::encode(random))
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
    /// Whether this rank created the file and has not unlinked it yet.
    owned: bool,
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
        let mut segment = Segment { base: std::ptr::null_mut(), len, path, owned: true };
        // SAFETY: a valid descriptor; posix_fallocate returns its error instead of setting errno.
        let reserved = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        if reserved != 0 {
            return Err(std::io::Error::from_raw_os_error(reserved));
        }
        segment.base = map(&file, len)?;
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
        Ok(Segment { base: map(&file, len)?, len, path, owned: false })
    }

    /// Removes the file (the mappings stay); a no-op on a rank that did not create it.
    pub(crate) fn unlink(&mut self) {
        if std::mem::take(&mut self.owned) {
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
