//! A line on the agent's local socket, read as the agent reads a request
//! from `meshctl` and as `meshctl` reads the agent's answer (JSON).
//!
//! Asserts: whatever parses prints to JSON that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::api::{
    error::ApiResult,
    messages::{LocalRequest, LocalResponse},
};
use serde::{de::DeserializeOwned, Serialize};

fn round_trips<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(line: &str) {
    if let Ok(value) = serde_json::from_str::<T>(line) {
        let printed = serde_json::to_string(&value).expect("a parsed value prints");
        let again: T = serde_json::from_str(&printed).expect("printed JSON parses");
        assert_eq!(again, value, "{printed}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    round_trips::<LocalRequest>(line);
    round_trips::<ApiResult<LocalResponse>>(line);
});
