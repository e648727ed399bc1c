//! The visit counter in plain hyper: a `service_fn` over a shared manager.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{COOKIE, SET_COOKIE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use session_core::SessionManager;
use tokio::net::TcpListener;

use crate::count_visit;

/// Answers one request: `visits: N`, with `Set-Cookie` when the session needs it.
pub async fn handle<B>(
    manager: &SessionManager,
    request: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let cookie_headers = request
        .headers()
        .get_all(COOKIE)
        .iter()
        .map(|value| value.as_bytes());
    let failure = || {
        let mut response = Response::new(Full::new(Bytes::from_static(b"session unavailable")));
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        response
    };
    let response = match count_visit(manager, cookie_headers).await {
        Ok((visits, set_cookie)) => {
            let mut response = Response::new(Full::new(Bytes::from(format!("visits: {visits}"))));
            match set_cookie.map(|value| value.parse()) {
                Some(Ok(value)) => {
                    response.headers_mut().insert(SET_COOKIE, value);
                    response
                }
                // The store already changed; a response without its cookie would lose it.
                Some(Err(_)) => failure(),
                None => response,
            }
        }
        Err(error) => {
            eprintln!("session error: {error}");
            failure()
        }
    };
    Ok(response)
}

/// Serves HTTP/1 connections from `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, manager: SessionManager) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let manager = manager.clone();
        tokio::spawn(async move {
            let service = service_fn(|request: Request<Incoming>| {
                let manager = manager.clone();
                async move { handle(&manager, request).await }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection error: {error}");
            }
        });
    }
}
