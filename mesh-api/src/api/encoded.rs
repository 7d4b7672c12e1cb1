//! A part of a message that many receivers get alike, encoded once.
//!
//! The dispatcher sends each network's endpoints and services to every
//! node on that network. At a thousand nodes, encoding the same lists again
//! for each node's answer was most of the leader's work (`perf`: 64% in
//! the assignments' serialisation). An [`Encoded`] value carries its
//! msgpack encoding, made once when it is built; it goes on the wire as a
//! msgpack bin holding that encoding, so sending it is a copy, and it is
//! decoded from one.

use std::{fmt, ops::Deref, sync::Arc};

use serde::{de::DeserializeOwned, Deserialize, Deserializer, Serialize, Serializer};

/// A value and its msgpack encoding, both shared.
pub struct Encoded<T> {
    value: Arc<T>,
    bytes: Arc<[u8]>,
}

impl<T: Serialize> Encoded<T> {
    /// Encodes `value` once.
    pub fn new(value: T) -> Encoded<T> {
        // Encoding plain data into a Vec cannot fail: no I/O, and these
        // types have no maps with non-string keys or custom errors.
        let bytes = rmp_serde::to_vec(&value).expect("reason: plain data encodes");
        Encoded {
            value: Arc::new(value),
            bytes: bytes.into(),
        }
    }
}

impl<T> Encoded<T> {
    /// The value's msgpack encoding.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl<T> Deref for Encoded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> Clone for Encoded<T> {
    fn clone(&self) -> Self {
        Encoded {
            value: self.value.clone(),
            bytes: self.bytes.clone(),
        }
    }
}

impl<T: Serialize> From<T> for Encoded<T> {
    fn from(value: T) -> Self {
        Encoded::new(value)
    }
}

impl<T: Serialize + Default> Default for Encoded<T> {
    fn default() -> Self {
        Encoded::new(T::default())
    }
}

impl<T: PartialEq> PartialEq for Encoded<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<T: Eq> Eq for Encoded<T> {}

impl<T: fmt::Debug> fmt::Debug for Encoded<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.value.fmt(f)
    }
}

impl<T> Serialize for Encoded<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.bytes)
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Encoded<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = crate::api::wire_bytes::deserialize(deserializer)?;
        let value = crate::api::msgpack::from_msgpack(&bytes)
            .map_err(|e| serde::de::Error::custom(format!("an encoded part does not decode: {e}")))?;
        Ok(Encoded {
            value: Arc::new(value),
            bytes: bytes.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq, Default)]
    struct Message {
        name: String,
        part: Encoded<Vec<(u32, String)>>,
    }

    #[test]
    fn a_part_goes_on_the_wire_as_its_own_encoding_and_comes_back() {
        let part = Encoded::new(vec![(1, "a".to_string()), (2, "b".to_string())]);
        let wire = rmp_serde::to_vec(&Message {
            name: "m".into(),
            part: part.clone(),
        })
        .unwrap();
        // The part's bytes appear whole in the message.
        assert!(wire.windows(part.bytes().len()).any(|w| w == part.bytes()));
        let back: Message = rmp_serde::from_slice(&wire).unwrap();
        assert_eq!(back.part, part);
        assert_eq!(back.part.bytes(), part.bytes());
        assert_eq!(back.part[1].1, "b");
    }

    #[test]
    fn a_part_that_does_not_decode_is_refused_with_a_clear_error() {
        #[derive(Serialize)]
        struct Raw {
            name: String,
            part: serde_bytes_like::Bin,
        }
        mod serde_bytes_like {
            pub(crate) struct Bin(pub Vec<u8>);
            impl serde::Serialize for Bin {
                fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                    s.serialize_bytes(&self.0)
                }
            }
        }
        let wire = rmp_serde::to_vec(&Raw {
            name: "m".into(),
            part: serde_bytes_like::Bin(vec![0xc1]),
        })
        .unwrap();
        let err = rmp_serde::from_slice::<Message>(&wire).unwrap_err().to_string();
        assert!(err.contains("an encoded part does not decode"), "{err}");
    }

    #[test]
    fn json_carries_a_part_as_bytes_too() {
        let m = Message {
            name: "m".into(),
            part: vec![(7, "x".to_string())].into(),
        };
        let back: Message = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }
}
