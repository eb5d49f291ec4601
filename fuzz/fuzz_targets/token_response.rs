//! Token-endpoint answers: parsing never panics, a usable token has a lifetime, and an error
//! description is never longer than what is kept.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcgate::token::endpoint::{parse_issued, parse_refusal, FetchError};

fuzz_target!(|input: (u16, &[u8])| {
    let (status, body) = input;
    if let Ok(issued) = parse_issued(body) {
        assert!(!issued.expires_in.is_zero());
    }
    match parse_refusal(status, body) {
        FetchError::InvalidGrant(d) | FetchError::InvalidClient(d) => {
            assert!(d.chars().count() <= 300)
        }
        FetchError::Refused {
            error, description, ..
        } => {
            assert!(error.chars().count() <= 64);
            assert!(description.chars().count() <= 300);
        }
        _ => {}
    }
});
