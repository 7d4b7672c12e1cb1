//! What an operator pastes: join tokens (`swarm join --token`), unlock keys
//! (`swarm unlock`) and WireGuard public keys (reported in heartbeats).
//!
//! Asserts: whatever parses prints to text that parses to the same value,
//! a token's secret matches its own text, and a parsed token or key has
//! exactly the shape the format promises.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::{
    api::assignment::tunnel::{key_text, parse_public_key},
    ca::{seal::UnlockKey, token::JoinToken},
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(token) = JoinToken::parse(text) {
        let printed = token.to_text();
        assert_eq!(printed.len(), "MESHTKN-1-".len() + 64 + 1 + 32);
        assert_eq!(JoinToken::parse(&printed), Ok(token.clone()));
        assert!(token.secret_matches(&printed));
        assert!(token.secret_matches(text));
        assert_eq!(hex::encode(token.ca_digest()), printed[10..74]);
    }
    if let Ok(key) = UnlockKey::parse(text) {
        let printed = key.to_text();
        assert_eq!(printed.len(), "MESHKEY-1-".len() + 64);
        assert_eq!(UnlockKey::parse(&printed), Ok(key));
    }
    if let Ok(key) = parse_public_key(text) {
        assert_eq!(parse_public_key(&key_text(&key)), Ok(key));
    }
});
