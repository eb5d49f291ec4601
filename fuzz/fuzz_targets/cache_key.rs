//! Cache-key building: never panics, keeps the path, and is independent of the order of
//! differently named query pairs, while pairs of one name (as the upstream decodes names) keep
//! their order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcgate::layer::cache::Key;

/// A pair's name as the key orders it: `+` a space, `%XX` decoded, ASCII case folded.
fn decoded_name(pair: &str) -> Vec<u8> {
    let name = pair.split_once('=').map_or(pair, |(name, _)| name);
    let mut out = Vec::new();
    let bytes = name.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    out.make_ascii_lowercase();
    out
}

fuzz_target!(|input: (&str, &str, &[u8], &[u8], &[u8])| {
    let (path, query, accept, locale, token) = input;
    let uri = if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    };
    let Ok(mut request) = http::Request::get(uri.as_str()).body(pcgate::body::empty()) else {
        return;
    };
    for (name, value) in [
        ("accept", accept),
        ("x-locale", locale),
        ("ms-continuationtoken", token),
    ] {
        if let Ok(value) = http::HeaderValue::from_bytes(value) {
            request.headers_mut().insert(name, value);
        }
    }
    let key = Key::of(&request, &[]);
    assert_eq!(key.path(), request.uri().path());
    // The pairs in reverse order: each name's pairs are reversed too, so the key is the same
    // exactly when every name's sequence of pairs reads the same both ways.
    if let Some(q) = request.uri().query() {
        let pairs: Vec<&str> = q.split('&').filter(|p| !p.is_empty()).collect();
        let reversed: Vec<&str> = q.split('&').rev().collect();
        let uri = format!("{}?{}", request.uri().path(), reversed.join("&"));
        if let Ok(mut other) = http::Request::get(uri.as_str()).body(pcgate::body::empty()) {
            *other.headers_mut() = request.headers().clone();
            let mut groups: std::collections::BTreeMap<Vec<u8>, Vec<&str>> = Default::default();
            for pair in &pairs {
                groups.entry(decoded_name(pair)).or_default().push(pair);
            }
            let palindromes = groups
                .values()
                .all(|g| g.iter().eq(g.iter().rev()));
            assert_eq!(Key::of(&other, &[]) == key, palindromes);
        }
    }
});
