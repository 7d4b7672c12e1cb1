//! The frame codec (pure but for the reads and writes it is given):
//! a `u32` big-endian length, then the msgpack `(id, payload)`.

use std::io;

use crate::api::msgpack::from_msgpack;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::*;

/// Writes queued frames until the queue closes, flushing whenever it runs empty.
pub(super) async fn write_frames<W: AsyncWrite + Unpin>(
    writer: &mut W,
    queue: &mut mpsc::Receiver<Vec<u8>>,
) -> io::Result<()> {
    while let Some(frame) = queue.recv().await {
        writer.write_all(&frame).await?;
        while let Ok(frame) = queue.try_recv() {
            writer.write_all(&frame).await?;
        }
        writer.flush().await?;
    }
    Ok(())
}

/// Encodes `(id, payload)` as a complete frame, header included.
pub fn encode_frame<T: Serialize>(id: u64, payload: &T, max_frame: usize) -> Result<Vec<u8>, RpcError> {
    let mut frame = vec![0; HEADER_LEN];
    rmp_serde::encode::write_named(&mut frame, &(id, payload)).map_err(|error| RpcError::Encode(error.to_string()))?;
    let size = frame.len() - HEADER_LEN;
    let too_large = RpcError::FrameTooLarge { size, max: max_frame };
    if size > max_frame {
        return Err(too_large);
    }
    let length = u32::try_from(size).map_err(|_| too_large)?;
    frame[..HEADER_LEN].copy_from_slice(&length.to_be_bytes());
    Ok(frame)
}

/// Decodes a request frame's body as the server does: a bad body is an
/// error that closes the connection.
pub fn decode_request<Req: DeserializeOwned>(body: &[u8]) -> Result<(u64, Req), RpcError> {
    from_msgpack(body).map_err(|error| RpcError::Decode(format!("request: {error}")))
}

/// Decodes a response frame's body as the client does: a body whose id can
/// be read fails only that call (the inner error); one without a readable
/// id is an error that breaks the connection.
pub fn decode_response<Resp: DeserializeOwned>(body: &[u8]) -> Result<(u64, Result<Resp, RpcError>), RpcError> {
    match from_msgpack::<(u64, Resp)>(body) {
        Ok((id, response)) => Ok((id, Ok(response))),
        Err(error) => {
            // The framing is intact: fail only this call, if we can tell which.
            let (id, IgnoredAny) =
                from_msgpack::<(u64, IgnoredAny)>(body).map_err(|_| RpcError::Decode(format!("response: {error}")))?;
            Ok((id, Err(RpcError::Decode(format!("response to request {id}: {error}")))))
        }
    }
}

/// Reads one frame body. `Ok(None)` when the peer closed the connection
/// between frames (with or without a TLS close_notify).
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R, max_frame: usize) -> Result<Option<Vec<u8>>, RpcError> {
    let mut first = [0u8; 1];
    match reader.read(&mut first).await {
        Ok(0) => Ok(None),
        Ok(_) => read_frame_rest(reader, first[0], max_frame).await.map(Some),
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Reads the rest of a frame whose header's first byte is `first`; its body.
pub(super) async fn read_frame_rest<R: AsyncRead + Unpin>(
    reader: &mut R,
    first: u8,
    max_frame: usize,
) -> Result<Vec<u8>, RpcError> {
    let mut header = [0u8; HEADER_LEN];
    header[0] = first;
    reader.read_exact(&mut header[1..]).await.map_err(|error| {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a frame header").into()
        } else {
            RpcError::from(error)
        }
    })?;
    let size = u32::from_be_bytes(header) as usize;
    if size > max_frame {
        return Err(RpcError::FrameTooLarge { size, max: max_frame });
    }
    // Grow with what actually arrives, never to the claimed size up front.
    let mut body = Vec::with_capacity(size.min(READ_STEP));
    while body.len() < size {
        let start = body.len();
        let step = (size - start).min(READ_STEP);
        if body.capacity() < start + step {
            let target = size.min((body.capacity() * 2).max(start + step));
            body.reserve_exact(target - start);
        }
        body.resize(start + step, 0);
        reader.read_exact(&mut body[start..]).await?;
    }
    Ok(body)
}
