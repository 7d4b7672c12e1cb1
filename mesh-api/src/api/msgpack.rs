//! msgpack, the encoding of every message, decoded with a bound on nesting.

/// How deeply a message may nest. The messages nest a few tens of levels
/// at most, and decoding recurses once per level: without a bound, a
/// small frame of requests each forwarded inside the next (10 KB, before
/// any authentication) overflowed the stack and aborted the agent.
pub(crate) const MAX_DEPTH: usize = 64;

/// Decodes msgpack with the nesting bound.
pub fn from_msgpack<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut de)
}
