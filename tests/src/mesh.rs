//! Routing-mesh helpers shared by its tests and its benchmark: HTTP
//! requests to the test server (`mesh-echo --http`), and reading a node's
//! routing-mesh maps from the kernel, found through the program attached
//! to its underlay link.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use aya::{
    maps::{HashMap, Map, MapData},
    programs::{tc::TcAttachType, SchedClassifier},
};
use mesh_common::lb::{Backend, FlowKey, ReverseNat, BACKENDS_MAP, REVERSE_NAT_MAP};

use crate::{
    cluster::host_address,
    swarm::{binary, Swarm},
};

/// One HTTP request to `to`: (the task that answered, the client address
/// it saw).
pub fn http_get(to: SocketAddr) -> Result<(String, String), String> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2)).map_err(|e| format!("{to}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: mesh\r\n\r\n")
        .map_err(|e| format!("{to}: {e}"))?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| format!("{to}: {e}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or(format!("{to}: no HTTP response: {response:?}"))?;
    if !head.starts_with("HTTP/1.0 200") {
        return Err(format!("{to}: {head}"));
    }
    let (task, seen) = body.trim().split_once(' ').ok_or(format!("{to}: body {body:?}"))?;
    Ok((task.to_string(), seen.to_string()))
}

/// `n` requests to the published `port` of each of hosts `0..nodes`, from
/// host `client`: (failures, requests answered per task, client addresses
/// the tasks saw).
pub fn spray(
    swarm: &Swarm,
    client: usize,
    nodes: usize,
    port: u16,
    n: usize,
) -> (Vec<String>, BTreeMap<String, usize>, Vec<String>) {
    swarm.cluster.host(client).run(move || {
        let mut failures = Vec::new();
        let mut per_task = BTreeMap::new();
        let mut seen = Vec::new();
        for node in 0..nodes {
            for _ in 0..n {
                match http_get(SocketAddr::from((host_address(node), port))) {
                    Ok((task, from)) => {
                        *per_task.entry(task).or_insert(0) += 1;
                        if !seen.contains(&from) {
                            seen.push(from);
                        }
                    }
                    Err(e) => failures.push(e),
                }
            }
        }
        (failures, per_task, seen)
    })
}

/// Frames on hosts `0..nodes` so far: those the task bridge passed up to
/// its node (tasks' replies routed through the bridge) and those the
/// tasks' veths sent in from the node's side (requests the bridge
/// forwarded), from /proc/net/dev in each host's namespace. Requests and
/// replies the routing mesh hands straight to and from a task's veth
/// count in neither.
pub fn bridge_frames(swarm: &Swarm, nodes: usize) -> (u64, u64) {
    let mut total = (0, 0);
    for host in 0..nodes {
        let dev = swarm
            .cluster
            .host(host)
            .run(|| std::fs::read_to_string("/proc/thread-self/net/dev").expect("read /proc/net/dev"));
        for line in dev.lines() {
            let Some((name, fields)) = line.split_once(':') else {
                continue;
            };
            let fields: Vec<u64> = fields.split_whitespace().filter_map(|f| f.parse().ok()).collect();
            let (Some(rx), Some(tx)) = (fields.get(1), fields.get(9)) else {
                continue;
            };
            match name.trim() {
                mesh_agent::agent::net::bridge::BRIDGE => total.0 += rx,
                n if n.starts_with("mv") => total.1 += tx,
                _ => {}
            }
        }
    }
    total
}

/// The routing-mesh map `name` of the calling thread's namespace (call it
/// inside a host's), found through the program on its `eth0` (`None`: no
/// routing-mesh program there). Needs tcx (kernel >= 6.6).
fn mesh_map(name: &str) -> Option<MapData> {
    let (_, programs) = SchedClassifier::query_tcx("eth0", TcAttachType::Ingress).ok()?;
    for program in programs {
        for id in program.map_ids().ok()??.into_iter() {
            let Ok(map) = MapData::from_id(id) else { continue };
            if map.info().ok()?.name_as_str() == Some(name) {
                return Some(map);
            }
        }
    }
    None
}

/// The backends in host `host`'s routing-mesh maps (`None`: no
/// routing-mesh program on its `eth0`). Needs tcx (kernel >= 6.6).
pub fn backends_on(swarm: &Swarm, host: usize) -> Option<Vec<Backend>> {
    swarm.cluster.host(host).run(|| {
        let map: HashMap<MapData, u32, Backend> = HashMap::try_from(Map::HashMap(mesh_map(BACKENDS_MAP)?)).ok()?;
        Some(map.iter().filter_map(Result::ok).map(|(_, b)| b).collect())
    })
}

/// Empties host `host`'s reverse-NAT map: the entries of connections the
/// mesh routed to its tasks, which outlive them until the LRU evicts
/// them. For benchmarks that reach the same task by other paths from the
/// same client addresses and ports (a reply matching an old entry would
/// get the published address). Returns how many entries went.
pub fn forget_routed_connections(swarm: &Swarm, host: usize) -> usize {
    swarm.cluster.host(host).run(|| {
        let Some(map) = mesh_map(REVERSE_NAT_MAP) else { return 0 };
        let Ok(mut map) = HashMap::<MapData, FlowKey, ReverseNat>::try_from(Map::LruHashMap(map)) else {
            return 0;
        };
        let keys: Vec<FlowKey> = map.keys().filter_map(Result::ok).collect();
        keys.iter().filter(|k| map.remove(k).is_ok()).count()
    })
}

/// Asks the DNS responder at 127.0.0.11 (call it inside a task's network
/// namespace) for `name`'s A records: the addresses, or the rcode.
pub fn dns_a(name: &str) -> Result<Vec<std::net::Ipv4Addr>, String> {
    let socket = std::net::UdpSocket::bind(("127.0.0.1", 0)).map_err(|e| e.to_string())?;
    socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let q = mesh_agent::agent::net::dns::encode_query(0x4d53, name, 1);
    socket.send_to(&q, ("127.0.0.11", 53)).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1500];
    let n = socket
        .recv(&mut buf)
        .map_err(|e| format!("no answer for {name}: {e}"))?;
    let r = &buf[..n];
    if r.len() < 12 || r[..2] != q[..2] {
        return Err(format!("a malformed answer for {name}: {r:?}"));
    }
    let rcode = r[3] & 0x0f;
    if rcode != 0 {
        return Err(format!("rcode {rcode}"));
    }
    let answers = u16::from_be_bytes([r[6], r[7]]) as usize;
    let mut at = q.len();
    let mut out = Vec::new();
    for _ in 0..answers {
        // A compressed name (2 bytes), type, class, TTL, length, data.
        let rdlen = u16::from_be_bytes([r[at + 10], r[at + 11]]) as usize;
        let data = &r[at + 12..at + 12 + rdlen];
        if rdlen == 4 {
            out.push(std::net::Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 12 + rdlen;
    }
    Ok(out)
}

/// `GET path` on host `host`'s agent metrics port (127.0.0.1:9323 in its
/// namespace): (status line, body).
pub fn metrics_get(swarm: &Swarm, host: usize, path: &str) -> (String, String) {
    metrics_get_as(swarm, host, path, "localhost")
}

/// [`metrics_get`] with the `Host` header `host_header` (as a browser
/// sends the name of the page that asked).
pub fn metrics_get_as(swarm: &Swarm, host: usize, path: &str, host_header: &str) -> (String, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host_header}\r\n\r\n");
    let response = swarm.cluster.host(host).run(move || {
        let to = SocketAddr::from(([127, 0, 0, 1], 9323));
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).expect("the metrics port answers");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).expect("a response");
        out
    });
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// The value of the sample whose line starts with `series` in metrics text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `meshctl service create --detach --name NAME OPTIONS... -- mesh-echo
/// --http 80` on host 0: an HTTP service that answers with its task and
/// the client address it saw.
pub fn create_http_service(swarm: &Swarm, name: &str, options: &[&str]) {
    let echo = binary("mesh-echo");
    let mut args = vec!["service", "create", "--detach", "--name", name];
    args.extend_from_slice(options);
    args.extend_from_slice(&["--", echo.to_str().expect("a UTF-8 path"), "--http", "80"]);
    swarm.ok(0, &args);
}

/// (host, task directory) of `service`'s running tasks (the harness
/// names host i's node "hI").
pub fn placed(swarm: &Swarm, service: &str) -> Vec<(usize, String)> {
    let out = swarm.ok(0, &["service", "ps", service, "--format", "json"]);
    let tasks: Vec<serde_json::Value> = serde_json::from_str(&out).expect("service ps --format json");
    tasks
        .iter()
        .filter(|t| t["task"]["state"] == "Running" && t["task"]["desired"] == "Running")
        .map(|t| {
            let node = t["node_hostname"].as_str().unwrap_or_default();
            let host: usize = node.trim_start_matches('h').parse().expect("the task's host");
            let id = t["task"]["id"].as_u64().expect("a task ID");
            (host, mesh_agent::agent::tasks::supervisor::task_dir_name(id))
        })
        .collect()
}
