//! Issue 4: no secret in the logs. Runs the real binary at `RUST_LOG=trace` against the sandbox,
//! drives token fetches, a refresh-token rotation and a 401 replay, then searches its whole output.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use pcgate::sandbox::{SandboxOptions, SANDBOX_CLIENT_SECRET, SANDBOX_REFRESH_TOKEN};
use serde_json::json;

#[tokio::test]
async fn a_trace_level_run_logs_no_secret() {
    let sandbox = start_sandbox(SandboxOptions {
        token_ttl: Duration::from_secs(2),
        ..SandboxOptions::default()
    })
    .await;
    let dir = temp_dir("secrets");
    let (secret_file, refresh_file, config_file, log_file) = (
        dir.join("secret"),
        dir.join("refresh-token"),
        dir.join("pcgate.toml"),
        dir.join("log"),
    );
    std::fs::write(&secret_file, SANDBOX_CLIENT_SECRET).unwrap();
    std::fs::write(&refresh_file, SANDBOX_REFRESH_TOKEN).unwrap();
    let (listen, admin) = (free_port(), free_port());
    let mut config = sandbox.config();
    config.server.listen = ([127, 0, 0, 1], listen).into();
    config.server.admin_listen = ([127, 0, 0, 1], admin).into();
    let app = config.app_mut();
    app.refresh_before = secs(1);
    app.secret = secret_from_file(&secret_file);
    let user = config.user_mut();
    user.refresh_token = None;
    user.refresh_token_file = Some(refresh_file.clone());
    user.app.refresh_before = secs(1);
    user.app.secret = secret_from_file(&secret_file);
    config.validate().expect("test config is valid");
    // No secret inline: the printed config is the whole config.
    let toml = config.to_toml();
    assert!(!toml.contains("[redacted]"), "{toml}");
    std::fs::write(&config_file, toml).unwrap();

    // The fleet tier, with a password in its URL (from the environment, as in Kubernetes) that
    // this Redis does not expect: every Redis operation fails, and its errors are logged.
    let redis = start_redis();
    let redis_url = format!("redis://:redis-pa55word@127.0.0.1:{}", redis.port);
    let child = Command::new(env!("CARGO_BIN_EXE_pcgate"))
        .args(["--log-format", "text", "run", "--config"])
        .arg(&config_file)
        .env("RUST_LOG", "trace")
        .env("PCGATE_SHARED__REDIS_URL", &redis_url)
        .env("PCGATE_SHARED__NAMESPACE", "secrets")
        .env_remove("PCGATE_CONFIG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_file).unwrap())
        .spawn()
        .unwrap();

    let base = format!("http://127.0.0.1:{listen}");
    wait_for_healthz(admin).await;
    let get = |path: &str| {
        let request = client()
            .get(format!("{base}{path}"))
            .header("Authorization", "Bearer callers-secret-key");
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(get("/v1/invoices/summary").await, 200);
    assert_eq!(get("/v1/invoices/summaries").await, 200);
    sandbox.faults(json!({"revoke_tokens": true})).await;
    assert_eq!(get("/v1/invoices?size=2").await, 200);
    // Let the 2 s tokens be refreshed in the background at least once each.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(get("/v1/invoices/summaries").await, 200);

    terminate(child).await;

    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(
        log.contains("token refreshed"),
        "the run did not refresh tokens"
    );
    assert!(log.contains("TRACE"), "the run did not log at trace level");
    assert!(
        log.contains("shared tier"),
        "the run did not use the shared tier"
    );
    let mut secrets = vec![
        SANDBOX_CLIENT_SECRET.to_owned(),
        SANDBOX_REFRESH_TOKEN.to_owned(),
        "callers-secret-key".to_owned(),
        "redis-pa55word".to_owned(),
        std::fs::read_to_string(&refresh_file)
            .unwrap()
            .trim()
            .to_owned(),
    ];
    for request in sandbox.log().await["recent"].as_array().unwrap() {
        if let Some(bearer) = request["headers"]["authorization"].as_str() {
            secrets.push(bearer.trim_start_matches("Bearer ").to_owned());
        }
    }
    assert!(
        secrets.len() > 6,
        "too few tokens seen to make the check meaningful"
    );
    for secret in &secrets {
        assert!(!secret.is_empty());
        assert!(
            !log.contains(secret.as_str()),
            "the log contains a secret ({} characters)",
            secret.len()
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
