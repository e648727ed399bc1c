//! [`RecordingStore`]: a store wrapper for tests that logs every call (`load_entry` is logged
//! as `load`), counts conflicts, and can be told to fail loads or writes, or to report
//! undecodable records.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use session_core::codec::decode_record;
use session_core::{Record, SessionStore, StorageKey, StoreError, StoredEntry, Version};

/// Wraps a store; clones share the log and the switches.
#[derive(Clone, Default)]
pub struct RecordingStore<S> {
    /// The wrapped store.
    pub inner: S,
    calls: Arc<Mutex<Vec<&'static str>>>,
    conflicts: Arc<AtomicUsize>,
    /// When set, `load` fails with a backend error.
    pub fail_loads: Arc<AtomicBool>,
    /// When set, `create`, `save`, `touch` and `delete` fail with a backend error.
    pub fail_writes: Arc<AtomicBool>,
    /// When set, `load` reports a record that does not decode.
    pub corrupt_loads: Arc<AtomicBool>,
    /// How many of the next `delete` calls fail with a backend error.
    pub fail_next_deletes: Arc<AtomicUsize>,
    /// How many of the next `mark_moved` calls fail with a backend error.
    pub fail_next_marks: Arc<AtomicUsize>,
}

impl<S> RecordingStore<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            calls: Arc::default(),
            conflicts: Arc::default(),
            fail_loads: Arc::default(),
            fail_writes: Arc::default(),
            corrupt_loads: Arc::default(),
            fail_next_deletes: Arc::default(),
            fail_next_marks: Arc::default(),
        }
    }

    /// The operations called so far, in order.
    pub fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().expect("call log").clone()
    }

    /// The operations called so far, clearing the log.
    pub fn take_calls(&self) -> Vec<&'static str> {
        std::mem::take(&mut *self.calls.lock().expect("call log"))
    }

    /// How many conditional writes (saves, marks, versioned deletes) reported a conflict.
    pub fn conflicts(&self) -> usize {
        self.conflicts.load(Ordering::Relaxed)
    }

    fn log(&self, operation: &'static str, switch: &AtomicBool) -> Result<(), StoreError> {
        self.calls.lock().expect("call log").push(operation);
        if switch.load(Ordering::SeqCst) {
            return Err(StoreError::Backend {
                operation,
                source: "connection refused (injected)".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl<S: SessionStore> SessionStore for RecordingStore<S> {
    async fn create(&self, k: &StorageKey, r: &Record, t: Duration) -> Result<Version, StoreError> {
        self.log("create", &self.fail_writes)?;
        self.inner.create(k, r, t).await
    }

    async fn load_entry(&self, key: &StorageKey) -> Result<Option<StoredEntry>, StoreError> {
        self.log("load", &self.fail_loads)?;
        if self.corrupt_loads.load(Ordering::SeqCst) {
            let error = decode_record(&[0xee, 1]).expect_err("0xee is no format byte");
            return Err(StoreError::Decode(error));
        }
        self.inner.load_entry(key).await
    }

    async fn save(
        &self,
        k: &StorageKey,
        r: &Record,
        t: Duration,
        v: Version,
    ) -> Result<Version, StoreError> {
        self.log("save", &self.fail_writes)?;
        let result = self.inner.save(k, r, t, v).await;
        if matches!(result, Err(StoreError::Conflict)) {
            self.conflicts.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn mark_moved(
        &self,
        key: &StorageKey,
        version: Version,
        to: &StorageKey,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.log("mark_moved", &self.fail_writes)?;
        if take_one(&self.fail_next_marks) {
            return Err(StoreError::Backend {
                operation: "mark_moved",
                source: "connection reset (injected)".into(),
            });
        }
        let result = self.inner.mark_moved(key, version, to, ttl).await;
        if matches!(result, Err(StoreError::Conflict)) {
            self.conflicts.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn touch(&self, key: &StorageKey, ttl: Duration) -> Result<bool, StoreError> {
        self.log("touch", &self.fail_writes)?;
        self.inner.touch(key, ttl).await
    }

    async fn delete(&self, key: &StorageKey) -> Result<(), StoreError> {
        self.log("delete", &self.fail_writes)?;
        if take_one(&self.fail_next_deletes) {
            return Err(StoreError::Backend {
                operation: "delete",
                source: "connection reset (injected)".into(),
            });
        }
        self.inner.delete(key).await
    }

    async fn delete_if_version(
        &self,
        key: &StorageKey,
        version: Version,
    ) -> Result<(), StoreError> {
        self.log("delete_if_version", &self.fail_writes)?;
        let result = self.inner.delete_if_version(key, version).await;
        if matches!(result, Err(StoreError::Conflict)) {
            self.conflicts.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn max_record_size(&self) -> usize {
        self.inner.max_record_size()
    }

    fn max_key_len(&self) -> Option<usize> {
        self.inner.max_key_len()
    }

    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
}

/// Takes one from a countdown of injected failures; whether there was one.
fn take_one(countdown: &AtomicUsize) -> bool {
    countdown
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}
