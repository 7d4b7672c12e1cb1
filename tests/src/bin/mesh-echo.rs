//! A TCP and UDP echo server for the overlay tests: `mesh-echo PORT`
//! answers every TCP connection and every UDP datagram on PORT (all
//! addresses) with what it received, prefixed by this task's hostname so
//! a test can tell which task answered.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
};

fn main() {
    let port: u16 = match std::env::args().nth(1).and_then(|p| p.parse().ok()) {
        Some(p) => p,
        None => {
            eprintln!("usage: mesh-echo PORT");
            std::process::exit(2);
        }
    };
    let name = std::env::var("HOSTNAME").unwrap_or_default();
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
