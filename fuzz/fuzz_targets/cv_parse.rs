//! The MS-CV parser and operators: a parsed vector prints back to what parses to it, and any
//! operation keeps it valid and within its length limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcgate::cv::CorrelationVector;

fuzz_target!(|input: (&str, Vec<bool>)| {
    let (text, ops) = input;
    let Ok(mut cv) = CorrelationVector::parse(text) else {
        return;
    };
    assert_eq!(CorrelationVector::parse(&cv.to_string()), Ok(cv.clone()));
    for extend in ops.into_iter().take(300) {
        if extend {
            cv.extend()
        } else {
            cv.increment()
        }
        let printed = cv.to_string();
        assert!(printed.trim_end_matches('!').len() <= cv.version().max_len());
        assert_eq!(CorrelationVector::parse(&printed), Ok(cv.clone()));
    }
});
