//! The layer's session spans nest under the request's span: the commit runs as its own task,
//! and takes the request's span along.

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use http::Request;
use session_core::{KeyRing, SessionConfig, SessionManager, SigningKey};
use session_memory::MemoryStore;
use session_tower::{Session, SessionFailure, SessionLayer};
use tower::ServiceExt;
use tracing::Instrument;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::format::FmtSpan;

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

async fn count(session: Session) -> Result<String, SessionFailure> {
    let n = session
        .update("n", |n: Option<u32>| n.unwrap_or(0) + 1)
        .await?;
    Ok(n.to_string())
}

#[test]
fn load_commit_and_store_spans_nest_under_the_request_span() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_span_events(FmtSpan::CLOSE)
        .with_ansi(false)
        .with_writer(captured.clone())
        .finish();
    // The global default, since the commit runs on a worker thread of its own.
    let _ = tracing::subscriber::set_global_default(subscriber);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let keys = KeyRing::single(SigningKey::new([5u8; 32]).unwrap());
        let manager =
            SessionManager::new(Arc::new(MemoryStore::new()), SessionConfig::new(keys)).unwrap();
        let app = Router::new()
            .route("/", get(count))
            .layer(SessionLayer::new(manager));
        let request = Request::builder().uri("/").body(Body::empty()).unwrap();
        let response = app
            .oneshot(request)
            .instrument(tracing::debug_span!("request", path = "/"))
            .await
            .unwrap();
        assert!(response.status().is_success());
    });
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    for nested in [
        "request{path=\"/\"}:session.load{",
        "request{path=\"/\"}:session.commit{",
        "request{path=\"/\"}:session.commit{backend=\"memory\"}:session.store{backend=\"memory\" operation=\"create\"",
    ] {
        assert!(logs.contains(nested), "no {nested:?} in:\n{logs}");
    }
}
