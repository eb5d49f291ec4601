//! Issue 12, items 2, 9 (framing) and 13 (shutdown): connections that never finish are closed,
//! and a request framed two ways is refused. Raw TCP on 127.0.0.1, as an attacker or a broken
//! network would speak; HTTP/2 frames are written by hand.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::StreamBody;
use hyper::body::Frame;
use pcgate::body::{self, Response};
use pcgate::sandbox::SandboxOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Reads one whole HTTP/1 response with a `Content-Length` body; the head and the body.
async fn read_response(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .expect("a content-length");
            if seen.len() >= end + 4 + length {
                return (head, seen[end + 4..end + 4 + length].to_vec());
            }
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("a response within WAIT")
            .unwrap();
        assert!(n > 0, "closed before a whole response");
        seen.extend_from_slice(&buf[..n]);
    }
}

/// Splits bytes read from a connection into HTTP/1 responses with `Content-Length` bodies.
fn responses(mut bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().unwrap())
            .expect("a content-length");
        let body = bytes[end + 4..end + 4 + length].to_vec();
        bytes = &bytes[end + 4 + length..];
        out.push((head, body));
    }
    assert!(bytes.is_empty(), "bytes left after the responses");
    out
}

// ---- HTTP/2 by hand (RFC 9113) ----

/// Opens an h2c connection (preface and SETTINGS) and makes one GET; returns once its answer has
/// ended. The client acknowledges SETTINGS and nothing else: it never answers a PING.
async fn h2_call(addr: SocketAddr, path: &str) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    hello.extend(get_headers(1, path));
    stream.write_all(&hello).await.unwrap();
    let deadline = Instant::now() + WAIT;
    let mut body = Vec::new();
    loop {
        let (kind, flags, id, payload) = read_frame(&mut stream, deadline)
            .await
            .expect("the call is answered before the connection closes");
        if kind == SETTINGS && flags & ACK == 0 {
            stream
                .write_all(&frame(SETTINGS, ACK, 0, &[]))
                .await
                .unwrap();
        }
        if kind == DATA && id == 1 {
            body.extend_from_slice(&payload);
        }
        if (kind == HEADERS || kind == DATA) && id == 1 && flags & END_STREAM != 0 {
            return (stream, body);
        }
    }
}

// ---- heads that never come ----

/// The short timeouts the tests configure.
const SHORT: Duration = Duration::from_millis(300);

#[tokio::test]
async fn a_socket_that_sends_nothing_is_closed_after_header_read_timeout() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let mut config = invoices_config(&origin.base_url());
    config.server.header_read_timeout = SHORT;
    let gateway = start_config(config).await;
    for addr in [gateway.addr, gateway.admin] {
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let seen = read_until_closed(&mut silent, CLOSED_WITHIN).await;
        assert!(seen.is_empty(), "nothing is answered to nothing");
    }
    // The listener still serves.
    let status = client()
        .get(gateway.url("/v1/invoices"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_partial_http2_preface_is_closed_after_header_read_timeout() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let mut config = invoices_config(&origin.base_url());
    config.server.header_read_timeout = SHORT;
    let gateway = start_config(config).await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    read_until_closed(&mut stream, CLOSED_WITHIN).await;
}

#[tokio::test]
async fn an_http2_client_that_sends_settings_but_no_headers_is_closed() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let mut config = invoices_config(&origin.base_url());
    config.server.header_read_timeout = SHORT;
    config.server.idle_timeout = secs(30);
    let gateway = start_config(config).await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    stream.write_all(&hello).await.unwrap();
    let kinds = frames_until_closed(&mut stream, CLOSED_WITHIN).await;
    assert!(kinds.contains(&SETTINGS), "it spoke HTTP/2: {kinds:?}");
}

#[tokio::test]
async fn a_later_http1_head_that_stalls_is_closed_after_header_read_timeout() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let mut config = invoices_config(&origin.base_url());
    config.server.header_read_timeout = SHORT;
    config.server.idle_timeout = secs(30);
    let gateway = start_config(config).await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream
        .write_all(b"GET /v1/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut stream).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, b"ok");
    // Kept alive; now half a head, and nothing more.
    stream
        .write_all(b"GET /v1/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    read_until_closed(&mut stream, CLOSED_WITHIN).await;
}

// ---- idle connections ----

#[tokio::test]
async fn an_idle_http1_keep_alive_connection_is_closed_after_idle_timeout() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let mut config = invoices_config(&origin.base_url());
    config.server.header_read_timeout = secs(30);
    config.server.idle_timeout = SHORT;
    let gateway = start_config(config).await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    for _ in 0..2 {
        stream
            .write_all(b"GET /v1/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = read_response(&mut stream).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
    }
    let rest = read_until_closed(&mut stream, CLOSED_WITHIN).await;
    assert!(rest.is_empty(), "closed without another answer");
}

#[tokio::test]
async fn an_idle_http2_connection_gets_a_goaway_then_is_closed() {
    let origin = origin(|_| async { text(200, "h2") }).await;
    let mut config = invoices_config(&origin.base_url());
    config.server.header_read_timeout = secs(30);
    config.server.idle_timeout = SHORT;
    let gateway = start_config(config).await;
    let (mut stream, body) = h2_call(gateway.addr, "/v1/invoices").await;
    assert_eq!(body, b"h2");
    let kinds = frames_until_closed(&mut stream, CLOSED_WITHIN).await;
    assert!(
        kinds.contains(&GOAWAY),
        "a GOAWAY comes before the close: {kinds:?}"
    );
}

#[tokio::test]
async fn a_call_in_flight_longer_than_idle_timeout_is_not_cut() {
    // The origin answers after 1 s, then streams its body over another second: four times the
    // idle timeout in all, while the connection has a call in flight.
    let origin = origin(|_| async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let (tx, rx) = mpsc::channel::<Bytes>(1);
        tokio::spawn(async move {
            for part in ["first ", "second ", "third"] {
                let _ = tx.send(Bytes::from_static(part.as_bytes())).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), rx))
        });
        let response: Response = Response::new(body::boxed(StreamBody::new(stream)));
        response
    })
    .await;
    let mut config = invoices_config(&origin.base_url());
    config.server.header_read_timeout = SHORT;
    config.server.idle_timeout = SHORT;
    let gateway = start_config(config).await;
    let h1 = client();
    let h2 = h2_client();
    let (a, b) = tokio::join!(
        h1.get(gateway.url("/v1/invoices/slow")).send(),
        h2.get(gateway.url("/v1/invoices/slow")).send(),
    );
    for response in [a.unwrap(), b.unwrap()] {
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "first second third");
    }
}

#[tokio::test]
async fn callers_that_pause_longer_than_idle_timeout_see_no_error() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let mut config = invoices_config(&origin.base_url());
    config.server.header_read_timeout = SHORT;
    config.server.idle_timeout = ms(200);
    let gateway = start_config(config).await;
    let h2 = h2_client();
    for client in [client(), h2] {
        for _ in 0..3 {
            let response = client
                .get(gateway.url("/v1/invoices"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(response.text().await.unwrap(), "ok");
            // Long enough for the pooled connection to be closed as idle.
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
    }
}

// ---- shutdown ----

#[tokio::test]
async fn shutdown_does_not_wait_the_whole_grace_for_an_http2_client_that_never_answers_ping() {
    let origin = origin(|_| async { text(200, "h2") }).await;
    let mut config = invoices_config(&origin.base_url());
    config.server.shutdown_grace = secs(30);
    config.server.idle_timeout = secs(60);
    config.server.header_read_timeout = secs(30);
    let mut gateway = start_config(config).await;
    let (mut stream, _) = h2_call(gateway.addr, "/v1/invoices").await;
    gateway.shutdown();
    let kinds = frames_until_closed(&mut stream, CLOSED_WITHIN).await;
    assert!(kinds.contains(&GOAWAY), "asked to go away first: {kinds:?}");
    tokio::time::timeout(CLOSED_WITHIN, &mut gateway.task)
        .await
        .expect("serve returns once nothing is in flight, not at the end of the grace")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn when_the_grace_ends_the_calls_left_are_closed_and_serve_returns() {
    let (reached_tx, mut reached_rx) = mpsc::channel::<()>(4);
    let origin = origin(move |_| {
        let reached = reached_tx.clone();
        async move {
            let _ = reached.send(()).await;
            // Longer than the test waits for anything.
            tokio::time::sleep(Duration::from_secs(60)).await;
            text(200, "too late")
        }
    })
    .await;
    let mut config = invoices_config(&origin.base_url());
    config.server.shutdown_grace = SHORT;
    let mut gateway = start_config(config).await;
    let mut h1 = TcpStream::connect(gateway.addr).await.unwrap();
    h1.write_all(b"GET /v1/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut h2 = TcpStream::connect(gateway.addr).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    hello.extend(get_headers(1, "/v1/invoices"));
    h2.write_all(&hello).await.unwrap();
    for _ in 0..2 {
        tokio::time::timeout(WAIT, reached_rx.recv())
            .await
            .expect("both calls reach the origin");
    }

    gateway.shutdown();
    tokio::time::timeout(CLOSED_WITHIN, &mut gateway.task)
        .await
        .expect("serve returns when the grace ends")
        .unwrap()
        .unwrap();
    let answered = read_until_closed(&mut h1, CLOSED_WITHIN).await;
    assert!(answered.is_empty(), "no answer, the connection closed");
    frames_until_closed(&mut h2, CLOSED_WITHIN).await;
}

// ---- framing ----

#[tokio::test]
async fn content_length_with_transfer_encoding_gets_400_and_a_closed_connection() {
    let sandbox = start_sandbox(SandboxOptions::default()).await;
    let gateway = start_config(sandbox.config()).await;
    let conflicting = "GET /v1/invoices?size=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\
        Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let reversed = "GET /v1/invoices?size=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\
        Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n";
    for request in [conflicting, reversed] {
        let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        // One answer, then the connection closes.
        let answers = responses(&read_until_closed(&mut stream, CLOSED_WITHIN).await);
        assert_eq!(answers.len(), 1, "{answers:?}");
        let (head, body) = &answers[0];
        assert!(head.starts_with("http/1.1 400"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        // An error pcgate makes carries the tracking headers, as every other one does.
        for name in ["ms-requestid:", "ms-correlationid:", "ms-cv:"] {
            assert!(head.contains(name), "{name} missing: {head}");
        }
        let fault: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(fault["errorName"], "InvalidRequest");
        assert_eq!(fault["source"], "pcgate");
    }
    assert_eq!(
        sandbox.count("invoices").await,
        0,
        "nothing reached upstream"
    );
    // Counted as every refused call is: under no route, a 4xx.
    let refused = "pcgate_requests_total{route=\"none\",status=\"4xx\"}";
    assert_eq!(metric(&gateway, refused).await, Some(2.0));

    // Pipelined between two good requests: the first is answered, the conflicting one refused,
    // and nothing after it is read as a request.
    let good = "GET /v1/invoices?size=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    let three = format!("{good}{conflicting}{good}");
    stream.write_all(three.as_bytes()).await.unwrap();
    let answers = responses(&read_until_closed(&mut stream, CLOSED_WITHIN).await);
    let statuses: Vec<&str> = answers.iter().map(|(head, _)| &head[9..12]).collect();
    assert_eq!(statuses, ["200", "400"]);
    assert_eq!(sandbox.count("invoices").await, 1);
    assert_eq!(metric(&gateway, refused).await, Some(3.0));

    // The admin port refuses it too, before any of its handlers (a purge is a change).
    let purge = "POST /cache/purge HTTP/1.1\r\nHost: 127.0.0.1\r\n\
        Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let mut stream = TcpStream::connect(gateway.admin).await.unwrap();
    stream.write_all(purge.as_bytes()).await.unwrap();
    let answers = responses(&read_until_closed(&mut stream, CLOSED_WITHIN).await);
    assert_eq!(answers.len(), 1, "{answers:?}");
    let (head, body) = &answers[0];
    assert!(head.starts_with("http/1.1 400"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(head.contains("cache-control: no-store"), "{head}");
    let fault: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(fault["errorName"], "InvalidRequest");
}

// ---- out of file descriptors ----

#[tokio::test]
async fn running_out_of_file_descriptors_neither_spins_nor_floods_the_log() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let dir = temp_dir("fds");
    let (config_file, log_file) = (dir.join("pcgate.toml"), dir.join("log"));
    let (listen, admin) = (free_port(), free_port());
    let mut config = invoices_config(&origin.base_url());
    config.server.listen = ([127, 0, 0, 1], listen).into();
    config.server.admin_listen = ([127, 0, 0, 1], admin).into();
    config.server.header_read_timeout = secs(30);
    config.validate().expect("test config is valid");
    std::fs::write(&config_file, config.to_toml()).unwrap();
    // The limit applies to the child only: `ulimit` in the shell that execs it.
    let child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 64 && exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_pcgate"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config_file)
        .env("RUST_LOG", "info")
        .env_remove("PCGATE_CONFIG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_file).unwrap())
        .spawn()
        .unwrap();
    let gateway = format!("http://127.0.0.1:{listen}/v1/invoices");
    wait_for_healthz(admin).await;

    // More silent connections than the child has descriptors; the kernel queues the rest.
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(TcpStream::connect(("127.0.0.1", listen)).await.unwrap());
    }
    // Two seconds out of descriptors: the old loop logged a line every 50 ms.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(silent);

    let deadline = Instant::now() + WAIT;
    let status = loop {
        match client().get(&gateway).send().await {
            Ok(response) => break response.status(),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no call got through after the silent sockets closed: {e}"),
        }
    };
    assert_eq!(status, 200);

    terminate(child).await;
    let log = std::fs::read_to_string(&log_file).unwrap();
    let lines = log.lines().filter(|l| l.contains("accept failed")).count();
    assert!(lines >= 1, "the descriptors did run out:\n{log}");
    assert!(
        lines <= 3,
        "{lines} accept-failure lines in about 2 s:\n{log}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
