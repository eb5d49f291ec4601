//! Review of issues 13 and 14 (the cache's miss lock, storage, policy; the upstream's caching
//! headers): probes from loopback through a misbehaving origin, each a defect found and fixed.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use pcgate::config::Config;

/// How long the probe origin takes to answer, so concurrent callers overlap.
const LATENCY: Duration = Duration::from_millis(300);

/// What the probe origin was asked, and how many calls it held at once at most.
#[derive(Clone, Default)]
struct Counters {
    calls: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
}

/// An origin that answers after [`LATENCY`] with `status=`, `cc=` (Cache-Control), `vary=`,
/// `age=` and `cookie=` (Set-Cookie) from its query, and a body naming the call number and the
/// `X-Tenant` it was sent (`-` when none).
async fn probe_origin() -> (Origin, Counters) {
    let counters = Counters::default();
    let counted = counters.clone();
    let origin = origin(move |seen: Seen| {
        let counters = counted.clone();
        async move {
            let n = counters.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let now = counters.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            counters.most_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(LATENCY).await;
            counters.in_flight.fetch_sub(1, Ordering::SeqCst);
            let tenant = seen
                .headers
                .get("x-tenant")
                .map_or("-".to_owned(), |v| format!("[{}]", v.to_str().unwrap()));
            let mut status = 200;
            let mut headers = Vec::new();
            for pair in seen.uri.query().unwrap_or("").split('&') {
                let Some((name, value)) = pair.split_once('=') else {
                    continue;
                };
                let value = percent_encoding::percent_decode_str(value)
                    .decode_utf8_lossy()
                    .into_owned();
                match name {
                    "status" => status = value.parse().unwrap(),
                    "cc" => headers.push(("cache-control", value)),
                    "vary" => headers.push(("vary", value)),
                    "age" => headers.push(("age", value)),
                    "cookie" => headers.push(("set-cookie", value)),
                    _ => {}
                }
            }
            let body = format!("answer {n} tenant {tenant}");
            let mut response = pcgate::body::Response::new(pcgate::body::full(body));
            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
            for (name, value) in headers {
                response.headers_mut().append(name, value.parse().unwrap());
            }
            response
        }
    })
    .await;
    (origin, counters)
}

/// `GET /v1/invoices/summary` cached for 5 minutes with its miss lock, `GET /v1/invoices`
/// uncached but coalesced; `X-Tenant` forwarded (not keyed: the operator's choice).
fn probe_config(base_url: &str) -> Config {
    let mut config = invoices_config(base_url);
    config.upstream.forward_headers = vec!["X-Tenant".to_owned()];
    let mut summary = route("summary", &["GET /v1/invoices/summary"]);
    summary.cache_ttl = Some(secs(300));
    summary.coalesce = true;
    let mut invoices = route("invoices", &["GET /v1/invoices"]);
    invoices.coalesce = true;
    config.routes = vec![summary, invoices];
    config
}

/// (status, body, headers) of a GET with these headers.
async fn get(
    gateway: &TestGateway,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, http::HeaderMap) {
    let mut request = client().get(gateway.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, response.text().await.unwrap(), headers)
}

/// Two calls, the second sent while the first is at the origin.
async fn overlapping(
    gateway: &TestGateway,
    path: &str,
    first: &[(&str, &str)],
    second: &[(&str, &str)],
) -> (
    (u16, String, http::HeaderMap),
    (u16, String, http::HeaderMap),
) {
    tokio::join!(get(gateway, path, first), async {
        tokio::time::sleep(LATENCY / 3).await;
        get(gateway, path, second).await
    })
}

/// Finding 1: on a coalesced uncached route, a follower got the leader's answer though the
/// answer said `Vary: X-Tenant` and the follower sent another tenant (or said `private`).
#[tokio::test]
async fn a_coalesced_answer_that_varies_or_is_private_is_not_handed_to_another_caller() {
    let (_origin, counters) = probe_origin().await;
    let gateway = start_config(probe_config(&_origin.base_url())).await;
    let (a, b) = overlapping(
        &gateway,
        "/v1/invoices?vary=X-Tenant",
        &[("X-Tenant", "a")],
        &[("X-Tenant", "b")],
    )
    .await;
    assert!(a.1.ends_with("tenant [a]"), "{}", a.1);
    assert!(
        b.1.ends_with("tenant [b]"),
        "tenant b got tenant a's answer: {}",
        b.1
    );
    // Followers that send what the leader sent still share its answer.
    let (a, again) = overlapping(
        &gateway,
        "/v1/invoices?vary=X-Tenant&same",
        &[("X-Tenant", "a")],
        &[("X-Tenant", "a")],
    )
    .await;
    assert_eq!(a.1, again.1);
    assert_eq!(counters.calls.load(Ordering::SeqCst), 3);
    // `Vary: *` and `private`: for no other caller.
    for path in ["/v1/invoices?vary=*", "/v1/invoices?cc=private"] {
        let (a, b) = overlapping(&gateway, path, &[], &[]).await;
        assert_ne!(a.1, b.1, "{path}: the follower got the leader's answer");
    }
}

/// Finding 2: every answer on a coalesced uncached route lost the upstream's `Age` (RFC 9111
/// §4.2.3) and its fetcher's `Set-Cookie`; the follower must get `Age` but not the cookie.
#[tokio::test]
async fn a_coalesced_answer_keeps_its_age_and_the_fetchers_cookie() {
    let (origin, _counters) = probe_origin().await;
    let gateway = start_config(probe_config(&origin.base_url())).await;
    let path = "/v1/invoices?age=100&cookie=session%3Dfetcher";
    let (leader, follower) = overlapping(&gateway, path, &[], &[]).await;
    assert_eq!(leader.1, follower.1, "one upstream call");
    for (who, answer) in [("leader", &leader), ("follower", &follower)] {
        let age: u64 = answer
            .2
            .get("age")
            .unwrap_or_else(|| panic!("{who}: no Age"))
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((100..=101).contains(&age), "{who}: Age {age}");
    }
    assert_eq!(leader.2["set-cookie"], "session=fetcher");
    assert!(follower.2.get("set-cookie").is_none());
}

/// Finding 3: a variant keyed on an empty header value was served to callers that sent no such
/// header (RFC 9111 §4.1: an absent header matches only an absent one).
#[tokio::test]
async fn an_empty_header_and_no_header_are_different_variants() {
    let (origin, _counters) = probe_origin().await;
    let gateway = start_config(probe_config(&origin.base_url())).await;
    let path = "/v1/invoices/summary?vary=X-Tenant";
    let empty = get(&gateway, path, &[("X-Tenant", "")]).await;
    assert!(empty.1.ends_with("tenant []"), "{}", empty.1);
    let none = get(&gateway, path, &[]).await;
    assert!(
        none.1.ends_with("tenant -"),
        "a caller with no X-Tenant got the empty one's answer: {}",
        none.1
    );
    // Each is a hit for its own kind.
    assert_eq!(get(&gateway, path, &[("X-Tenant", "")]).await.1, empty.1);
    assert_eq!(get(&gateway, path, &[]).await.1, none.1);
}

/// Finding 4: the cache handed an answer the upstream marked `private` (or `Vary: *`) to the
/// callers waiting on its key whenever it was not stored for another reason first: a `404`, or
/// a fetching caller that sent `Cache-Control: no-store`. The upstream's word must win.
#[tokio::test]
async fn an_answer_for_no_other_caller_is_not_handed_to_the_keys_waiters() {
    let (origin, _counters) = probe_origin().await;
    let gateway = start_config(probe_config(&origin.base_url())).await;
    for (path, writer) in [
        ("/v1/invoices/summary?cc=private&status=404", &[][..]),
        ("/v1/invoices/summary?vary=*&status=404", &[][..]),
        (
            "/v1/invoices/summary?cc=private",
            &[("Cache-Control", "no-store")][..],
        ),
    ] {
        let (a, b) = overlapping(&gateway, path, writer, &[]).await;
        assert_ne!(a.1, b.1, "{path}: the waiter got the writer's answer");
    }
    // A plain error answer is still shared, so a failing upstream sees one call.
    let (a, b) = overlapping(&gateway, "/v1/invoices/summary?status=503", &[], &[]).await;
    assert_eq!((a.0, &a.1), (b.0, &b.1));
}

/// Finding 5: callers of different variants of one key queued on one miss lock, each waiting a
/// whole upstream call per variant before it: a caller sending a new `Vary`-ed value on every
/// call could hold every other cold variant of the key to its deadline.
#[tokio::test]
async fn callers_of_different_variants_do_not_queue_behind_each_other() {
    let (origin, counters) = probe_origin().await;
    let gateway = start_config(probe_config(&origin.base_url())).await;
    let path = "/v1/invoices/summary?vary=X-Tenant";
    // The key's vary spec is known once one variant is stored.
    get(&gateway, path, &[("X-Tenant", "seed")]).await;
    counters.most_in_flight.store(0, Ordering::SeqCst);
    let gateway = Arc::new(gateway);
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let gateway = gateway.clone();
            tokio::spawn(async move {
                let tenant = format!("t{i}");
                let answer = get(&gateway, path, &[("X-Tenant", &tenant)]).await;
                assert!(answer.1.ends_with(&format!("[{tenant}]")), "{}", answer.1);
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
    assert_eq!(counters.calls.load(Ordering::SeqCst), 7);
    assert!(
        counters.most_in_flight.load(Ordering::SeqCst) > 1,
        "the six variants were fetched one after another"
    );
}
