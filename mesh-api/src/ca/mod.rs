//! The swarm's keys and certificates: the root CA and node certificates
//! ([`pki`]), join tokens ([`token`]), the data key, key-encryption key and
//! unlock key ([`seal`]), and the key files on disk ([`keystore`]).

pub mod keystore;
pub mod pki;
pub mod seal;
pub mod token;
