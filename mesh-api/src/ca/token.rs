//! Join tokens: `MESHTKN-1-<sha256 of the root CA, 64 hex>-<secret, 32 hex>`.
//!
//! The digest lets a joining node verify the manager it talks to before it
//! sends the secret (the TLS connection is pinned to that CA); the secret
//! says which role the node joins with. Tokens are compared in constant time.

use std::fmt;

use rand::RngCore;

const PREFIX: &str = "MESHTKN-1-";

/// Why a token was refused before it was even sent.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Wrong overall shape.
    #[error("not a join token: expected MESHTKN-1-<64 hex digits>-<32 hex digits> (print one with `meshctl swarm join-token worker` on a manager)")]
    Format,
    /// The CA digest part is not 64 hex digits.
    #[error("the join token's CA digest part is malformed (expected 64 hex digits); was the token copied whole?")]
    Digest,
    /// The secret part is not 32 hex digits.
    #[error("the join token's secret part is malformed (expected 32 hex digits); was the token copied whole?")]
    Secret,
}

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    digest: [u8; 32],
    secret: [u8; 16],
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken(ca {}, secret <redacted>)", hex::encode(self.digest))
    }
}

impl JoinToken {
    /// A new random token for the CA with `ca_digest`.
    pub fn generate(ca_digest: [u8; 32]) -> JoinToken {
        let mut secret = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        JoinToken {
            digest: ca_digest,
            secret,
        }
    }

    /// The text form.
    pub fn to_text(&self) -> String {
        format!("{PREFIX}{}-{}", hex::encode(self.digest), hex::encode(self.secret))
    }

    /// Parses a token (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<JoinToken, TokenError> {
        let rest = text.trim().strip_prefix(PREFIX).ok_or(TokenError::Format)?;
        let (digest, secret) = rest.split_once('-').ok_or(TokenError::Format)?;
        let digest: [u8; 32] = hex::decode(digest)
            .ok()
            .and_then(|d| d.try_into().ok())
            .ok_or(TokenError::Digest)?;
        let secret: [u8; 16] = hex::decode(secret)
            .ok()
            .and_then(|s| s.try_into().ok())
            .ok_or(TokenError::Secret)?;
        Ok(JoinToken { digest, secret })
    }

    /// The digest of the CA this token trusts.
    pub fn ca_digest(&self) -> [u8; 32] {
        self.digest
    }

    /// Whether `stored` (a token's text) has the same secret, compared in
    /// constant time.
    pub fn secret_matches(&self, stored: &str) -> bool {
        let Ok(other) = JoinToken::parse(stored) else {
            return false;
        };
        self.secret
            .iter()
            .zip(other.secret.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_matching() {
        let t = JoinToken::generate([7; 32]);
        let text = t.to_text();
        assert_eq!(JoinToken::parse(&format!(" {text}\n")).unwrap(), t);
        assert!(t.secret_matches(&text));
        assert!(!t.secret_matches(&JoinToken::generate([7; 32]).to_text()));
        assert!(!t.secret_matches("junk"));
        assert!(!format!("{t:?}").contains(&text[text.len() - 32..]));
    }

    #[test]
    fn malformed_tokens_name_their_fault() {
        let text = JoinToken::generate([1; 32]).to_text();
        assert_eq!(JoinToken::parse("SWMTKN-1-abc-def"), Err(TokenError::Format));
        assert_eq!(JoinToken::parse("MESHTKN-1-nodash"), Err(TokenError::Format));
        let bad_digest = text.replacen("0101", "zz01", 1);
        assert_eq!(JoinToken::parse(&bad_digest), Err(TokenError::Digest));
        assert_eq!(JoinToken::parse(&text[..text.len() - 2]), Err(TokenError::Secret));
    }
}
