//! A request with a cookie through each by-hand embedding: the counter rises only for the
//! browser that sends its cookie back, and a tampered cookie starts over.

use std::sync::Arc;

use actix_web::{App, test, web};
use session_core::{KeyRing, SessionConfig, SessionManager, SigningKey};
use session_memory::MemoryStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn manager() -> SessionManager {
    let keys = KeyRing::single(SigningKey::new([8u8; 32]).unwrap());
    SessionManager::new(Arc::new(MemoryStore::new()), SessionConfig::new(keys)).unwrap()
}

/// `session=<value>` from a `Set-Cookie` header value.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_owned()
}

#[actix_web::test]
async fn actix_counts_visits_through_the_cookie() {
    let app = test::init_service(
        App::new()
            .app_data(web::Data::new(manager()))
            .configure(session_embedding::actix::configure),
    )
    .await;

    let first = test::call_service(&app, test::TestRequest::get().uri("/").to_request()).await;
    let set_cookie = first.headers().get("set-cookie").unwrap().to_str().unwrap();
    assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
    let cookie = cookie_pair(set_cookie);
    assert_eq!(test::read_body(first).await, "visits: 1");

    for expected in 2..=4 {
        let request = test::TestRequest::get()
            .uri("/")
            .insert_header(("cookie", format!("other=1; {cookie}")))
            .to_request();
        let response = test::call_service(&app, request).await;
        assert_eq!(
            test::read_body(response).await,
            format!("visits: {expected}")
        );
    }

    // Same length and alphabet, one character of the tag changed: only the MAC can tell.
    let mut tampered = cookie.clone().into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let request = test::TestRequest::get()
        .uri("/")
        .insert_header(("cookie", tampered))
        .to_request();
    let response = test::call_service(&app, request).await;
    assert!(
        response.headers().get("set-cookie").is_some(),
        "a fresh session"
    );
    assert_eq!(test::read_body(response).await, "visits: 1");
}

/// Sends a raw HTTP/1.1 GET and returns the whole response.
async fn get(address: std::net::SocketAddr, cookie: Option<&str>) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let cookie_line = cookie.map_or(String::new(), |c| format!("Cookie: {c}\r\n"));
    let request = format!("GET / HTTP/1.1\r\nHost: test\r\n{cookie_line}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

fn set_cookie_of(response: &str) -> Option<String> {
    response
        .lines()
        .find_map(|line| line.strip_prefix("set-cookie: "))
        .map(cookie_pair)
}

#[tokio::test]
async fn hyper_counts_visits_through_the_cookie() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server = tokio::spawn(session_embedding::hyper_service::serve(listener, manager()));

    let first = get(address, None).await;
    assert!(first.ends_with("visits: 1"), "{first}");
    let cookie = set_cookie_of(&first).expect("a cookie for the new session");
    for expected in 2..=4 {
        let response = get(address, Some(&format!("a=b; {cookie}"))).await;
        assert!(
            response.ends_with(&format!("visits: {expected}")),
            "{response}"
        );
    }
    let fifth = get(address, Some(&cookie)).await;
    assert!(fifth.ends_with("visits: 5"));

    let fresh = get(address, Some("session=forged.value")).await;
    assert!(fresh.ends_with("visits: 1"), "{fresh}");
    let new_cookie = set_cookie_of(&fresh).expect("a fresh session sets its cookie");
    assert_ne!(new_cookie, cookie);

    // A planted cookie of the same name in front of the real one does not hide it.
    let both = get(address, Some(&format!("session=planted; {cookie}"))).await;
    assert!(both.ends_with("visits: 6"), "{both}");
    server.abort();
}
