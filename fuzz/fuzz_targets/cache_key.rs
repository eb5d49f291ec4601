//! Cache-key building: never panics, keeps the path, and does not depend on query order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcgate::layer::cache::Key;

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
    let key = Key::of(&request);
    assert_eq!(key.path(), request.uri().path());
    // The same pairs in reverse order make the same key.
    if let Some(q) = request.uri().query() {
        let reversed: Vec<&str> = q.split('&').rev().collect();
        let uri = format!("{}?{}", request.uri().path(), reversed.join("&"));
        if let Ok(mut other) = http::Request::get(uri.as_str()).body(pcgate::body::empty()) {
            *other.headers_mut() = request.headers().clone();
            assert_eq!(Key::of(&other), key);
        }
    }
});
