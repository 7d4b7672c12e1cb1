//! Addresses as operators give them: where a manager listens, what it
//! advertises, and the managers a node joins through.

use std::net::{IpAddr, SocketAddr};

use crate::api::error::{ApiError, ApiResult};

/// The cluster port, as Swarm's 2377.
pub(crate) const DEFAULT_PORT: u16 = 2377;

/// The address to listen on: `ADDR:PORT`, or `ADDR` with the default port.
pub fn parse_listen_addr(text: &str) -> ApiResult<SocketAddr> {
    parse_socket_addr(text, DEFAULT_PORT).map_err(|_| {
        ApiError::invalid(format!(
            "invalid listen address {text:?}: expected ADDR:PORT, e.g. 0.0.0.0:2377"
        ))
    })
}

/// The advertise address: `IP[:PORT]`, the port defaulting to `port`.
/// A wildcard address cannot be advertised.
pub fn parse_advertise_addr(text: &str, port: u16) -> ApiResult<SocketAddr> {
    let addr = parse_socket_addr(text, port).map_err(|_| {
        ApiError::invalid(format!(
            "invalid advertise address {text:?}: expected IP[:PORT], e.g. 192.0.2.10 or 192.0.2.10:2377 (interface names are not supported)"
        ))
    })?;
    if addr.ip().is_unspecified() {
        return Err(ApiError::invalid(format!(
            "advertise address {text:?} is a wildcard; give the IP other nodes reach this one on"
        )));
    }
    Ok(addr)
}

/// A manager address given to `swarm join`: `HOST:PORT` (port defaulting to 2377).
pub fn parse_remote_addr(text: &str) -> ApiResult<String> {
    let text = text.trim();
    let bad = || {
        ApiError::invalid(format!(
            "invalid manager address {text:?}: expected HOST:PORT, e.g. 192.0.2.1:2377"
        ))
    };
    if text.is_empty() || text.contains(char::is_whitespace) {
        return Err(bad());
    }
    if let Ok(addr) = parse_socket_addr(text, DEFAULT_PORT) {
        return Ok(addr.to_string());
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => Ok(text.to_string()),
        None => Ok(format!("{text}:{DEFAULT_PORT}")),
        _ => Err(bad()),
    }
}

fn parse_socket_addr(text: &str, default_port: u16) -> Result<SocketAddr, ()> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return if addr.port() == 0 { Err(()) } else { Ok(addr) };
    }
    let ip: IpAddr = text
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| ())?;
    Ok(SocketAddr::new(ip, default_port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_listen_addr("0.0.0.0:2377").unwrap().port(), 2377);
        assert_eq!(parse_listen_addr("10.1.2.3").unwrap().to_string(), "10.1.2.3:2377");
        assert!(parse_listen_addr("eth0").is_err());
        assert!(parse_listen_addr("1.2.3.4:0").is_err());
        assert_eq!(
            parse_advertise_addr("192.0.2.1", 4000).unwrap().to_string(),
            "192.0.2.1:4000"
        );
        assert!(parse_advertise_addr("0.0.0.0", 2377)
            .unwrap_err()
            .message
            .contains("wildcard"));
        assert!(parse_advertise_addr("300.1.1.1", 2377).is_err());
        assert_eq!(parse_remote_addr("192.0.2.1").unwrap(), "192.0.2.1:2377");
        assert_eq!(parse_remote_addr("mgr.example:2377").unwrap(), "mgr.example:2377");
        assert!(parse_remote_addr("mgr:notaport").is_err());
        assert!(parse_remote_addr("").is_err());
    }
}
