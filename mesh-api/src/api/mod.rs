//! The swarm's plain data: the objects the store holds, the messages nodes
//! and `meshctl` exchange, what the leader assigns to each node, and the
//! pure helpers that go with them (parsers, checks, encodings). Nothing here
//! does IO, and this layer uses no other module of the crate.
//!
//! - [`objects`]: nodes, roles, the cluster's settings and CA;
//!   [`store`]: everything Raft replicates and the commands that change it;
//!   [`raft_types`]: Raft's type configuration.
//! - [`service`]: service specs, their flag parsers, tasks and their life cycle;
//!   [`network`]: overlay networks; [`secret`]: secrets and configs;
//!   [`security`]: how far tasks are confined (capabilities, seccomp, read-only);
//!   [`resources`]: their limits and reservations; [`mounts`]: their `--mount`s.
//! - [`messages`]: what `meshctl` and nodes ask and answer; [`error`]: what went wrong.
//! - [`assignment`]: what the leader tells each node (mesh, discovery, tunnel, IPsec);
//!   [`parts`]: the parts many nodes get alike, held back from a node that has them;
//!   [`encoded`]: such a part, encoded once.
//! - [`overlay_key`]: the key encrypted overlays' pair keys derive from.
//! - [`cert_records`]: which issued certificates the store still honours.
//! - [`addr`]: addresses as operators give them; [`clock`]: Unix time, durations.
//! - [`msgpack`], [`wire_bytes`], [`secret_text`], [`subnet`]: encodings, key
//!   material as text, IPv4 subnets.

pub mod addr;
pub mod assignment;
pub mod cert_records;
pub mod clock;
pub mod encoded;
pub mod error;
pub mod messages;
pub mod mounts;
pub mod msgpack;
pub mod network;
pub mod objects;
pub mod overlay_key;
pub mod parts;
pub mod raft_types;
pub mod resources;
pub mod secret;
pub mod secret_text;
pub mod security;
pub mod service;
pub mod store;
pub mod subnet;
pub(crate) mod wire_bytes;
