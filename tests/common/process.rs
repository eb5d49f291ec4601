//! The real binary as a child process, and the files and ports it is given.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use tokio::time::Instant;

use super::{client, WAIT};

/// A fresh, empty directory under the system temp dir, named for the test and this process.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pcgate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A loopback port free a moment ago, for a child process's config.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (bounded by [`WAIT`]) until an admin port on loopback answers `/healthz`.
pub async fn wait_for_healthz(admin: u16) {
    let deadline = Instant::now() + WAIT;
    while client()
        .get(format!("http://127.0.0.1:{admin}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the gateway did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends the child SIGTERM and asserts it exits cleanly.
pub async fn terminate(mut child: Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// Writes `text` to `path` as Kubernetes updates a mounted Secret and the kubelet a projected
/// token: a new file renamed over the old, so a reader never sees it half-written.
pub fn replace_file(path: &std::path::Path, text: &str) {
    let temp = path.with_extension("new");
    std::fs::write(&temp, text).unwrap();
    std::fs::rename(&temp, path).unwrap();
}

/// The first 12 hex digits of SHA-256, as the sandbox's request log names a secret or token.
pub fn fingerprint(value: &str) -> String {
    use sha2::Digest;
    super::hex(&sha2::Sha256::digest(value.as_bytes())[..6])
}

/// Waits (bounded by [`WAIT`]) for a child process to exit; kills it if it does not.
pub async fn wait_exit(mut child: Child) -> std::process::Output {
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child process did not exit");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.wait_with_output().unwrap()
}
