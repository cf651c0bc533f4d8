//! The hashes of files `coordinator submit` has sent, kept on this machine, so that submitting
//! the same dataset again asks the coordinator whether it holds them (`HasBlobs`) instead of
//! sending them again, without a hash pass over every file before every submission.
//!
//! A file is sent in one pass, its CRC-32 in the stream's last chunk; once the coordinator has
//! checked and stored it, the hash the coordinator named it by is recorded here under the
//! file's absolute path with the file's stamp: device, inode, size, modification and change
//! times. A later lookup trusts the hash only while the stamp is the same. Writing a file changes its
//! modification and change times, replacing it changes its inode, and setting the times back
//! (`touch -d`) still moves the change time, so a file that changed is sent again rather than
//! named by a stale hash. Two guards keep a change from hiding inside one timestamp tick: the
//! stamp must be the same after the upload as before it, and a file whose times lie within
//! [`SETTLE`] of the upload's start is not recorded at all (the next submission sends it again
//! and records it then), as git treats a "racily clean" file.
//!
//! The cache is one JSON file in the user's cache folder ([`default_path`]); a missing or
//! unreadable one is an empty cache, and one that cannot be written only costs a later resend.
//! It keeps the [`MAX_ENTRIES`] most recently used files.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cohort_proto::transfer::is_sha256_hex;
use cohort_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// How long a file must have been left alone before the upload starts for its hash to be kept.
pub const SETTLE: Duration = Duration::from_secs(2);

/// The most files the cache remembers; the least recently used go first.
pub const MAX_ENTRIES: usize = 100_000;

/// The format this code writes; a file in another format is read as an empty cache.
const FORMAT: u32 = 1;

/// What identifies a file's content without reading it: where it lives on disk, its size and
/// its times (seconds and nanoseconds since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    modified: (i64, i64),
    changed: (i64, i64),
}

impl FileStamp {
    /// The stamp of the file at `path` (following no link of its own: `submit` lists regular files).
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            modified: (meta.mtime(), meta.mtime_nsec()),
            changed: (meta.ctime(), meta.ctime_nsec()),
        })
    }

    /// True when neither time lies later than `settle` before `started`: no write can have
    /// shared a timestamp tick with the read that began then.
    fn settled(&self, started: SystemTime, settle: Duration) -> bool {
        let Some(limit) = started.checked_sub(settle).and_then(|at| at.duration_since(UNIX_EPOCH).ok()) else {
            return false;
        };
        let limit = (i64::try_from(limit.as_secs()).unwrap_or(i64::MAX), i64::from(limit.subsec_nanos()));
        self.modified.max(self.changed) < limit
    }
}

/// One remembered file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    stamp: FileStamp,
    sha256: String,
    /// When a submission last used or recorded it (seconds since the epoch), for eviction.
    used: u64,
}

/// The file as written.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    format: u32,
    entries: BTreeMap<String, Entry>,
}

/// The default cache file: `$XDG_CACHE_HOME/cohort/file-hashes.json`, else
/// `$HOME/.cache/cohort/file-hashes.json`; `None` when neither names an absolute folder (then
/// nothing is cached and every file is sent).
pub fn default_path() -> Option<PathBuf> {
    path_from(|name| std::env::var_os(name))
}

/// [`default_path`] with the environment read through `variable`.
fn path_from(variable: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let absolute = |name: &str| variable(name).map(PathBuf::from).filter(|path| path.is_absolute());
    let folder = absolute("XDG_CACHE_HOME").or_else(|| absolute("HOME").map(|home| home.join(".cache")))?;
    Some(folder.join("cohort").join("file-hashes.json"))
}

/// The files' hashes, loaded from and saved to one file.
#[derive(Debug)]
pub struct HashCache {
    /// Where it is saved; `None` keeps it in memory only.
    path: Option<PathBuf>,
    entries: BTreeMap<String, Entry>,
    settle: Duration,
    changed: bool,
}

impl HashCache {
    /// The cache saved at `path` (empty when the file is missing, unreadable or in another
    /// format), recording only files left alone for `settle` ([`SETTLE`] outside tests).
    pub fn load(path: Option<PathBuf>, settle: Duration) -> Self {
        let entries = match path.as_deref().map(std::fs::read) {
            Some(Ok(bytes)) => match serde_json::from_slice::<Stored>(&bytes) {
                Ok(stored) if stored.format == FORMAT => stored.entries,
                Ok(_) => BTreeMap::new(),
                Err(error) => {
                    tracing::warn!(path = %path.as_deref().unwrap_or(Path::new("")).display(), %error, "unreadable hash cache, starting empty");
                    BTreeMap::new()
                }
            },
            _ => BTreeMap::new(),
        };
        Self { path, entries, settle, changed: false }
    }

    /// How many files it remembers.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// The blob `file` held when it was last sent, if its stamp is still `stamp`.
    pub fn lookup(&mut self, file: &Path, stamp: &FileStamp) -> Option<pb::BlobRef> {
        let entry = self.entries.get_mut(&key(file)?)?;
        if entry.stamp != *stamp || !is_sha256_hex(&entry.sha256) {
            return None;
        }
        entry.used = now_seconds();
        self.changed = true;
        Some(pb::BlobRef { sha256: entry.sha256.clone(), size: stamp.size })
    }

    /// Records that `file`, read from `started` on, held `blob`: only when its stamp was `before`
    /// when the read started and is `after` now, the same, with times settled before `started`,
    /// and of the blob's size. Otherwise it forgets any earlier hash of the file. Returns whether
    /// it recorded.
    pub fn record(&mut self, file: &Path, before: &FileStamp, after: &FileStamp, blob: &pb::BlobRef, started: SystemTime) -> bool {
        let Some(key) = key(file) else {
            return false;
        };
        let trusted = before == after && before.size == blob.size && before.settled(started, self.settle) && is_sha256_hex(&blob.sha256);
        self.changed = true;
        if !trusted {
            self.entries.remove(&key);
            return false;
        }
        self.entries.insert(key, Entry { stamp: *before, sha256: blob.sha256.clone(), used: now_seconds() });
        true
    }

    /// Writes the cache if anything changed, keeping the [`MAX_ENTRIES`] most recently used:
    /// to a temporary file beside it, then renamed over it, so a reader never sees half of it.
    pub fn save(&mut self) -> std::io::Result<()> {
        let Some(path) = self.path.clone().filter(|_| self.changed) else {
            return Ok(());
        };
        if self.entries.len() > MAX_ENTRIES {
            let mut entries: Vec<(String, Entry)> = std::mem::take(&mut self.entries).into_iter().collect();
            entries.sort_by_key(|(_, entry)| std::cmp::Reverse(entry.used));
            entries.truncate(MAX_ENTRIES);
            self.entries = entries.into_iter().collect();
        }
        if let Some(folder) = path.parent() {
            std::fs::create_dir_all(folder)?;
        }
        let stored = Stored { format: FORMAT, entries: std::mem::take(&mut self.entries) };
        let written = serde_json::to_vec(&stored).map_err(std::io::Error::other);
        self.entries = stored.entries;
        let temp = path.with_extension(format!("{}.tmp", std::process::id()));
        let outcome = written.and_then(|bytes| std::fs::write(&temp, bytes)).and_then(|()| std::fs::rename(&temp, &path));
        if outcome.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        outcome?;
        self.changed = false;
        Ok(())
    }
}

/// The cache's key for `file`: its canonical path, or the path as given when that fails (the
/// stamp's device and inode still tell one file from another); `None` for a path that is not
/// UTF-8, which is never cached.
fn key(file: &Path) -> Option<String> {
    std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf()).into_os_string().into_string().ok()
}

fn now_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blob of `size` bytes named `name` repeated (the cache never reads the content).
    fn blob(name: &str, size: u64) -> pb::BlobRef {
        pb::BlobRef { sha256: name.repeat(32), size }
    }

    /// A time well after every file a test writes.
    fn later() -> SystemTime {
        SystemTime::now() + Duration::from_secs(60)
    }

    #[test]
    fn a_recorded_file_is_found_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("train.bin");
        std::fs::write(&file, b"first content").unwrap();
        let mut cache = HashCache::load(None, SETTLE);
        let stamp = FileStamp::of(&file).unwrap();
        assert_eq!(cache.lookup(&file, &stamp), None);
        let blob = blob("ab", 13);
        assert!(cache.record(&file, &stamp, &FileStamp::of(&file).unwrap(), &blob, later()));
        assert_eq!(cache.lookup(&file, &FileStamp::of(&file).unwrap()), Some(blob.clone()));
        // By a relative path too: the key is the canonical path.
        let relative = dir.path().join(".").join("train.bin");
        assert_eq!(cache.lookup(&relative, &FileStamp::of(&relative).unwrap()), Some(blob.clone()));

        // Rewritten in place with the same size, and its modification time set back to what it
        // was: the change time still tells it apart.
        let modified = std::fs::metadata(&file).unwrap().modified().unwrap();
        // Past the file system's timestamp tick (a jiffy at most), so the change time moves.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&file, b"other content").unwrap();
        std::fs::File::options().write(true).open(&file).unwrap().set_modified(modified).unwrap();
        let changed = FileStamp::of(&file).unwrap();
        assert_eq!(changed.size, stamp.size);
        assert_eq!(changed.modified, stamp.modified);
        assert_eq!(cache.lookup(&file, &changed), None, "a changed file is not named by its old hash");

        // Replaced by another file of the same size: a new inode.
        let replacement = dir.path().join("replacement");
        std::fs::write(&replacement, b"first content").unwrap();
        std::fs::rename(&replacement, &file).unwrap();
        assert_eq!(cache.lookup(&file, &FileStamp::of(&file).unwrap()), None);
    }

    #[test]
    fn a_file_that_changed_during_the_upload_or_just_before_is_not_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data.bin");
        std::fs::write(&file, b"abc").unwrap();
        let before = FileStamp::of(&file).unwrap();
        let sent = blob("cd", 3);
        let mut cache = HashCache::load(None, SETTLE);
        // Written just now: its times lie within SETTLE of an upload starting now.
        assert!(!cache.record(&file, &before, &before, &sent, SystemTime::now()));
        assert_eq!(cache.lookup(&file, &before), None);
        // Its stamp moved while it was sent.
        assert!(cache.record(&file, &before, &before, &sent, later()));
        let mut moved = before;
        moved.changed.1 += 1;
        assert!(!cache.record(&file, &before, &moved, &sent, later()));
        assert_eq!(cache.lookup(&file, &before), None, "a failed record forgets the earlier hash");
        // A blob of another size than the file, or no hash at all.
        assert!(!cache.record(&file, &before, &before, &blob("ab", 4), later()));
        assert!(!cache.record(&file, &before, &before, &pb::BlobRef { sha256: "x".into(), size: 3 }, later()));
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn the_cache_survives_a_save_and_a_damaged_file_reads_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data.bin");
        std::fs::write(&file, b"abc").unwrap();
        let stamp = FileStamp::of(&file).unwrap();
        let saved = dir.path().join("cache/cohort/file-hashes.json");
        let mut cache = HashCache::load(Some(saved.clone()), SETTLE);
        assert!(cache.record(&file, &stamp, &stamp, &blob("cd", 3), later()));
        cache.save().unwrap();
        let folder: Vec<_> = std::fs::read_dir(saved.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(folder, vec![std::ffi::OsString::from("file-hashes.json")], "no temporary file is left");
        let mut reloaded = HashCache::load(Some(saved.clone()), SETTLE);
        assert_eq!(reloaded.lookup(&file, &stamp), Some(blob("cd", 3)));

        std::fs::write(&saved, b"{ not json").unwrap();
        assert_eq!(HashCache::load(Some(saved.clone()), SETTLE).len(), 0);
        std::fs::write(&saved, br#"{"format": 99, "entries": {}}"#).unwrap();
        assert_eq!(HashCache::load(Some(saved), SETTLE).len(), 0);
        assert_eq!(HashCache::load(Some(dir.path().join("missing.json")), SETTLE).len(), 0);
    }

    #[test]
    fn only_the_most_recently_used_entries_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let saved = dir.path().join("file-hashes.json");
        let mut cache = HashCache::load(Some(saved.clone()), SETTLE);
        let stamp = FileStamp { dev: 1, ino: 1, size: 3, modified: (0, 0), changed: (0, 0) };
        let sha256 = blob("cd", 3).sha256;
        for index in 0..MAX_ENTRIES + 10 {
            let used = if index < 10 { 1 } else { 2 };
            cache.entries.insert(format!("/gone/{index}"), Entry { stamp, sha256: sha256.clone(), used });
        }
        cache.changed = true;
        cache.save().unwrap();
        let reloaded = HashCache::load(Some(saved), SETTLE);
        assert_eq!(reloaded.len(), MAX_ENTRIES);
        assert!(reloaded.entries.values().all(|entry| entry.used == 2), "the least recently used went first");
    }

    #[test]
    fn the_default_file_lies_in_the_users_cache_folder() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| (*v).into())
        };
        assert_eq!(path_from(env(&[("HOME", "/home/u")])), Some(PathBuf::from("/home/u/.cache/cohort/file-hashes.json")));
        let both = env(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/var/cache/u")]);
        assert_eq!(path_from(both), Some(PathBuf::from("/var/cache/u/cohort/file-hashes.json")));
        assert_eq!(
            path_from(env(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "relative")])),
            Some(PathBuf::from("/home/u/.cache/cohort/file-hashes.json"))
        );
        assert_eq!(path_from(env(&[("HOME", "relative")])), None, "no cache rather than one in the working folder");
        assert_eq!(path_from(env(&[])), None);
    }
}
