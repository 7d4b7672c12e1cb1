//! Services and tasks as data: the spec an operator writes, the
//! parsers for its flags, and the task lifecycle. Pure: no I/O, no Raft.
//!
//! Task states follow Swarm's: new -> pending -> assigned -> preparing ->
//! starting -> running -> complete | failed | shutdown, with rejected
//! (could not start) and orphaned (its node vanished) as terminal states.

use crate::api::error::Invalid;
use std::collections::BTreeMap;

use super::objects::NodeId;
use serde::{Deserialize, Serialize};

/// Transport of a published port.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// Its IP protocol number, as packets carry it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    /// The protocol with IP protocol number `n`, if it is one of these.
    pub fn from_number(n: u8) -> Option<Protocol> {
        [Protocol::Tcp, Protocol::Udp].into_iter().find(|p| p.number() == n)
    }

    /// `tcp` or `udp`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// How a published port is exposed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PublishMode {
    /// On every node, load-balanced to any task (the routing mesh).
    Ingress,
    /// Only on nodes running a task, straight to the local task.
    Host,
}

/// `--publish`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortPublish {
    /// The port clients connect to.
    pub published: u16,
    /// The port the task listens on.
    pub target: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Ingress or host.
    pub mode: PublishMode,
}

impl PortPublish {
    /// Parses `P:T[/udp]` or `published=P,target=T[,protocol=tcp|udp][,mode=ingress|host]`.
    pub fn parse(text: &str) -> Result<PortPublish, Invalid> {
        let text = text.trim();
        let port = |what: &str, v: &str| {
            v.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                format!("invalid publish spec {text:?}: {what} port {v:?} is not a port number (1-65535)")
            })
        };
        if text.contains('=') {
            let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
            for part in text.split(',') {
                let (k, v) = part
                    .split_once('=')
                    .ok_or_else(|| format!("invalid publish spec {text:?}: {part:?} is not KEY=VALUE"))?;
                if fields.insert(k.trim(), v.trim()).is_some() {
                    return Err(crate::invalid!("invalid publish spec {text:?}: {k} is given twice"));
                }
            }
            let mut spec = PortPublish {
                published: 0,
                target: 0,
                protocol: Protocol::Tcp,
                mode: PublishMode::Ingress,
            };
            for (k, v) in fields {
                match k {
                    "published" => spec.published = port("published", v)?,
                    "target" => spec.target = port("target", v)?,
                    "protocol" => spec.protocol = protocol(text, v)?,
                    "mode" => {
                        spec.mode = match v {
                            "ingress" => PublishMode::Ingress,
                            "host" => PublishMode::Host,
                            _ => return Err(crate::invalid!("invalid publish spec {text:?}: mode is ingress or host")),
                        }
                    }
                    other => {
                        return Err(crate::invalid!(
                            "invalid publish spec {text:?}: unknown field {other:?} (use published, target, protocol, mode)"
                        ))
                    }
                }
            }
            if spec.target == 0 {
                return Err(crate::invalid!(
                    "invalid publish spec {text:?}: target=PORT is required"
                ));
            }
            if spec.published == 0 {
                return Err(crate::invalid!(
                    "invalid publish spec {text:?}: published=PORT is required"
                ));
            }
            return Ok(spec);
        }
        let (ports, proto) = match text.split_once('/') {
            Some((p, proto)) => (p, protocol(text, proto)?),
            None => (text, Protocol::Tcp),
        };
        let (published, target) = ports
            .split_once(':')
            .ok_or_else(|| format!("invalid publish spec {text:?}: expected PUBLISHED:TARGET[/udp], e.g. 8080:80"))?;
        Ok(PortPublish {
            published: port("published", published)?,
            target: port("target", target)?,
            protocol: proto,
            mode: PublishMode::Ingress,
        })
    }
}

fn protocol(text: &str, v: &str) -> Result<Protocol, Invalid> {
    match v {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        _ => Err(crate::invalid!("invalid publish spec {text:?}: protocol is tcp or udp")),
    }
}

/// Parses `--env K=V` (a bare `K` is refused: there is no client environment to copy).
pub fn parse_env(items: &[String]) -> Result<BTreeMap<String, String>, Invalid> {
    let mut env = BTreeMap::new();
    for item in items {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("invalid --env {item:?}: expected KEY=VALUE"))?;
        if k.is_empty() || k.contains(char::is_whitespace) || k.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            return Err(crate::invalid!("invalid --env {item:?}: {k:?} is not a variable name"));
        }
        env.insert(k.to_string(), v.to_string());
    }
    Ok(env)
}

/// Service names: as Docker's, 1-63 of `[a-zA-Z0-9_.-]`, starting with a letter or digit
/// (they become DNS names later).
pub(crate) fn check_service_name(name: &str) -> Result<(), Invalid> {
    let ok = (1..=63).contains(&name.len())
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(crate::invalid!(
            "invalid service name {name:?}: use 1 to 63 letters, digits, '_', '.' or '-', starting with a letter or digit"
        ))
    }
}

/// `--placement-pref spread=node.labels.K` -> `K`.
pub fn parse_placement_pref(text: &str) -> Result<String, Invalid> {
    text.trim()
        .strip_prefix("spread=node.labels.")
        .filter(|k| !k.is_empty())
        .map(str::to_string)
        .ok_or_else(|| crate::invalid!("invalid placement preference {text:?}: expected spread=node.labels.KEY"))
}

/// Checks constraints as `--constraint` gives them.
pub(crate) fn parse_constraints(items: &[String]) -> Result<Vec<Constraint>, Invalid> {
    items.iter().map(|c| Constraint::parse(c)).collect()
}

/// Checks that no two publish specs claim the same port and protocol.
pub(crate) fn check_publish_conflicts(ports: &[PortPublish]) -> Result<(), Invalid> {
    let mut seen = BTreeMap::new();
    for p in ports {
        if let Some(other) = seen.insert((p.published, p.protocol), p) {
            return Err(crate::invalid!(
                "port {}/{} is published twice (targets {} and {})",
                p.published,
                if p.protocol == Protocol::Tcp { "tcp" } else { "udp" },
                other.target,
                p.target
            ));
        }
    }
    Ok(())
}

/// Where a task is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TaskState {
    /// Created by the orchestrator.
    New,
    /// Waiting for a node.
    Pending,
    /// Given to a node.
    Assigned,
    /// The node prepares its namespace and networks.
    Preparing,
    /// The process is being started.
    Starting,
    /// The process runs (and is healthy, if checked).
    Running,
    /// The process exited with status 0.
    Complete,
    /// The process exited non-zero, or failed its health check.
    Failed,
    /// Stopped on purpose.
    Shutdown,
    /// The node could not start it.
    Rejected,
    /// Its node left the swarm.
    Orphaned,
}

impl TaskState {
    /// Whether the task can no longer change.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Complete | Self::Failed | Self::Shutdown | Self::Rejected | Self::Orphaned
        )
    }

    /// Whether `self -> next` is a legal move: forward through the life
    /// cycle, or to a terminal state from any live one; never out of a
    /// terminal state, never backwards.
    pub fn may_become(self, next: TaskState) -> bool {
        if self.is_terminal() {
            return false;
        }
        if next.is_terminal() {
            // Complete needs a process that ran.
            return next != Self::Complete || self >= Self::Starting;
        }
        next > self
    }

    /// Lowercase, as `service ps` prints it.
    pub fn name(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Pending => "pending",
            Self::Assigned => "assigned",
            Self::Preparing => "preparing",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Complete => "complete",
            Self::Failed => "failed",
            Self::Shutdown => "shutdown",
            Self::Rejected => "rejected",
            Self::Orphaned => "orphaned",
        }
    }
}

/// `--restart-condition`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartCondition {
    /// Never restart.
    None,
    /// Restart after a failure (non-zero exit, failed health check).
    OnFailure,
    /// Restart whenever the task ends.
    Any,
}

/// Whether a task that ended in `state` should be replaced, given the
/// policy and how many times its slot was restarted already.
pub fn should_restart(condition: RestartCondition, state: TaskState, restarts: u32, max_attempts: u32) -> bool {
    let wanted = match condition {
        RestartCondition::None => false,
        RestartCondition::OnFailure => matches!(state, TaskState::Failed | TaskState::Rejected),
        RestartCondition::Any => state.is_terminal() && state != TaskState::Shutdown,
    };
    wanted && (max_attempts == 0 || restarts < max_attempts)
}

/// Where a task's replacement goes: its replica slot, or for global
/// services (slot 0) its node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Place {
    /// A replica slot.
    Slot(u32),
    /// A global service's node.
    Node(crate::api::objects::NodeId),
}

/// The place `task` fills (`None`: a global task not placed yet).
pub fn place_of(task: &Task) -> Option<Place> {
    match (task.slot, task.node) {
        (0, Some(node)) => Some(Place::Node(node)),
        (0, None) => None,
        (slot, _) => Some(Place::Slot(slot)),
    }
}

/// Where a finished task's history is kept: its service slot, and for a
/// global task (all in slot 0) its node.
pub type HistoryPlace = (u64, u32, Option<NodeId>);

impl Task {
    /// Whether `node`'s report `report` moves this task: it runs there, and
    /// the report is a new state it may go to.
    pub fn takes_report(&self, node: NodeId, report: &TaskReport) -> bool {
        self.node == Some(node) && self.state != report.state && self.state.may_become(report.state)
    }

    /// Told to shut down, and either ended or never placed: history.
    pub fn is_finished(&self) -> bool {
        self.desired == DesiredState::Shutdown && (self.state.is_terminal() || self.node.is_none())
    }

    /// The history this task belongs to once finished.
    pub fn history_place(&self) -> HistoryPlace {
        let node = if self.slot == 0 { self.node } else { None };
        (self.service, self.slot, node)
    }
}

/// What a constraint compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConstraintKey {
    /// `node.id`
    NodeId,
    /// `node.hostname`
    Hostname,
    /// `node.role` (`manager` or `worker`)
    Role,
    /// `node.labels.K`
    Label(String),
}

/// `--constraint KEY==VALUE` or `KEY!=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    /// What is compared.
    pub key: ConstraintKey,
    /// `==` (true) or `!=` (false).
    pub equal: bool,
    /// The value compared with.
    pub value: String,
}

impl Constraint {
    /// Parses `node.labels.zone==a`, `node.role!=manager`, `node.hostname==h1`, `node.id==...`.
    pub fn parse(text: &str) -> Result<Constraint, Invalid> {
        let (key, equal, value) = if let Some((k, v)) = text.split_once("==") {
            (k, true, v)
        } else if let Some((k, v)) = text.split_once("!=") {
            (k, false, v)
        } else {
            return Err(crate::invalid!(
                "invalid constraint {text:?}: expected KEY==VALUE or KEY!=VALUE, e.g. node.labels.zone==a"
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        if value.is_empty() {
            return Err(crate::invalid!("invalid constraint {text:?}: the value is empty"));
        }
        let key = match key {
            "node.id" => ConstraintKey::NodeId,
            "node.hostname" => ConstraintKey::Hostname,
            "node.role" if value == "manager" || value == "worker" => ConstraintKey::Role,
            "node.role" => {
                return Err(crate::invalid!(
                    "invalid constraint {text:?}: node.role is manager or worker"
                ))
            }
            other => match other.strip_prefix("node.labels.") {
                Some(label) if !label.is_empty() => ConstraintKey::Label(label.to_string()),
                _ => {
                    return Err(crate::invalid!(
                        "invalid constraint key {other:?}: use node.id, node.hostname, node.role or node.labels.KEY"
                    ))
                }
            },
        };
        Ok(Constraint {
            key,
            equal,
            value: value.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_specs_short_and_long() {
        let p = PortPublish::parse("8080:80").unwrap();
        assert_eq!(
            (p.published, p.target, p.protocol, p.mode),
            (8080, 80, Protocol::Tcp, PublishMode::Ingress)
        );
        assert_eq!(PortPublish::parse("53:5353/udp").unwrap().protocol, Protocol::Udp);
        let long = PortPublish::parse("published=8080,target=80,protocol=udp,mode=host").unwrap();
        assert_eq!(
            (long.published, long.target, long.protocol, long.mode),
            (8080, 80, Protocol::Udp, PublishMode::Host)
        );
        for (bad, why) in [
            ("8080", "PUBLISHED:TARGET"),
            ("8080:0", "not a port"),
            ("70000:80", "not a port"),
            ("80:80/sctp", "tcp or udp"),
            ("published=80", "target=PORT is required"),
            ("target=80", "published=PORT is required"),
            ("published=80,target=80,mode=mesh", "ingress or host"),
            ("published=80,target=80,colour=red", "unknown field"),
            ("published=80,published=81,target=80", "twice"),
            ("published=80,target", "not KEY=VALUE"),
        ] {
            let err = PortPublish::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let a = PortPublish::parse("8080:80").unwrap();
        let b = PortPublish::parse("8080:81").unwrap();
        let c = PortPublish::parse("8080:81/udp").unwrap();
        assert!(check_publish_conflicts(&[a, c]).is_ok());
        assert!(check_publish_conflicts(&[a, b])
            .unwrap_err()
            .contains("published twice"));
    }

    #[test]
    fn names_env_and_preferences() {
        assert!(check_service_name("web").is_ok());
        assert!(check_service_name("web_1.v2-x").is_ok());
        for bad in ["", "-web", "web app", "wéb", &"a".repeat(64)] {
            assert!(check_service_name(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_env(&["A=1".into(), "B=x=y".into()]).unwrap()["B"], "x=y");
        assert!(parse_env(&["A".into()]).is_err());
        assert!(parse_env(&["1A=2".into()]).is_err());
        assert_eq!(parse_placement_pref("spread=node.labels.zone").unwrap(), "zone");
        assert!(parse_placement_pref("spread=zone").is_err());
        assert!(parse_constraints(&["node.labels.a==b".into(), "nope".into()]).is_err());
    }

    #[test]
    fn task_states_move_forward_only() {
        use TaskState::*;
        assert!(New.may_become(Pending) && Pending.may_become(Assigned) && Starting.may_become(Running));
        assert!(Assigned.may_become(Rejected) && Running.may_become(Failed) && Pending.may_become(Shutdown));
        assert!(Running.may_become(Complete) && !Assigned.may_become(Complete));
        assert!(!Running.may_become(Assigned), "never backwards");
        assert!(
            !Failed.may_become(Running) && !Shutdown.may_become(Shutdown),
            "terminal is final"
        );
        assert_eq!(Running.name(), "running");
    }

    #[test]
    fn restart_policies() {
        use RestartCondition as R;
        assert!(should_restart(R::Any, TaskState::Complete, 0, 0));
        assert!(
            !should_restart(R::Any, TaskState::Shutdown, 0, 0),
            "a task stopped on purpose stays stopped"
        );
        assert!(should_restart(R::OnFailure, TaskState::Failed, 2, 3));
        assert!(
            !should_restart(R::OnFailure, TaskState::Failed, 3, 3),
            "attempts exhausted"
        );
        assert!(!should_restart(R::OnFailure, TaskState::Complete, 0, 0));
        assert!(!should_restart(R::None, TaskState::Failed, 0, 0));
    }

    #[test]
    fn restart_policy_and_endpoint_mode_update_without_replacing_tasks() {
        let spec = crate::api::service::Service::example(1).spec;
        let update = ServiceUpdate {
            restart_condition: Some(RestartCondition::OnFailure),
            restart_max_attempts: Some(3),
            endpoint_mode: Some(EndpointMode::Dnsrr),
            ..ServiceUpdate::default()
        };
        let next = apply_update(&spec, &update).unwrap();
        assert_eq!(next.restart.condition, RestartCondition::OnFailure);
        assert_eq!(next.restart.max_attempts, 3);
        assert_eq!(
            next.restart.delay_ms, spec.restart.delay_ms,
            "unset flags keep their value"
        );
        assert_eq!(next.endpoint_mode, EndpointMode::Dnsrr);
        assert!(!next.task_template_differs(&spec));
    }

    #[test]
    fn dnsrr_cannot_publish_through_the_ingress() {
        let mut spec = crate::api::service::Service::example(1).spec;
        spec.endpoint_mode = EndpointMode::Dnsrr;
        spec.publish = vec![PortPublish::parse("8080:80").unwrap()];
        let err = spec.validate().unwrap_err();
        assert!(err.contains("--endpoint-mode vip"), "{err}");
        spec.publish = vec![PortPublish::parse("published=8080,target=80,mode=host").unwrap()];
        spec.validate().unwrap();
    }

    /// Found by the specs fuzz target: a spec sent to the cluster API (not
    /// through meshctl's --secret/--config parser) kept a config mode with
    /// setuid/setgid/sticky bits, and could carry any target.
    #[test]
    fn a_spec_from_the_api_gets_its_references_checked() {
        use crate::api::secret::BlobRef;
        let reference = |target: &str, mode: u32| BlobRef {
            source: "app".into(),
            target: target.into(),
            uid: 0,
            gid: 0,
            mode,
        };
        let mut spec = crate::api::service::Service::example(1).spec;
        spec.configs = vec![reference("/etc/app.conf", 0o1110)];
        assert!(spec.validate().unwrap_err().contains("beyond 0777"));
        spec.configs = vec![reference("/etc/../shadow", 0o444)];
        assert!(spec.validate().unwrap_err().contains("absolute path"));
        spec.configs = vec![reference("/etc/app.conf", 0o444)];
        spec.secrets = vec![reference("../../etc/cron.d/x", 0o400)];
        assert!(spec.validate().unwrap_err().contains("/run/secrets"));
        spec.secrets = vec![reference("pw", 0o400)];
        spec.validate().unwrap();
    }
}

/// Replicated or global.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceMode {
    /// This many tasks, spread over the eligible nodes.
    Replicated {
        /// Desired tasks.
        replicas: u32,
    },
    /// One task on every eligible node.
    Global,
}

/// `--restart-*`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// When to restart.
    pub condition: RestartCondition,
    /// Wait before restarting, in milliseconds.
    pub delay_ms: u64,
    /// Give up after this many restarts of a slot (0: never give up).
    pub max_attempts: u32,
}

impl Default for RestartPolicy {
    /// Docker's defaults: restart on any exit, after 5 s, forever.
    fn default() -> Self {
        RestartPolicy {
            condition: RestartCondition::Any,
            delay_ms: 5000,
            max_attempts: 0,
        }
    }
}

/// What the operator asked for (`service create` / `service update`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Unique name.
    pub name: String,
    /// The command and its arguments.
    pub command: Vec<String>,
    /// Replicated or global.
    pub mode: ServiceMode,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub workdir: Option<String>,
    /// User to run as.
    pub user: Option<String>,
    /// Overlay networks by name.
    pub networks: Vec<String>,
    /// Published ports.
    pub publish: Vec<PortPublish>,
    /// `--constraint`, as given (validated on create).
    pub constraints: Vec<String>,
    /// `--placement-pref` label keys.
    pub spread_over: Vec<String>,
    /// `--replicas-max-per-node` (0: no limit).
    pub max_per_node: u32,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// `--health-*`: a command whose failures replace the task.
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// `--stop-grace-period`: SIGTERM, then SIGKILL after this many milliseconds.
    #[serde(default = "default_stop_grace_ms")]
    pub stop_grace_ms: u64,
    /// `--update-*`: how a changed spec rolls over the tasks.
    #[serde(default)]
    pub update: UpdateConfig,
    /// `--endpoint-mode`: how the service is reached on its networks.
    #[serde(default)]
    pub endpoint_mode: EndpointMode,
    /// `--lb-*`: how connections are spread over the tasks.
    #[serde(default)]
    pub lb: LbOptions,
    /// `--secret`: files under /run/secrets in each task.
    #[serde(default)]
    pub secrets: Vec<crate::api::secret::BlobRef>,
    /// `--config`: files under /run/configs in each task.
    #[serde(default)]
    pub configs: Vec<crate::api::secret::BlobRef>,
    /// `--cap-add`, `--cap-drop`, `--security-opt`, `--read-only`.
    #[serde(default)]
    pub security: crate::api::security::Security,
    /// `--limit-*`, `--reserve-*`.
    #[serde(default)]
    pub resources: crate::api::resources::Resources,
    /// `--mount`.
    #[serde(default)]
    pub mounts: Vec<crate::api::mounts::Mount>,
}

impl ServiceSpec {
    /// Its secret or config references.
    pub fn refs(&self, kind: crate::api::secret::Kind) -> &[crate::api::secret::BlobRef] {
        match kind {
            crate::api::secret::Kind::Secret => &self.secrets,
            crate::api::secret::Kind::Config => &self.configs,
        }
    }
}

/// `--lb-algorithm`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LbAlgorithm {
    /// Maglev consistent hashing: a connection's backend only changes when
    /// that backend leaves, and a client keeps its backend across nodes.
    #[default]
    Maglev,
    /// A random backend per connection.
    Random,
    /// The next backend per connection (per entry node and CPU).
    RoundRobin,
}

impl LbAlgorithm {
    /// As the flag spells it.
    pub fn name(self) -> &'static str {
        match self {
            LbAlgorithm::Maglev => "maglev",
            LbAlgorithm::Random => "random",
            LbAlgorithm::RoundRobin => "round-robin",
        }
    }
}

/// Default `--lb-affinity-timeout`: as IPVS persistence's default.
pub(crate) const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 300;

/// How connections are spread over a service's tasks.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbOptions {
    /// `--lb-algorithm`.
    pub algorithm: LbAlgorithm,
    /// `--lb-affinity client-ip`: a client's new connections go to the task
    /// its last one went to, until it has been idle for `affinity_timeout_s`.
    pub client_affinity: bool,
    /// `--lb-affinity-timeout`, seconds.
    pub affinity_timeout_s: u32,
}

impl Default for LbOptions {
    fn default() -> Self {
        LbOptions {
            algorithm: LbAlgorithm::Maglev,
            client_affinity: false,
            affinity_timeout_s: DEFAULT_AFFINITY_TIMEOUT_S,
        }
    }
}

/// `--endpoint-mode`, as Swarm's.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EndpointMode {
    /// One virtual IP per network, load-balanced over the healthy tasks.
    #[default]
    Vip,
    /// No virtual IP: the service name resolves to the task addresses.
    Dnsrr,
}

/// `--update-failure-action`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailureAction {
    /// Stop the update where it is (Docker's default).
    #[default]
    Pause,
    /// Carry on.
    Continue,
    /// Go back to the previous spec.
    Rollback,
}

/// `--update-order`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UpdateOrder {
    /// Stop the old task, then start its replacement (Docker's default).
    #[default]
    StopFirst,
    /// Start the replacement, stop the old task once it runs.
    StartFirst,
}

/// How a rolling update proceeds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpdateConfig {
    /// Tasks replaced at once (0: all at once).
    pub parallelism: u32,
    /// Wait between batches, in milliseconds.
    pub delay_ms: u64,
    /// What a failed new task does to the update.
    pub failure_action: FailureAction,
    /// Stop-first or start-first.
    pub order: UpdateOrder,
}

impl Default for UpdateConfig {
    /// Docker's defaults: one at a time, no delay, pause on failure, stop first.
    fn default() -> Self {
        UpdateConfig {
            parallelism: 1,
            delay_ms: 0,
            failure_action: FailureAction::Pause,
            order: UpdateOrder::StopFirst,
        }
    }
}

/// Where a rolling update is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateState {
    /// Replacing tasks with the new spec.
    Updating,
    /// Stopped after a failure; `service update` or `rollback` goes on.
    Paused,
    /// Every task runs the new spec.
    Completed,
    /// Replacing tasks with the previous spec.
    RollingBack,
    /// A rollback stopped after a failure.
    RollbackPaused,
    /// Every task runs the previous spec again.
    RolledBack,
}

/// A service's update progress (`service inspect` shows it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct UpdateStatus {
    /// Where it is.
    pub state: UpdateState,
    /// Why (failures).
    pub message: String,
    /// Unix milliseconds when it began; failures before do not count.
    pub started_at_ms: u64,
    /// Batches started so far.
    pub batches: u32,
    /// Unix milliseconds when the last batch finished (0: not yet).
    pub batch_done_at_ms: u64,
}

impl UpdateStatus {
    /// A fresh update (or rollback) starting at `now_ms`.
    pub fn start(state: UpdateState, now_ms: u64) -> UpdateStatus {
        UpdateStatus {
            state,
            message: String::new(),
            started_at_ms: now_ms,
            batches: 0,
            batch_done_at_ms: 0,
        }
    }

    /// Whether tasks are being replaced.
    pub fn is_active(&self) -> bool {
        matches!(self.state, UpdateState::Updating | UpdateState::RollingBack)
    }
}

/// `service update`: what changes (unset fields stay).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceUpdate {
    /// New command and arguments.
    pub command: Option<Vec<String>>,
    /// `--replicas`.
    pub replicas: Option<u32>,
    /// `--env-add K=V`.
    pub env_add: Vec<String>,
    /// `--env-rm K`.
    pub env_rm: Vec<String>,
    /// `--publish-add`.
    pub publish_add: Vec<String>,
    /// `--publish-rm PUBLISHED[/udp]`.
    pub publish_rm: Vec<String>,
    /// `--network-add`.
    pub network_add: Vec<String>,
    /// `--network-rm`.
    pub network_rm: Vec<String>,
    /// `--secret-add`.
    #[serde(default)]
    pub secret_add: Vec<String>,
    /// `--secret-rm`.
    #[serde(default)]
    pub secret_rm: Vec<String>,
    /// `--config-add`.
    #[serde(default)]
    pub config_add: Vec<String>,
    /// `--config-rm`.
    #[serde(default)]
    pub config_rm: Vec<String>,
    /// `--constraint-add`.
    pub constraint_add: Vec<String>,
    /// `--constraint-rm`.
    pub constraint_rm: Vec<String>,
    /// `--health-cmd` etc. (`Some(None)`: `--no-healthcheck`).
    pub health: Option<Option<HealthCheck>>,
    /// `--stop-grace-period`.
    pub stop_grace_ms: Option<u64>,
    /// `--update-parallelism`.
    pub update_parallelism: Option<u32>,
    /// `--update-delay`.
    pub update_delay_ms: Option<u64>,
    /// `--update-failure-action`.
    pub update_failure_action: Option<FailureAction>,
    /// `--update-order`.
    pub update_order: Option<UpdateOrder>,
    /// `--restart-condition`.
    #[serde(default)]
    pub restart_condition: Option<RestartCondition>,
    /// `--restart-delay`.
    #[serde(default)]
    pub restart_delay_ms: Option<u64>,
    /// `--restart-max-attempts`.
    #[serde(default)]
    pub restart_max_attempts: Option<u32>,
    /// `--endpoint-mode`.
    #[serde(default)]
    pub endpoint_mode: Option<EndpointMode>,
    /// `--lb-algorithm`.
    #[serde(default)]
    pub lb_algorithm: Option<LbAlgorithm>,
    /// `--lb-affinity` (true: client-ip).
    #[serde(default)]
    pub lb_client_affinity: Option<bool>,
    /// `--lb-affinity-timeout`, seconds.
    #[serde(default)]
    pub lb_affinity_timeout_s: Option<u32>,
    /// `--cap-add`.
    #[serde(default)]
    pub cap_add: Vec<String>,
    /// `--cap-drop`.
    #[serde(default)]
    pub cap_drop: Vec<String>,
    /// `--security-opt`.
    #[serde(default)]
    pub security_opt: Vec<String>,
    /// `--read-only`.
    #[serde(default)]
    pub read_only: Option<bool>,
    /// `--limit-*` and `--reserve-*` given (unset: unchanged; 0: removed).
    #[serde(default)]
    pub resources: crate::api::resources::Resources,
    /// `--mount-add`.
    #[serde(default)]
    pub mount_add: Vec<String>,
    /// `--mount-rm TARGET`.
    #[serde(default)]
    pub mount_rm: Vec<String>,
    /// `--force`: replace every task even if nothing else changed.
    pub force: bool,
}

/// Applies `update` to `spec`: the new spec, checked, or what is wrong.
pub fn apply_update(spec: &ServiceSpec, update: &ServiceUpdate) -> Result<ServiceSpec, Invalid> {
    let mut next = spec.clone();
    if let Some(command) = &update.command {
        next.command = command.clone();
    }
    if let Some(replicas) = update.replicas {
        match &mut next.mode {
            ServiceMode::Replicated { replicas: r } => *r = replicas,
            ServiceMode::Global => {
                return Err(crate::invalid!(
                    "service {} is global: it runs one task per node and has no --replicas",
                    spec.name
                ))
            }
        }
    }
    for k in &update.env_rm {
        next.env.remove(k);
    }
    next.env.extend(parse_env(&update.env_add)?);
    for rm in &update.publish_rm {
        let (port, proto) = match rm.split_once('/') {
            Some((p, proto)) => (p, protocol(rm, proto)?),
            None => (rm.as_str(), Protocol::Tcp),
        };
        let port: u16 = port
            .parse()
            .map_err(|_| format!("invalid --publish-rm {rm:?}: expected PUBLISHED[/udp]"))?;
        let before = next.publish.len();
        next.publish.retain(|p| !(p.published == port && p.protocol == proto));
        if next.publish.len() == before {
            return Err(crate::invalid!(
                "--publish-rm {rm}: the service does not publish that port"
            ));
        }
    }
    for add in &update.publish_add {
        next.publish.push(PortPublish::parse(add)?);
    }
    for rm in &update.network_rm {
        if !next.networks.contains(rm) {
            return Err(crate::invalid!(
                "--network-rm {rm}: the service is not attached to that network"
            ));
        }
        next.networks.retain(|n| n != rm);
    }
    for add in &update.network_add {
        if !next.networks.contains(add) {
            next.networks.push(add.clone());
        }
    }
    use crate::api::secret::Kind;
    for (kind, removes, adds) in [
        (Kind::Secret, &update.secret_rm, &update.secret_add),
        (Kind::Config, &update.config_rm, &update.config_add),
    ] {
        let refs = match kind {
            Kind::Secret => &mut next.secrets,
            Kind::Config => &mut next.configs,
        };
        for rm in removes {
            if !refs.iter().any(|r| &r.source == rm) {
                return Err(crate::invalid!(
                    "--{}-rm {rm}: the service has no such {}",
                    kind.name(),
                    kind.name()
                ));
            }
            refs.retain(|r| &r.source != rm);
        }
        for add in adds {
            refs.push(crate::api::secret::parse_ref(kind, add)?);
        }
    }
    for rm in &update.constraint_rm {
        next.constraints.retain(|c| c != rm);
    }
    next.constraints.extend(update.constraint_add.iter().cloned());
    if let Some(health) = &update.health {
        next.health = health.clone();
    }
    if let Some(grace) = update.stop_grace_ms {
        next.stop_grace_ms = grace;
    }
    if let Some(p) = update.update_parallelism {
        next.update.parallelism = p;
    }
    if let Some(d) = update.update_delay_ms {
        next.update.delay_ms = d;
    }
    if let Some(a) = update.update_failure_action {
        next.update.failure_action = a;
    }
    if let Some(o) = update.update_order {
        next.update.order = o;
    }
    if let Some(c) = update.restart_condition {
        next.restart.condition = c;
    }
    if let Some(d) = update.restart_delay_ms {
        next.restart.delay_ms = d;
    }
    if let Some(n) = update.restart_max_attempts {
        next.restart.max_attempts = n;
    }
    if let Some(m) = update.endpoint_mode {
        next.endpoint_mode = m;
    }
    if let Some(a) = update.lb_algorithm {
        next.lb.algorithm = a;
    }
    if let Some(a) = update.lb_client_affinity {
        next.lb.client_affinity = a;
    }
    if let Some(t) = update.lb_affinity_timeout_s {
        next.lb.affinity_timeout_s = t;
    }
    crate::api::security::update_capabilities(&mut next.security, &update.cap_add, &update.cap_drop)?;
    crate::api::security::parse_security_opts(&update.security_opt, &mut next.security)?;
    if let Some(read_only) = update.read_only {
        next.security.read_only = read_only;
    }
    for target in &update.mount_rm {
        if !next.mounts.iter().any(|m| &m.target == target) {
            return Err(crate::invalid!("--mount-rm {target}: the service has no mount there"));
        }
        next.mounts.retain(|m| &m.target != target);
    }
    for text in &update.mount_add {
        let mount = crate::api::mounts::parse_mount(text)?;
        next.mounts.retain(|m| m.target != mount.target);
        next.mounts.push(mount);
    }
    let (r, given) = (&mut next.resources, update.resources);
    for (field, value) in [
        (&mut r.memory_limit, given.memory_limit),
        (&mut r.cpu_limit, given.cpu_limit),
        (&mut r.pids_limit, given.pids_limit),
        (&mut r.memory_reservation, given.memory_reservation),
        (&mut r.cpu_reservation, given.cpu_reservation),
    ] {
        if let Some(value) = value {
            *field = (value > 0).then_some(value);
        }
    }
    next.validate()?;
    Ok(next)
}

impl ServiceSpec {
    /// Whether tasks made from `self` differ from tasks made from `other`
    /// (replica count, update settings, restart policy, published ports and
    /// endpoint mode are the managers' business and change no running task,
    /// so changing them replaces none).
    pub fn task_template_differs(&self, other: &ServiceSpec) -> bool {
        let template = |s: &ServiceSpec| {
            let mut t = s.clone();
            if let ServiceMode::Replicated { replicas } = &mut t.mode {
                *replicas = 0;
            }
            t.update = UpdateConfig::default();
            t.restart = RestartPolicy::default();
            t.publish.clear();
            t.endpoint_mode = EndpointMode::default();
            t.lb = LbOptions::default();
            t
        };
        template(self) != template(other)
    }
}

/// Docker's default stop grace period (10 s).
pub(crate) const DEFAULT_STOP_GRACE_MS: u64 = 10_000;

fn default_stop_grace_ms() -> u64 {
    DEFAULT_STOP_GRACE_MS
}

/// `--health-cmd` and its timing (Docker's defaults: every 30 s, 30 s
/// timeout, 3 retries, no start period).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// Run with `/bin/sh -c` inside the task's namespaces; exit 0 is healthy.
    pub command: String,
    /// Between checks, in milliseconds.
    pub interval_ms: u64,
    /// A check running longer fails, in milliseconds.
    pub timeout_ms: u64,
    /// Consecutive failures that make the task unhealthy.
    pub retries: u32,
    /// Failures in this first window do not count, in milliseconds.
    pub start_period_ms: u64,
}

impl ServiceSpec {
    /// One replica of `command` with Docker's defaults for everything else.
    pub fn new(name: impl Into<String>, command: Vec<String>) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            command,
            mode: ServiceMode::Replicated { replicas: 1 },
            env: BTreeMap::new(),
            workdir: None,
            user: None,
            networks: vec![],
            publish: vec![],
            constraints: vec![],
            spread_over: vec![],
            max_per_node: 0,
            restart: RestartPolicy::default(),
            health: None,
            stop_grace_ms: DEFAULT_STOP_GRACE_MS,
            update: UpdateConfig::default(),
            endpoint_mode: EndpointMode::default(),
            lb: LbOptions::default(),
            secrets: vec![],
            configs: vec![],
            security: crate::api::security::Security::default(),
            resources: crate::api::resources::Resources::default(),
            mounts: vec![],
        }
    }

    /// Checks everything that can be checked without the cluster.
    pub fn validate(&self) -> Result<(), Invalid> {
        check_service_name(&self.name)?;
        self.security.validate()?;
        self.resources.validate()?;
        crate::api::mounts::check_mounts(&self.mounts)?;
        for kind in [crate::api::secret::Kind::Secret, crate::api::secret::Kind::Config] {
            let refs = self.refs(kind);
            for (i, r) in refs.iter().enumerate() {
                // The spec may not come from meshctl's parser: check again.
                crate::api::secret::check_ref(kind, r).map_err(|e| format!("--{} {}: {e}", kind.name(), r.source))?;
                if refs[..i].iter().any(|o| o.target == r.target) {
                    let place = if r.target.starts_with('/') {
                        r.target.clone()
                    } else {
                        format!("{}/{}", kind.dir(), r.target)
                    };
                    return Err(crate::invalid!(
                        "two {}s go to {place}: give one another target",
                        kind.name()
                    ));
                }
            }
        }
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err("a service needs a command: meshctl service create --name NAME -- COMMAND [ARGS...]".into());
        }
        parse_constraints(&self.constraints)?;
        check_publish_conflicts(&self.publish)?;
        if self.networks.len() > crate::api::network::MAX_TASK_NETWORKS {
            return Err(crate::invalid!(
                "the service is on {} networks; at most {} are supported",
                self.networks.len(),
                crate::api::network::MAX_TASK_NETWORKS
            ));
        }
        if self.endpoint_mode == EndpointMode::Dnsrr {
            if let Some(p) = self.publish.iter().find(|p| p.mode == PublishMode::Ingress) {
                return Err(crate::invalid!(
                    "port {} is published in ingress mode, which needs a virtual IP: use --endpoint-mode vip, or publish with mode=host",
                    p.published
                ));
            }
        }
        if self.lb.client_affinity && !(1..=86_400).contains(&self.lb.affinity_timeout_s) {
            return Err(crate::invalid!(
                "--lb-affinity-timeout {}s is out of range: use 1s to 24h",
                self.lb.affinity_timeout_s
            ));
        }
        if let ServiceMode::Replicated { replicas } = self.mode {
            if replicas > 10_000 {
                return Err(crate::invalid!("--replicas {replicas} is more than 10000"));
            }
        }
        if let Some(h) = &self.health {
            if h.command.trim().is_empty() {
                return Err("--health-cmd is empty".into());
            }
            if h.interval_ms == 0 || h.timeout_ms == 0 || h.retries == 0 {
                return Err("--health-interval, --health-timeout and --health-retries must be greater than 0".into());
            }
        }
        Ok(())
    }
}

/// A service as stored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// ID.
    pub id: u64,
    /// The spec.
    pub spec: ServiceSpec,
    /// Bumped on every update.
    pub version: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub updated_at: u64,
    /// The spec before the last update (what `service rollback` returns to).
    #[serde(default)]
    pub previous_spec: Option<ServiceSpec>,
    /// The last rolling update's progress.
    #[serde(default)]
    pub update_status: Option<UpdateStatus>,
    /// Its virtual IP on each of its networks (endpoint mode vip).
    #[serde(default)]
    pub vips: Vec<crate::api::network::NetworkAttachment>,
}

#[cfg(any(test, feature = "fixtures"))]
impl Service {
    /// For tests: a replicated service of 1 running `sleep 1000`.
    pub fn example(id: u64) -> Service {
        Service {
            id,
            spec: ServiceSpec::new(format!("s{id}"), vec!["sleep".into(), "1000".into()]),
            version: 1,
            created_at: 0,
            updated_at: 0,
            previous_spec: None,
            update_status: None,
            vips: Vec::new(),
        }
    }
}

/// Whether a task should run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DesiredState {
    /// Keep it running.
    Running,
    /// Stop it.
    Shutdown,
}

/// One task as stored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// ID.
    pub id: u64,
    /// Its service.
    pub service: u64,
    /// Replica slot (1..), 0 for global tasks.
    pub slot: u32,
    /// Where it runs, once assigned.
    pub node: Option<u64>,
    /// What the orchestrator wants.
    pub desired: DesiredState,
    /// Where it is.
    pub state: TaskState,
    /// Why (errors for `service ps`).
    pub message: String,
    /// The service version it runs.
    pub service_version: u64,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds of the last state change.
    pub updated_at: u64,
    /// Restarts of its slot before this task (restart policy's attempts).
    #[serde(default)]
    pub restarts: u32,
    /// Unix milliseconds when it reached a terminal state (0: not yet).
    #[serde(default)]
    pub ended_at_ms: u64,
    /// Its address on each of its service's overlay networks.
    #[serde(default)]
    pub attachments: Vec<crate::api::network::NetworkAttachment>,
}

/// A node's report on one of its tasks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TaskReport {
    /// Which task.
    pub task: u64,
    /// Where it is now.
    pub state: TaskState,
    /// Why (errors for `service ps`).
    pub message: String,
}

/// What a node needs to run one task: the service's spec, cut to the task.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskSpec {
    /// `SERVICE.SLOT` (or `SERVICE.NODE` for global tasks), for logs.
    pub name: String,
    /// The command and its arguments.
    pub command: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub workdir: Option<String>,
    /// User to run as.
    pub user: Option<String>,
    /// Health check.
    pub health: Option<HealthCheck>,
    /// SIGTERM, then SIGKILL after this many milliseconds.
    pub stop_grace_ms: u64,
    /// The overlay networks to attach it to, with its address on each.
    #[serde(default)]
    pub networks: Vec<crate::api::network::TaskNetwork>,
    /// Its secrets and configs, content included (only in the assignment
    /// of the node running it, and only while it is to run).
    #[serde(default)]
    pub files: Vec<crate::api::secret::TaskFile>,
    /// Its confinement.
    #[serde(default)]
    pub security: crate::api::security::Security,
    /// Its limits.
    #[serde(default)]
    pub resources: crate::api::resources::Resources,
    /// Its mounts.
    #[serde(default)]
    pub mounts: Vec<crate::api::mounts::Mount>,
}

/// One task a node is told about: run it, or stop it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The task's ID.
    pub task: u64,
    /// Its service's ID.
    pub service: u64,
    /// Running or Shutdown.
    pub desired: DesiredState,
    /// Its state as the managers know it.
    pub state: TaskState,
    /// What to run.
    pub spec: TaskSpec,
    /// Nodes on its networks that have yet to learn its endpoint (0 once
    /// they all have, and for a task that has started): its process waits
    /// for them, up to a bound, so its first connection is answered.
    #[serde(default)]
    pub endpoints_pending: u32,
}
