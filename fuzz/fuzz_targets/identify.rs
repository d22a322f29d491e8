//! Any line: neither function panics, `validate` agrees with serde_json on whether it is
//! JSON, and on a valid line whose identity does not hang on key order (see
//! `reference::unambiguous`) `identify` finds the identity a full parse finds, never a
//! nested id.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_core::{LineKind, identify, validate};

#[path = "../../crates/core/tests/reference/mod.rs"]
mod reference;

fuzz_target!(|line: &[u8]| {
    let valid = validate(line).is_ok();
    assert_eq!(
        valid,
        reference::serde_accepts(line),
        "validate and serde_json disagree on {:?}",
        String::from_utf8_lossy(line)
    );
    let got = identify(line);
    if !valid || !reference::unambiguous(line) {
        return;
    }
    match (reference::reference(line), got) {
        (Some(Ok(want)), Ok(LineKind::Activity(id))) => assert_eq!(id, want),
        (Some(Ok(want)), other) => panic!("the full parse finds {want:?}, identify {other:?}"),
        (_, Ok(LineKind::Activity(id))) => {
            panic!("identify finds {id:?} where the full parse finds no valid id")
        }
        _ => {}
    }
});
