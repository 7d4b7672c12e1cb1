//! Byte strings in messages (secrets' and configs' content): base64 text in
//! JSON (the local socket), where serde's default of an array of numbers
//! took four bytes per byte and pushed a 500 KiB secret past the socket's
//! request limit; a msgpack binary on the cluster port and in the store.
//! Either side also reads the old array form, so entries stored by an
//! earlier agent still decode.
//!
//! Use as `#[serde(with = "crate::api::wire_bytes")]`.

use std::fmt;

use base64::{engine::general_purpose::STANDARD, Engine};
use serde::{
    de::{self, SeqAccess, Visitor},
    Deserializer, Serializer,
};

/// Serializes `bytes` as base64 text or as a binary.
pub(crate) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    if serializer.is_human_readable() {
        serializer.serialize_str(&STANDARD.encode(bytes))
    } else {
        serializer.serialize_bytes(bytes)
    }
}

/// Reads base64 text, a binary, or an array of byte values.
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    deserializer.deserialize_any(BytesVisitor)
}

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("base64 text or bytes")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Vec<u8>, E> {
        STANDARD
            .decode(text)
            .map_err(|e| E::custom(format!("the content is not base64: {e}")))
    }

    fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
        Ok(bytes.to_vec())
    }

    fn visit_byte_buf<E: de::Error>(self, bytes: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(bytes)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Holder {
        #[serde(with = "super")]
        data: Vec<u8>,
    }

    #[derive(Serialize)]
    struct Old {
        data: Vec<u8>,
    }

    #[test]
    fn base64_in_json_binary_in_msgpack_and_the_old_arrays_still_read() {
        let held = Holder {
            data: vec![0, 1, 2, 250, 255],
        };
        let json = serde_json::to_string(&held).unwrap();
        assert_eq!(json, r#"{"data":"AAEC+v8="}"#);
        assert_eq!(serde_json::from_str::<Holder>(&json).unwrap(), held);
        let packed = rmp_serde::to_vec_named(&held).unwrap();
        assert!(packed.len() < 20, "a msgpack bin: {packed:?}");
        assert_eq!(rmp_serde::from_slice::<Holder>(&packed).unwrap(), held);
        let old = Old {
            data: held.data.clone(),
        };
        let old_json = serde_json::to_string(&old).unwrap();
        assert_eq!(serde_json::from_str::<Holder>(&old_json).unwrap(), held);
        let old_packed = rmp_serde::to_vec_named(&old).unwrap();
        assert_eq!(rmp_serde::from_slice::<Holder>(&old_packed).unwrap(), held);
        let err = serde_json::from_str::<Holder>(r#"{"data":"not base64!"}"#).unwrap_err();
        assert!(err.to_string().contains("not base64"), "{err}");
        // 500 KiB of content fits the local socket's 1 MiB request.
        let big = Holder {
            data: vec![0xab; 500 * 1024],
        };
        assert!(serde_json::to_vec(&big).unwrap().len() < 700 * 1024);
    }
}
