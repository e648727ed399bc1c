//! The sweeper thread ends with its store. Alone in its own test binary, so that the process's
//! thread count is not disturbed by other tests.

use std::time::Duration;

use session_memory::MemoryStore;

#[tokio::test]
async fn the_sweeper_thread_ends_with_the_store() {
    let before = thread_count();
    let stores: Vec<MemoryStore> = (0..20)
        .map(|_| {
            MemoryStore::builder()
                .sweep_interval(Duration::from_secs(3600))
                .build()
        })
        .collect();
    assert!(thread_count() >= before + 20);
    drop(stores);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while thread_count() > before && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        thread_count() <= before,
        "sweeper threads outlived their stores"
    );
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}
