//! Key material carried as text (the unlock key, the CA key, tokens as the
//! API prints them): zeroized when dropped and never printed by `Debug`,
//! so a log line that formats a message or the store cannot leak it. On
//! the wire and in the store it is the plain string.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

/// A secret string.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretText(Zeroizing<String>);

impl SecretText {
    /// Wraps `text`.
    pub fn new(text: impl Into<String>) -> SecretText {
        SecretText(Zeroizing::new(text.into()))
    }

    /// The text, for the few places that use it (never for logging).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretText {
    fn from(text: String) -> SecretText {
        SecretText::new(text)
    }
}

impl From<&str> for SecretText {
    fn from(text: &str) -> SecretText {
        SecretText::new(text)
    }
}

impl From<Zeroizing<String>> for SecretText {
    fn from(text: Zeroizing<String>) -> SecretText {
        SecretText(text)
    }
}

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for SecretText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(SecretText::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_travels_as_a_string_and_never_prints() {
        let key = SecretText::new("MESHKEY-1-abc");
        assert_eq!(format!("{key:?}"), "<redacted>");
        assert_eq!(format!("{:?}", Some(&key)), "Some(<redacted>)");
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(json, "\"MESHKEY-1-abc\"");
        let back: SecretText = serde_json::from_str(&json).unwrap();
        assert_eq!(back.expose(), "MESHKEY-1-abc");
        let packed = rmp_serde::to_vec(&key).unwrap();
        assert_eq!(rmp_serde::from_slice::<String>(&packed).unwrap(), "MESHKEY-1-abc");
    }
}
