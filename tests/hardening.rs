//! Issue 12: what an adversarial review found, each defect driven from loopback by a misbehaving
//! upstream or client started here. Every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use pcgate::config::{RouteConfig, UpstreamConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// An upstream that reads one request head per connection and answers with what `answer` writes.
struct RawOrigin {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn raw_origin<F, Fut>(answer: F) -> RawOrigin
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = std::sync::Arc::new(answer);
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                answer(stream).await;
            });
        }
    });
    RawOrigin { addr, task }
}

/// A gateway in front of `base_url` with one static credential, `fixed`, and these routes.
async fn gateway_for(
    base_url: &str,
    upstream: impl FnOnce(&mut UpstreamConfig),
    routes: Vec<RouteConfig>,
) -> TestGateway {
    let mut config = invoices_config(base_url);
    config
        .credentials
        .insert("fixed".to_owned(), static_credential("t"));
    upstream(&mut config.upstream);
    config.routes = routes;
    start_config(config).await
}

/// A route sending the `fixed` credential.
fn fixed(name: &str, patterns: &[&str]) -> RouteConfig {
    RouteConfig {
        credential: Some("fixed".to_owned()),
        ..route(name, patterns)
    }
}

/// Statement and receipt PDFs: streamed, retried.
fn documents() -> Vec<RouteConfig> {
    vec![RouteConfig {
        retry: true,
        ..fixed("documents", &["GET /v1/invoices/*/documents/**"])
    }]
}

/// The upstream's attempt timeout and deadline both `limit`.
fn one_limit(limit: Duration) -> impl FnOnce(&mut UpstreamConfig) {
    move |upstream| {
        upstream.attempt_timeout = limit;
        upstream.deadline = limit;
    }
}

/// Reads a streamed body to its end; `Err` when it broke off. Panics if it is still going after
/// `limit`, which is what a body without a deadline does.
async fn body_outcome(response: reqwest::Response, limit: Duration) -> Result<usize, String> {
    let mut response = response;
    let read = async {
        let mut total = 0;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => total += chunk.len(),
                Ok(None) => return Ok(total),
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .expect("the body was still streaming long after upstream.deadline")
}

#[tokio::test]
async fn a_body_that_stalls_is_cut_at_the_deadline() {
    let origin = raw_origin(|mut stream| async move {
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n%PDF-1.4 partial")
            .await;
        // Then nothing, for far longer than the deadline.
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let gateway = gateway_for(
        &format!("http://{}", origin.addr),
        one_limit(secs(1)),
        documents(),
    )
    .await;
    let response = client()
        .get(gateway.url("/v1/invoices/G1/documents/statement"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let outcome = body_outcome(response, Duration::from_secs(6)).await;
    assert!(
        outcome.is_err(),
        "a stalled body must not end cleanly: {outcome:?}"
    );
}

#[tokio::test]
async fn a_body_that_never_ends_is_cut_at_the_deadline() {
    let origin = raw_origin(|mut stream| async move {
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await;
        // A chunk every 5 ms, bounded at 6000 (30 s): far past the deadline.
        for _ in 0..6000 {
            if stream.write_all(b"400\r\n").await.is_err()
                || stream.write_all(&[b'x'; 1024]).await.is_err()
                || stream.write_all(b"\r\n").await.is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let gateway = gateway_for(
        &format!("http://{}", origin.addr),
        one_limit(secs(1)),
        documents(),
    )
    .await;
    let response = client()
        .get(gateway.url("/v1/invoices/G1/documents/statement"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let outcome = body_outcome(response, Duration::from_secs(6)).await;
    assert!(outcome.is_err(), "an endless body must be cut: {outcome:?}");
}

#[tokio::test]
async fn a_body_that_ends_before_the_deadline_is_whole() {
    let origin = origin(|_| async { text(200, "%PDF-1.4 whole statement") }).await;
    let gateway = gateway_for(
        &origin.base_url(),
        |upstream| upstream.deadline = secs(30),
        documents(),
    )
    .await;
    let response = client()
        .get(gateway.url("/v1/invoices/G1/documents/statement"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "%PDF-1.4 whole statement");
}

#[tokio::test]
async fn an_upstream_that_breaks_mid_body_on_a_buffered_route_is_a_502() {
    let origin = raw_origin(|mut stream| async move {
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"totalCharges\":")
            .await;
        // Then the connection goes away: the body is 990 bytes short.
    })
    .await;
    let gateway = gateway_for(
        &format!("http://{}", origin.addr),
        |_| {},
        vec![
            RouteConfig {
                cache_ttl: Some(secs(300)),
                coalesce: true,
                ..fixed("summary", &["GET /v1/invoices/summary"])
            },
            RouteConfig {
                coalesce: true,
                ..fixed("invoices", &["GET /v1/invoices"])
            },
        ],
    )
    .await;
    for path in ["/v1/invoices/summary", "/v1/invoices"] {
        let response = client().get(gateway.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 502, "{path}");
        let fault: serde_json::Value = response.json().await.unwrap();
        assert_eq!(fault["errorName"], "UpstreamFailed", "{path}: {fault}");
    }
}

#[tokio::test]
async fn a_malformed_chunked_request_body_is_a_400() {
    // An upstream that takes the request and never answers: the only failure is the caller's body.
    let origin = raw_origin(|stream| async move {
        let _held = stream;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let gateway = gateway_for(
        &format!("http://{}", origin.addr),
        |_| {},
        vec![fixed("invoices", &["POST /v1/invoices"])],
    )
    .await;
    // A chunk size that is not hex: the caller's body is broken, not the upstream. (A write route:
    // hyper sends no body for a GET of unknown length.)
    let status = raw_status(
        gateway.addr,
        b"POST /v1/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n",
    )
    .await;
    assert_eq!(status, 400);
}

/// `check-config` and `run` agree: what `run` could not start (or would start unsafely) is refused
/// by `check-config` with exit 64 naming the key.
#[test]
fn check_config_refuses_what_run_could_not_start() {
    let dir = std::env::temp_dir().join(format!("pcgate-hardening-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base =
        "[upstream]\nbase_url = \"http://127.0.0.1:9\"\n[[routes]]\nmatch = \"GET /v1/invoices\"\n";
    for (extra, key) in [
        (
            "[retry]\nbudget_min_per_second = 2147483647",
            "retry.budget_min_per_second",
        ),
        (
            "[tracking]\napplication = \"a\\u0001b\"",
            "tracking.application",
        ),
        ("[server]\nlisten = \"0.0.0.0:8080\"", "server.listen"),
    ] {
        let file = dir.join("pcgate.toml");
        std::fs::write(&file, format!("{base}{extra}\n")).unwrap();
        for command in ["check-config", "run"] {
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_pcgate"))
                .args([command, "--config"])
                .arg(&file)
                .env_remove("PCGATE_CONFIG")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(64), "{command} {key}: {stderr}");
            assert!(stderr.contains(key), "{command} {key}: {stderr}");
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Sends a raw HTTP/1.1 request with these extra header lines; returns the status and the head.
async fn raw_call(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("an answer within the wait")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    (first_status(answer.as_bytes()), answer)
}

#[tokio::test]
async fn admin_answers_only_ip_literals_localhost_and_listed_names() {
    let origin = origin(|_| async { text(200, "{}") }).await;
    let mut config = invoices_config(&origin.base_url());
    config.routes = vec![RouteConfig {
        name: None,
        ..route("", &["GET /v1/invoices"])
    }];
    config.server.admin_hosts = vec!["pcgate-admin.billing.svc".to_owned()];
    let gateway = start_config(config).await;
    let admin = gateway.admin;
    for host in [
        format!("{admin}"),
        "localhost:9090".to_owned(),
        "10.244.1.7:9090".to_owned(),
        "[::1]:9090".to_owned(),
        "pcgate-admin.billing.svc:9090".to_owned(),
    ] {
        let (status, head) = raw_call(admin, "GET", "/healthz", &format!("Host: {host}\r\n")).await;
        assert_eq!(status, 200, "{host}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("cache-control: no-store"),
            "{head}"
        );
    }
    // A rebinding page: its own name in Host.
    let (status, head) =
        raw_call(admin, "GET", "/metrics", "Host: attacker.example:9090\r\n").await;
    assert_eq!(status, 421, "{head}");
    assert!(head.contains("MisdirectedRequest"), "{head}");
    assert!(!head.contains("pcgate_requests_total"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("cache-control: no-store"),
        "{head}"
    );
    // The gateway port without inbound keys follows the same rule.
    let (status, head) = raw_call(
        gateway.addr,
        "GET",
        "/v1/invoices",
        "Host: attacker.example\r\n",
    )
    .await;
    assert_eq!(status, 421, "{head}");
    assert!(
        origin.requests().is_empty(),
        "a misdirected call reached the upstream"
    );
    let (status, _) = raw_call(
        gateway.addr,
        "GET",
        "/v1/invoices",
        &format!("Host: {}\r\n", gateway.addr),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn admin_refuses_a_purge_from_another_origin() {
    let sandbox = start_sandbox(pcgate::sandbox::SandboxOptions::default()).await;
    let gateway = start_config(sandbox.config()).await;
    let summary = gateway.url("/v1/invoices/summary");
    assert_eq!(client().get(&summary).send().await.unwrap().status(), 200);
    let host = format!("Host: {}\r\n", gateway.admin);
    // A web page the operator has open posts to the admin port.
    for origin in ["https://evil.example", "null", "http://127.0.0.1:8080"] {
        let (status, head) = raw_call(
            gateway.admin,
            "POST",
            "/cache/purge",
            &format!("{host}Origin: {origin}\r\n"),
        )
        .await;
        assert_eq!(status, 403, "{origin}: {head}");
        assert!(head.contains("ForeignOrigin"), "{head}");
    }
    let cached = client().get(&summary).send().await.unwrap();
    let status = cached.headers()["cache-status"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(status.contains("hit"), "the entry was purged: {status}");
    // The operator's own curl (no Origin) and a same-origin page may purge.
    let (status, head) = raw_call(gateway.admin, "POST", "/cache/purge", &host).await;
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("\"purged\":1"), "{head}");
    let (status, _) = raw_call(
        gateway.admin,
        "POST",
        "/cache/purge",
        &format!("{host}Origin: http://{}\r\n", gateway.admin),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn request_ids_reach_the_upstream_in_one_canonical_form_and_nil_is_refused() {
    let origin = origin(|_| async { text(200, "{}") }).await;
    let gateway = gateway_for(
        &origin.base_url(),
        |_| {},
        vec![RouteConfig {
            name: None,
            ..fixed("", &["GET /v1/invoices"])
        }],
    )
    .await;
    let url = gateway.url("/v1/invoices");
    let response = client()
        .get(&url)
        .header("MS-RequestId", "{A45E6643-1CAF-4429-8F90-07C03D85BC2B}")
        .header(
            "MS-CorrelationId",
            "urn:uuid:b45e6643-1caf-4429-8f90-07c03d85bc2b",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let canonical = "a45e6643-1caf-4429-8f90-07c03d85bc2b";
    assert_eq!(response.headers()["ms-requestid"], canonical);
    let seen = &origin.requests()[0].headers;
    assert_eq!(seen["ms-requestid"], canonical);
    assert_eq!(
        seen["ms-correlationid"],
        "b45e6643-1caf-4429-8f90-07c03d85bc2b"
    );
    let response = client()
        .get(&url)
        .header("MS-RequestId", "00000000-0000-0000-0000-000000000000")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(origin.requests().len(), 1, "a nil id reached the upstream");
}
