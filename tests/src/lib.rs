//! The conformance suite every [`SessionStore`] backend passes.
//!
//! Each case in [`cases`] is a `pub async fn` written against the trait alone, taking a store
//! that is `SessionStore + Clone + 'static` (every backend, and `Arc<dyn SessionStore>`).
//! [`conformance_suite!`] turns the whole list into one `#[tokio::test]` per case for a store
//! fixture, so a failure names its case:
//!
//! ```
//! mod memory {
//!     session_conformance::conformance_suite!(async {
//!         Some((session_memory::MemoryStore::new(), ()))
//!     });
//! }
//! ```
//!
//! The fixture is an async block giving `Option<(store, guard)>`: the guard (a server process,
//! say) lives until the case ends; `None` means the backend is not available and the case is
//! skipped (the fixture prints the `SKIPPED` line saying why).
//! The generated tests need `tokio` with the `macros` and `rt-multi-thread` features.

use session_core::{KeyPrefix, SessionId, SessionStore, StorageKey};

pub mod cases;
pub mod faults;
pub mod harness;
pub mod interleave;
pub mod model;
pub mod network;
pub mod proxy;
pub mod recording;
pub mod strategies;

/// A storage key for a new random session id under the default prefix.
pub fn new_key() -> StorageKey {
    StorageKey::derive(
        &KeyPrefix::default(),
        &SessionId::generate().expect("the OS random number generator works"),
    )
}

/// Asserts at compile time that a fixture's store fits the cases.
#[doc(hidden)]
pub fn __check_store<S: SessionStore + Clone + 'static>(store: S) -> S {
    store
}

/// Generates one `#[tokio::test]` per conformance case for a store fixture.
///
/// The argument is an async block evaluating to `Option<(store, guard)>`; see the crate docs.
#[macro_export]
macro_rules! conformance_suite {
    ($fixture:expr) => {
        $crate::conformance_suite!(@cases $fixture;
            create_load_round_trip,
            create_never_overwrites,
            load_of_missing_key_is_none,
            save_with_stale_version_is_conflict,
            save_after_delete_is_not_found_and_recreates_nothing,
            old_version_does_not_match_a_recreated_entry,
            touch_extends_expiry_without_changing_data,
            touch_of_missing_key_is_false_and_creates_nothing,
            delete_is_idempotent,
            idle_expiry_is_honored,
            long_timeouts_are_honored,
            ttl_outside_the_contract_range_is_rejected,
            save_and_touch_set_the_ttl,
            saves_with_the_reported_ttl_keep_the_expiry,
            record_at_the_size_limit_works_and_over_it_is_rejected,
            binary_safe_values,
            thousands_of_sessions,
            concurrent_creates_have_one_winner,
            concurrent_saves_have_one_winner,
            mark_moved_leaves_a_marker_that_is_no_session,
            mark_moved_is_conditional,
            moved_marker_expires_after_its_ttl,
            delete_if_version_is_conditional,
            concurrent_saves_and_marks_have_one_winner,
            model_based_operations,
            manager_concurrent_commits_lose_no_update,
            manager_concurrent_updates_count_every_one,
            manager_interleavings_keep_every_invariant,
            manager_active_sessions_keep_a_live_cookie,
            manager_request_flow
        );
    };
    (@cases $fixture:expr; $($case:ident),+) => {$(
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let Some((store, guard)) = $fixture.await else {
                return;
            };
            $crate::cases::$case($crate::__check_store(store)).await;
            drop(guard);
        }
    )+};
}
