//! One copy per session (`replicas = 1`, the default): every operation is one request to the
//! key's server, and the version is memcached's own CAS value.

use std::sync::Arc;
use std::time::Duration;

use session_core::codec::{DecodeError, encode_moved, encode_record_within};
use session_core::store::check_ttl;
use session_core::{Record, StorageKey, StoreError, StoredEntry, Version};

use crate::MemcachedStore;
use crate::items::{
    self, Condition, Kind, LAST_SESSION_FLAGS, MutationStatus, Put, SESSION_FLAGS, expiry_flags,
    time_left, unexpected, wire_ttl, written_cas,
};
use crate::nodes::Node;
use crate::wire::Ttl;

impl MemcachedStore {
    pub(crate) async fn single_create(
        &self,
        node: &Arc<Node>,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
    ) -> Result<Version, StoreError> {
        check_ttl(ttl)?;
        let bytes = encode_record_within(record, self.max_record_size)?;
        let item_key = self.item_key(key);
        let result = items::set(
            node,
            "create",
            &item_key,
            Put {
                value: &bytes,
                flags: SESSION_FLAGS,
                ttl: wire_ttl(ttl),
                condition: Condition::Absent,
            },
            self.deadline,
        )
        .await?;
        match result.status {
            MutationStatus::NotStored => Err(StoreError::AlreadyExists),
            _ => written_cas("create", &result).map(Version::new),
        }
    }

    pub(crate) async fn single_load_entry(
        &self,
        node: &Arc<Node>,
        key: &StorageKey,
    ) -> Result<Option<StoredEntry>, StoreError> {
        let item_key = self.item_key(key);
        let Some(item) = items::get(node, "load", &item_key, self.deadline).await? else {
            return Ok(None);
        };
        if item.kind == Kind::Ended {
            return Ok(None);
        }
        if item.kind == Kind::Unreadable {
            return Err(StoreError::Decode(DecodeError::TooShort {
                len: item.value.len(),
            }));
        }
        // Without the second every write adds for the coarse clock (see `wire_ttl`), so that a
        // save with the time reported left keeps the expiry where it is instead of moving it a
        // second later each time.
        StoredEntry::decode(
            item.payload(),
            self.max_record_size,
            Version::new(item.cas),
            item.expires_in(),
        )
        .map(Some)
    }

    /// `save` and `mark_moved`: writes `bytes` with `flags` only at CAS `version`.
    #[allow(clippy::too_many_arguments)] // reason: one private helper behind two operations
    pub(crate) async fn single_replace(
        &self,
        node: &Arc<Node>,
        operation: &'static str,
        key: &StorageKey,
        bytes: &[u8],
        flags: u32,
        ttl: Duration,
        version: Version,
    ) -> Result<Version, StoreError> {
        let item_key = self.item_key(key);
        let result = items::set(
            node,
            operation,
            &item_key,
            Put {
                value: bytes,
                flags,
                ttl: wire_ttl(ttl),
                condition: Condition::Cas(version.get()),
            },
            self.deadline,
        )
        .await?;
        match result.status {
            MutationStatus::CasMismatch => Err(StoreError::Conflict),
            MutationStatus::NotFound => Err(StoreError::NotFound),
            _ => written_cas(operation, &result).map(Version::new),
        }
    }

    pub(crate) async fn single_save(
        &self,
        node: &Arc<Node>,
        key: &StorageKey,
        record: &Record,
        ttl: Duration,
        version: Version,
    ) -> Result<Version, StoreError> {
        check_ttl(ttl)?;
        let bytes = encode_record_within(record, self.max_record_size)?;
        self.single_replace(node, "save", key, &bytes, SESSION_FLAGS, ttl, version)
            .await
    }

    pub(crate) async fn single_mark_moved(
        &self,
        node: &Arc<Node>,
        key: &StorageKey,
        version: Version,
        to: &StorageKey,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        check_ttl(ttl)?;
        let flags = expiry_flags("mark_moved", ttl)?;
        self.single_replace(
            node,
            "mark_moved",
            key,
            &encode_moved(to),
            flags,
            ttl,
            version,
        )
        .await
        .map(drop)
    }

    pub(crate) async fn single_touch(
        &self,
        node: &Arc<Node>,
        key: &StorageKey,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        check_ttl(ttl)?;
        let item_key = self.item_key(key);
        let touched = items::touch(node, &item_key, wire_ttl(ttl), self.deadline).await?;
        match touched.client_flags {
            // A marker or tombstone: memcached touched it before answering, so give it back its
            // own expiry (a second request, only when a touch races an id cycle or a logout).
            Some(expires) if expires > LAST_SESSION_FLAGS && touched.hit => {
                let restore = Ttl::from(time_left(expires));
                items::touch(node, &item_key, restore, self.deadline).await?;
                Ok(false)
            }
            _ => Ok(touched.hit),
        }
    }

    pub(crate) async fn single_delete(
        &self,
        node: &Arc<Node>,
        key: &StorageKey,
        version: Option<Version>,
    ) -> Result<(), StoreError> {
        let operation = if version.is_some() {
            "delete_if_version"
        } else {
            "delete"
        };
        let item_key = self.item_key(key);
        let cas = version.map(Version::get);
        let status = items::delete(node, operation, &item_key, cas, self.deadline).await?;
        match (status, version) {
            (MutationStatus::Applied, _) | (MutationStatus::NotFound, None) => Ok(()),
            (MutationStatus::NotFound, Some(_)) => Err(StoreError::NotFound),
            (MutationStatus::CasMismatch, Some(_)) => Err(StoreError::Conflict),
            (other, _) => Err(unexpected(operation, format!("unexpected reply {other:?}"))),
        }
    }
}
