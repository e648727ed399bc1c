//! What the metrics cost on the hot path when the application installed no recorder: a load
//! without a cookie allocates nothing (the facade's macros build a key, with a heap-allocated
//! label vector, when a label is not a literal; the manager makes the keys of frequent events
//! once).

use std::sync::Arc;

use session_core::{KeyRing, SessionConfig, SessionManager, SessionStore, SigningKey};
use session_memory::MemoryStore;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn blocks() -> u64 {
    dhat::HeapStats::get().total_blocks
}

/// A load without a cookie touches no store and builds a fresh session with an empty record:
/// before the metrics it made no heap allocation. With no recorder installed it should still
/// make none, but each `counter!` with a non-literal label allocates a label vector.
#[test]
fn a_load_without_a_cookie_allocates_nothing_without_a_recorder() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let store: Arc<dyn SessionStore> = Arc::new(MemoryStore::builder().build());
    let keys = KeyRing::single(SigningKey::new([7u8; 32]).unwrap());
    let manager = SessionManager::new(store, SessionConfig::new(keys)).unwrap();
    // Warm up (thread locals, lazy statics).
    drop(runtime.block_on(manager.load(None)).unwrap());

    let before = blocks();
    let session = runtime.block_on(manager.load(None)).unwrap();
    let during = blocks() - before;
    drop(session);

    // What one counter with a variable label costs by itself, for the message.
    let before = blocks();
    let backend: &'static str = std::hint::black_box("memory");
    metrics::counter!(std::hint::black_box("session_loads_total"), "backend" => backend, "result" => "no_cookie")
        .increment(1);
    let one_counter = blocks() - before;

    assert_eq!(
        during, 0,
        "manager.load(None) made {during} heap allocations with no recorder installed; one \
         `counter!` with a non-literal label makes {one_counter} by itself"
    );
}
