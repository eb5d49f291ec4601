//! Issue 3: the demo's configuration end to end: the sandbox, and the gateway configured for it
//! exactly as `pcgate demo` does, spoken to as the printed curl lines do.

mod common;

use common::*;
use pcgate::sandbox::{Sandbox, SandboxOptions};

#[tokio::test]
async fn the_demo_configuration_serves_the_printed_calls() {
    let sandbox = Sandbox::bind(SandboxOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let mut config = pcgate::demo::config_for(&sandbox).unwrap();
    let sandbox_url = sandbox.base_url();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(sandbox.serve(async move {
        let _ = stopped.await;
    }));
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    let gateway = start_with(config).await;
    let client = client();

    let summary: serde_json::Value = client
        .get(gateway.url("/v1/invoices/summary"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(summary["attributes"]["objectType"], "InvoiceSummary");
    assert!(summary["balanceAmount"].is_number());

    let page: serde_json::Value = client
        .get(gateway.url("/v1/invoices?size=2&offset=0"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    assert_eq!(page["links"]["next"]["uri"], "/invoices?size=2&offset=2");

    // App+User only: works because the demo wires the `user` credential.
    let summaries = client
        .get(gateway.url("/v1/invoices/summaries"))
        .send()
        .await
        .unwrap();
    assert_eq!(summaries.status(), 200);
    let summaries: serde_json::Value = summaries.json().await.unwrap();
    assert!(
        summaries["items"].as_array().unwrap().len() >= 2,
        "one summary per currency"
    );

    let id = page["items"][0]["id"].as_str().unwrap();
    let invoice = client
        .get(gateway.url(&format!("/v1/invoices/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(invoice.status(), 200);
    let pdf = client
        .get(gateway.url(&format!("/v1/invoices/{id}/documents/statement")))
        .header("Accept", "application/pdf")
        .send()
        .await
        .unwrap();
    assert_eq!(pdf.status(), 200);
    assert_eq!(pdf.headers()["content-type"], "application/pdf");
    assert!(pdf.bytes().await.unwrap().starts_with(b"%PDF-"));

    let refused = client
        .get(gateway.url("/v1/customers"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);

    let log: serde_json::Value = client
        .get(format!("{sandbox_url}/__sandbox/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(log["counts"]["summary"], 1);
    assert_eq!(log["counts"]["statement"], 1);
    assert_eq!(log["counts"]["other"], 0, "the 403 reached the upstream");
    drop(stop);
}
