//! Adversarial review of the issue 12 fixes: probes for bypasses, from loopback, as an attacker
//! or a broken network would speak. Raw TCP on 127.0.0.1; every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

// ---- framing: Content-Length with Transfer-Encoding ----

/// hyper ignores a `Content-Length` that comes after `Transfer-Encoding` without parsing it, so
/// one it cannot parse is as much a second framing as one it can: a front proxy that reads
/// `Content-Length: 5, 5` (a list RFC 9110 §8.6 lets it accept) as 5 and pcgate, which reads the
/// chunked body, disagree on where the next request starts.
#[tokio::test]
async fn transfer_encoding_then_an_unparsable_content_length_is_still_refused() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let gateway = start_config(invoices_config(&origin.base_url())).await;
    for length in ["5, 5", "x", "-1", "5 5"] {
        let request = format!(
            "GET /v1/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Transfer-Encoding: chunked\r\nContent-Length: {length}\r\n\r\n0\r\n\r\n"
        );
        let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let answered = try_read_until_closed(&mut stream, CLOSED_WITHIN)
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
    let mut config = invoices_config(&origin.base_url());
    config
        .routes
        .push(route("post", &["POST /v1/customers/*/carts"]));
    let gateway = start_config(config).await;
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

// ---- HTTP/2 by hand ----

/// Opens an h2c connection whose SETTINGS give the server a send window of zero
/// (SETTINGS_INITIAL_WINDOW_SIZE = 0), and asks for `path` on a few streams: the answers' heads
/// can come, their bodies never can. Acknowledges the server's SETTINGS and nothing else.
async fn h2_never_reading(addr: SocketAddr, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[0x00, 0x04, 0, 0, 0, 0]));
    for id in [1, 3, 5] {
        hello.extend(get_headers(id, path));
    }
    stream.write_all(&hello).await.unwrap();
    // The server's SETTINGS come first: acknowledge them, so nothing is left to time out on.
    let (kind, ..) = read_frame(&mut stream, Instant::now() + WAIT)
        .await
        .expect("the server's SETTINGS before any close");
    assert_eq!(kind, SETTINGS);
    stream
        .write_all(&frame(SETTINGS, ACK, 0, &[]))
        .await
        .unwrap();
    stream
}

/// A client that asks and never lets an answer's body through holds its connection (and a file
/// descriptor) for as long as it likes: the call counts as in flight until the body is finished,
/// hyper only polls a body it has room to send, so neither the idle timer, the header timer nor
/// `upstream.deadline` ever fires. A few hundred such sockets lock real callers out, as item 2's
/// silent sockets did.
#[tokio::test]
async fn an_http2_client_that_never_opens_its_window_is_closed() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let mut config = invoices_config(&origin.base_url());
    config.server.header_read_timeout = ms(300);
    config.server.idle_timeout = ms(300);
    config.upstream.attempt_timeout = secs(1);
    config.upstream.deadline = secs(1);
    let gateway = start_config(config).await;
    let mut open = Vec::new();
    for (addr, path) in [(gateway.addr, "/v1/invoices"), (gateway.admin, "/healthz")] {
        let mut stream = h2_never_reading(addr, path).await;
        // Deadline and idle timers are 1 s and 300 ms: stalled for 1.3 s, then closed.
        let within = Duration::from_secs(2) + CLOSED_WITHIN;
        if try_read_until_closed(&mut stream, within).await.is_err() {
            open.push(path);
        }
    }
    assert!(open.is_empty(), "still open: {open:?}");
}
