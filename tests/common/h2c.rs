//! HTTP/2 by hand (RFC 9113): frames written and read byte by byte, for clients no library
//! would be (one that never answers a PING, one whose window stays at zero).

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame types.
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;
/// Flags.
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const ACK: u8 = 0x1;

/// One frame: the 9-byte head, then `payload`.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A GET for `path` on `stream`, HPACK without Huffman or indexing (RFC 7541).
pub fn get_headers(stream: u32, path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86]; // :method GET, :scheme http (static table 2 and 6)
    block.push(0x04); // :path, literal value, not indexed (static name 4)
    block.push(path.len() as u8);
    block.extend_from_slice(path.as_bytes());
    block.push(0x01); // :authority (static name 1): an IP literal, which the Host rule answers
    block.push(9);
    block.extend_from_slice(b"127.0.0.1");
    frame(HEADERS, END_STREAM | END_HEADERS, stream, &block)
}

/// Reads one frame: (type, flags, stream, payload), or `None` once the peer closes.
pub async fn read_frame(
    stream: &mut TcpStream,
    deadline: Instant,
) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    match tokio::time::timeout_at(deadline, stream.read_exact(&mut head)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return None,
        Err(_) => panic!("no frame and no close by the deadline"),
    }
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    match tokio::time::timeout_at(deadline, stream.read_exact(&mut payload)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return None,
        Err(_) => panic!("a frame cut short"),
    }
    let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Some((head[3], head[4], id, payload))
}

/// The frame types read until the connection closes, within `within`.
pub async fn frames_until_closed(stream: &mut TcpStream, within: Duration) -> Vec<u8> {
    let deadline = Instant::now() + within;
    let mut kinds = Vec::new();
    while let Some((kind, ..)) = read_frame(stream, deadline).await {
        kinds.push(kind);
    }
    kinds
}

/// An HTTP client that speaks HTTP/2 cleartext from the first byte (prior knowledge), as
/// [`super::client`] speaks HTTP/1.
pub fn h2_client() -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(pcgate::upstream::tls_config(None).unwrap())
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(super::WAIT)
        .build()
        .unwrap()
}
