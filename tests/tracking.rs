//! Issue 5: tracking headers end to end, against an in-test origin that records what it sees.

mod common;

use common::*;

const REQUEST_ID: &str = "a45e6643-1caf-4429-8f90-07c03d85bc2b";
const CORRELATION_ID: &str = "57eb2ca7-755f-450f-9187-eae1e75a0114";

/// One unnamed route, `GET /v1/invoices`, to `base_url`, with the tracking values set.
fn config(base_url: &str) -> pcgate::config::Config {
    let mut config = invoices_config(base_url);
    let mut invoices = route("", &["GET /v1/invoices"]);
    invoices.name = None;
    config.routes = vec![invoices];
    config.tracking.application = "billing-sidecar".into();
    config.tracking.locale = "de-DE".into();
    config
}

fn is_guid(value: &str) -> bool {
    uuid::Uuid::try_parse(value).is_ok()
}

#[tokio::test]
async fn ids_are_made_when_absent_sent_upstream_and_echoed() {
    let origin = origin(|_| async { text(200, "[]") }).await;
    let gateway = start_config(config(&origin.base_url())).await;

    let response = client()
        .get(gateway.url("/v1/invoices"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let header = |name: &str| response.headers()[name].to_str().unwrap().to_owned();
    let (request_id, correlation_id, cv) = (
        header("ms-requestid"),
        header("ms-correlationid"),
        header("ms-cv"),
    );
    assert!(is_guid(&request_id) && is_guid(&correlation_id));
    assert_ne!(request_id, correlation_id);
    // A seeded v1 vector (16 + ".0"), incremented once for the one upstream attempt.
    assert_eq!(cv.len(), 18, "{cv}");
    assert!(cv.ends_with(".1"), "{cv}");

    let seen = &origin.requests()[0];
    assert_eq!(seen.headers["ms-requestid"], request_id.as_str());
    assert_eq!(seen.headers["ms-correlationid"], correlation_id.as_str());
    assert_eq!(seen.headers["ms-cv"], cv.as_str());
    assert_eq!(seen.headers["x-locale"], "de-DE");
    assert_eq!(
        seen.headers["ms-partnercenter-application"],
        "billing-sidecar"
    );

    // The next call is a new call: new ids.
    let again = client()
        .get(gateway.url("/v1/invoices"))
        .send()
        .await
        .unwrap();
    assert_ne!(again.headers()["ms-requestid"], request_id.as_str());
}

#[tokio::test]
async fn the_callers_ids_locale_and_vector_are_kept() {
    let origin = origin(|_| async { text(200, "[]") }).await;
    let gateway = start_config(config(&origin.base_url())).await;

    let response = client()
        .get(gateway.url("/v1/invoices"))
        .header("MS-RequestId", REQUEST_ID)
        .header("MS-CorrelationId", CORRELATION_ID)
        .header("MS-CV", "5npA0K22CUmWPOzB.4")
        .header("X-Locale", "fr-FR")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["ms-requestid"], REQUEST_ID);
    assert_eq!(response.headers()["ms-correlationid"], CORRELATION_ID);
    assert_eq!(response.headers()["ms-cv"], "5npA0K22CUmWPOzB.4.1");

    let seen = &origin.requests()[0];
    assert_eq!(seen.headers["ms-requestid"], REQUEST_ID);
    assert_eq!(seen.headers["ms-correlationid"], CORRELATION_ID);
    // Extended once on the way in (.4 → .4.0), incremented before the attempt (→ .4.1).
    assert_eq!(seen.headers["ms-cv"], "5npA0K22CUmWPOzB.4.1");
    assert_eq!(seen.headers["x-locale"], "fr-FR");
}

#[tokio::test]
async fn a_malformed_vector_is_replaced_not_refused() {
    let origin = origin(|_| async { text(200, "[]") }).await;
    let gateway = start_config(config(&origin.base_url())).await;
    let response = client()
        .get(gateway.url("/v1/invoices"))
        .header("MS-CV", "not-a-vector")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = origin.requests()[0].headers["ms-cv"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(seen.len(), 18, "{seen}");
    assert!(seen.ends_with(".1"));
}

#[tokio::test]
async fn malformed_ids_get_400_naming_the_header_with_tracking_headers() {
    let origin = origin(|_| async { text(200, "[]") }).await;
    let gateway = start_config(config(&origin.base_url())).await;
    let long = "7".repeat(300);
    for (name, value) in [
        ("MS-RequestId", "12345"),
        ("MS-CorrelationId", "not-a-guid"),
        ("MS-RequestId", long.as_str()),
    ] {
        let response = client()
            .get(gateway.url("/v1/invoices"))
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{name}: {value}");
        assert!(is_guid(
            response.headers()["ms-requestid"].to_str().unwrap()
        ));
        assert!(is_guid(
            response.headers()["ms-correlationid"].to_str().unwrap()
        ));
        assert!(response.headers().contains_key("ms-cv"));
        let fault: serde_json::Value = response.json().await.unwrap();
        assert_eq!(fault["errorName"], "InvalidTrackingHeader");
        assert!(
            fault["description"].as_str().unwrap().contains(name),
            "{fault}"
        );
    }
    assert_eq!(origin.requests().len(), 0);
}

#[tokio::test]
async fn errors_pcgate_makes_carry_the_callers_ids() {
    let origin = origin(|_| async { text(200, "[]") }).await;
    let gateway = start_config(config(&origin.base_url())).await;
    let response = client()
        .get(gateway.url("/v1/customers"))
        .header("MS-RequestId", REQUEST_ID)
        .header("MS-CorrelationId", CORRELATION_ID)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["ms-requestid"], REQUEST_ID);
    assert_eq!(response.headers()["ms-correlationid"], CORRELATION_ID);
}

#[tokio::test]
async fn the_vector_can_be_turned_off() {
    let origin = origin(|_| async { text(200, "[]") }).await;
    let mut config = config(&origin.base_url());
    config.tracking.correlation_vector = false;
    let gateway = start_config(config).await;
    let response = client()
        .get(gateway.url("/v1/invoices"))
        .header("MS-CV", "5npA0K22CUmWPOzB.4")
        .send()
        .await
        .unwrap();
    assert!(response.headers().get("ms-cv").is_none());
    // Passed through untouched.
    assert_eq!(origin.requests()[0].headers["ms-cv"], "5npA0K22CUmWPOzB.4");
}
