//! Issue 2: the gateway core end to end, over real HTTP on 127.0.0.1.

mod common;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pcgate::body::{self, Response};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A route table for tests: no credentials, everything under /v1 plus a POST echo.
fn config(base_url: &str, extra: &str) -> String {
    format!(
        r#"
        [upstream]
        base_url = "{base_url}"
        {extra}
        [[routes]]
        name = "echo"
        match = "POST /v1/echo"
        [[routes]]
        name = "invoices"
        match = ["GET /v1/invoices", "GET /v1/invoices/**"]
        "#
    )
}

#[tokio::test]
async fn path_query_status_headers_and_body_arrive_intact_both_ways() {
    let origin = origin(|seen: Seen| async move {
        let mut response = Response::new(body::full(seen.body.clone()));
        *response.status_mut() = http::StatusCode::CREATED;
        response
            .headers_mut()
            .insert("x-origin", "yes".parse().unwrap());
        response
            .headers_mut()
            .insert("x-origin-id", "from-origin".parse().unwrap());
        response
    })
    .await;
    // `x-app` is not a Partner Center header: it goes on because the operator forwards it.
    let gateway = start_gateway(&config(&origin.base_url(), "forward_headers = [\"x-app\"]")).await;

    let response = client()
        .post(gateway.url("/v1/echo?size=2&offset=4&filter=%7B%22a%22%7D"))
        .header("x-app", "billing")
        .header("accept", "application/json")
        .body("{\"hello\":\"world\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-origin"], "yes");
    assert_eq!(response.headers()["x-origin-id"], "from-origin");
    assert_eq!(response.text().await.unwrap(), "{\"hello\":\"world\"}");

    let seen = origin.requests();
    assert_eq!(seen.len(), 1);
    let seen = &seen[0];
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.uri.path(), "/v1/echo");
    assert_eq!(
        seen.uri.query(),
        Some("size=2&offset=4&filter=%7B%22a%22%7D")
    );
    assert_eq!(seen.headers["x-app"], "billing");
    assert_eq!(seen.headers["accept"], "application/json");
    assert_eq!(seen.headers["host"], origin.addr.to_string().as_str());
    assert_eq!(&seen.body[..], b"{\"hello\":\"world\"}");
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let origin = origin(|_| async {
        let mut response = text(200, "ok");
        let headers = response.headers_mut();
        headers.insert("connection", "x-hop-back".parse().unwrap());
        headers.insert("x-hop-back", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("x-end-to-end", "kept".parse().unwrap());
        response
    })
    .await;
    // Forwarded by config, yet still stripped when the caller's `Connection` names them.
    let gateway = start_gateway(&config(
        &origin.base_url(),
        "forward_headers = [\"x-end-to-end\", \"x-hop-out\"]",
    ))
    .await;

    let response = client()
        .get(gateway.url("/v1/invoices"))
        .header("connection", "x-hop-out")
        .header("x-hop-out", "secret-to-this-hop")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic eDp5")
        .header("x-end-to-end", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("x-hop-back").is_none());
    assert!(response.headers().get("keep-alive").is_none());
    assert_eq!(response.headers()["x-end-to-end"], "kept");

    let seen = &origin.requests()[0];
    for gone in ["x-hop-out", "keep-alive", "te", "proxy-authorization"] {
        assert!(
            seen.headers.get(gone).is_none(),
            "{gone} reached the origin"
        );
    }
    assert_eq!(seen.headers["x-end-to-end"], "kept");
}

#[tokio::test]
async fn a_20_mib_response_streams_through_without_being_held_whole() {
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 20;
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let rx = Arc::new(Mutex::new(Some(rx)));
    let origin = origin(move |_| {
        let rx = rx.lock().unwrap().take().expect("one call");
        async move {
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv()
                    .await
                    .map(|chunk| (Ok::<_, Infallible>(Frame::data(chunk)), rx))
            });
            Response::new(body::boxed(StreamBody::new(stream)))
        }
    })
    .await;
    let gateway = start_gateway(&config(&origin.base_url(), "")).await;

    let mut response = client()
        .get(gateway.url("/v1/invoices/big"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The origin has sent one chunk of twenty; the caller must already be able to read it.
    tx.send(Bytes::from(vec![b'a'; CHUNK])).await.unwrap();
    let mut received = 0;
    while received < CHUNK {
        let chunk = tokio::time::timeout(WAIT, response.chunk())
            .await
            .expect("first bytes arrive while the origin is still sending")
            .unwrap()
            .expect("body not ended");
        received += chunk.len();
    }
    let sender = tokio::spawn(async move {
        for _ in 1..CHUNKS {
            tx.send(Bytes::from(vec![b'b'; CHUNK])).await.unwrap();
        }
    });
    while let Some(chunk) = response.chunk().await.unwrap() {
        received += chunk.len();
    }
    sender.await.unwrap();
    assert_eq!(received, CHUNK * CHUNKS);
}

#[tokio::test]
async fn unmatched_routes_get_403_and_the_origin_sees_nothing() {
    let origin = origin(|_| async { text(200, "should not be reached") }).await;
    let gateway = start_gateway(&config(&origin.base_url(), "")).await;
    let client = client();

    for (method, path) in [
        ("GET", "/v1/customers"),
        ("DELETE", "/v1/invoices/D1"),
        ("GET", "/v2/invoices"),
    ] {
        let response = client
            .request(method.parse().unwrap(), gateway.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{method} {path}");
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let fault: serde_json::Value = response.json().await.unwrap();
        assert_eq!(fault["code"], 403);
        assert_eq!(fault["errorName"], "RouteNotAllowed");
        assert_eq!(fault["source"], "pcgate");
        assert!(fault["data"].is_array());
    }
    assert_eq!(origin.requests().len(), 0);
}

#[tokio::test]
async fn traversal_and_encoded_slashes_never_reach_the_origin() {
    let origin = origin(|_| async { text(200, "should not be reached") }).await;
    let gateway = start_gateway(&config(&origin.base_url(), "")).await;

    for path in [
        "/v1/invoices/../customers",
        "/v1/invoices/../../admin",
        "/v1/invoices/%2e%2e/customers",
        "/v1/invoices/%2E%2E/%2E%2E/customers",
        "/v1/invoices/./x",
        "/v1//invoices",
        "//v1/invoices",
        "/v1/invoices%2f..%2fcustomers",
        "/v1/invoices/x%2F..%2F..%2Fcustomers",
        "/v1/invoices/x%5C..%5Ccustomers",
        "/v1/customers/%2e%2e/invoices",
        "http://evil.example/v1/customers",
    ] {
        let status = raw_status(gateway.addr, &raw_get(path)).await;
        // 421: without inbound keys, a foreign host (an absolute-form target's) is refused.
        assert!(
            status == 400 || status == 403 || status == 421,
            "{path} answered {status}"
        );
    }
    assert_eq!(
        origin.requests().len(),
        0,
        "a traversal form reached the origin"
    );

    // An absolute-form request line for an allowed path still goes to the configured upstream,
    // whatever authority it names.
    let status = raw_status(gateway.addr, &raw_get("http://10.9.9.9:1/v1/invoices")).await;
    assert_eq!(status, 200);
    assert_eq!(origin.requests()[0].uri.path(), "/v1/invoices");
}

#[tokio::test]
async fn a_dead_origin_gives_502() {
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let gateway = start_gateway(&config(&format!("http://{addr}"), "")).await;

    let response = client()
        .get(gateway.url("/v1/invoices"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let fault: serde_json::Value = response.json().await.unwrap();
    assert_eq!(fault["errorName"], "UpstreamUnreachable");
    assert_eq!(fault["source"], "pcgate");
}

#[tokio::test]
async fn an_origin_that_stalls_past_attempt_timeout_gives_504() {
    let origin = origin(|_| async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        text(200, "too late")
    })
    .await;
    let gateway = start_gateway(&config(
        &origin.base_url(),
        "attempt_timeout = \"300ms\"\ndeadline = \"1s\"",
    ))
    .await;

    let response = client()
        .get(gateway.url("/v1/invoices"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let fault: serde_json::Value = response.json().await.unwrap();
    assert_eq!(fault["errorName"], "UpstreamTimeout");
}

#[tokio::test]
async fn a_tls_origin_with_a_private_ca_is_reached_over_http2() {
    // A CA of our own, and a certificate for 127.0.0.1 signed by it.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf_params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf_params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();

    let dir = std::env::temp_dir().join(format!("pcgate-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let service = recording_service(|_| async { text(200, "over tls") }, seen.clone());
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, service) = (acceptor.clone(), service.clone());
            tokio::spawn(async move {
                if let Ok(stream) = acceptor.accept(stream).await {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            });
        }
    });

    let base = format!("https://127.0.0.1:{}", addr.port());
    let extra = format!("ca_file = \"{}\"", ca_file.display());
    let gateway = start_gateway(&config(&base, &extra)).await;
    let response = client()
        .get(gateway.url("/v1/invoices?size=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "over tls");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            seen[0].version,
            http::Version::HTTP_2,
            "ALPN should pick h2"
        );
        assert_eq!(seen[0].uri.path(), "/v1/invoices");
        assert_eq!(seen[0].uri.query(), Some("size=1"));
    }

    // Without the CA the certificate is not trusted: 502, and nothing reaches the origin.
    let untrusting = start_gateway(&config(&base, "")).await;
    let response = client()
        .get(untrusting.url("/v1/invoices"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(seen.lock().unwrap().len(), 1);
    server.abort();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_call_finish_and_refuses_new_connections() {
    let (reached_tx, mut reached_rx) = mpsc::channel::<()>(1);
    let origin = origin(move |_| {
        let reached = reached_tx.clone();
        async move {
            let _ = reached.send(()).await;
            tokio::time::sleep(Duration::from_millis(800)).await;
            text(200, "finished")
        }
    })
    .await;
    let mut gateway = start_gateway(&config(&origin.base_url(), "")).await;
    let url = gateway.url("/v1/invoices");
    let in_flight = tokio::spawn(async move {
        let response = client().get(url).send().await.unwrap();
        (response.status(), response.text().await.unwrap())
    });
    tokio::time::timeout(WAIT, reached_rx.recv()).await.unwrap();

    gateway.shutdown();
    // Once the accept loop has stopped, new connections are refused.
    let refused = async {
        loop {
            if tokio::net::TcpStream::connect(gateway.addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(WAIT, refused)
        .await
        .expect("new connections are refused");

    let (status, text) = tokio::time::timeout(WAIT, in_flight)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(text, "finished");
    tokio::time::timeout(WAIT, &mut gateway.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn the_admin_port_answers_healthz() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let gateway = start_gateway(&config(&origin.base_url(), "")).await;
    let response = client()
        .get(format!("http://{}/healthz", gateway.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = client()
        .get(format!("http://{}/nope", gateway.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn http2_cleartext_callers_are_served() {
    let origin = origin(|_| async { text(200, "h2c") }).await;
    let gateway = start_gateway(&config(&origin.base_url(), "")).await;
    let client = h2_client();
    let response = client
        .get(gateway.url("/v1/invoices"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "h2c");
    // Upstream over cleartext is HTTP/1.1 whatever the caller spoke.
    assert_eq!(origin.requests()[0].version, http::Version::HTTP_11);
}

#[tokio::test]
async fn only_documented_and_configured_request_headers_reach_the_origin() {
    let origin = origin(|_| async { text(200, "ok") }).await;
    let gateway = start_gateway(&config(
        &origin.base_url(),
        "forward_headers = [\"X-Tenant\"]",
    ))
    .await;
    let response = client()
        .get(gateway.url("/v1/invoices?size=2"))
        // Partner Center's own request headers (reference §1.1–1.2, §5.5)...
        .header("Accept", "application/json")
        .header("X-Locale", "de-DE")
        .header("MS-Contract-Version", "v1")
        .header("MS-ContinuationToken", "page-2")
        .header("MS-PartnerCenter-Client", "Partner Center .NET SDK")
        // ...one the operator forwards...
        .header("X-Tenant", "contoso")
        // ...and what an attacker or a browser would add.
        .header("X-Original-URL", "/v1/customers")
        .header("X-Rewrite-URL", "/v1/customers")
        .header("X-Forwarded-Host", "evil.example")
        .header("Accept-Language", "fr-FR")
        .header("Cookie", "session=caller-session-cookie")
        .header("Cache-Control", "max-stale=86400")
        .header("User-Agent", "curl/8")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = &origin.requests()[0];
    for (name, value) in [
        ("accept", "application/json"),
        ("x-locale", "de-DE"),
        ("ms-contract-version", "v1"),
        ("ms-continuationtoken", "page-2"),
        ("ms-partnercenter-client", "Partner Center .NET SDK"),
        ("x-tenant", "contoso"),
    ] {
        assert_eq!(
            seen.headers.get(name).map(|v| v.as_bytes()),
            Some(value.as_bytes()),
            "{name}"
        );
    }
    for gone in [
        "x-original-url",
        "x-rewrite-url",
        "x-forwarded-host",
        "accept-language",
        "cookie",
        "cache-control",
        "user-agent",
    ] {
        assert!(
            seen.headers.get(gone).is_none(),
            "{gone} reached the origin"
        );
    }
    // The tracking headers pcgate stamps still go, and the origin's host is pcgate's to set.
    assert!(seen.headers.contains_key("ms-requestid"));
    assert!(seen.headers.contains_key("ms-correlationid"));
    assert_eq!(seen.headers["host"], origin.addr.to_string().as_str());
}
