//! Routing-mesh helpers shared by its tests and its benchmark: HTTP
//! requests to the test server (`mesh-echo --http`), and reading a node's
//! routing-mesh maps from the kernel, found through the program attached
//! to its underlay link.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use aya::{
    maps::{HashMap, Map, MapData},
    programs::{tc::TcAttachType, SchedClassifier},
};
use mesh_common::lb::{Backend, BACKENDS_MAP};

use crate::swarm::Swarm;

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

/// The backends in host `host`'s routing-mesh maps (`None`: no
/// routing-mesh program on its `eth0`). Needs tcx (kernel >= 6.6).
pub fn backends_on(swarm: &Swarm, host: usize) -> Option<Vec<Backend>> {
    swarm.cluster.host(host).run(|| {
        let (_, programs) = SchedClassifier::query_tcx("eth0", TcAttachType::Ingress).ok()?;
        for program in programs {
            for id in program.map_ids().ok()??.into_iter() {
                let Ok(map) = MapData::from_id(id) else { continue };
                if map.info().ok()?.name_as_str() != Some(BACKENDS_MAP) {
                    continue;
                }
                let map: HashMap<MapData, u32, Backend> = HashMap::try_from(Map::HashMap(map)).ok()?;
                return Some(map.iter().filter_map(Result::ok).map(|(_, b)| b).collect());
            }
        }
        None
    })
}
