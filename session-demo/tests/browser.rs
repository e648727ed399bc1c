//! The demo in a real headless Chromium, driven over WebDriver (chromedriver): an anonymous
//! page view makes no session, the counter rises across reloads, logging in survives a reload
//! and changes the session id, logging out ends the session, and the cookie is HttpOnly with
//! SameSite=Lax. Runs against the memory store and against a real memcached. A second local
//! server on another port plays the attacker's site: forms it auto-posts to the demo neither
//! log the user out nor log them in.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use session_conformance::harness::{ServerKind, ServerProcess, find_binary, free_port};

/// One browser at a time: two Chromiums at once are slow on a two-core machine.
static ONE_BROWSER: Mutex<()> = Mutex::new(());

const COOKIE: &str = "demo_session";

/// The demo application, running as its own process; killed on drop.
struct Demo {
    child: Child,
    base: String,
}

impl Demo {
    fn start(store_url: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_session-demo"))
            .env("SESSION_DEMO_ADDR", "127.0.0.1:0")
            .env("SESSION_STORE_URL", store_url)
            .env(
                "SESSION_SECRET",
                "a browser-test secret of at least 32 bytes",
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the demo");
        let stdout = child.stdout.take().expect("piped stdout");
        // Read the first line on a thread, so a demo that never prints cannot hang the test.
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = sender.send(line);
        });
        let Ok(line) = receiver.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            panic!("the demo printed no address within 30 s");
        };
        let base = line
            .split_whitespace()
            .find(|word| word.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        Self { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless Chromium session through chromedriver; everything is torn down on drop.
struct Browser {
    agent: ureq::Agent,
    session: String,
    driver_url: String,
    driver: Child,
    profile: PathBuf,
}

impl Browser {
    /// `None` (after a SKIPPED line) when Chromium or chromedriver is missing and servers are
    /// not required.
    fn start() -> Option<Self> {
        let chromium = find_binary("chromium", "chromium")?;
        let chromedriver = find_binary("chromedriver", "chromium-driver")?;
        // A port found free can be taken before chromedriver binds it: try a few.
        let (driver, port) = (0..3)
            .find_map(|_| {
                let port = free_port();
                let mut driver = Command::new(&chromedriver)
                    .arg(format!("--port={port}"))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("starting chromedriver");
                std::thread::sleep(Duration::from_millis(300));
                match driver.try_wait() {
                    Ok(None) => Some((driver, port)),
                    _ => None,
                }
            })
            .expect("chromedriver could not bind a port");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .build()
            .into();
        let driver_url = format!("http://127.0.0.1:{port}");
        let profile = std::env::temp_dir().join(format!("session-demo-profile-{port}"));
        let mut browser = Self {
            agent,
            session: String::new(),
            driver_url,
            driver,
            profile,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while browser.request("GET", "/status", None).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": [
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-background-networking",
                        "--disable-dev-shm-usage",
                        "--disable-component-update",
                        "--disable-sync",
                        "--no-first-run",
                        format!("--user-data-dir={}", browser.profile.display()),
                    ]
                }
            }}
        });
        let created = browser
            .request("POST", "/session", Some(capabilities))
            .expect("creating a browser session");
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {created}"))
            .to_owned();
        Some(browser)
    }

    /// One WebDriver command; returns its `value`, or the WebDriver error as `Err`.
    fn request(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.driver_url);
        let response = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, body) => self.agent.post(&url).send_json(body.unwrap_or(json!({}))),
        };
        let mut response = response.map_err(|e| e.to_string())?;
        let status = response.status();
        let reply: Value = response.body_mut().read_json().map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(reply["value"].clone())
        } else {
            Err(reply["value"].to_string())
        }
    }

    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        self.request(method, &path, body)
            .unwrap_or_else(|error| panic!("{method} {path}: {error}"))
    }

    fn open(&self, url: &str) {
        self.command("POST", "/url", Some(json!({ "url": url })));
    }

    fn reload(&self) {
        self.command("POST", "/refresh", None);
    }

    /// The element matching `css` now, if any.
    fn try_element(&self, css: &str) -> Option<String> {
        let path = format!("/session/{}/element", self.session);
        let found = self
            .request(
                "POST",
                &path,
                Some(json!({ "using": "css selector", "value": css })),
            )
            .ok()?;
        let id = found.as_object()?.values().next()?.as_str()?;
        Some(id.to_owned())
    }

    /// The text of the element matching `css` now, if there is one (a page being replaced
    /// by a navigation may have none, or lose it between the two commands).
    fn try_text(&self, css: &str) -> Option<String> {
        let element = self.try_element(css)?;
        let path = format!("/session/{}/element/{element}/text", self.session);
        let text = self.request("GET", &path, None).ok()?;
        text.as_str().map(str::to_owned)
    }

    /// Polls `probe` for up to thirty seconds (a loaded two-core machine is slow).
    fn eventually<T>(&self, what: &str, probe: impl Fn() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(found) = probe() {
                return found;
            }
            assert!(Instant::now() < deadline, "gave up waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn element(&self, css: &str) -> String {
        self.eventually(css, || self.try_element(css))
    }

    fn text(&self, css: &str) -> String {
        self.eventually(css, || self.try_text(css))
    }

    fn type_into(&self, css: &str, text: &str) {
        let element = self.element(css);
        self.command(
            "POST",
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        );
    }

    fn click(&self, css: &str) {
        let element = self.element(css);
        self.command("POST", &format!("/element/{element}/click"), None);
    }

    /// Waits until the element's text is `expected` (pages load after clicks).
    fn wait_for_text(&self, css: &str, expected: &str) {
        let what = format!("{css} to say {expected:?}");
        self.eventually(&what, || {
            (self.try_text(css).as_deref() == Some(expected)).then_some(())
        });
    }

    /// Replaces the demo's session cookie in the browser with `value`.
    fn set_session_cookie(&self, value: &str) {
        self.command("DELETE", &format!("/cookie/{COOKIE}"), None);
        self.command(
            "POST",
            "/cookie",
            Some(json!({ "cookie": { "name": COOKIE, "value": value, "path": "/", "httpOnly": true } })),
        );
    }

    /// The demo's session cookie as the browser holds it.
    fn session_cookie(&self) -> Option<Value> {
        self.command("GET", "/cookie", None)
            .as_array()
            .and_then(|cookies| cookies.iter().find(|c| c["name"] == COOKIE).cloned())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.request("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn visits(browser: &Browser) -> u32 {
    browser.text("#visits").parse().expect("a visit count")
}

/// The whole visit: counter, login, reload, private page, logout, cookie attributes.
fn walk_through_the_demo(store_url: &str) {
    let _one = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let Some(browser) = Browser::start() else {
        return;
    };
    let demo = Demo::start(store_url);

    // Anonymous page views make no session.
    browser.open(&demo.url("/"));
    assert_eq!(visits(&browser), 0);
    browser.reload();
    assert_eq!(visits(&browser), 0);
    assert_eq!(browser.text("#user"), "anonymous");
    assert!(
        browser.session_cookie().is_none(),
        "a page view set a cookie"
    );

    // The login form starts one (for its CSRF token); the counter runs from then on.
    browser.open(&demo.url("/login"));
    browser.element("#username");
    browser.open(&demo.url("/"));
    assert_eq!(visits(&browser), 1);
    browser.reload();
    assert_eq!(visits(&browser), 2);
    browser.reload();
    assert_eq!(visits(&browser), 3);
    assert_eq!(browser.text("#user"), "anonymous");

    let cookie = browser.session_cookie().expect("the demo sets its cookie");
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Lax", "{cookie}");
    let anonymous_id = cookie["value"].as_str().unwrap().to_owned();

    browser.open(&demo.url("/private"));
    browser.wait_for_text("#user", "not logged in");

    browser.open(&demo.url("/login"));
    browser.type_into("#username", "alice");
    browser.click("#login");
    browser.wait_for_text("#user", "alice");
    let logged_in = browser
        .session_cookie()
        .expect("still a cookie after login");
    assert_ne!(
        logged_in["value"], anonymous_id,
        "logging in must change the session id"
    );
    assert_eq!(logged_in["httpOnly"], true);
    assert_eq!(logged_in["sameSite"], "Lax");

    browser.reload();
    browser.wait_for_text("#user", "alice");

    // The pre-login cookie no longer opens the session (its id was cycled away).
    let logged_in_value = logged_in["value"].as_str().unwrap().to_owned();
    browser.set_session_cookie(&anonymous_id);
    browser.open(&demo.url("/private"));
    browser.wait_for_text("#user", "not logged in");
    browser.set_session_cookie(&logged_in_value);
    browser.open(&demo.url("/private"));
    browser.wait_for_text("#user", "alice");

    browser.open(&demo.url("/"));
    assert_eq!(visits(&browser), 4, "the counter survives the login");
    browser.reload();
    assert_eq!(visits(&browser), 5);
    assert_eq!(browser.text("#user"), "alice");

    browser.open(&demo.url("/private"));
    browser.click("#logout");
    // Logout lands on the home page, which starts no new session.
    browser.wait_for_text("#user", "anonymous");
    assert_eq!(
        visits(&browser),
        0,
        "logging out ends the session and its counter"
    );
    assert!(
        browser.session_cookie().is_none(),
        "logout clears the cookie"
    );
    browser.open(&demo.url("/private"));
    browser.wait_for_text("#user", "not logged in");

    // The logged-out cookie does not come back to life either.
    browser.set_session_cookie(&logged_in_value);
    browser.open(&demo.url("/private"));
    browser.wait_for_text("#user", "not logged in");
}

/// The attacker's site: a server on another local port whose `/logout` and `/login` pages
/// auto-post a form to the demo; answers requests until dropped.
struct AttackerSite {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl AttackerSite {
    fn start(demo: &Demo) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the attacker");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (target, stopping) = (demo.base.clone(), std::sync::Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                // A thread per connection: browsers open spare connections that never send a
                // request, and one of those must not hold up the real one.
                match listener.accept() {
                    Ok((stream, _)) => {
                        let target = target.clone();
                        std::thread::spawn(move || Self::answer(stream, &target));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self { port, stop }
    }

    /// Answers one request with a page whose form posts itself to the demo on load.
    fn answer(mut stream: std::net::TcpStream, target: &str) {
        use std::io::Write as _;
        stream.set_nonblocking(false).unwrap();
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        // Read the request up to its blank line, so closing the connection resets nothing.
        let mut reader = BufReader::new(&stream);
        let mut request_line = String::new();
        let _ = reader.read_line(&mut request_line);
        let mut line = String::new();
        while reader.read_line(&mut line).is_ok_and(|read| read > 2) {
            line.clear();
        }
        let fields = if request_line.contains("/login") {
            "<input name=\"username\" value=\"mallory\">"
        } else {
            ""
        };
        let action = if request_line.contains("/login") {
            "/login"
        } else {
            "/logout"
        };
        let body = format!(
            "<!doctype html><html><body><form id=\"f\" method=\"post\" \
             action=\"{target}{action}\">{fields}</form>\
             <script>document.getElementById('f').submit()</script></body></html>"
        );
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.port)
    }
}

impl Drop for AttackerSite {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Opens the attacker's page, waits for its forged post to land on the demo, and returns the
/// text the demo answered it with.
fn forge(browser: &Browser, demo: &Demo, attacker_page: &str) -> String {
    browser.open(attacker_page);
    browser.eventually("the forged post to reach the demo", || {
        let url = browser.command("GET", "/url", None);
        url.as_str()?.starts_with(&demo.base).then_some(())
    });
    browser.text("body")
}

#[test]
fn forms_auto_posted_from_another_origin_neither_log_out_nor_log_in() {
    let _one = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let Some(browser) = Browser::start() else {
        return;
    };
    let demo = Demo::start("memory://");
    let attacker = AttackerSite::start(&demo);
    // 127.0.0.1 on another port is the same site but another origin: the browser sends the
    // SameSite=Lax cookie with the forged post, so only the CSRF check stands in the way.
    // localhost is another site altogether.
    let attackers = ["127.0.0.1", "localhost"];

    browser.open(&demo.url("/login"));
    browser.type_into("#username", "alice");
    browser.click("#login");
    browser.wait_for_text("#user", "alice");
    for host in attackers {
        let answer = forge(&browser, &demo, &attacker.url(host, "/logout"));
        browser.open(&demo.url("/private"));
        browser.wait_for_text("#user", "alice");
        assert!(answer.contains("forbidden"), "{host}: {answer}");
    }

    // A same-origin post without the token, or with a wrong one, is refused by the token
    // check itself (the browser says same-origin, so the origin check lets it through).
    for token in [None, Some("A".repeat(86))] {
        browser.open(&demo.url("/private"));
        browser.wait_for_text("#user", "alice");
        let field = token
            .map(|token| format!("<input name=\"csrf_token\" value=\"{token}\">"))
            .unwrap_or_default();
        let script = format!(
            "const f = document.createElement('form'); f.method = 'post'; \
             f.action = '/logout'; f.innerHTML = '{field}'; document.body.appendChild(f); \
             f.submit();"
        );
        browser.command(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        );
        browser.eventually("the token-less post to be refused", || {
            browser
                .try_text("body")
                .filter(|text| text.contains("forbidden"))
        });
        browser.open(&demo.url("/private"));
        browser.wait_for_text("#user", "alice");
    }

    // Logged out (with a session holding a token, from the login form) and with none.
    browser.click("#logout");
    browser.wait_for_text("#user", "anonymous");
    browser.open(&demo.url("/login"));
    browser.element("#username");
    let mut forged_logins = Vec::new();
    for host in attackers {
        forged_logins.push(forge(&browser, &demo, &attacker.url(host, "/login")));
        browser.open(&demo.url("/private"));
        browser.wait_for_text("#user", "not logged in");
    }
    browser.command("DELETE", "/cookie", None);
    for host in attackers {
        forged_logins.push(forge(&browser, &demo, &attacker.url(host, "/login")));
        browser.open(&demo.url("/private"));
        browser.wait_for_text("#user", "not logged in");
    }
    for answer in forged_logins {
        assert!(answer.contains("forbidden"), "{answer}");
    }
}

#[test]
fn the_demo_in_a_real_browser_on_the_memory_store() {
    walk_through_the_demo("memory://");
}

#[test]
fn the_demo_in_a_real_browser_on_memcached() {
    let Some(memcached) = ServerProcess::start(ServerKind::Memcached) else {
        return;
    };
    walk_through_the_demo(&format!("memcached://{}", memcached.address()));
}

/// The demo's `/metrics` counts what a browser did, and `/dashboard` shows it live.
#[test]
fn the_dashboard_shows_the_live_counters() {
    let _one = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let Some(browser) = Browser::start() else {
        return;
    };
    let demo = Demo::start("memory://");

    // The login form starts a session (a load without a cookie, a create); three home page
    // views load it (hits) and save the visit count.
    browser.open(&demo.url("/login"));
    for _ in 0..3 {
        browser.open(&demo.url("/"));
    }
    assert_eq!(visits(&browser), 3);

    let metrics = ureq::get(&demo.url("/metrics"))
        .call()
        .expect("GET /metrics")
        .into_body()
        .read_to_string()
        .expect("a text body");
    for line in [
        "session_loads_total{backend=\"memory\",result=\"no_cookie\"} 1",
        "session_loads_total{backend=\"memory\",result=\"hit\"} 3",
        "session_creates_total{backend=\"memory\"} 1",
        "session_saves_total{backend=\"memory\"} 3",
        "session_store_operation_seconds_count{backend=\"memory\",operation=\"load\"} 3",
        "session_store_operation_seconds_bucket{backend=\"memory\",operation=\"save\",le=\"+Inf\"} 3",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no line {line:?} in:\n{metrics}"
        );
    }

    // The page reads the same counters (scraping makes no session), and after two scrapes
    // draws the latency of the calls made between them.
    browser.open(&demo.url("/dashboard"));
    browser.wait_for_text("#hits", "3");
    browser.wait_for_text("#creates", "1");
    browser.wait_for_text("#saves", "3");
    // New visitors at the login form (each a store call) while the page is open.
    let drawn = browser.eventually("a latency line", || {
        ureq::get(&demo.url("/login")).call().expect("GET /login");
        browser.try_element("#latency polyline")
    });
    assert!(!drawn.is_empty());
    assert_ne!(browser.text("#creates"), "1", "the counters stopped");
}
