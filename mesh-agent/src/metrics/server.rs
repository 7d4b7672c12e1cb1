//! The `/metrics` endpoint: plain HTTP/1.1 on `--metrics-addr` (default
//! 127.0.0.1:9323, Docker's metrics port), `GET /metrics` and nothing
//! else. One request per connection; a client that sends nothing in 5 s,
//! or a request head over 8 KiB, is dropped. On a loopback address, a
//! request whose `Host` is a name other than `localhost` is refused: a web
//! page elsewhere could otherwise rebind its own name to 127.0.0.1 and
//! read what is served here through the browser (DNS rebinding).

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// The default address.
pub(crate) const DEFAULT_ADDR: &str = "127.0.0.1:9323";
const HEAD_LIMIT: usize = 8192;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What `--metrics-addr` says: an address, or `off`.
pub fn parse_addr(text: &str) -> Result<Option<SocketAddr>, String> {
    if text == "off" {
        return Ok(None);
    }
    text.parse::<SocketAddr>()
        .map(Some)
        .map_err(|_| format!("{text:?} is not an address and port (like {DEFAULT_ADDR}), nor `off`"))
}

/// Whether serving on `addr` exposes the metrics beyond this host.
pub fn is_public(addr: &SocketAddr) -> bool {
    !addr.ip().is_loopback()
}

/// How long accepting waits after an error (out of file descriptors, say)
/// before it tries again, instead of spinning.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Whether the request `head` may be answered by a server listening on
/// `listen`: anything on a public address (the operator exposed it, and
/// scrapers use names); on loopback, only a `Host` that is an IP address
/// or `localhost` (or none, as HTTP/1.0 allows).
pub(crate) fn host_allowed(head: &str, listen: &SocketAddr) -> bool {
    if !listen.ip().is_loopback() {
        return true;
    }
    let host = head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("host").then(|| value.trim())
    });
    let Some(host) = host else {
        return true;
    };
    // Without the port: "[::1]:9323", "127.0.0.1:9323", "localhost:9323".
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// The method and path of a request head.
pub(super) fn request_line(head: &str) -> (&str, &str) {
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    (words.next().unwrap_or_default(), words.next().unwrap_or_default())
}

/// What a request gets: the metrics, or a status and text saying why not.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    Metrics,
    Refused(u16, &'static str),
}

/// The route of a request head.
pub(crate) fn route(head: &str) -> Route {
    match request_line(head) {
        ("GET", "/metrics") => Route::Metrics,
        ("GET", _) => Route::Refused(404, "not found: the metrics are at /metrics\n"),
        _ => Route::Refused(405, "only GET /metrics is served\n"),
    }
}

/// Serves `listener` until the runtime stops; `render` makes the body.
pub async fn serve<F, Fut>(listener: TcpListener, render: F)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send,
{
    accept_loop(listener, move |stream, head| answer(stream, head, render.clone())).await
}

/// Accepts connections until the runtime stops, each on its own task:
/// its request head is read, then `handle` answers it.
pub(super) async fn accept_loop<H, Fut>(listener: TcpListener, handle: H)
where
    H: Fn(TcpStream, String) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = std::io::Result<()>> + Send,
{
    let listen = listener.local_addr().ok();
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::debug!("HTTP endpoint: accepting a connection: {e}");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let Some(head) = read_head(&mut stream).await else {
                return;
            };
            if listen.is_some_and(|l| !host_allowed(&head, &l)) {
                let why = "forbidden: on a loopback address only a Host of localhost or an IP address is served\n";
                let _ = write_response(&mut stream, 403, "text/plain", why).await;
                return;
            }
            let _ = handle(stream, head).await;
        });
    }
}

/// Reads a request head (up to the blank line): `None` for a client that
/// sends nothing in time, closes, or sends more than the limit.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 || head.len() + n > HEAD_LIMIT {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// Writes a whole response and closes.
pub(super) async fn write_response(stream: &mut TcpStream, status: u16, kind: &str, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        403 => "Forbidden",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

async fn answer<F, Fut>(mut stream: TcpStream, head: String, render: F) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = String>,
{
    match route(&head) {
        Route::Metrics => {
            let body = render().await;
            write_response(&mut stream, 200, "text/plain; version=0.0.4; charset=utf-8", &body).await
        }
        Route::Refused(status, text) => write_response(&mut stream, status, "text/plain", text).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_loopback_only_localhost_and_addresses_are_served_as_hosts() {
        let local: SocketAddr = "127.0.0.1:9323".parse().unwrap();
        let public: SocketAddr = "192.0.2.10:9323".parse().unwrap();
        let head = |host: &str| format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n");
        for ok in [
            "127.0.0.1:9323",
            "localhost:9323",
            "LOCALHOST",
            "[::1]:9323",
            "10.0.0.1",
        ] {
            assert!(host_allowed(&head(ok), &local), "{ok}");
        }
        for rebound in ["attacker.example:9323", "attacker.example", "127.0.0.1.nip.io:9323"] {
            assert!(!host_allowed(&head(rebound), &local), "{rebound}");
        }
        assert!(host_allowed(&head("node1.example:9323"), &public), "scrapers use names");
        assert!(
            host_allowed("GET /metrics HTTP/1.0\r\n\r\n", &local),
            "HTTP/1.0 without Host"
        );
        assert!(!host_allowed(
            "GET /metrics HTTP/1.1\r\nhOsT:  evil.example \r\n\r\n",
            &local
        ));
    }

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(route("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Route::Metrics);
        assert!(matches!(route("GET / HTTP/1.1\r\n\r\n"), Route::Refused(404, _)));
        assert!(matches!(
            route("POST /metrics HTTP/1.1\r\n\r\n"),
            Route::Refused(405, _)
        ));
        assert!(matches!(route(""), Route::Refused(405, _)));
    }

    #[test]
    fn the_address_is_parsed_and_public_ones_are_told_apart() {
        assert_eq!(parse_addr("off"), Ok(None));
        let local = parse_addr(DEFAULT_ADDR).unwrap().unwrap();
        assert!(!is_public(&local));
        assert!(is_public(&parse_addr("0.0.0.0:9323").unwrap().unwrap()));
        assert!(parse_addr("9323").unwrap_err().contains("nor `off`"));
    }
}
