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

/// Issue 15: `pcgate demo --credential certificate`, the binary, makes a throwaway certificate,
/// the sandbox trusts it, and the gateway answers the printed summary call with tokens got by
/// signed assertions. The key is in a 0600 file, never in the output, and gone after Ctrl-C.
#[tokio::test]
async fn the_demo_runs_with_a_certificate_credential() {
    use std::io::BufRead;
    use tokio::time::Instant;

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pcgate"))
        .args([
            "--log-format",
            "text",
            "demo",
            "--credential",
            "certificate",
        ])
        .env_remove("PCGATE_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The banner, read on a thread until its last line (bounded: the demo prints it at once).
    let stdout = child.stdout.take().unwrap();
    let (lines, banner) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = String::new();
    let deadline = Instant::now() + WAIT;
    while !printed.contains("Ctrl-C stops both") {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = banner
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no banner from the demo: {printed}"));
        printed.push_str(&line);
        printed.push('\n');
    }
    let url_after = |label: &str| -> String {
        let line = printed
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label} line: {printed}"));
        line.split_whitespace().nth(1).unwrap().to_owned()
    };
    let (gateway, sandbox) = (url_after("gateway"), url_after("sandbox"));
    let dir = printed
        .split("a throwaway certificate in ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| panic!("the banner does not say where the certificate is: {printed}"));
    let key = dir.join("private-key.pem");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    }
    let key_lines: Vec<String> = std::fs::read_to_string(&key)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::to_owned)
        .collect();

    let summary = client()
        .get(format!("{gateway}/v1/invoices/summary"))
        .send()
        .await
        .unwrap();
    assert_eq!(summary.status(), 200);
    let summary: serde_json::Value = summary.json().await.unwrap();
    assert_eq!(summary["attributes"]["objectType"], "InvoiceSummary");
    let log: serde_json::Value = client()
        .get(format!("{sandbox}/__sandbox/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let tokens: Vec<&serde_json::Value> = log["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["route"] == "token")
        .collect();
    assert!(!tokens.is_empty());
    for token in tokens {
        assert_eq!(token["status"], 200, "{token}");
        assert!(
            token["client"]
                .as_str()
                .unwrap()
                .starts_with("client_assertion x5t#S256:"),
            "{token}"
        );
    }

    let _ = std::process::Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status();
    let output = wait_exit(child).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    for line in &key_lines {
        assert!(!printed.contains(line.as_str()) && !stderr.contains(line.as_str()));
    }
    assert!(!printed.contains("PRIVATE KEY") && !stderr.contains("PRIVATE KEY"));
    assert!(!dir.exists(), "the throwaway key outlived the demo");
}
