//! Bytes as they arrive on a node's mutual-TLS RPC connection, read frame
//! by frame as the server (requests: Raft, joins, heartbeats, the cluster
//! API) and the client (responses) read them.
//!
//! Asserts: a frame never exceeds the limit; whatever decodes re-encodes
//! to a frame that reads and decodes back to the same bytes (so nothing
//! the peer sent is lost or changed in between); a response the client
//! cannot decode still names its request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::{
    api::messages::{PeerRequest, PeerResponse},
    wire::rpc::{self, decode_request, decode_response, encode_frame, read_frame, RpcError},
};
use serde::{de::DeserializeOwned, Serialize};

/// The limit a peer without a client certificate (anyone who can reach
/// the cluster port) faces; members get 64 MiB, and the refusal is the same.
const MAX_FRAME: usize = rpc::DEFAULT_ANONYMOUS_MAX_FRAME;

/// Re-encodes a decoded message, reads that frame back and re-encodes
/// again: both encodings must be the same bytes.
fn stable<T: Serialize + DeserializeOwned>(id: u64, message: &T) {
    let frame = encode_frame(id, message, usize::MAX).expect("a decoded message encodes");
    let body = futures::executor::block_on(read_frame(&mut &frame[..], usize::MAX))
        .expect("an encoded frame reads")
        .expect("an encoded frame is not the end");
    assert_eq!(body.len(), frame.len() - 4);
    let (again_id, again): (u64, T) = decode_request(&body).expect("an encoded frame decodes");
    assert_eq!(again_id, id);
    let again = encode_frame(again_id, &again, usize::MAX).expect("a decoded message encodes");
    assert!(frame == again, "re-encoding changed the message");
}

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    loop {
        let body = match futures::executor::block_on(read_frame(&mut stream, MAX_FRAME)) {
            Ok(Some(body)) => body,
            Ok(None) => break,
            Err(RpcError::FrameTooLarge { size, max }) => {
                assert!(size > max && max == MAX_FRAME);
                break;
            }
            Err(RpcError::Io(_)) => break,
            Err(other) => panic!("read_frame failed unexpectedly: {other:?}"),
        };
        assert!(body.len() <= MAX_FRAME);
        if let Ok((id, request)) = decode_request::<PeerRequest>(&body) {
            stable(id, &request);
        }
        match decode_response::<PeerResponse>(&body) {
            Ok((id, Ok(response))) => stable(id, &response),
            Ok((id, Err(error))) => {
                assert!(matches!(error, RpcError::Decode(ref m) if m.contains(&format!("request {id}"))));
            }
            Err(error) => assert!(matches!(error, RpcError::Decode(_))),
        }
    }
});
