//! Adversarial review of the issue 12 fixes: probes for bypasses, from loopback, as an attacker
//! or a broken network would speak. Raw TCP on 127.0.0.1; every wait is bounded.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long a connection that should be closed may take to be seen closed.
const CLOSED_WITHIN: Duration = Duration::from_secs(5);

/// A gateway config: no credentials, `GET /v1/invoices/**` to `base_url`, `server` lines and
/// extra tables added.
fn config(base_url: &str, server: &str, rest: &str) -> String {
    format!(
        r#"
        [server]
        {server}
        [upstream]
        base_url = "{base_url}"
        [[routes]]
        name = "invoices"
        match = ["GET /v1/invoices", "GET /v1/invoices/**"]
        {rest}
        "#
    )
}

/// Reads until the peer closes (EOF or reset); the bytes read. `Err` with what was read if it
/// stays open `within`.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Result<Vec<u8>, Vec<u8>> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(seen),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => return Err(seen),
        }
    }
}

/// The status of the first HTTP/1 response in `bytes` (0 if none).
fn first_status(bytes: &[u8]) -> u16 {
    String::from_utf8_lossy(bytes)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

// ---- framing: Content-Length with Transfer-Encoding ----

/// hyper ignores a `Content-Length` that comes after `Transfer-Encoding` without parsing it, so
/// one it cannot parse is as much a second framing as one it can: a front proxy that reads
/// `Content-Length: 5, 5` (a list RFC 9110 §8.6 lets it accept) as 5 and pcgate, which reads the
/// chunked body, disagree on where the next request starts.
#[tokio::test]
async fn transfer_encoding_then_an_unparsable_content_length_is_still_refused() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let gateway = start_gateway(&config(&origin.base_url(), "", "")).await;
    for length in ["5, 5", "x", "-1", "5 5"] {
        let request = format!(
            "GET /v1/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Transfer-Encoding: chunked\r\nContent-Length: {length}\r\n\r\n0\r\n\r\n"
        );
        let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let answered = read_until_closed(&mut stream, CLOSED_WITHIN)
            .await
            .unwrap_or_else(|seen| {
                panic!(
                    "Content-Length: {length}: still open after {CLOSED_WITHIN:?}: {}",
                    String::from_utf8_lossy(&seen)
                )
            });
        assert_eq!(
            first_status(&answered),
            400,
            "Content-Length: {length}: {}",
            String::from_utf8_lossy(&answered)
        );
    }
    assert!(origin.requests().is_empty(), "nothing reached the upstream");
}

// ---- the gateway port and web pages ----

/// With no inbound keys the gateway port trusts whoever reaches it on loopback, so a web page
/// the operator opens can post to it (a form's `text/plain` POST needs no preflight) and the
/// call goes out with the partner's credential. The Host rule does not stop it: the page names
/// `127.0.0.1`. Browsers send `Origin` on every cross-site POST; the gateway must refuse a
/// foreign one as the admin port does (README: "A web page reaches pcgate (... cross-site
/// posts)").
#[tokio::test]
async fn a_cross_site_post_to_the_gateway_port_is_refused() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let gateway = start_gateway(&config(
        &origin.base_url(),
        "",
        r#"
        [[routes]]
        name = "post"
        match = "POST /v1/customers/*/carts"
        "#,
    ))
    .await;
    let body = "x=1";
    let request = format!(
        "POST /v1/customers/c1/carts HTTP/1.1\r\nHost: {addr}\r\nOrigin: https://evil.example\r\n\
         Content-Type: text/plain\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{body}",
        addr = gateway.addr,
        len = body.len()
    );
    let status = raw_status(gateway.addr, request.as_bytes()).await;
    assert_eq!(status, 403);
    assert!(origin.requests().is_empty(), "nothing reached the upstream");

    // A caller that is no web page (no Origin), and the listener's own origin, still pass.
    for extra in ["", &format!("Origin: http://{}\r\n", gateway.addr)] {
        let request = format!(
            "POST /v1/customers/c1/carts HTTP/1.1\r\nHost: {addr}\r\n{extra}\
             Content-Type: text/plain\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{body}",
            addr = gateway.addr,
            len = body.len()
        );
        assert_eq!(raw_status(gateway.addr, request.as_bytes()).await, 200);
    }
}
