//! The local API socket between `meshctl` and its agent: one JSON request
//! line, one JSON response line, per connection.
//!
//! The socket lives in a 0700 directory and is itself 0600, so only root (the
//! agent's user) can drive the node, as with Docker's socket minus the
//! `docker` group.

use std::{
    future::Future,
    io,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::api::{
    error::{ApiError, ApiResult},
    messages::{LocalRequest, LocalResponse},
};

/// Where the agent listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/mesh/mesh.sock";
/// Longest request line accepted (bytes).
const MAX_REQUEST: u64 = 1 << 20;

/// Binds the socket with root-only permissions, replacing a stale one.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests until the listener fails; each connection is handled on
/// its own task.
pub async fn serve<F, Fut>(listener: UnixListener, handler: F)
where
    F: Fn(LocalRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ApiResult<LocalResponse>> + Send + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                log::error!("local API socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(stream, &*handler).await {
                log::warn!("local API connection: {e}");
            }
        });
    }
}

async fn serve_one<F, Fut>(stream: UnixStream, handler: &F) -> io::Result<()>
where
    F: Fn(LocalRequest) -> Fut,
    Fut: Future<Output = ApiResult<LocalResponse>>,
{
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST)).read_line(&mut line).await?;
    let response: ApiResult<LocalResponse> = match serde_json::from_str::<LocalRequest>(&line) {
        Ok(request) => handler(request).await,
        Err(e) => Err(ApiError::invalid(format!(
            "malformed request on the local socket ({e}); is meshctl the same version as mesh-agent?"
        ))),
    };
    let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// `meshctl`'s side: sends one request and waits for the answer.
pub async fn call(socket: &Path, request: &LocalRequest) -> ApiResult<LocalResponse> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| connect_error(socket, e))?;
    let (read, mut write) = stream.into_split();
    let mut out = serde_json::to_vec(request).map_err(|e| ApiError::internal(e.to_string()))?;
    out.push(b'\n');
    write
        .write_all(&out)
        .await
        .map_err(|e| ApiError::unavailable(format!("writing to {}: {e}", socket.display())))?;
    let mut line = String::new();
    BufReader::new(read)
        .read_line(&mut line)
        .await
        .map_err(|e| ApiError::unavailable(format!("reading from {}: {e}", socket.display())))?;
    if line.is_empty() {
        return Err(ApiError::unavailable(format!(
            "the agent at {} closed the connection without answering",
            socket.display()
        )));
    }
    serde_json::from_str::<ApiResult<LocalResponse>>(&line)
        .map_err(|e| ApiError::internal(format!("malformed answer from the agent: {e}")))?
}

fn connect_error(socket: &Path, e: io::Error) -> ApiError {
    let hint = match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            "is mesh-agent running? (start it with `mesh-agent run`)"
        }
        io::ErrorKind::PermissionDenied => "the socket is root-only: run meshctl as root",
        _ => "",
    };
    ApiError::unavailable(format!("cannot reach the agent at {}: {e}; {hint}", socket.display()))
}

/// The socket path from `--socket` or `MESH_SOCKET`, else the default.
pub fn socket_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("MESH_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn request_response_and_permissions() {
        let dir = std::env::temp_dir().join(format!("mesh-local-{}", std::process::id()));
        let path = dir.join("sock/mesh.sock");
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        tokio::spawn(serve(listener, |req| async move {
            match req {
                LocalRequest::Info => Ok(LocalResponse::Done),
                _ => Err(ApiError::invalid("nope")),
            }
        }));
        assert_eq!(call(&path, &LocalRequest::Info).await, Ok(LocalResponse::Done));
        let err = call(&path, &LocalRequest::Leave { force: false }).await.unwrap_err();
        assert_eq!(err.message, "nope");
        // Garbage gets a clear error, and the server keeps serving.
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"{not json\n").await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        assert!(answer.contains("malformed request"), "{answer}");
        assert_eq!(call(&path, &LocalRequest::Info).await, Ok(LocalResponse::Done));
        let missing = call(&dir.join("none.sock"), &LocalRequest::Info).await.unwrap_err();
        assert!(missing.message.contains("is mesh-agent running"), "{}", missing.message);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
