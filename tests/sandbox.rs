//! End-to-end tests of the sandbox: it is bound on 127.0.0.1:0 inside the test process and
//! spoken to over plain HTTP, as a billing app or the gateway would.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use pcgate::sandbox::{
    Sandbox, SandboxOptions, SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, SANDBOX_REFRESH_TOKEN,
};
use serde_json::{json, Value};
use tokio::sync::oneshot;

const RESOURCE: &str = "https://api.partnercenter.microsoft.com";
/// Upper bound on pages followed, so a paging bug fails instead of looping.
const MAX_PAGES: usize = 500;

struct Harness {
    base: String,
    token_url: String,
    client: reqwest::Client,
    _shutdown: oneshot::Sender<()>,
}

async fn start(options: SandboxOptions) -> Harness {
    let options = SandboxOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..options
    };
    let sandbox = Sandbox::bind(options).await.unwrap();
    let base = sandbox.base_url();
    let token_url = sandbox.token_url();
    assert!(base.starts_with("http://127.0.0.1:"));
    assert_eq!(token_url, format!("{base}/sandbox-tenant/oauth2/token"));
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(sandbox.serve(async move {
        let _ = rx.await;
    }));
    Harness {
        base,
        token_url,
        client: client(),
        _shutdown: tx,
    }
}

/// A plain-HTTP client. reqwest is built with `rustls-no-provider`, so a crypto provider must be
/// installed before any client is built, even one that never speaks TLS.
fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().build().unwrap()
}

async fn start_default() -> Harness {
    start(SandboxOptions::default()).await
}

async fn body_json(response: reqwest::Response) -> Value {
    let bytes = response.bytes().await.unwrap();
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
}

impl Harness {
    async fn token_request(&self, form: &[(&str, &str)]) -> reqwest::Response {
        self.client
            .post(&self.token_url)
            .form(form)
            .send()
            .await
            .unwrap()
    }

    async fn app_token(&self) -> String {
        let response = self
            .token_request(&[
                ("grant_type", "client_credentials"),
                ("client_id", SANDBOX_CLIENT_ID),
                ("client_secret", SANDBOX_CLIENT_SECRET),
                ("resource", RESOURCE),
            ])
            .await;
        assert_eq!(response.status(), 200);
        body_json(response).await["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Redeems `refresh`, returning the whole token response.
    async fn refresh(&self, refresh: &str) -> reqwest::Response {
        self.token_request(&[
            ("grant_type", "refresh_token"),
            ("client_id", SANDBOX_CLIENT_ID),
            ("client_secret", SANDBOX_CLIENT_SECRET),
            ("resource", RESOURCE),
            ("refresh_token", refresh),
            ("scope", "openid"),
        ])
        .await
    }

    async fn user_token(&self) -> String {
        let response = self.refresh(SANDBOX_REFRESH_TOKEN).await;
        assert_eq!(response.status(), 200);
        body_json(response).await["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    async fn get_json(&self, path: &str, token: &str) -> Value {
        let response = self.get(path, token).await;
        assert_eq!(response.status(), 200, "GET {path}");
        body_json(response).await
    }

    async fn set_faults(&self, patch: Value) -> Value {
        let response = self
            .client
            .post(format!("{}/__sandbox/faults", self.base))
            .header("content-type", "application/json")
            .body(patch.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        body_json(response).await
    }

    async fn requests_log(&self) -> Value {
        let response = self
            .client
            .get(format!("{}/__sandbox/requests", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        body_json(response).await
    }

    /// Every invoice, in one unpaged request.
    async fn all_invoices(&self, token: &str) -> Vec<Value> {
        self.get_json("/v1/invoices", token).await["items"]
            .as_array()
            .unwrap()
            .clone()
    }
}

/// Asserts `value` is a Partner Center ApiFault (reference §3.1).
fn assert_api_fault(value: &Value) {
    assert!(value["code"].is_number(), "{value}");
    assert!(value["description"].is_string(), "{value}");
    assert_eq!(value["data"], json!([]), "{value}");
    assert_eq!(value["source"], "PartnerFD", "{value}");
}

fn assert_link(link: &Value, uri: &str) {
    assert_eq!(link["uri"], uri, "{link}");
    assert_eq!(link["method"], "GET");
    assert!(link["headers"].is_array());
}

/// Minor units of a JSON amount (cents, or whole yen).
fn cents(value: &Value) -> i64 {
    (value.as_f64().unwrap() * 100.0).round() as i64
}

#[tokio::test]
async fn client_credentials_issue_a_v1_app_token() {
    let h = start_default().await;
    let response = h
        .token_request(&[
            ("grant_type", "client_credentials"),
            ("client_id", SANDBOX_CLIENT_ID),
            ("client_secret", SANDBOX_CLIENT_SECRET),
            ("resource", RESOURCE),
        ])
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store, no-cache");
    let body = body_json(response).await;
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], "3600");
    assert_eq!(body["ext_expires_in"], "3600");
    let expires_on: u64 = body["expires_on"].as_str().unwrap().parse().unwrap();
    let not_before: u64 = body["not_before"].as_str().unwrap().parse().unwrap();
    assert_eq!(expires_on - not_before, 3900);
    assert_eq!(body["resource"], RESOURCE);
    assert!(body["access_token"]
        .as_str()
        .unwrap()
        .starts_with("sbx-app-"));
    assert!(body.get("refresh_token").is_none());
}

#[tokio::test]
async fn v2_style_requests_get_numeric_lifetimes() {
    let h = start(SandboxOptions {
        token_ttl: Duration::from_secs(600),
        ..SandboxOptions::default()
    })
    .await;
    let response = h
        .token_request(&[
            ("grant_type", "client_credentials"),
            ("client_id", SANDBOX_CLIENT_ID),
            ("client_secret", SANDBOX_CLIENT_SECRET),
            ("scope", "https://api.partnercenter.microsoft.com/.default"),
        ])
        .await;
    assert_eq!(response.status(), 200);
    let body = body_json(response).await;
    assert_eq!(body["expires_in"], 600);
    assert!(body.get("expires_on").is_none());
    assert!(body.get("resource").is_none());
}

/// A token request's form fields.
type Form<'a> = &'a [(&'a str, &'a str)];

#[tokio::test]
async fn bad_token_requests_get_clear_oauth_errors() {
    let h = start_default().await;
    let cases: [(Form, u16, &str, u64); 6] = [
        (
            &[
                ("grant_type", "client_credentials"),
                ("client_id", SANDBOX_CLIENT_ID),
                ("client_secret", "wrong"),
                ("resource", RESOURCE),
            ],
            401,
            "invalid_client",
            7_000_215,
        ),
        (
            &[
                ("grant_type", "client_credentials"),
                ("client_id", SANDBOX_CLIENT_ID),
                ("resource", RESOURCE),
            ],
            401,
            "invalid_client",
            7_000_218,
        ),
        (
            &[
                ("grant_type", "password"),
                ("client_id", SANDBOX_CLIENT_ID),
                ("client_secret", SANDBOX_CLIENT_SECRET),
            ],
            400,
            "unsupported_grant_type",
            70_003,
        ),
        (
            &[
                ("client_id", SANDBOX_CLIENT_ID),
                ("client_secret", SANDBOX_CLIENT_SECRET),
            ],
            400,
            "invalid_request",
            900_144,
        ),
        (
            &[
                ("grant_type", "client_credentials"),
                ("client_id", SANDBOX_CLIENT_ID),
                ("client_secret", SANDBOX_CLIENT_SECRET),
            ],
            400,
            "invalid_request",
            900_144,
        ),
        (
            &[
                ("grant_type", "client_credentials"),
                ("client_id", "someone-else"),
                ("client_secret", SANDBOX_CLIENT_SECRET),
                ("resource", RESOURCE),
            ],
            400,
            "unauthorized_client",
            700_016,
        ),
    ];
    for (form, status, error, code) in cases {
        let response = h.token_request(form).await;
        assert_eq!(response.status(), status, "{form:?}");
        let body = body_json(response).await;
        assert_eq!(body["error"], error, "{form:?}");
        assert_eq!(body["error_codes"], json!([code]));
        let description = body["error_description"].as_str().unwrap();
        assert!(
            description.starts_with(&format!("AADSTS{code}: ")),
            "{description}"
        );
        // The secret that was sent never comes back.
        assert!(!description.contains(SANDBOX_CLIENT_SECRET));
    }

    let response = h
        .client
        .post(&h.token_url)
        .header("content-type", "application/json")
        .body(r#"{"grant_type":"client_credentials"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(body_json(response).await["error"], "invalid_request");
}

#[tokio::test]
async fn refresh_tokens_rotate_strictly() {
    let h = start_default().await;
    let response = h.refresh(SANDBOX_REFRESH_TOKEN).await;
    assert_eq!(response.status(), 200);
    let first = body_json(response).await;
    assert_eq!(first["scope"], "user_impersonation");
    assert_eq!(first["expires_in"], "3600");
    assert!(first["access_token"]
        .as_str()
        .unwrap()
        .starts_with("sbx-user-"));
    let second_refresh = first["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(second_refresh, SANDBOX_REFRESH_TOKEN);

    // The new refresh token works once...
    let response = h.refresh(&second_refresh).await;
    assert_eq!(response.status(), 200);
    let second = body_json(response).await;
    assert_ne!(second["refresh_token"], second_refresh);

    // ...and the ones before it are dead.
    for old in [SANDBOX_REFRESH_TOKEN, second_refresh.as_str()] {
        let response = h.refresh(old).await;
        assert_eq!(response.status(), 400);
        let body = body_json(response).await;
        assert_eq!(body["error"], "invalid_grant");
        assert!(body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS70008: "));
    }
}

#[tokio::test]
async fn summary_has_the_documented_shape() {
    let h = start_default().await;
    let token = h.app_token().await;
    let response = h.get("/v1/invoices/summary", &token).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/json; charset=utf-8"
    );
    let summary = body_json(response).await;
    assert!(summary["balanceAmount"].is_number());
    assert_eq!(summary["currencyCode"], "USD");
    assert_eq!(summary["currencySymbol"], "$");
    for field in [
        "accountingDate",
        "firstInvoiceCreationDate",
        "lastPaymentDate",
        "latestInvoiceDate",
    ] {
        assert!(summary[field].is_string(), "{field}");
    }
    assert!(summary["lastPaymentAmount"].is_number());
    let details = summary["details"].as_array().unwrap();
    let kinds: Vec<&str> = details
        .iter()
        .map(|d| d["invoiceType"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["Recurring", "OneTime"]);
    for detail in details {
        assert_eq!(detail["summary"]["currencyCode"], "USD");
        assert!(detail["summary"]["balanceAmount"].is_number());
        assert_eq!(
            detail["summary"]["attributes"]["objectType"],
            "InvoiceSummary"
        );
    }
    let detail_sum: i64 = details
        .iter()
        .map(|d| cents(&d["summary"]["balanceAmount"]))
        .sum();
    assert_eq!(detail_sum, cents(&summary["balanceAmount"]));
    assert_link(&summary["links"]["self"], "/invoices/summary");
    assert_eq!(summary["attributes"]["objectType"], "InvoiceSummary");
}

#[tokio::test]
async fn summaries_add_up_from_the_invoices() {
    let h = start(SandboxOptions {
        invoices: 80,
        seed: 42,
        ..SandboxOptions::default()
    })
    .await;
    let token = h.user_token().await;
    let invoices = h.all_invoices(&token).await;
    assert_eq!(invoices.len(), 80);
    let mut balances: HashMap<String, i64> = HashMap::new();
    for invoice in &invoices {
        let currency = invoice["currencyCode"].as_str().unwrap().to_owned();
        *balances.entry(currency).or_default() +=
            cents(&invoice["totalCharges"]) - cents(&invoice["paidAmount"]);
    }
    assert!(balances.len() >= 3, "several currencies: {balances:?}");

    let summaries = h.get_json("/v1/invoices/summaries", &token).await;
    let items = summaries["items"].as_array().unwrap();
    assert_eq!(summaries["totalCount"], items.len());
    assert_eq!(items.len(), balances.len());
    assert_link(&summaries["links"]["self"], "/invoices/summaries");
    assert_eq!(summaries["attributes"]["objectType"], "Collection");
    for item in items {
        let currency = item["currencyCode"].as_str().unwrap();
        assert_eq!(
            cents(&item["balanceAmount"]),
            balances[currency],
            "{currency}"
        );
        let details: i64 = item["details"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| cents(&d["summary"]["balanceAmount"]))
            .sum();
        assert_eq!(details, balances[currency], "{currency} details");
    }

    // The primary-currency summary is the USD item of the collection.
    let usd = h.get_json("/v1/invoices/summary", &token).await;
    assert_eq!(cents(&usd["balanceAmount"]), balances["USD"]);
}

#[tokio::test]
async fn invoices_have_the_documented_shape() {
    let h = start_default().await;
    let token = h.user_token().await;
    let invoices = h.all_invoices(&token).await;
    assert_eq!(invoices.len(), 60);
    for invoice in &invoices {
        let id = invoice["id"].as_str().unwrap();
        assert!(
            id.len() == 10 && (id.starts_with("D020") || id.starts_with('G')),
            "{id}"
        );
        for field in [
            "invoiceDate",
            "billingPeriodStartDate",
            "billingPeriodEndDate",
            "currencyCode",
            "currencySymbol",
            "documentType",
        ] {
            assert!(invoice[field].is_string(), "{field}");
        }
        assert!(invoice["totalCharges"].is_number());
        assert!(invoice["paidAmount"].is_number());
        assert_eq!(
            invoice["pdfDownloadLink"],
            format!("/invoices/{id}/documents/statement")
        );
        let receipt = &invoice["taxReceipts"][0];
        assert!(receipt["id"].is_string());
        assert!(receipt["taxReceiptPdfDownloadLink"].is_string());
        let kind = invoice["invoiceType"].as_str().unwrap();
        assert!(kind == "Recurring" || kind == "OneTime");
        let detail = &invoice["invoiceDetails"][0];
        assert_eq!(detail["invoiceLineItemType"], "billing_line_items");
        assert!(detail["billingProvider"].is_string());
        assert_eq!(detail["attributes"]["objectType"], "InvoiceDetail");
        assert_link(&invoice["links"]["self"], &format!("/invoices/{kind}-{id}"));
        assert_eq!(invoice["attributes"]["objectType"], "Invoice");
    }

    // By id, by the API's own prefixed link, and the same resource either way.
    let first = &invoices[0];
    let id = first["id"].as_str().unwrap();
    let by_id = h.get_json(&format!("/v1/invoices/{id}"), &token).await;
    assert_eq!(&by_id, first);
    let self_link = first["links"]["self"]["uri"].as_str().unwrap();
    let by_link = h.get_json(&format!("/v1{self_link}"), &token).await;
    assert_eq!(&by_link, first);
}

#[tokio::test]
async fn index_paging_returns_every_invoice_once() {
    let h = start(SandboxOptions {
        invoices: 23,
        ..SandboxOptions::default()
    })
    .await;
    let token = h.app_token().await;
    let expected: Vec<Value> = h
        .all_invoices(&token)
        .await
        .iter()
        .map(|i| i["id"].clone())
        .collect();

    let mut seen = Vec::new();
    let mut path = "/v1/invoices?size=5&offset=0".to_owned();
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages <= MAX_PAGES, "paging does not end");
        let page = h.get_json(&path, &token).await;
        let items = page["items"].as_array().unwrap();
        assert_eq!(page["totalCount"], items.len());
        assert_eq!(page["attributes"]["objectType"], "Collection");
        seen.extend(items.iter().map(|i| i["id"].clone()));
        match page["links"].get("next") {
            Some(next) => {
                let uri = next["uri"].as_str().unwrap();
                assert!(uri.starts_with("/invoices?size=5&offset="), "{uri}");
                path = format!("/v1{uri}");
            }
            None => break,
        }
    }
    assert_eq!(pages, 5);
    assert_eq!(seen, expected);
    let unique: HashSet<String> = seen.iter().map(|v| v.to_string()).collect();
    assert_eq!(unique.len(), 23);

    let first = h.get_json("/v1/invoices?size=5&offset=0", &token).await;
    assert_link(&first["links"]["self"], "/invoices?size=5&offset=0");
    assert_link(&first["links"]["next"], "/invoices?size=5&offset=5");
    let beyond = h.get_json("/v1/invoices?size=5&offset=100", &token).await;
    assert_eq!(beyond["totalCount"], 0);
    assert!(beyond["links"].get("next").is_none());
}

#[tokio::test]
async fn bad_paging_input_is_a_400() {
    let h = start_default().await;
    let token = h.app_token().await;
    for query in ["size=-1", "size=abc", "size=0", "offset=-1", "offset=abc"] {
        let response = h.get(&format!("/v1/invoices?{query}"), &token).await;
        assert_eq!(response.status(), 400, "{query}");
        let body = body_json(response).await;
        assert_api_fault(&body);
        assert_eq!(body["code"], 3000);
    }
}

#[tokio::test]
async fn continuation_tokens_page_through_line_items_once() {
    let h = start(SandboxOptions {
        seed: 9,
        ..SandboxOptions::default()
    })
    .await;
    let token = h.app_token().await;
    let invoices = h.all_invoices(&token).await;
    let invoice = invoices
        .iter()
        .find(|i| i["invoiceType"] == "OneTime")
        .unwrap();
    let id = invoice["id"].as_str().unwrap();
    let currency = invoice["currencyCode"].as_str().unwrap();
    let query = format!(
        "provider=onetime&invoicelineitemtype=billinglineitems&currencycode={currency}&period=current"
    );

    let all = h
        .get_json(&format!("/v1/invoices/{id}/lineitems?{query}"), &token)
        .await;
    let all_items = all["items"].as_array().unwrap();
    assert!(all.get("continuationToken").is_none());
    assert!((5..=40).contains(&all_items.len()));

    let mut seen: Vec<Value> = Vec::new();
    let mut request = h
        .client
        .get(format!(
            "{}/v1/invoices/{id}/lineitems?{query}&size=3",
            h.base
        ))
        .bearer_auth(&token);
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages <= MAX_PAGES, "paging does not end");
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        let page = body_json(response).await;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 3);
        assert_eq!(page["totalCount"], items.len());
        seen.extend(items.iter().cloned());
        let Some(next) = page["links"].get("next") else {
            assert!(page.get("continuationToken").is_none());
            break;
        };
        let uri = next["uri"].as_str().unwrap();
        assert!(
            uri.starts_with(&format!("/invoices/{id}/lineitems?")),
            "{uri}"
        );
        assert!(uri.ends_with("&seekOperation=Next"), "{uri}");
        let header = &next["headers"][0];
        assert_eq!(header["key"], "MS-ContinuationToken");
        assert_eq!(header["value"], page["continuationToken"]);
        request = h
            .client
            .get(format!("{}/v1{uri}", h.base))
            .bearer_auth(&token)
            .header("MS-ContinuationToken", header["value"].as_str().unwrap());
    }
    assert_eq!(pages, all_items.len().div_ceil(3));
    assert_eq!(&seen, all_items);

    // The items add up to the invoice.
    let total: i64 = seen.iter().map(|i| cents(&i["totalForCustomer"])).sum();
    assert_eq!(total, cents(&invoice["totalCharges"]));
    for item in &seen {
        assert_eq!(item["invoiceNumber"], id);
        assert_eq!(item["currency"], currency);
        assert!(item["quantity"].is_number());
        assert!(item["customerId"].is_string());
        assert_eq!(item["attributes"]["objectType"], "OneTimeInvoiceLineItem");
    }

    // The token travelled as a request header and reached the sandbox.
    let log = h.requests_log().await;
    let last = log["recent"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["route"], "lineitems");
    assert!(last["headers"]["ms-continuationtoken"].is_string());

    // Next without a token, or with a forged one, is bad input.
    let next_uri = format!(
        "{}/v1/invoices/{id}/lineitems?{query}&size=3&seekOperation=Next",
        h.base
    );
    for token_header in [None, Some("0000000000000000-3")] {
        let mut request = h.client.get(&next_uri).bearer_auth(&token);
        if let Some(value) = token_header {
            request = request.header("MS-ContinuationToken", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 400);
        assert_api_fault(&body_json(response).await);
    }
}

#[tokio::test]
async fn legacy_line_items_page_by_index() {
    let h = start_default().await;
    let token = h.app_token().await;
    let invoice = h.all_invoices(&token).await[0].clone();
    let link = invoice["invoiceDetails"][0]["links"]["self"]["uri"]
        .as_str()
        .unwrap()
        .to_owned();
    let all = h.get_json(&format!("/v1{link}"), &token).await;
    let expected = all["items"].as_array().unwrap().clone();
    assert!(!expected.is_empty());

    let mut seen = Vec::new();
    let mut path = format!("/v1{link}?size=4&offset=0");
    for _ in 0..MAX_PAGES {
        let page = h.get_json(&path, &token).await;
        seen.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["links"].get("next") {
            Some(next) => path = format!("/v1{}", next["uri"].as_str().unwrap()),
            None => break,
        }
    }
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn api_routes_need_a_valid_bearer_token() {
    let h = start_default().await;
    let response = h
        .client
        .get(format!("{}/v1/invoices", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("OAuth realm="));
    let body = body_json(response).await;
    assert_api_fault(&body);
    assert_eq!(body["code"], 800_001);

    let response = h.get("/v1/invoices", "sbx-app-not-issued-here").await;
    assert_eq!(response.status(), 401);
    assert_eq!(body_json(response).await["code"], 900_420);

    let response = h
        .client
        .get(format!("{}/v1/invoices", h.base))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn app_only_tokens_are_refused_on_app_user_routes() {
    let h = start_default().await;
    let app = h.app_token().await;
    let user = h.user_token().await;
    let id = h.all_invoices(&app).await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for path in [
        "/v1/invoices/summaries".to_owned(),
        format!("/v1/invoices/{id}"),
        format!("/v1/invoices/{id}/documents/statement"),
    ] {
        let response = h.get(&path, &app).await;
        assert_eq!(response.status(), 403, "{path}");
        assert_api_fault(&body_json(response).await);
        assert_eq!(h.get(&path, &user).await.status(), 200, "{path}");
    }
    for path in ["/v1/invoices/summary", "/v1/invoices"] {
        assert_eq!(h.get(path, &app).await.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn unknown_things_are_404_and_wrong_methods_405() {
    let h = start_default().await;
    let token = h.user_token().await;
    let response = h.get("/v1/invoices/D020NOPE00", &token).await;
    assert_eq!(response.status(), 404);
    let body = body_json(response).await;
    assert_api_fault(&body);
    assert!(body["description"].as_str().unwrap().contains("D020NOPE00"));

    let response = h.get("/v1/customers", &token).await;
    assert_eq!(response.status(), 404);
    assert_api_fault(&body_json(response).await);

    let response = h
        .client
        .post(format!("{}/v1/invoices", h.base))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "GET, HEAD");
}

#[tokio::test]
async fn statements_are_pdfs() {
    let h = start_default().await;
    let token = h.user_token().await;
    let invoice = h.all_invoices(&token).await[3].clone();
    let id = invoice["id"].as_str().unwrap();
    let response = h
        .get(&format!("/v1/invoices/{id}/documents/statement"), &token)
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/pdf");
    assert_eq!(
        response.headers()["content-disposition"],
        format!("attachment; filename=Invoice_{id}.pdf").as_str()
    );
    let pdf = response.bytes().await.unwrap();
    assert!(pdf.starts_with(b"%PDF-"));
    assert!(pdf.ends_with(b"%%EOF"));
    let text = String::from_utf8_lossy(&pdf);
    assert!(text.contains(&format!("(Invoice {id}) Tj")));

    let receipt_link = invoice["taxReceipts"][0]["taxReceiptPdfDownloadLink"]
        .as_str()
        .unwrap();
    let response = h.get(&format!("/v1{receipt_link}"), &token).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/pdf");
    assert!(response.bytes().await.unwrap().starts_with(b"%PDF-"));

    let response = h
        .get(
            &format!("/v1/invoices/{id}/receipts/999/documents/statement"),
            &token,
        )
        .await;
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn a_rate_limit_answers_429_with_retry_after() {
    let h = start(SandboxOptions {
        rate_limit: Some(2),
        ..SandboxOptions::default()
    })
    .await;
    let token = h.app_token().await;
    let mut throttled = None;
    for _ in 0..20 {
        let response = h.get("/v1/invoices/summary", &token).await;
        if response.status() == 429 {
            throttled = Some(response);
            break;
        }
        assert_eq!(response.status(), 200);
    }
    let response = throttled.expect("no 429 in 20 calls at 2/s");
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let body = body_json(response).await;
    assert_eq!(body["statusCode"], 429);
    assert_eq!(
        body["message"],
        format!("Rate limit is exceeded. Try again in {retry_after} seconds.")
    );

    // Lifting the limit at run time lets calls through again.
    let faults = h.set_faults(json!({ "rate_limit": null })).await;
    assert_eq!(faults["rate_limit"], Value::Null);
    assert_eq!(h.get("/v1/invoices/summary", &token).await.status(), 200);
}

#[tokio::test]
async fn a_fault_script_is_served_in_order() {
    let h = start_default().await;
    let token = h.app_token().await;
    let faults = h
        .set_faults(json!({ "script": [500, 503, 429], "retry_after": "7" }))
        .await;
    assert_eq!(faults["script"], json!([500, 503, 429]));

    let response = h.get("/v1/invoices/summary", &token).await;
    assert_eq!(response.status(), 500);
    assert_api_fault(&body_json(response).await);
    let response = h.get("/v1/invoices/summary", &token).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "7");
    let response = h.get("/v1/invoices/summary", &token).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    assert_eq!(h.get("/v1/invoices/summary", &token).await.status(), 200);

    let log = h.requests_log().await;
    let statuses: Vec<u64> = log["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["route"] == "summary")
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [500, 503, 429, 200]);
}

#[tokio::test]
async fn fail_rate_fails_every_call_at_one() {
    let h = start(SandboxOptions {
        fail_rate: 1.0,
        fail_status: 502,
        ..SandboxOptions::default()
    })
    .await;
    let token = h.app_token().await;
    for _ in 0..5 {
        let response = h.get("/v1/invoices", &token).await;
        assert_eq!(response.status(), 502);
        assert_api_fault(&body_json(response).await);
    }
    let faults = h.set_faults(json!({ "fail_rate": 0.0 })).await;
    assert_eq!(faults["fail_rate"], 0.0);
    assert_eq!(faults["fail_status"], 502);
    assert_eq!(h.get("/v1/invoices", &token).await.status(), 200);
}

#[tokio::test]
async fn the_token_endpoint_can_be_made_to_fail() {
    let h = start_default().await;
    h.set_faults(json!({ "token_fail_status": 503 })).await;
    let response = h.refresh(SANDBOX_REFRESH_TOKEN).await;
    assert_eq!(response.status(), 503);
    assert_eq!(
        body_json(response).await["error"],
        "temporarily_unavailable"
    );
    h.set_faults(json!({ "token_fail_status": null })).await;
    // The refresh token was not consumed by the failed attempt.
    assert!(h.user_token().await.starts_with("sbx-user-"));
}

#[tokio::test]
async fn revoking_tokens_makes_the_api_answer_401() {
    let h = start_default().await;
    let token = h.app_token().await;
    assert_eq!(h.get("/v1/invoices", &token).await.status(), 200);
    h.set_faults(json!({ "revoke_tokens": true })).await;
    assert_eq!(h.get("/v1/invoices", &token).await.status(), 401);
    let fresh = h.app_token().await;
    assert_eq!(h.get("/v1/invoices", &fresh).await.status(), 200);
}

#[tokio::test]
async fn latency_delays_api_answers() {
    let h = start_default().await;
    let token = h.app_token().await;
    let faults = h.set_faults(json!({ "latency": "150ms" })).await;
    assert_eq!(faults["latency"], "150ms");
    let started = std::time::Instant::now();
    assert_eq!(h.get("/v1/invoices/summary", &token).await.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn the_faults_endpoint_reports_and_validates() {
    let h = start_default().await;
    let response = h
        .client
        .get(format!("{}/__sandbox/faults", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        body_json(response).await,
        json!({
            "fail_rate": 0.0,
            "fail_status": 500,
            "latency": "0s",
            "rate_limit": null,
            "script": [],
            "retry_after": "1",
            "token_fail_status": null,
        })
    );
    for bad in ["{not json", r#"{"fail_rate": 3}"#, r#"{"nonsense": true}"#] {
        let response = h
            .client
            .post(format!("{}/__sandbox/faults", h.base))
            .body(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{bad}");
    }
}

#[tokio::test]
async fn the_request_log_counts_and_keeps_headers() {
    let h = start_default().await;
    let token = h.app_token().await;
    let response = h
        .client
        .get(format!("{}/v1/invoices/summary", h.base))
        .bearer_auth(&token)
        .header("MS-RequestId", "11111111-2222-3333-4444-555555555555")
        .header("MS-CV", "abcdefghijklmnop.1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers();
    assert_eq!(
        headers["ms-requestid"],
        "11111111-2222-3333-4444-555555555555"
    );
    assert_eq!(headers["ms-cv"], "abcdefghijklmnop.1");
    assert!(headers.contains_key("ms-correlationid"));
    assert!(headers.contains_key("ms-serverid"));
    assert_eq!(h.get("/v1/nowhere", &token).await.status(), 404);

    let log = h.requests_log().await;
    assert_eq!(log["total"], 3);
    assert_eq!(log["counts"]["token"], 1);
    assert_eq!(log["counts"]["summary"], 1);
    assert_eq!(log["counts"]["other"], 1);
    assert_eq!(log["counts"]["invoices"], 0);
    let recent = log["recent"].as_array().unwrap();
    assert_eq!(recent.len(), 3);
    let summary = &recent[1];
    assert_eq!(summary["method"], "GET");
    assert_eq!(summary["path"], "/v1/invoices/summary");
    assert_eq!(summary["query"], "");
    assert_eq!(summary["status"], 200);
    assert_eq!(
        summary["headers"]["authorization"],
        format!("Bearer {token}")
    );
    assert_eq!(
        summary["headers"]["ms-requestid"],
        "11111111-2222-3333-4444-555555555555"
    );

    let response = h
        .client
        .delete(format!("{}/__sandbox/requests", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let log = h.requests_log().await;
    assert_eq!(log["total"], 0);
    assert_eq!(log["recent"], json!([]));
}

#[tokio::test]
async fn the_same_seed_gives_the_same_data() {
    let ids = |seed| async move {
        let h = start(SandboxOptions {
            seed,
            invoices: 12,
            ..SandboxOptions::default()
        })
        .await;
        let token = h.app_token().await;
        h.get_json("/v1/invoices", &token).await
    };
    let a = ids(5).await;
    let b = ids(5).await;
    let c = ids(6).await;
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[tokio::test]
async fn head_answers_every_get_route_with_the_get_head_and_no_body() {
    let h = start_default().await;
    let user = h.user_token().await;
    let invoice = h.all_invoices(&user).await[0].clone();
    let id = invoice["id"].as_str().unwrap().to_owned();
    for path in [
        "/v1/invoices/summary".to_owned(),
        "/v1/invoices/summaries".to_owned(),
        "/v1/invoices?size=2&offset=0".to_owned(),
        format!("/v1/invoices/{id}"),
        format!("/v1/invoices/{id}/lineitems/onetime/billinglineitems?size=2&offset=0"),
        format!("/v1/invoices/{id}/documents/statement"),
    ] {
        let get = h.get(&path, &user).await;
        assert_eq!(get.status(), 200, "GET {path}");
        let get_type = get.headers()["content-type"].clone();
        let get_len = get.bytes().await.unwrap().len();
        let head = h
            .client
            .head(format!("{}{path}", h.base))
            .bearer_auth(&user)
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), 200, "HEAD {path}");
        assert_eq!(head.headers()["content-type"], get_type, "HEAD {path}");
        assert_eq!(
            head.headers()["content-length"].to_str().unwrap(),
            get_len.to_string(),
            "HEAD {path}"
        );
        assert!(head.bytes().await.unwrap().is_empty(), "HEAD {path}");
    }
    // HEAD is checked like GET: no token, no answer.
    let response = h
        .client
        .head(format!("{}/v1/invoices", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

/// Issue 15, item 5: `/__sandbox/credentials` replaces what the token endpoint accepts at run
/// time (a secret rotated: the new accepted, the old refused), shows no secret, and refuses a bad
/// body or method; a federated token configured is accepted as a client assertion.
#[tokio::test]
async fn what_the_token_endpoint_accepts_is_replaced_at_run_time() {
    let h = start(SandboxOptions {
        federated_tokens: vec!["eyJfederated".into()],
        ..SandboxOptions::default()
    })
    .await;
    let admin = format!("{}/__sandbox/credentials", h.base);
    let token = |auth: &'static [(&'static str, &'static str)]| {
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", SANDBOX_CLIENT_ID),
            ("resource", RESOURCE),
        ];
        form.extend_from_slice(auth);
        let request = h.client.post(&h.token_url).form(&form);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    const OLD: &[(&str, &str)] = &[("client_secret", SANDBOX_CLIENT_SECRET)];
    const NEW: &[(&str, &str)] = &[("client_secret", "rotated-secret")];
    const FEDERATED: &[(&str, &str)] = &[
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", "eyJfederated"),
    ];
    assert_eq!((token(OLD).await, token(NEW).await), (200, 401));
    assert_eq!(token(FEDERATED).await, 200);

    let post = |body: &'static str| {
        let request = h.client.post(&admin).body(body);
        async move { request.send().await.unwrap() }
    };
    let added = post(r#"{"client_secrets": ["sandbox-client-secret", "rotated-secret"]}"#).await;
    assert_eq!(added.status(), 200);
    assert_eq!((token(OLD).await, token(NEW).await), (200, 200));
    assert_eq!(
        post(r#"{"client_secrets": ["rotated-secret"]}"#)
            .await
            .status(),
        200
    );
    assert_eq!((token(OLD).await, token(NEW).await), (401, 200));
    assert_eq!(token(FEDERATED).await, 200, "other kinds stay as they were");

    let shown = h.client.get(&admin).send().await.unwrap();
    assert_eq!(shown.status(), 200);
    let shown = shown.text().await.unwrap();
    assert!(
        !shown.contains("rotated-secret") && !shown.contains("eyJ"),
        "{shown}"
    );
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["client_secrets"], 1);
    assert_eq!(shown["federated_tokens"], 1);

    assert_eq!(
        post(r#"{"certificates": ["not a certificate"]}"#)
            .await
            .status(),
        400
    );
    assert_eq!(post("{not json").await.status(), 400);
    assert_eq!(token(NEW).await, 200, "a refused update changes nothing");
    let put = h.client.put(&admin).send().await.unwrap();
    assert_eq!(put.status(), 405);
    assert_eq!(put.headers()["allow"], "GET, POST");
}
