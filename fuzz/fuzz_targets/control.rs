//! The control protocol, both directions: a line the daemon reads as a
//! request, and a line the CLI reads as a response. What parses must
//! serialize and parse again.
#![no_main]
use hostcryptd::control::protocol::{ControlRequest, ControlResponse};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<ControlRequest>(data) {
        let text = serde_json::to_string(&request).expect("a request serializes");
        serde_json::from_str::<ControlRequest>(&text).expect("a serialized request parses");
    }
    if let Ok(response) = serde_json::from_slice::<ControlResponse>(data) {
        let text = serde_json::to_string(&response).expect("a response serializes");
        serde_json::from_str::<ControlResponse>(&text).expect("a serialized response parses");
    }
});
