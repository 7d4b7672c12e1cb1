//! A TCP and UDP echo server for the overlay and routing-mesh tests:
//! `mesh-echo PORT` answers every TCP connection and every UDP datagram on
//! PORT (all addresses) with what it received, prefixed by this task's
//! hostname so a test can tell which task answered.
//!
//! `mesh-echo --http PORT` is a minimal HTTP/1.0 server instead: every
//! request gets `200 OK` with the body `HOSTNAME CLIENT-ADDRESS`, and an
//! access-log line `access CLIENT-ADDRESS` goes to standard output (the
//! task's log), as a web server's would.
//!
//! Arguments after PORT are ignored: tests use them to find their own
//! tasks' processes.
//!
//! `mesh-echo --connect NAME PORT N` is a client instead: it resolves NAME
//! (through the task's resolver), opens N TCP connections to it and sends
//! N UDP datagrams from one unconnected socket, and prints per connection
//! `tcp PEER GREETING` (the peer as getpeername() reports it) and per
//! datagram `udp FROM REPLY` (the sender as recvfrom() reports it).

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--connect") {
        connect(&args[1..]);
        return;
    }
    let http = args.first().is_some_and(|a| a == "--http");
    if http {
        args.remove(0);
    }
    let port: u16 = match args.first().and_then(|p| p.parse().ok()) {
        Some(p) => p,
        None => {
            eprintln!("usage: mesh-echo [--http] PORT [LABEL...]");
            std::process::exit(2);
        }
    };
    let name = std::env::var("HOSTNAME").unwrap_or_default();
    if http {
        serve_http(port, &name);
        return;
    }
    let udp = UdpSocket::bind(("0.0.0.0", port)).expect("bind the UDP port");
    let tcp = TcpListener::bind(("0.0.0.0", port)).expect("bind the TCP port");
    println!("mesh-echo {name} listening on {port}");
    let udp_name = name.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        loop {
            let Ok((n, from)) = udp.recv_from(&mut buf) else {
                continue;
            };
            let mut reply = format!("{udp_name} ").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = udp.send_to(&reply, from);
        }
    });
    for stream in tcp.incoming().flatten() {
        let name = name.clone();
        std::thread::spawn(move || echo(stream, &name));
    }
}

/// Sends the hostname line, then echoes until the peer closes.
fn echo(mut stream: TcpStream, name: &str) {
    if stream.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Threads taking HTTP connections: a request is a few microseconds of
/// work, far less than starting a thread for it, so a fixed set of
/// threads takes turns on the listener (as pre-forking servers do).
const HTTP_WORKERS: usize = 8;

/// The HTTP mode: one response per connection, then close.
fn serve_http(port: u16, name: &str) {
    let tcp = TcpListener::bind(("0.0.0.0", port)).expect("bind the TCP port");
    println!("mesh-echo {name} serving HTTP on {port}");
    let workers: Vec<_> = (0..HTTP_WORKERS)
        .map(|_| {
            let (tcp, name) = (tcp.try_clone().expect("share the listener"), name.to_string());
            std::thread::spawn(move || {
                for stream in tcp.incoming().flatten() {
                    // A stalled client must not hold a worker for long.
                    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
                    let _ = answer_http(stream, &name);
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
}

fn answer_http(mut stream: TcpStream, name: &str) -> std::io::Result<()> {
    let peer = stream.peer_addr()?.ip();
    // Read the request head (up to the blank line); the body is not used.
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    println!("access {peer}");
    let body = format!("{name} {peer}\n");
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())
}

/// The client mode (see the module's comment).
fn connect(args: &[String]) {
    use std::net::ToSocketAddrs;
    let (Some(name), Some(port), Some(n)) = (
        args.first(),
        args.get(1).and_then(|p| p.parse::<u16>().ok()),
        args.get(2).and_then(|n| n.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: mesh-echo --connect NAME PORT N");
        std::process::exit(2);
    };
    let to = match (name.as_str(), port).to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(to)) => to,
        other => {
            println!("cannot resolve {name}: {other:?}");
            std::process::exit(1);
        }
    };
    println!("resolved {name} {}", to.ip());
    for _ in 0..n {
        match TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2)) {
            Ok(mut stream) => {
                let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
                let peer = stream.peer_addr().map(|p| p.to_string()).unwrap_or_default();
                let mut greeting = Vec::new();
                let mut byte = [0u8; 1];
                while stream.read(&mut byte).map(|r| r == 1).unwrap_or(false) && byte[0] != b'\n' {
                    greeting.push(byte[0]);
                }
                println!("tcp {peer} {}", String::from_utf8_lossy(&greeting));
            }
            Err(e) => println!("tcp error {e}"),
        }
    }
    let udp = UdpSocket::bind(("0.0.0.0", 0)).expect("a UDP socket");
    let _ = udp.set_read_timeout(Some(std::time::Duration::from_secs(1)));
    let mut buf = [0u8; 1500];
    for _ in 0..n {
        let _ = udp.send_to(b"datagram", to);
        match udp.recv_from(&mut buf) {
            Ok((len, from)) => println!("udp {from} {}", String::from_utf8_lossy(&buf[..len])),
            Err(e) => println!("udp error {e}"),
        }
    }
}
