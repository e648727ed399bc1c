//! The conformance suite against `MemoryStore`, directly and as `Arc<dyn SessionStore>`.

mod direct {
    session_conformance::conformance_suite!(async {
        Some((session_memory::MemoryStore::new(), ()))
    });
}

mod as_dyn {
    use std::sync::Arc;

    use session_core::SessionStore;

    session_conformance::conformance_suite!(async {
        let store: Arc<dyn SessionStore> = Arc::new(session_memory::MemoryStore::new());
        Some((store, ()))
    });
}
