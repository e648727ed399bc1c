//! Logs never carry a raw session id or cookie value.

use std::io::Write;
use std::sync::{Arc, Mutex};

use session_core::{KeyPrefix, KeyRing, SessionConfig, SessionManager, SigningKey, StorageKey};
use session_memory::MemoryStore;
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[test]
fn no_log_line_holds_an_id_or_cookie_value() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_writer(captured.clone())
        .finish();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut secrets = Vec::new();
    tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(async {
            let keys = KeyRing::single(SigningKey::new([3u8; 32]).unwrap());
            let manager =
                SessionManager::new(Arc::new(MemoryStore::new()), SessionConfig::new(keys))
                    .unwrap();
            let mut session = manager.load(None).await.unwrap();
            session.insert("user", "alice").unwrap();
            let cookie = manager.commit(session).await.unwrap().cookie.unwrap().value;
            secrets.push(cookie.clone());
            // A conflict, replayed.
            let mut a = manager.load(Some(&cookie)).await.unwrap();
            let mut b = manager.load(Some(&cookie)).await.unwrap();
            a.insert("a", &1).unwrap();
            b.insert("b", &2).unwrap();
            manager.commit(a).await.unwrap();
            manager.commit(b).await.unwrap();
            // Cycle, then destroy.
            let mut session = manager.load(Some(&cookie)).await.unwrap();
            session.cycle_id();
            let cycled = manager.commit(session).await.unwrap().cookie.unwrap().value;
            secrets.push(cycled.clone());
            let mut session = manager.load(Some(&cycled)).await.unwrap();
            session.destroy();
            manager.commit(session).await.unwrap();
        });
    });
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("session id cycled"),
        "expected debug logs, got:\n{logs}"
    );
    // Every store call and commit has its span, with what it did.
    for expected in [
        "session.load{backend=\"memory\" outcome=\"hit\" elapsed_us=",
        "session.store{backend=\"memory\" operation=\"save\"",
        "outcome=\"conflict\"",
        "conflicts=1 replays=1 status=\"saved\"",
        "status=\"cycled\"",
        "status=\"destroyed\"",
        "elapsed_us=",
    ] {
        assert!(logs.contains(expected), "no {expected:?} in:\n{logs}");
    }
    let keys = KeyRing::single(SigningKey::new([3u8; 32]).unwrap());
    for cookie in &secrets {
        let (id, tag) = cookie.split_once('.').unwrap();
        assert!(!logs.contains(id), "a raw id reached the logs:\n{logs}");
        let verified = keys.verify("session", cookie).expect("the cookie verifies");
        let key = StorageKey::derive(&KeyPrefix::default(), verified.id());
        let hashed = key.as_str().trim_start_matches("session:");
        assert!(
            !logs.contains(hashed),
            "a storage key reached the logs:\n{logs}"
        );
        assert!(
            !logs.contains(tag),
            "a cookie tag reached the logs:\n{logs}"
        );
    }
}
