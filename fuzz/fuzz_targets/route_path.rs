//! Path normalisation and route matching: whatever the bytes, a path that is accepted is
//! canonical (no empty, `.` or `..` segment, no hidden separator), normalising it again changes
//! nothing, and the route it matches is the route its canonical form matches.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pcgate::route::{normalize_path, RouteTable};

fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut config = pcgate::config::Config::from_toml(pcgate::demo::SHIPPED_CONFIG)
            .expect("shipped config");
        // Matching does not depend on credentials, and their sources would read secret files.
        for route in &mut config.routes {
            route.credential = None;
        }
        RouteTable::new(&config.routes, &Default::default()).expect("shipped routes")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(path) = normalize_path(raw) else {
        return;
    };
    let canonical = path.as_str();
    assert!(canonical.starts_with('/'));
    for segment in path.segments() {
        assert!(!segment.is_empty() && segment != "." && segment != "..");
        assert!(!segment.contains(['/', '\\']));
    }
    let lower = canonical.to_ascii_lowercase();
    assert!(!lower.contains("%2f") && !lower.contains("%5c") && !canonical.contains("//"));
    let again = normalize_path(canonical).expect("a canonical path normalises");
    assert_eq!(again, path);
    let method = http::Method::GET;
    let first = table().find(&method, &path).map(|r| r.name.clone());
    let second = table().find(&method, &again).map(|r| r.name.clone());
    assert_eq!(first, second);
});
