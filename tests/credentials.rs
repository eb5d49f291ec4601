//! Issue 4: service credentials against the sandbox's token endpoint, over real HTTP.

mod common;

use std::time::Duration;

use common::*;
use pcgate::sandbox::{SandboxOptions, SANDBOX_CLIENT_SECRET, SANDBOX_REFRESH_TOKEN};
use serde_json::json;
use tokio::time::Instant;

fn sandbox_with_ttl(ttl: Duration) -> SandboxOptions {
    SandboxOptions {
        token_ttl: ttl,
        ..SandboxOptions::default()
    }
}

async fn get(gateway: &TestGateway, path: &str) -> reqwest::Response {
    client().get(gateway.url(path)).send().await.unwrap()
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_ahead_of_expiry_with_no_caller_error() {
    let sandbox = start_sandbox(sandbox_with_ttl(Duration::from_secs(2))).await;
    let mut config = sandbox.config();
    config.app_mut().refresh_before = secs(1);
    let gateway = start_config(config).await;

    // The refresh state machine is tested in paused time (`token::tests`); this checks the same
    // end to end, against the sandbox's real expiry, for a few token lifetimes.
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_secs(6) && calls < 2_000 {
        let response = get(&gateway, "/v1/invoices?size=1").await;
        assert_eq!(
            response.status(),
            200,
            "call {calls} at {:?}",
            started.elapsed()
        );
        calls += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A 2 s token refreshed 1 s (minus jitter) ahead: one fetch every 0.75–1 s over 6 s, so
    // calls crossed several token expiries.
    let fetched = sandbox.count("token").await;
    assert!(fetched >= 5, "only {fetched} token requests in 6 s");
    assert!(calls > 40);
}

#[tokio::test]
async fn a_failing_token_endpoint_is_ridden_out_until_the_token_expires_then_503() {
    let sandbox = start_sandbox(sandbox_with_ttl(Duration::from_secs(3))).await;
    let mut config = sandbox.config();
    config.app_mut().refresh_before = secs(2);
    let gateway = start_config(config).await;
    assert_eq!(get(&gateway, "/v1/invoices?size=1").await.status(), 200);
    let token_fetched_at = Instant::now();
    sandbox.faults(json!({"token_fail_status": 503})).await;

    // Until the 3 s token expires, calls succeed though every refresh fails.
    while token_fetched_at.elapsed() < Duration::from_millis(2_500) {
        assert_eq!(get(&gateway, "/v1/invoices?size=1").await.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failed_refreshes = sandbox
        .recent("token")
        .await
        .iter()
        .filter(|r| r["status"] == 503)
        .count();
    assert!(
        failed_refreshes >= 1,
        "no refresh was attempted while the token lived"
    );

    // Then: 503 in the Partner Center shape, naming the credential, never the secret.
    let deadline = Instant::now() + WAIT;
    let response = loop {
        let response = get(&gateway, "/v1/invoices?size=1").await;
        if response.status() != 200 || Instant::now() > deadline {
            break response;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("ms-requestid"));
    let text = response.text().await.unwrap();
    let fault: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(fault["errorName"], "NoValidCredential");
    assert!(
        fault["description"].as_str().unwrap().contains("`app`"),
        "{text}"
    );
    assert!(!text.contains(SANDBOX_CLIENT_SECRET));

    // The endpoint recovers: so do the calls (the backoff is at most a minute; the test waits less).
    sandbox.faults(json!({"token_fail_status": null})).await;
    let deadline = Instant::now() + WAIT;
    loop {
        if get(&gateway, "/v1/invoices?size=1").await.status() == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "calls did not recover after the token endpoint did"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_hundred_concurrent_first_calls_make_one_token_request() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    // Bind, then serve: the background refresher starts with serve, the calls race it.
    let gateway = start_config(sandbox.config()).await;
    let calls = (0..100).map(|_| {
        let url = gateway.url("/v1/invoices?size=1");
        tokio::spawn(async move { client().get(url).send().await.unwrap().status() })
    });
    for call in futures_util::future::join_all(calls).await {
        assert_eq!(call.unwrap(), 200);
    }
    // One token request per configured credential: `app` for these 100 calls (and its background
    // refresher, which shares the single flight), `user` from its own background refresher.
    let log = sandbox.log().await;
    assert_eq!(log["counts"]["token"], 2, "{}", log["counts"]);
}

#[tokio::test]
async fn the_callers_authorization_never_reaches_the_upstream() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let gateway = start_config(sandbox.config()).await;
    let response = client()
        .get(gateway.url("/v1/invoices/summary"))
        .header("Authorization", "Bearer callers-own-token")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = sandbox.recent("summary").await;
    let auth = seen[0]["headers"]["authorization"].as_str().unwrap();
    assert!(auth.starts_with("Bearer sbx-app-"), "{auth}");
    assert!(!auth.contains("callers-own-token"));
}

#[tokio::test]
async fn app_user_routes_get_the_user_credential() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let gateway = start_config(sandbox.config()).await;
    let response = get(&gateway, "/v1/invoices/summaries").await;
    assert_eq!(response.status(), 200);
    let seen = sandbox.recent("summaries").await;
    assert!(seen[0]["headers"]["authorization"]
        .as_str()
        .unwrap()
        .starts_with("Bearer sbx-user-"));
}

#[tokio::test]
async fn an_upstream_401_refreshes_once_and_replays_once_with_the_same_request_id() {
    replays_a_401_once(false).await;
}

/// With `retry = true` the replay is made from retry's copy of the request, not one of its own.
#[tokio::test]
async fn an_upstream_401_on_a_retried_route_replays_once_with_the_same_request_id() {
    replays_a_401_once(true).await;
}

async fn replays_a_401_once(retry: bool) {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let mut config = sandbox.config();
    for route in &mut config.routes {
        route.retry = retry;
    }
    let gateway = start_config(config).await;
    gateway.ready().await;
    assert_eq!(get(&gateway, "/v1/invoices/summary").await.status(), 200);
    let tokens_before = sandbox.count("token").await;
    sandbox.faults(json!({"revoke_tokens": true})).await;
    sandbox.reset_log().await;

    let response = get(&gateway, "/v1/invoices/summary?fresh=1").await;
    assert_eq!(response.status(), 200);
    let attempts = sandbox.recent("summary").await;
    assert_eq!(attempts.len(), 2, "one refused attempt, one replay");
    assert_eq!(attempts[0]["status"], 401);
    assert_eq!(attempts[1]["status"], 200);
    let token_requests = sandbox.count("token").await;
    assert_eq!(
        token_requests, 1,
        "one refresh (log reset after {tokens_before})"
    );
    // The replay is the same call: same MS-RequestId, next MS-CV.
    let header = |i: usize, name: &str| attempts[i]["headers"][name].as_str().unwrap().to_owned();
    assert_eq!(header(0, "ms-requestid"), header(1, "ms-requestid"));
    let (first, second) = (header(0, "ms-cv"), header(1, "ms-cv"));
    assert!(
        first.ends_with(".1") && second.ends_with(".2"),
        "{first} {second}"
    );
    assert_eq!(first.trim_end_matches(".1"), second.trim_end_matches(".2"));
    assert_ne!(header(0, "authorization"), header(1, "authorization"));
}

#[tokio::test]
async fn rotated_refresh_tokens_are_persisted_and_reused_after_a_restart() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let dir = temp_dir("rotation");
    let file = dir.join("refresh-token");
    std::fs::write(&file, format!("{SANDBOX_REFRESH_TOKEN}\n")).unwrap();
    let mut config = sandbox.config();
    let user = config.user_mut();
    user.refresh_token = None;
    user.refresh_token_file = Some(file.clone());

    let gateway = start_config(config.clone()).await;
    assert_eq!(get(&gateway, "/v1/invoices/summaries").await.status(), 200);
    drop(gateway);
    let rotated = std::fs::read_to_string(&file).unwrap().trim().to_owned();
    assert_ne!(
        rotated, SANDBOX_REFRESH_TOKEN,
        "the rotated token was not written back"
    );
    assert!(rotated.starts_with("sbx-refresh-"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    // The sandbox rotates strictly: only the rotated token works now. A restart must use it.
    let restarted = start_config(config).await;
    assert_eq!(
        get(&restarted, "/v1/invoices/summaries").await.status(),
        200
    );
    let refreshes: Vec<_> = sandbox.recent("token").await;
    assert!(
        refreshes.iter().all(|r| r["status"] == 200),
        "a refresh was refused: {refreshes:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_revoked_refresh_token_is_reported_as_needing_consent() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let mut config = sandbox.config();
    config.user_mut().refresh_token = Some("revoked-long-ago".into());
    let gateway = start_config(config).await;
    let response = get(&gateway, "/v1/invoices/summaries").await;
    assert_eq!(response.status(), 503);
    let fault: serde_json::Value = response.json().await.unwrap();
    let description = fault["description"].as_str().unwrap();
    assert!(
        description.contains("`user`") && description.contains("re-consent needed"),
        "{description}"
    );
}

#[tokio::test]
async fn readyz_waits_for_every_credential_a_route_uses() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    sandbox.faults(json!({"token_fail_status": 500})).await;
    let gateway = start_config(sandbox.config()).await;
    let readyz = format!("http://{}/readyz", gateway.admin);
    let response = client().get(&readyz).send().await.unwrap();
    assert_eq!(response.status(), 503);
    let text = response.text().await.unwrap();
    assert!(text.contains("app") && text.contains("user"), "{text}");

    sandbox.faults(json!({"token_fail_status": null})).await;
    let deadline = Instant::now() + WAIT;
    loop {
        // A caller's call drives a fetch once the backoff has passed; so does the background task.
        let _ = get(&gateway, "/v1/invoices/summaries").await;
        let _ = get(&gateway, "/v1/invoices/summary").await;
        if client().get(&readyz).send().await.unwrap().status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn inbound_keys_are_required_when_configured() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let mut config = sandbox.config();
    config
        .access
        .clients
        .push(client_key("billing", b"billing-app-key"));
    let gateway = start_config(config).await;
    let call = |key: Option<&'static str>| {
        let mut request = client().get(gateway.url("/v1/invoices/summary"));
        if let Some(key) = key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(call(None).await, 401);
    assert_eq!(call(Some("wrong-key")).await, 401);
    assert_eq!(sandbox.count("summary").await, 0);
    assert_eq!(call(Some("billing-app-key")).await, 200);
    let seen = sandbox.recent("summary").await;
    assert!(!seen[0]["headers"]["authorization"]
        .as_str()
        .unwrap()
        .contains("billing-app-key"));
}

#[tokio::test]
async fn a_missing_secret_file_is_a_start_up_error_naming_the_credential_and_file() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let mut config = sandbox.config();
    config.app_mut().secret = secret_from_file("/nonexistent/pc-secret".as_ref());
    let error = pcgate::Gateway::bind(on_loopback(config))
        .await
        .err()
        .expect("start-up fails")
        .to_string();
    assert!(
        error.contains("credential `app`") && error.contains("/nonexistent/pc-secret"),
        "{error}"
    );
}

#[tokio::test]
async fn a_connection_header_cannot_strip_the_service_token() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let gateway = start_config(sandbox.config()).await;
    gateway.ready().await;
    let response = client()
        .get(gateway.url("/v1/invoices?size=1"))
        .header("Connection", "authorization, x-locale")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = sandbox.recent("invoices").await;
    assert!(seen[0]["headers"]["authorization"]
        .as_str()
        .unwrap()
        .starts_with("Bearer sbx-app-"));
    assert_eq!(seen[0]["headers"]["x-locale"], "en-US");
    assert_eq!(sandbox.count("token").await, 2, "no extra token request");
}

#[tokio::test]
async fn an_upstream_that_keeps_refusing_fresh_tokens_does_not_get_a_token_request_per_call() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let gateway = start_config(sandbox.config()).await;
    gateway.ready().await;
    assert_eq!(get(&gateway, "/v1/invoices?size=1").await.status(), 200);
    let tokens_before = sandbox.count("token").await;
    // Every answer a 401, as when consent or a role is missing.
    sandbox
        .faults(json!({"script": [401, 401, 401, 401, 401, 401, 401, 401, 401, 401]}))
        .await;
    for i in 0..5 {
        let response = get(&gateway, &format!("/v1/invoices?size={}", i + 2)).await;
        assert_eq!(response.status(), 401, "the upstream's own 401 goes back");
    }
    // One replacement for the first 401; none for the 401s on the fresh token that followed.
    assert_eq!(sandbox.count("token").await, tokens_before + 1);
}

// ---------------------------------------------------------------------------------------------
// Issue 12, items 1, 5, 6: token endpoints that misbehave and refresh-token files that cannot be
// written. The misbehaving token endpoints are raw TCP servers started by the test.

/// What a raw token endpoint in a test does with each request.
#[derive(Clone)]
enum Answer {
    /// `307 Temporary Redirect` to this `Location`.
    Redirect(String),
    /// `400` with an OAuth error body.
    Refuse,
    /// `200`, chunked, a body that does not end (up to `ENDLESS` bytes, then it stops).
    Endless,
    /// `200` announcing `ENDLESS` bytes by Content-Length, then sending them.
    HugeContentLength,
}

/// How much an endless answer sends at most (the test's own bound).
const ENDLESS: usize = 64 << 20;

/// Each request a raw server got: when, and its bytes.
type Requests = std::sync::Arc<std::sync::Mutex<Vec<(Instant, Vec<u8>)>>>;

/// A token endpoint speaking raw HTTP/1.1 on 127.0.0.1:0: records every request (when it came and
/// its bytes, head and body) and how many body bytes it managed to send back.
struct RawTokenServer {
    addr: std::net::SocketAddr,
    requests: Requests,
    /// Body bytes the kernel accepted, summed over connections.
    sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Connections whose answer is finished (written in full or cut by the client).
    done: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawTokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawTokenServer {
    async fn start(answer: Answer) -> RawTokenServer {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Requests::default();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (r, s, d) = (requests.clone(), sent.clone(), done.clone());
        let task = tokio::spawn(async move {
            // Bounded: a test makes a handful of token requests.
            for _ in 0..100 {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let (r, s, d, answer) = (r.clone(), s.clone(), d.clone(), answer.clone());
                tokio::spawn(async move {
                    // The request: head, then Content-Length bytes of form.
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    let read = async {
                        loop {
                            let n = stream.read(&mut buf).await.ok()?;
                            if n == 0 {
                                return None;
                            }
                            request.extend_from_slice(&buf[..n]);
                            let text = String::from_utf8_lossy(&request).to_lowercase();
                            if let Some(end) = text.find("\r\n\r\n") {
                                let length = text[..end]
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length:"))
                                    .and_then(|v| v.trim().parse::<usize>().ok())
                                    .unwrap_or(0);
                                if request.len() >= end + 4 + length {
                                    return Some(());
                                }
                            }
                        }
                    };
                    if tokio::time::timeout(WAIT, read)
                        .await
                        .ok()
                        .flatten()
                        .is_none()
                    {
                        return;
                    }
                    r.lock().unwrap().push((Instant::now(), request));
                    let head = match &answer {
                        Answer::Redirect(location) => format!(
                            "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n"
                        ),
                        Answer::Refuse => {
                            let body = r#"{"error":"invalid_request","error_description":"no"}"#;
                            format!(
                                "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            )
                        }
                        Answer::Endless => "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned(),
                        Answer::HugeContentLength => format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {ENDLESS}\r\n\r\n"
                        ),
                    };
                    if stream.write_all(head.as_bytes()).await.is_err() {
                        d.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    let chunked = matches!(answer, Answer::Endless);
                    if chunked || matches!(answer, Answer::HugeContentLength) {
                        let piece = vec![b' '; 16 * 1024];
                        let mut framed = Vec::new();
                        if chunked {
                            framed.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                        }
                        framed.extend_from_slice(&piece);
                        if chunked {
                            framed.extend_from_slice(b"\r\n");
                        }
                        for _ in 0..ENDLESS / piece.len() {
                            match tokio::time::timeout(WAIT, stream.write_all(&framed)).await {
                                Ok(Ok(())) => s.fetch_add(piece.len(), Ordering::SeqCst),
                                _ => break,
                            };
                        }
                        if chunked {
                            let _ = stream.write_all(b"0\r\n\r\n").await;
                        }
                    }
                    d.fetch_add(1, Ordering::SeqCst);
                    // Keep the connection until the client closes it.
                    let _ = tokio::time::timeout(WAIT, stream.read(&mut buf)).await;
                });
            }
        });
        RawTokenServer {
            addr,
            requests,
            sent,
            done,
            task,
        }
    }

    fn token_url(&self) -> String {
        format!("http://{}/tenant/oauth2/token", self.addr)
    }

    fn requests(&self) -> Vec<(Instant, Vec<u8>)> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits (bounded) until `n` requests have come.
    async fn wait_for_requests(&self, n: usize) -> Vec<(Instant, Vec<u8>)> {
        let deadline = Instant::now() + WAIT;
        loop {
            let seen = self.requests();
            if seen.len() >= n {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} token requests came",
                seen.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The sandbox config with the `app` credential's token endpoint replaced by `token_url`.
fn with_app_token_url(sandbox: &TestSandbox, token_url: &str) -> pcgate::config::Config {
    let mut config = sandbox.config();
    config.app_mut().token_url = token_url_of(token_url);
    config
}

#[tokio::test]
async fn a_redirecting_token_endpoint_never_gets_the_secret_sent_elsewhere_and_is_backed_off() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    // Where the redirect points: it must never see a request, least of all the client secret.
    let elsewhere = RawTokenServer::start(Answer::Refuse).await;
    let redirecting = RawTokenServer::start(Answer::Redirect(format!(
        "http://{}/collect?leak=query-part",
        elsewhere.addr
    )))
    .await;
    let gateway = start_config(with_app_token_url(&sandbox, &redirecting.token_url())).await;

    // The background refresher asks at start; callers during the backoff do not drive requests.
    let first = redirecting.wait_for_requests(1).await;
    assert!(String::from_utf8_lossy(&first[0].1).contains("client_secret="));
    let mut description = String::new();
    for _ in 0..10 {
        let response = get(&gateway, "/v1/invoices?size=1").await;
        assert_eq!(response.status(), 503);
        let fault: serde_json::Value = response.json().await.unwrap();
        description = fault["description"].as_str().unwrap().to_owned();
    }
    assert!(
        description.contains("307") && description.contains("127.0.0.1"),
        "{description}"
    );
    assert!(
        !description.contains("leak") && !description.contains("collect"),
        "the Location's path and query are not repeated: {description}"
    );
    // The next attempt comes after a backoff (at least half of the first second), not per call.
    let two = redirecting.wait_for_requests(2).await;
    assert!(
        two[1].0 - two[0].0 >= Duration::from_millis(400),
        "second attempt {:?} after the first",
        two[1].0 - two[0].0
    );
    assert!(elsewhere.requests().is_empty(), "the redirect was followed");
    assert!(
        metric(
            &gateway,
            r#"pcgate_token_refreshes_total{credential="app",result="error"}"#
        )
        .await
        .unwrap_or(0.0)
            >= 2.0
    );
    assert_eq!(
        metric(
            &gateway,
            r#"pcgate_token_refreshes_total{credential="app",result="ok"}"#
        )
        .await
        .unwrap_or(0.0),
        0.0
    );
}

#[tokio::test]
async fn a_token_answer_larger_than_the_cap_is_not_read_and_fails_the_refresh() {
    use std::sync::atomic::Ordering;
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    for (answer, cause) in [
        (Answer::Endless, "64 KiB"),
        (Answer::HugeContentLength, "64 KiB"),
    ] {
        let server = RawTokenServer::start(answer).await;
        let gateway = start_config(with_app_token_url(&sandbox, &server.token_url())).await;
        server.wait_for_requests(1).await;
        let deadline = Instant::now() + WAIT;
        while server.done.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the answer never ended");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The client hung up after about the cap; what the kernel buffers on loopback (a few MiB
        // at most) is all that left the server, not the 64 MiB it had to send.
        let sent = server.sent.load(Ordering::SeqCst);
        assert!(sent < 16 << 20, "the client read {sent} bytes");
        let response = get(&gateway, "/v1/invoices?size=1").await;
        assert_eq!(response.status(), 503);
        let fault: serde_json::Value = response.json().await.unwrap();
        let description = fault["description"].as_str().unwrap();
        assert!(description.contains(cause), "{description}");
    }
}

#[tokio::test]
async fn an_unwritable_refresh_token_directory_fails_the_start_naming_the_file() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    // The tests run as root, for whom permission bits do not stop a write. /proc/self is a
    // directory nobody can create files in, root included (procfs has no create operation), and
    // the file is absent, so the token comes from the inline seed and only a write would fail.
    let mut config = sandbox.config();
    let user = config.user_mut();
    user.refresh_token_file = Some("/proc/self/pcgate-refresh-token".into());
    user.refresh_token = Some("seed".into());
    let config = on_loopback(config);
    let error = pcgate::Gateway::bind(config.clone())
        .await
        .err()
        .expect("start-up fails")
        .to_string();
    assert!(
        error.contains("credential `user`")
            && error.contains("/proc/self/pcgate-refresh-token")
            && error.contains("writable"),
        "{error}"
    );

    // `pcgate run` exits 1 with that message.
    let dir = temp_dir("unwritable-run");
    let path = dir.join("pcgate.toml");
    // The printed config, secrets redacted: start-up fails on the file before any is used.
    std::fs::write(&path, config.to_toml()).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pcgate"))
        .args(["--log-format", "text", "run", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pcgate run did not exit");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("/proc/self/pcgate-refresh-token"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_rotated_refresh_token_that_cannot_be_saved_is_counted_kept_and_saved_later() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let dir = temp_dir("store-failure");
    let file = dir.join("refresh-token");
    std::fs::write(&file, format!("{SANDBOX_REFRESH_TOKEN}\n")).unwrap();
    let mut config = sandbox.config();
    let user = config.user_mut();
    user.refresh_token = None;
    user.refresh_token_file = Some(file.clone());
    let failures = r#"pcgate_token_store_failures_total{credential="user"}"#;

    let gateway = start_config(config.clone()).await;
    // Exported at zero from start, for the credential with a file only.
    assert_eq!(metric(&gateway, failures).await, Some(0.0));
    assert_eq!(
        metric(
            &gateway,
            r#"pcgate_token_store_failures_total{credential="app"}"#
        )
        .await,
        None
    );
    assert_eq!(get(&gateway, "/v1/invoices/summaries").await.status(), 200);

    // The volume goes away (as root, the one write failure we can cause); a 401 forces a rotation.
    std::fs::remove_dir_all(&dir).unwrap();
    sandbox.faults(json!({"revoke_tokens": true})).await;
    assert_eq!(
        get(&gateway, "/v1/invoices/summaries?after=revoke")
            .await
            .status(),
        200,
        "the rotated token is kept in memory and used"
    );
    assert!(metric(&gateway, failures).await.unwrap_or(0.0) >= 1.0);

    // The directory is back: the write is retried and the file holds the current token.
    std::fs::create_dir_all(&dir).unwrap();
    let deadline = Instant::now() + WAIT;
    while !file.exists() {
        assert!(
            Instant::now() < deadline,
            "the rotated token was never saved"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(gateway);
    // The sandbox rotates strictly: a restart works only if the file holds the latest token.
    tokio::time::sleep(Duration::from_millis(100)).await;
    sandbox.reset_log().await;
    let restarted = start_config(config).await;
    assert_eq!(
        get(&restarted, "/v1/invoices/summaries?after=restart")
            .await
            .status(),
        200
    );
    let refreshes = sandbox.recent("token").await;
    assert!(
        refreshes.iter().all(|r| r["status"] == 200),
        "a refresh was refused: {refreshes:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 15, item 1: a rotated `client_secret_file` is picked up at the next token request, with
/// no restart. The sandbox refuses the old secret (as Entra does once it is deleted) and accepts
/// the new one. Then a rotation as Entra ID runs it: a second secret is added to the app, the file
/// gets it, the first is deleted; the next refresh uses the new secret and the old one is never
/// sent again (the sandbox would refuse it).
#[tokio::test]
async fn a_rotated_client_secret_file_is_read_again_without_a_restart() {
    // Short tokens: a refresh about every second, so "the next refresh" comes soon.
    let sandbox = start_sandbox(sandbox_with_ttl(Duration::from_secs(2))).await;
    let dir = temp_dir("secret-rotation");
    let file = dir.join("client-secret");
    std::fs::write(&file, "an-old-secret-entra-deleted\n").unwrap();
    let mut config = sandbox.config();
    // Both credentials read the one secret file, as in deploy/kubernetes.
    config.app_mut().secret = secret_from_file(&file);
    config.app_mut().refresh_before = secs(1);
    config.user_mut().app.secret = secret_from_file(&file);
    config.user_mut().app.refresh_before = secs(1);
    let gateway = start_config(config).await;
    let url = gateway.url("/v1/invoices?size=1");
    assert_eq!(client().get(&url).send().await.unwrap().status(), 503);
    // Readiness names the failing credential and why, never the secret.
    let readyz = client()
        .get(format!("http://{}/readyz", gateway.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), 503);
    let readyz = readyz.text().await.unwrap();
    assert!(
        readyz.contains("app (") && readyz.contains("invalid_client"),
        "{readyz}"
    );
    // ...and what to do (AADSTS7000215, as the sandbox answers).
    assert!(
        readyz.contains("AADSTS7000215: the client secret is wrong"),
        "{readyz}"
    );
    assert!(!readyz.contains("an-old-secret"), "{readyz}");
    // The operator (or the kubelet) writes the new secret in place of the old.
    std::fs::write(
        &file,
        format!("{}\n", pcgate::sandbox::SANDBOX_CLIENT_SECRET),
    )
    .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let status = client().get(&url).send().await.unwrap().status();
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {status}: the rotated secret was not read"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Entra ID's rotation: add a second secret to the app registration...
    let (old, new) = (pcgate::sandbox::SANDBOX_CLIENT_SECRET, "the-second-secret");
    sandbox.accept(json!({"client_secrets": [old, new]})).await;
    // ...write it where the pod reads it (the kubelet swaps the file)...
    replace_file(&file, &format!("{new}\n"));
    let (old_sent, new_sent) = (
        format!("client_secret sha256:{}", fingerprint(old)),
        format!("client_secret sha256:{}", fingerprint(new)),
    );
    let deadline = Instant::now() + WAIT;
    while !sandbox
        .token_clients()
        .await
        .iter()
        .any(|(c, _)| *c == new_sent)
    {
        assert!(
            Instant::now() < deadline,
            "the next refresh did not send the new secret: {:?}",
            sandbox.token_clients().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...and delete the first. From here on the sandbox refuses it.
    sandbox.accept(json!({"client_secrets": [new]})).await;
    sandbox.reset_log().await;
    // Several refreshes later, every call was served and every token request was answered 200:
    // none carried the old secret.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        assert_eq!(client().get(&url).send().await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let clients = sandbox.token_clients().await;
    assert!(clients.len() >= 2, "too few refreshes: {clients:?}");
    assert!(
        clients
            .iter()
            .all(|(c, status)| *c == new_sent && *status == 200),
        "{clients:?}"
    );
    assert!(!clients.iter().any(|(c, _)| *c == old_sent));
    std::fs::remove_dir_all(dir).unwrap();
}

/// The gateway config of the sandbox, its credentials (`app`, and `user` with a seeded
/// refresh-token file in `dir`) authenticating with the certificate files given, on the ports
/// given: nothing secret inline, so the printed config is the whole config.
fn certificate_config(
    sandbox: &TestSandbox,
    dir: &std::path::Path,
    (certificate_file, private_key_file): (&std::path::Path, &std::path::Path),
    (listen, admin): (u16, u16),
) -> pcgate::config::Config {
    let refresh_file = dir.join("refresh-token");
    std::fs::write(&refresh_file, SANDBOX_REFRESH_TOKEN).unwrap();
    let mut config = sandbox.config();
    config.server.listen = ([127, 0, 0, 1], listen).into();
    config.server.admin_listen = ([127, 0, 0, 1], admin).into();
    let certificate = pcgate::config::ClientSecret::Certificate {
        certificate_file: certificate_file.to_owned(),
        private_key_file: private_key_file.to_owned(),
    };
    config.app_mut().secret = certificate.clone();
    let user = config.user_mut();
    user.app.secret = certificate;
    user.refresh_token = None;
    user.refresh_token_file = Some(refresh_file);
    config.validate().expect("test config is valid");
    config
}

/// Writes a throwaway certificate and key into `dir` as `NAME.crt` / `NAME.key`.
fn write_certificate(
    dir: &std::path::Path,
    name: &str,
) -> (
    pcgate::sandbox::ThrowawayCertificate,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    use secrecy::ExposeSecret;
    let pair = pcgate::sandbox::throwaway_certificate(name).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, &pair.certificate_pem).unwrap();
    std::fs::write(&key, pair.private_key_pem.expose_secret()).unwrap();
    (pair, cert, key)
}

/// Runs `pcgate run` on `config` (written to `dir`), calls the summary and /readyz, stops it;
/// gives the summary's status and body, /readyz's, and everything the process logged. With
/// `until_ready`, /readyz is asked again (every 50 ms, for at most 10 s) until it answers 200:
/// the summary's call fetched one credential's token, and another's first refresh may still be
/// on its way.
async fn run_binary(
    config: &pcgate::config::Config,
    dir: &std::path::Path,
    name: &str,
    until_ready: bool,
) -> ((u16, String), (u16, String), String) {
    let config_file = dir.join(format!("{name}.toml"));
    let log_file = dir.join(format!("{name}.log"));
    let toml = config.to_toml();
    assert!(!toml.contains("[redacted]"), "{toml}");
    std::fs::write(&config_file, toml).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_pcgate"))
        .args(["--log-format", "text", "run", "--config"])
        .arg(&config_file)
        .env("RUST_LOG", "debug")
        .env_remove("PCGATE_CONFIG")
        .env_remove("AZURE_FEDERATED_TOKEN_FILE")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_file).unwrap())
        .spawn()
        .unwrap();
    wait_for_healthz(config.server.admin_listen.port()).await;
    let answer = |url: String| async move {
        let response = client().get(url).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    let summary = answer(format!(
        "http://{}/v1/invoices/summary",
        config.server.listen
    ))
    .await;
    let readyz_url = format!("http://{}/readyz", config.server.admin_listen);
    let mut readyz = answer(readyz_url.clone()).await;
    for _ in 0..200 {
        if !until_ready || readyz.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        readyz = answer(readyz_url.clone()).await;
    }
    terminate(child).await;
    (summary, readyz, std::fs::read_to_string(&log_file).unwrap())
}

/// Issue 15, item 2, through the binary: a certificate credential's signed assertion is accepted
/// by the sandbox (which trusts the certificate), and one signed by a key the app registration
/// does not know is refused, the 503 and /readyz saying what to do. No key and no assertion
/// reach the log.
#[tokio::test]
async fn a_certificate_credential_is_accepted_and_an_unknown_key_is_refused() {
    let dir = temp_dir("certificate-credential");
    let (trusted, trusted_cert, trusted_key) = write_certificate(&dir, "uploaded");
    let (_, other_cert, other_key) = write_certificate(&dir, "not-uploaded");
    let sandbox = start_sandbox(SandboxOptions {
        client_certificates: vec![trusted.certificate_pem.clone()],
        ..SandboxOptions::default()
    })
    .await;
    let key_lines: Vec<String> = std::fs::read_to_string(&trusted_key)
        .unwrap()
        .lines()
        .chain(
            std::fs::read_to_string(&other_key)
                .unwrap()
                .lines()
                .collect::<Vec<_>>(),
        )
        .filter(|line| !line.starts_with("-----"))
        .map(str::to_owned)
        .collect();

    let config = certificate_config(
        &sandbox,
        &dir,
        (&trusted_cert, &trusted_key),
        (free_port(), free_port()),
    );
    let ((status, body), (ready, readyz), log) = run_binary(&config, &dir, "accepted", true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ready, 200, "{readyz}");
    let clients = sandbox.token_clients().await;
    assert!(clients.len() >= 2, "both credentials: {clients:?}");
    assert!(
        clients
            .iter()
            .all(|(c, s)| c.starts_with("client_assertion x5t#S256:") && *s == 200),
        "{clients:?}"
    );
    assert!(log.contains("certificate credential loaded"), "{log}");
    for line in &key_lines {
        assert!(!log.contains(line.as_str()), "a key line in the log");
    }
    assert!(!log.contains("eyJ"), "an assertion (a JWT) in the log");

    sandbox.reset_log().await;
    let config = certificate_config(
        &sandbox,
        &dir,
        (&other_cert, &other_key),
        (free_port(), free_port()),
    );
    let ((status, body), (ready, readyz), log) = run_binary(&config, &dir, "refused", false).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("AADSTS700027") && body.contains("upload the certificate"),
        "{body}"
    );
    assert_eq!(ready, 503);
    assert!(
        readyz.contains("app (") && readyz.contains("700027"),
        "{readyz}"
    );
    assert!(log.contains("upload the certificate"), "{log}");
    let refused = sandbox.token_clients().await;
    assert!(
        !refused.is_empty() && refused.iter().all(|(_, s)| *s == 401),
        "{refused:?}"
    );
    for text in [&log, &body, &readyz] {
        assert!(!text.contains("eyJ"), "an assertion in {text}");
        for line in &key_lines {
            assert!(!text.contains(line.as_str()), "a key line in the output");
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A certificate and a key that do not belong together, or a federated token file that is not
/// there, stop the start naming the credential and the file.
#[tokio::test]
async fn certificate_and_token_files_that_cannot_work_fail_the_start_naming_the_file() {
    let dir = temp_dir("credential-files");
    let (_, cert_a, _) = write_certificate(&dir, "a");
    let (_, _, key_b) = write_certificate(&dir, "b");
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let mut config = sandbox.config();
    config.app_mut().secret = pcgate::config::ClientSecret::Certificate {
        certificate_file: cert_a.clone(),
        private_key_file: key_b.clone(),
    };
    let error = pcgate::Gateway::bind(on_loopback(config))
        .await
        .err()
        .expect("start-up fails")
        .to_string();
    assert!(
        error.contains("credential `app`")
            && error.contains(&key_b.display().to_string())
            && error.contains("is not the key of certificate_file"),
        "{error}"
    );
    let mut config = sandbox.config();
    let missing = dir.join("azure-identity-token");
    config.app_mut().secret = pcgate::config::ClientSecret::Federated(missing.clone());
    let error = pcgate::Gateway::bind(on_loopback(config))
        .await
        .err()
        .expect("start-up fails")
        .to_string();
    assert!(
        error.contains("credential `app`")
            && error.contains(&missing.display().to_string())
            && error.contains("azure.workload.identity/use"),
        "{error}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Issue 15, item 3, through the binary as the AKS webhook sets it up: the config names no client
/// id, tenant or secret; AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_AUTHORITY_HOST and
/// AZURE_FEDERATED_TOKEN_FILE do. The token file's content is the assertion; when the kubelet
/// rotates it, the next token request sends the new one (the sandbox, told to accept only the new
/// token, saw it and answered 200).
#[tokio::test]
async fn a_workload_identity_token_file_that_changes_is_read_again() {
    let (first, second) = ("eyJfirst.projected.token", "eyJsecond.projected.token");
    let sandbox = start_sandbox(SandboxOptions {
        token_ttl: Duration::from_secs(2),
        federated_tokens: vec![first.to_owned()],
        ..SandboxOptions::default()
    })
    .await;
    let dir = temp_dir("workload-identity");
    let token_file = dir.join("azure-identity-token");
    replace_file(&token_file, first);
    let (listen, admin) = (free_port(), free_port());
    let config_file = dir.join("pcgate.toml");
    std::fs::write(
        &config_file,
        format!(
            "[server]\nlisten = \"127.0.0.1:{listen}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             [upstream]\nbase_url = \"{}\"\n\
             [credentials.app]\ngrant = \"client_credentials\"\nrefresh_before = \"1s\"\n\
             [[routes]]\nname = \"invoices\"\nmatch = \"GET /v1/invoices\"\ncredential = \"app\"\n",
            sandbox.base_url
        ),
    )
    .unwrap();
    let log_file = dir.join("log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_pcgate"))
        .args(["--log-format", "text", "run", "--config"])
        .arg(&config_file)
        .env("RUST_LOG", "debug")
        .env_remove("PCGATE_CONFIG")
        .env("AZURE_CLIENT_ID", pcgate::sandbox::SANDBOX_CLIENT_ID)
        .env("AZURE_TENANT_ID", pcgate::sandbox::SANDBOX_TENANT)
        .env("AZURE_AUTHORITY_HOST", format!("{}/", sandbox.base_url))
        .env("AZURE_FEDERATED_TOKEN_FILE", &token_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_file).unwrap())
        .spawn()
        .unwrap();
    wait_for_healthz(admin).await;
    let url = format!("http://127.0.0.1:{listen}/v1/invoices?size=1");
    assert_eq!(client().get(&url).send().await.unwrap().status(), 200);
    let (first_sent, second_sent) = (
        format!("federated sha256:{}", fingerprint(first)),
        format!("federated sha256:{}", fingerprint(second)),
    );
    let clients = sandbox.token_clients().await;
    assert!(
        clients.iter().all(|(c, s)| *c == first_sent && *s == 200),
        "{clients:?}"
    );

    // The kubelet rotates the projected token; Entra ID would take either until the first
    // expires: the sandbox is stricter and takes only the new one from now on.
    sandbox.accept(json!({"federated_tokens": [second]})).await;
    replace_file(&token_file, second);
    sandbox.reset_log().await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        assert_eq!(client().get(&url).send().await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    terminate(child).await;
    let clients = sandbox.token_clients().await;
    assert!(clients.len() >= 2, "too few refreshes: {clients:?}");
    assert!(
        clients.iter().all(|(c, s)| *c == second_sent && *s == 200),
        "{clients:?}"
    );
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(log.contains("federated_token_file changed"), "{log}");
    assert!(!log.contains("eyJ"), "a token in the log: {log}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The AKS webhook's variables come from the environment, not the reviewed config file: an
/// `AZURE_AUTHORITY_HOST` in clear text off loopback, or an `AZURE_TENANT_ID` that is not one
/// path segment, would send the federated token elsewhere. Both `check-config` and `run` refuse
/// such a workload identity credential with exit 64 and a message naming the variable.
#[tokio::test]
async fn webhook_variables_that_would_send_the_token_elsewhere_stop_check_config_and_run() {
    let dir = temp_dir("webhook-variables");
    let token_file = dir.join("azure-identity-token");
    replace_file(&token_file, "eyJprojected.token");
    let config_file = dir.join("pcgate.toml");
    std::fs::write(
        &config_file,
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [credentials.app]\ngrant = \"client_credentials\"\n\
         [[routes]]\nname = \"invoices\"\nmatch = \"GET /v1/invoices\"\ncredential = \"app\"\n",
    )
    .unwrap();
    let cases = [
        (
            "AZURE_AUTHORITY_HOST",
            "http://login.pcgate-test.invalid/",
            "72f988bf-86f1-41af-91ab-2d7cd011db47",
        ),
        (
            "AZURE_TENANT_ID",
            "https://login.microsoftonline.com/",
            "evil.example/x?",
        ),
    ];
    for (variable, authority, tenant) in cases {
        for command in ["check-config", "run"] {
            let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pcgate"))
                .args(["--log-format", "text", command, "--config"])
                .arg(&config_file)
                .env_remove("PCGATE_CONFIG")
                .env("AZURE_CLIENT_ID", "wi-client")
                .env("AZURE_TENANT_ID", tenant)
                .env("AZURE_AUTHORITY_HOST", authority)
                .env("AZURE_FEDERATED_TOKEN_FILE", &token_file)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + WAIT;
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("pcgate {command} did not exit");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let output = child.wait_with_output().unwrap();
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert_eq!(output.status.code(), Some(64), "{command}: {said}");
            assert!(
                said.contains("credentials.app") && said.contains(variable),
                "{command}: {said}"
            );
            assert!(!said.contains("eyJ"), "{command}: {said}");
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// The sandbox checks an assertion's `aud` against its own token URL, as Entra ID checks its
/// own: an assertion made out to another host is refused even when the request's Host header
/// names that host; one made out to the sandbox is accepted over HTTP/1.1 and HTTP/2 alike.
#[tokio::test]
async fn the_sandbox_takes_an_assertions_aud_from_its_own_address_not_the_host_header() {
    use secrecy::ExposeSecret;
    let dir = temp_dir("sandbox-aud");
    let (pair, _, _) = write_certificate(&dir, "uploaded");
    let sandbox = start_sandbox(SandboxOptions {
        client_certificates: vec![pair.certificate_pem.clone()],
        ..SandboxOptions::default()
    })
    .await;
    let der = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(pair.certificate_pem.as_bytes()).unwrap()
    };
    let key =
        jsonwebtoken::EncodingKey::from_rsa_pem(pair.private_key_pem.expose_secret().as_bytes())
            .unwrap();
    let sign = |aud: &str, jti: &str| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::PS256);
        header.x5t_s256 = Some(pcgate::token::assertion::thumbprints(der.as_ref()).1);
        let claims = json!({
            "aud": aud, "iss": pcgate::sandbox::SANDBOX_CLIENT_ID,
            "sub": pcgate::sandbox::SANDBOX_CLIENT_ID, "exp": now + 600, "nbf": now,
            "iat": now, "jti": jti,
        });
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    };
    let post = |client: reqwest::Client, assertion: String, host: Option<&'static str>| {
        let url = sandbox.token_url.clone();
        async move {
            let mut request = client.post(url).form(&[
                ("grant_type", "client_credentials"),
                ("client_id", pcgate::sandbox::SANDBOX_CLIENT_ID),
                (
                    "client_assertion_type",
                    pcgate::token::assertion::JWT_BEARER,
                ),
                ("client_assertion", assertion.as_str()),
                ("resource", "https://api.partnercenter.microsoft.com"),
            ]);
            if let Some(host) = host {
                request = request.header("host", host);
            }
            let response = request.send().await.unwrap();
            (
                response.status().as_u16(),
                response.version(),
                response.text().await.unwrap(),
            )
        }
    };
    let elsewhere = format!(
        "http://login.example/{}/oauth2/token",
        pcgate::sandbox::SANDBOX_TENANT
    );
    let (status, _, body) = post(
        client(),
        sign(&elsewhere, "elsewhere"),
        Some("login.example"),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body.contains("700027") && body.contains("audience"),
        "{body}"
    );

    let (status, version, body) = post(client(), sign(&sandbox.token_url, "h1"), None).await;
    assert_eq!(
        (status, version),
        (200, reqwest::Version::HTTP_11),
        "{body}"
    );
    let h2 = reqwest::Client::builder()
        .use_preconfigured_tls(pcgate::upstream::tls_config(None).unwrap())
        .http2_prior_knowledge()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .unwrap();
    let (status, version, body) = post(h2, sign(&sandbox.token_url, "h2"), None).await;
    assert_eq!((status, version), (200, reqwest::Version::HTTP_2), "{body}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A token endpoint that accepts and never answers: the caller gets its answer by the call's
/// deadline (`upstream.deadline`), not after the token request's own 30 s limit.
#[tokio::test]
async fn a_silent_token_endpoint_costs_a_caller_its_deadline_not_the_token_timeout() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        // Bounded: a few connections are all one gateway makes here.
        for _ in 0..16 {
            match tokio::time::timeout(WAIT, listener.accept()).await {
                Ok(Ok((stream, _))) => held.push(stream),
                _ => break,
            }
        }
    });
    let mut config = with_app_token_url(&sandbox, &format!("http://{addr}/tenant/oauth2/token"));
    config.upstream.deadline = Duration::from_secs(1);
    config.upstream.attempt_timeout = Duration::from_secs(1);
    let gateway = start_config(config).await;
    for _ in 0..2 {
        let started = Instant::now();
        let response = get(&gateway, "/v1/invoices?size=1").await;
        let took = started.elapsed();
        assert_eq!(response.status(), 504, "the call's deadline passed");
        assert!(
            took < Duration::from_secs(3),
            "answered after {took:?}, past the 1 s deadline"
        );
    }
    silent.abort();
}
