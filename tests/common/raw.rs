//! Raw TCP on loopback, as an attacker or a broken network would speak: reading until the peer
//! closes, and reading a status off the bytes.

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long a connection that should be closed may take to be seen closed: far above the
/// timeouts tests configure (a few hundred ms), far below what a leak would hold it for.
pub const CLOSED_WITHIN: Duration = Duration::from_secs(5);

/// Reads until the peer closes (EOF or reset); the bytes read. `Err` with what was read if it
/// stays open `within`.
pub async fn try_read_until_closed(
    stream: &mut TcpStream,
    within: Duration,
) -> Result<Vec<u8>, Vec<u8>> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(seen),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => return Err(seen),
        }
    }
}

/// Reads until the peer closes (EOF or reset); the bytes read. Panics if it stays open `within`.
pub async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    try_read_until_closed(stream, within)
        .await
        .unwrap_or_else(|seen| {
            panic!(
                "the connection is still open after {within:?} ({} bytes read)",
                seen.len()
            )
        })
}

/// The status of the first HTTP/1 response in `bytes` (0 if none).
pub fn first_status(bytes: &[u8]) -> u16 {
    String::from_utf8_lossy(bytes)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}
