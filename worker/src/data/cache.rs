//! Prepared datasets kept in host memory between a worker's tasks.
//!
//! The trials of a sweep share their data: every config of a cross-validation trains on the same
//! dataset and the same folds, augmented with the same seed. Without a cache each task decodes
//! the files and augments its training rows again; with it a worker does each once and later
//! tasks take the tensors as they are. Entries are evicted least recently used first past a byte
//! budget (`worker --dataset-cache-mib`, [`DEFAULT_BUDGET_BYTES`] by default; 0 turns it off).
//!
//! The cached tensors are shared, not copied: callers must not modify them in place (the recipes
//! only read their data, selecting batches into new tensors).

use std::sync::{Mutex, OnceLock, PoisonError};

use tch::{Device, Tensor};

/// The default budget: 1 GiB of host memory.
pub const DEFAULT_BUDGET_BYTES: u64 = 1 << 30;

/// A byte-bounded, least-recently-used cache of tensor lists, keyed by what they were made from.
#[derive(Debug)]
pub struct TensorCache {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    budget: u64,
    /// Least recently used first.
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    key: String,
    /// On the host.
    tensors: Vec<Tensor>,
    bytes: u64,
}

fn shallow(tensors: &[Tensor]) -> Vec<Tensor> {
    tensors.iter().map(Tensor::shallow_clone).collect()
}

impl TensorCache {
    /// An empty cache holding at most `budget` bytes.
    pub fn new(budget: u64) -> Self {
        Self { inner: Mutex::new(Inner { budget, entries: Vec::new() }) }
    }

    /// The worker's cache.
    pub fn global() -> &'static TensorCache {
        static CACHE: OnceLock<TensorCache> = OnceLock::new();
        CACHE.get_or_init(|| TensorCache::new(DEFAULT_BUDGET_BYTES))
    }

    /// Sets the budget, evicting what no longer fits.
    pub fn set_budget(&self, budget: u64) {
        let mut inner = self.lock();
        inner.budget = budget;
        inner.evict_to(budget);
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.lock().entries.iter().map(|entry| entry.bytes).sum()
    }

    /// The tensors cached under `key` (on the host), or those `make` returns (where it made
    /// them), keeping a host copy when they fit in the budget. `make` runs without the lock; an
    /// error is returned and nothing is kept.
    pub fn get_or_make<E>(&self, key: &str, make: impl FnOnce() -> Result<Vec<Tensor>, E>) -> Result<Vec<Tensor>, E> {
        if let Some(found) = self.get(key) {
            return Ok(found);
        }
        let made = make()?;
        let bytes: u64 = made.iter().map(|tensor| (tensor.numel() * tensor.kind().elt_size_in_bytes()) as u64).sum();
        let mut inner = self.lock();
        if bytes > inner.budget {
            return Ok(made);
        }
        let tensors = made.iter().map(|tensor| tensor.to_device(Device::Cpu)).collect();
        inner.entries.retain(|entry| entry.key != key);
        let budget = inner.budget - bytes;
        inner.evict_to(budget);
        inner.entries.push(Entry { key: key.to_string(), tensors, bytes });
        Ok(made)
    }

    fn get(&self, key: &str) -> Option<Vec<Tensor>> {
        let mut inner = self.lock();
        let position = inner.entries.iter().position(|entry| entry.key == key)?;
        let entry = inner.entries.remove(position);
        let found = shallow(&entry.tensors);
        inner.entries.push(entry);
        Some(found)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Entries are whole once pushed: a panic elsewhere leaves a usable cache.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    /// Drops least recently used entries until at most `bytes` are held.
    fn evict_to(&mut self, bytes: u64) {
        let mut held: u64 = self.entries.iter().map(|entry| entry.bytes).sum();
        while held > bytes && !self.entries.is_empty() {
            held -= self.entries.remove(0).bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::convert::Infallible;

    use tch::Kind;

    use super::*;

    /// `floats` float32 values (4 bytes each) counting up from `start`.
    fn tensor(start: f64, floats: i64) -> Vec<Tensor> {
        vec![Tensor::arange(floats, (Kind::Float, Device::Cpu)) + start]
    }

    /// The first value of what `cache` holds under `key`, made (counted in `made`) as 10 floats
    /// counting up from `start` when absent.
    fn first_value(cache: &TensorCache, key: &str, start: f64, made: &Cell<u32>) -> f64 {
        let tensors = cache.get_or_make(key, || {
            made.set(made.get() + 1);
            Ok::<_, Infallible>(tensor(start, 10))
        });
        tensors.unwrap()[0].double_value(&[0])
    }

    #[test]
    fn makes_once_then_hands_out_the_same_values() {
        let cache = TensorCache::new(1 << 20);
        let made = Cell::new(0);
        assert_eq!(first_value(&cache, "a", 1.0, &made), 1.0);
        assert_eq!(first_value(&cache, "a", 99.0, &made), 1.0);
        assert_eq!(made.get(), 1);
        assert_eq!(cache.bytes(), 40);
    }

    #[test]
    fn evicts_the_least_recently_used_past_the_budget() {
        let cache = TensorCache::new(100);
        let made = Cell::new(0);
        first_value(&cache, "a", 0.0, &made);
        first_value(&cache, "b", 0.0, &made);
        first_value(&cache, "a", 0.0, &made);
        first_value(&cache, "c", 0.0, &made);
        assert_eq!(made.get(), 3, "a was a hit");
        assert_eq!(cache.bytes(), 80, "b went, the least recently used");
        first_value(&cache, "a", 0.0, &made);
        assert_eq!(made.get(), 3);
        first_value(&cache, "b", 0.0, &made);
        assert_eq!(made.get(), 4);
    }

    #[test]
    fn keeps_nothing_too_large_or_failed() {
        let cache = TensorCache::new(30);
        let made = Cell::new(0);
        first_value(&cache, "big", 0.0, &made);
        first_value(&cache, "big", 0.0, &made);
        assert_eq!((made.get(), cache.bytes()), (2, 0));
        let failed = cache.get_or_make("bad", || Err::<Vec<Tensor>, _>("unreadable"));
        assert_eq!(failed.unwrap_err(), "unreadable");
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn a_zero_budget_turns_it_off() {
        let cache = TensorCache::new(1 << 20);
        let made = Cell::new(0);
        first_value(&cache, "a", 0.0, &made);
        cache.set_budget(0);
        assert_eq!(cache.bytes(), 0);
        first_value(&cache, "a", 0.0, &made);
        assert_eq!(made.get(), 2);
    }
}
