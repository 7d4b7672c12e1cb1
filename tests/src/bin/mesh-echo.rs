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
//! With `inet6` after N it does the same from IPv6 sockets, as dual-stack
//! runtimes do: a name is resolved as they resolve it (getaddrinfo with
//! AF_INET6 and AI_V4MAPPED: an IPv4-only name comes back as
//! `::ffff:A.B.C.D`), an IPv4 literal is mapped the same way.
//!
//! `mesh-echo --first NAME PORT [inet6]` connects once, at once, with one
//! socket and a 2 s timeout (what an application that connects at start
//! does), reads the greeting and prints `first ok MS UNIX_MS TASK` (MS
//! since the process started, UNIX_MS the wall clock when the round trip
//! was done); on failure `first error MS REASON` and exit code 1.
//!
//! `mesh-echo --stay NAME PORT SECONDS [inet6]` keeps one TCP connection
//! for SECONDS, sending a line every 100 ms and reading its echo, and
//! prints `stay PEER TASK ok LINES` (or `stay error ...`): a connection
//! keeps its task for its life, whatever happens to the service meanwhile.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream, UdpSocket},
};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--connect") => return connect(&args[1..]),
        Some("--first") => return first(&args[1..]),
        Some("--stay") => return stay(&args[1..]),
        _ => {}
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

/// Whether the client's sockets are IPv6 ones (`inet6` after the
/// client's arguments).
fn wants_inet6(arg: Option<&String>) -> bool {
    arg.is_some_and(|a| a == "inet6")
}

/// NAME:PORT resolved as the client's family would: through the resolver
/// (getaddrinfo), IPv4 for `inet6 == false`, IPv6 with IPv4-mapped
/// answers otherwise.
fn resolve(name: &str, port: u16, inet6: bool) -> Result<SocketAddr, String> {
    if let Ok(ip) = name.parse::<Ipv4Addr>() {
        return Ok(if inet6 {
            SocketAddr::V6(SocketAddrV6::new(ip.to_ipv6_mapped(), port, 0, 0))
        } else {
            SocketAddr::V4(SocketAddrV4::new(ip, port))
        });
    }
    let c_name = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: a zeroed addrinfo is a valid hints value.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = if inet6 { libc::AF_INET6 } else { libc::AF_INET };
    hints.ai_socktype = libc::SOCK_STREAM;
    hints.ai_flags = if inet6 { libc::AI_V4MAPPED } else { 0 };
    let mut found: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: the name is NUL-terminated, hints and found are locals.
    let rc = unsafe { libc::getaddrinfo(c_name.as_ptr(), std::ptr::null(), &hints, &mut found) };
    if rc != 0 || found.is_null() {
        return Err(format!("getaddrinfo({name}) failed with {rc}"));
    }
    // SAFETY: getaddrinfo succeeded: `found` is a list it allocated, whose
    // first address is of the family asked for.
    let addr = unsafe {
        let info = &*found;
        let addr = if info.ai_family == libc::AF_INET6 {
            let sin6 = &*(info.ai_addr as *const libc::sockaddr_in6);
            SocketAddr::V6(SocketAddrV6::new(
                std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                port,
                0,
                0,
            ))
        } else {
            let sin = &*(info.ai_addr as *const libc::sockaddr_in);
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                port,
            ))
        };
        libc::freeaddrinfo(found);
        addr
    };
    Ok(addr)
}

/// Reads the greeting line.
fn greeting(stream: &mut TcpStream) -> String {
    let mut greeting = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).map(|r| r == 1).unwrap_or(false) && byte[0] != b'\n' {
        greeting.push(byte[0]);
    }
    String::from_utf8_lossy(&greeting).into_owned()
}

/// The client mode (see the module's comment).
fn connect(args: &[String]) {
    let (Some(name), Some(port), Some(n)) = (
        args.first(),
        args.get(1).and_then(|p| p.parse::<u16>().ok()),
        args.get(2).and_then(|n| n.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: mesh-echo --connect NAME PORT N [inet6]");
        std::process::exit(2);
    };
    let inet6 = wants_inet6(args.get(3));
    let to = match resolve(name, port, inet6) {
        Ok(to) => to,
        Err(e) => {
            println!("cannot resolve {name}: {e}");
            std::process::exit(1);
        }
    };
    println!("resolved {name} {}", to.ip());
    for _ in 0..n {
        match TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2)) {
            Ok(mut stream) => {
                let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
                let peer = stream.peer_addr().map(|p| p.to_string()).unwrap_or_default();
                println!("tcp {peer} {}", greeting(&mut stream));
            }
            Err(e) => println!("tcp error {e}"),
        }
    }
    let any: SocketAddr = if inet6 {
        "[::]:0".parse().expect("reason: a literal")
    } else {
        "0.0.0.0:0".parse().expect("reason: a literal")
    };
    let udp = UdpSocket::bind(any).expect("a UDP socket");
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

/// The first-connection mode (see the module's comment).
fn first(args: &[String]) {
    let started = std::time::Instant::now();
    let (Some(name), Some(port)) = (args.first(), args.get(1).and_then(|p| p.parse::<u16>().ok())) else {
        eprintln!("usage: mesh-echo --first NAME PORT [inet6]");
        std::process::exit(2);
    };
    let attempt = || -> Result<String, String> {
        let to = resolve(name, port, wants_inet6(args.get(2)))?;
        let mut stream =
            TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2)).map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
        match greeting(&mut stream) {
            g if g.is_empty() => Err("no greeting".into()),
            g => Ok(g),
        }
    };
    match attempt() {
        Ok(task) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            println!("first ok {} {now} {task}", started.elapsed().as_millis());
        }
        Err(e) => {
            println!("first error {} {e}", started.elapsed().as_millis());
            std::process::exit(1);
        }
    }
}

/// The long-connection mode (see the module's comment).
fn stay(args: &[String]) {
    let (Some(name), Some(port), Some(seconds)) = (
        args.first(),
        args.get(1).and_then(|p| p.parse::<u16>().ok()),
        args.get(2).and_then(|n| n.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: mesh-echo --stay NAME PORT SECONDS [inet6]");
        std::process::exit(2);
    };
    let run = || -> Result<(String, String, usize), String> {
        let to = resolve(name, port, wants_inet6(args.get(3)))?;
        let mut stream =
            TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2)).map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
        let peer = stream.peer_addr().map(|p| p.to_string()).unwrap_or_default();
        let task = greeting(&mut stream);
        println!("stay connected {peer} {task}");
        let until = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
        let mut lines = 0;
        while std::time::Instant::now() < until {
            let line = format!("line {lines}\n");
            stream
                .write_all(line.as_bytes())
                .map_err(|e| format!("send {lines}: {e}"))?;
            let mut back = vec![0u8; line.len()];
            stream.read_exact(&mut back).map_err(|e| format!("echo {lines}: {e}"))?;
            if back != line.as_bytes() {
                return Err(format!(
                    "echo {lines} came back as {:?}",
                    String::from_utf8_lossy(&back)
                ));
            }
            lines += 1;
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok((peer, task, lines))
    };
    match run() {
        Ok((peer, task, lines)) => println!("stay {peer} {task} ok {lines}"),
        Err(e) => {
            println!("stay error {e}");
            std::process::exit(1);
        }
    }
}
