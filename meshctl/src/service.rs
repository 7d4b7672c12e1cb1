//! `meshctl service ...`: create, update, rollback, ls, ps, inspect, logs,
//! scale, rm. `create` and `update` follow the tasks until they run, unless
//! `--detach`.

use crate::api::mounts::parse_mount;
use crate::api::resources::{bytes_text, cpus_text, parse_bytes, parse_cpus, Resources};
use crate::api::secret::Kind;
use crate::api::security::{parse_security_opts, Seccomp, Security};
use clap::{Args, Subcommand, ValueEnum};

use super::{duration_ms, json, table, Client, Format, ListArgs};
use crate::api::{
    error::{ApiError, ApiResult},
    messages::{ClusterRequest, ClusterResponse, LocalRequest, LocalResponse, ServiceView, TaskView},
    objects::node_id_text,
    service::{
        parse_env, parse_placement_pref, EndpointMode, FailureAction, HealthCheck, LbAlgorithm, LbOptions, PortPublish,
        Protocol, PublishMode, RestartCondition, RestartPolicy, ServiceMode, ServiceSpec, ServiceUpdate, UpdateConfig,
        UpdateOrder,
    },
};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Replicated,
    Global,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RestartArg {
    None,
    OnFailure,
    Any,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EndpointArg {
    Vip,
    Dnsrr,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum AlgorithmArg {
    Maglev,
    Random,
    RoundRobin,
}

impl From<AlgorithmArg> for LbAlgorithm {
    fn from(arg: AlgorithmArg) -> Self {
        match arg {
            AlgorithmArg::Maglev => LbAlgorithm::Maglev,
            AlgorithmArg::Random => LbAlgorithm::Random,
            AlgorithmArg::RoundRobin => LbAlgorithm::RoundRobin,
        }
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum AffinityArg {
    None,
    ClientIp,
}

/// Resource flags, shared by create and update (on update, 0 removes a
/// limit or reservation).
#[derive(clap::Args, Debug, Default)]
struct ResourceArgs {
    /// Memory limit, e.g. 512m or 1g: over it the task is OOM killed.
    #[arg(long)]
    limit_memory: Option<String>,
    /// CPU limit, e.g. 0.5 or 2: the task is throttled beyond it.
    #[arg(long)]
    limit_cpu: Option<String>,
    /// How many processes and threads the task may have at once.
    #[arg(long)]
    limit_pids: Option<u64>,
    /// Memory the scheduler keeps for each task on its node, e.g. 256m.
    #[arg(long)]
    reserve_memory: Option<String>,
    /// CPUs the scheduler keeps for each task on its node, e.g. 0.25.
    #[arg(long)]
    reserve_cpu: Option<String>,
}

impl ResourceArgs {
    /// Each flag given, parsed; "0" is 0 (no limit).
    fn parsed(&self) -> ApiResult<Resources> {
        let bytes = |flag: &str, v: &Option<String>| -> ApiResult<Option<u64>> {
            v.as_deref()
                .map(|t| if t.trim() == "0" { Ok(0) } else { parse_bytes(flag, t) })
                .transpose()
                .map_err(ApiError::invalid)
        };
        let cpus = |flag: &str, v: &Option<String>| -> ApiResult<Option<u64>> {
            v.as_deref()
                .map(|t| if t.trim() == "0" { Ok(0) } else { parse_cpus(flag, t) })
                .transpose()
                .map_err(ApiError::invalid)
        };
        Ok(Resources {
            memory_limit: bytes("limit-memory", &self.limit_memory)?,
            cpu_limit: cpus("limit-cpu", &self.limit_cpu)?,
            pids_limit: self.limit_pids,
            memory_reservation: bytes("reserve-memory", &self.reserve_memory)?,
            cpu_reservation: cpus("reserve-cpu", &self.reserve_cpu)?,
        })
    }

    /// What a new service asks for (0: none).
    fn resources(&self) -> ApiResult<Resources> {
        let r = self.parsed()?;
        let set = |v: Option<u64>| v.filter(|v| *v > 0);
        Ok(Resources {
            memory_limit: set(r.memory_limit),
            cpu_limit: set(r.cpu_limit),
            pids_limit: set(r.pids_limit),
            memory_reservation: set(r.memory_reservation),
            cpu_reservation: set(r.cpu_reservation),
        })
    }
}

/// Confinement flags, shared by create and update (on update, `--cap-add`
/// and `--cap-drop` move a capability between the service's two lists).
#[derive(clap::Args, Debug, Default)]
struct SecurityArgs {
    /// Add a Linux capability to Docker's default set, e.g. NET_ADMIN, or ALL (repeatable).
    #[arg(long)]
    cap_add: Vec<String>,
    /// Drop a Linux capability from it, or ALL (repeatable).
    #[arg(long)]
    cap_drop: Vec<String>,
    /// seccomp=unconfined to run without the default seccomp filter, seccomp=default for it (repeatable).
    #[arg(long)]
    security_opt: Vec<String>,
    /// Show the tasks the node's file system read-only (--read-only=false undoes it on update).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    read_only: Option<bool>,
}

impl SecurityArgs {
    /// The confinement a new service asks for.
    fn security(&self) -> ApiResult<Security> {
        let mut security = Security {
            cap_add: self.cap_add.clone(),
            cap_drop: self.cap_drop.clone(),
            read_only: self.read_only.unwrap_or(false),
            ..Security::default()
        };
        parse_security_opts(&self.security_opt, &mut security).map_err(ApiError::invalid)?;
        Ok(security)
    }
}

/// `--lb-*` flags, shared by create and update (unset: unchanged on update,
/// the defaults on create).
#[derive(clap::Args, Debug, Default)]
struct LbArgs {
    /// How connections are spread over the tasks: maglev (consistent hashing, the default), random or round-robin.
    #[arg(long, value_enum)]
    lb_algorithm: Option<AlgorithmArg>,
    /// client-ip keeps each client on one task (sticky sessions); none (the default) does not.
    #[arg(long, value_enum)]
    lb_affinity: Option<AffinityArg>,
    /// How long an idle client stays with its task under --lb-affinity client-ip (default 300s).
    #[arg(long)]
    lb_affinity_timeout: Option<String>,
}

impl LbArgs {
    fn timeout_s(&self) -> ApiResult<Option<u32>> {
        self.lb_affinity_timeout
            .as_deref()
            .map(|t| {
                let ms = duration_ms("lb-affinity-timeout", t)?;
                u32::try_from(ms / 1000)
                    .map_err(|_| ApiError::invalid(format!("--lb-affinity-timeout {t} is too long")))
            })
            .transpose()
    }

    fn applied_to(&self, mut lb: LbOptions) -> ApiResult<LbOptions> {
        if let Some(a) = self.lb_algorithm {
            lb.algorithm = a.into();
        }
        if let Some(a) = self.lb_affinity {
            lb.client_affinity = matches!(a, AffinityArg::ClientIp);
        }
        if let Some(t) = self.timeout_s()? {
            lb.affinity_timeout_s = t;
        }
        Ok(lb)
    }
}

impl From<EndpointArg> for EndpointMode {
    fn from(arg: EndpointArg) -> Self {
        match arg {
            EndpointArg::Vip => EndpointMode::Vip,
            EndpointArg::Dnsrr => EndpointMode::Dnsrr,
        }
    }
}

impl From<RestartArg> for RestartCondition {
    fn from(arg: RestartArg) -> Self {
        match arg {
            RestartArg::None => RestartCondition::None,
            RestartArg::OnFailure => RestartCondition::OnFailure,
            RestartArg::Any => RestartCondition::Any,
        }
    }
}

/// `--restart-*`, shared by `create` and `update` (unset: the default, or
/// unchanged on update).
#[derive(Args, Debug)]
pub(crate) struct RestartArgs {
    /// When to restart a task [default: any].
    #[arg(long, value_enum)]
    restart_condition: Option<RestartArg>,
    /// Wait before a restart [default: 5s].
    #[arg(long)]
    restart_delay: Option<String>,
    /// Restarts per slot before giving up (0: unlimited) [default: 0].
    #[arg(long)]
    restart_max_attempts: Option<u32>,
}

impl RestartArgs {
    fn delay_ms(&self) -> ApiResult<Option<u64>> {
        self.restart_delay
            .as_deref()
            .map(|d| duration_ms("restart-delay", d))
            .transpose()
    }

    /// `base` with the given flags applied.
    fn applied_to(&self, base: RestartPolicy) -> ApiResult<RestartPolicy> {
        Ok(RestartPolicy {
            condition: self.restart_condition.map_or(base.condition, Into::into),
            delay_ms: self.delay_ms()?.unwrap_or(base.delay_ms),
            max_attempts: self.restart_max_attempts.unwrap_or(base.max_attempts),
        })
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FailureArg {
    Pause,
    Continue,
    Rollback,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OrderArg {
    StopFirst,
    StartFirst,
}

/// `--update-*`, shared by `create` and `update` (unset: the default, or
/// unchanged on update).
#[derive(Args, Debug)]
pub(crate) struct UpdateConfigArgs {
    /// Tasks replaced at once during an update (0: all at once) [default: 1].
    #[arg(long)]
    update_parallelism: Option<u32>,
    /// Wait between batches of an update [default: 0s].
    #[arg(long)]
    update_delay: Option<String>,
    /// What a failed task does to an update [default: pause].
    #[arg(long, value_enum)]
    update_failure_action: Option<FailureArg>,
    /// stop-first (old task stops, then its replacement starts) or start-first [default: stop-first].
    #[arg(long, value_enum)]
    update_order: Option<OrderArg>,
}

impl From<FailureArg> for FailureAction {
    fn from(arg: FailureArg) -> Self {
        match arg {
            FailureArg::Pause => FailureAction::Pause,
            FailureArg::Continue => FailureAction::Continue,
            FailureArg::Rollback => FailureAction::Rollback,
        }
    }
}

impl From<OrderArg> for UpdateOrder {
    fn from(arg: OrderArg) -> Self {
        match arg {
            OrderArg::StopFirst => UpdateOrder::StopFirst,
            OrderArg::StartFirst => UpdateOrder::StartFirst,
        }
    }
}

impl UpdateConfigArgs {
    fn delay_ms(&self) -> ApiResult<Option<u64>> {
        self.update_delay
            .as_deref()
            .map(|d| duration_ms("update-delay", d))
            .transpose()
    }

    /// The defaults with the given flags applied (`create`).
    fn config(&self) -> ApiResult<UpdateConfig> {
        let base = UpdateConfig::default();
        Ok(UpdateConfig {
            parallelism: self.update_parallelism.unwrap_or(base.parallelism),
            delay_ms: self.delay_ms()?.unwrap_or(base.delay_ms),
            failure_action: self.update_failure_action.map_or(base.failure_action, Into::into),
            order: self.update_order.map_or(base.order, Into::into),
        })
    }
}

/// `service update` flags.
#[derive(Args, Debug)]
pub(crate) struct UpdateArgs {
    /// Number of tasks.
    #[arg(long)]
    replicas: Option<u32>,
    /// Add or change an environment variable KEY=VALUE (repeatable).
    #[arg(long)]
    env_add: Vec<String>,
    /// Remove an environment variable (repeatable).
    #[arg(long)]
    env_rm: Vec<String>,
    /// Publish a port (as --publish on create; repeatable).
    #[arg(long)]
    publish_add: Vec<String>,
    /// Stop publishing PUBLISHED[/udp] (repeatable).
    #[arg(long)]
    publish_rm: Vec<String>,
    /// Attach a network (repeatable).
    #[arg(long)]
    network_add: Vec<String>,
    /// Detach a network (repeatable).
    #[arg(long)]
    network_rm: Vec<String>,
    /// Give the tasks a secret: NAME or source=NAME,target=FILE,uid=,gid=,mode= (repeatable; rolls the tasks).
    #[arg(long)]
    secret_add: Vec<String>,
    /// Take a secret away, by name (repeatable; rolls the tasks).
    #[arg(long)]
    secret_rm: Vec<String>,
    /// Give the tasks a config: NAME or source=NAME,target=FILE,uid=,gid=,mode= (repeatable; rolls the tasks).
    #[arg(long)]
    config_add: Vec<String>,
    /// Take a config away, by name (repeatable; rolls the tasks).
    #[arg(long)]
    config_rm: Vec<String>,
    /// Add a placement constraint (repeatable).
    #[arg(long)]
    constraint_add: Vec<String>,
    /// Remove a placement constraint (repeatable).
    #[arg(long)]
    constraint_rm: Vec<String>,
    #[command(flatten)]
    health: HealthArgs,
    /// Remove the health check.
    #[arg(long, conflicts_with = "health_cmd")]
    no_healthcheck: bool,
    /// SIGTERM first, SIGKILL after this long.
    #[arg(long)]
    stop_grace_period: Option<String>,
    #[command(flatten)]
    update: UpdateConfigArgs,
    /// Replace every task even if nothing else changed.
    #[arg(long)]
    force: bool,
    /// vip or dnsrr (changes no task).
    #[arg(long, value_enum)]
    endpoint_mode: Option<EndpointArg>,
    #[command(flatten)]
    lb: LbArgs,
    /// Add or replace a mount, as --mount on create (repeatable).
    #[arg(long)]
    mount_add: Vec<String>,
    /// Remove the mount at TARGET (repeatable).
    #[arg(long)]
    mount_rm: Vec<String>,
    #[command(flatten)]
    security: SecurityArgs,
    #[command(flatten)]
    resources: ResourceArgs,
    #[command(flatten)]
    restart: RestartArgs,
    /// Return at once instead of showing progress until the update converges.
    #[arg(short, long)]
    detach: bool,
    /// Name or ID.
    service: String,
    /// New command and arguments, after `--`.
    #[arg(last = true)]
    command: Vec<String>,
}

/// `--health-*`, shared by `create` and `update`.
#[derive(Args, Debug)]
pub(crate) struct HealthArgs {
    /// Command run inside the task to check its health (`sh -c CMD`; exit 0 is healthy).
    #[arg(long)]
    health_cmd: Option<String>,
    /// Time between health checks.
    #[arg(long, default_value = "30s")]
    health_interval: String,
    /// A health check running longer than this fails.
    #[arg(long, default_value = "30s")]
    health_timeout: String,
    /// Consecutive failures that make a task unhealthy (it is then replaced).
    #[arg(long, default_value_t = 3)]
    health_retries: u32,
    /// Failures in this window after start do not count.
    #[arg(long, default_value = "0s")]
    health_start_period: String,
}

impl HealthArgs {
    /// The check `--health-cmd` asks for, if any.
    fn check(self) -> ApiResult<Option<HealthCheck>> {
        let Some(command) = self.health_cmd else {
            return Ok(None);
        };
        Ok(Some(HealthCheck {
            command,
            interval_ms: duration_ms("health-interval", &self.health_interval)?,
            timeout_ms: duration_ms("health-timeout", &self.health_timeout)?,
            retries: self.health_retries,
            start_period_ms: duration_ms("health-start-period", &self.health_start_period)?,
        }))
    }
}

fn update_of(args: UpdateArgs) -> ApiResult<(String, ServiceUpdate, bool)> {
    let health = match args.health.check()? {
        _ if args.no_healthcheck => Some(None),
        Some(check) => Some(Some(check)),
        None => None,
    };
    let update = ServiceUpdate {
        command: (!args.command.is_empty()).then_some(args.command),
        replicas: args.replicas,
        env_add: args.env_add,
        env_rm: args.env_rm,
        publish_add: args.publish_add,
        publish_rm: args.publish_rm,
        network_add: args.network_add,
        network_rm: args.network_rm,
        secret_add: args.secret_add,
        secret_rm: args.secret_rm,
        config_add: args.config_add,
        config_rm: args.config_rm,
        constraint_add: args.constraint_add,
        constraint_rm: args.constraint_rm,
        health,
        stop_grace_ms: args
            .stop_grace_period
            .as_deref()
            .map(|g| duration_ms("stop-grace-period", g))
            .transpose()?,
        update_parallelism: args.update.update_parallelism,
        update_delay_ms: args.update.delay_ms()?,
        update_failure_action: args.update.update_failure_action.map(Into::into),
        update_order: args.update.update_order.map(Into::into),
        restart_condition: args.restart.restart_condition.map(Into::into),
        restart_delay_ms: args.restart.delay_ms()?,
        restart_max_attempts: args.restart.restart_max_attempts,
        endpoint_mode: args.endpoint_mode.map(Into::into),
        lb_algorithm: args.lb.lb_algorithm.map(Into::into),
        lb_client_affinity: args.lb.lb_affinity.map(|a| matches!(a, AffinityArg::ClientIp)),
        lb_affinity_timeout_s: args.lb.timeout_s()?,
        cap_add: args.security.cap_add,
        cap_drop: args.security.cap_drop,
        security_opt: args.security.security_opt,
        read_only: args.security.read_only,
        resources: args.resources.parsed()?,
        mount_add: args.mount_add,
        mount_rm: args.mount_rm,
        force: args.force,
    };
    Ok((args.service, update, args.detach))
}

/// `service create` flags.
#[derive(Args, Debug)]
pub(crate) struct CreateArgs {
    /// Service name.
    #[arg(long)]
    name: String,
    /// Number of tasks (replicated mode).
    #[arg(long)]
    replicas: Option<u32>,
    /// replicated or global.
    #[arg(long, value_enum, default_value = "replicated")]
    mode: ModeArg,
    /// At most this many tasks per node (0: no limit).
    #[arg(long, default_value_t = 0)]
    replicas_max_per_node: u32,
    /// Placement constraint, e.g. node.labels.zone==a (repeatable).
    #[arg(long)]
    constraint: Vec<String>,
    /// Spread over a label's values: spread=node.labels.KEY (repeatable).
    #[arg(long)]
    placement_pref: Vec<String>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long)]
    env: Vec<String>,
    /// Working directory of the command.
    #[arg(long)]
    workdir: Option<String>,
    /// User to run the command as.
    #[arg(long)]
    user: Option<String>,
    /// Network to attach (repeatable).
    #[arg(long)]
    network: Vec<String>,
    /// A secret for the tasks, under /run/secrets: NAME or source=NAME,target=FILE,uid=,gid=,mode= (repeatable).
    #[arg(long)]
    secret: Vec<String>,
    /// A config for the tasks, under /run/configs: NAME or source=NAME,target=FILE,uid=,gid=,mode= (repeatable).
    #[arg(long)]
    config: Vec<String>,
    /// Publish a port: P:T[/udp] or published=P,target=T,protocol=tcp|udp,mode=ingress|host.
    #[arg(long)]
    publish: Vec<String>,
    /// vip (a virtual IP per network, load-balanced) or dnsrr (DNS answers with the task addresses).
    #[arg(long, value_enum, default_value = "vip")]
    endpoint_mode: EndpointArg,
    #[command(flatten)]
    lb: LbArgs,
    /// Mount into the tasks: type=bind|tmpfs|volume,source=,target=[,readonly][,tmpfs-size=] (repeatable; the target must exist on the node).
    #[arg(long)]
    mount: Vec<String>,
    #[command(flatten)]
    security: SecurityArgs,
    #[command(flatten)]
    resources: ResourceArgs,
    #[command(flatten)]
    restart: RestartArgs,
    #[command(flatten)]
    health: HealthArgs,
    /// SIGTERM first, SIGKILL after this long.
    #[arg(long, default_value = "10s")]
    stop_grace_period: String,
    #[command(flatten)]
    update: UpdateConfigArgs,
    /// Return once the service is stored instead of showing progress until it converges.
    #[arg(short, long)]
    detach: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// `meshctl service`.
#[derive(Subcommand, Debug)]
pub(crate) enum ServiceCommand {
    /// Create a service.
    Create(Box<CreateArgs>),
    /// List services.
    Ls(ListArgs),
    /// List a service's tasks.
    Ps {
        /// Only print task IDs.
        #[arg(short, long)]
        quiet: bool,
        /// json or table.
        #[arg(long, default_value = "table")]
        format: Format,
        /// Name or ID.
        service: String,
    },
    /// Show a service's task logs (stdout and stderr, kept on each task's node).
    Logs {
        /// Keep following new output (until interrupted).
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines of each task ("all" for everything).
        #[arg(short = 'n', long, default_value = "all")]
        tail: String,
        /// Name or ID.
        service: String,
    },
    /// Show services in detail (JSON unless --pretty).
    Inspect {
        /// Human-readable text instead of JSON.
        #[arg(long)]
        pretty: bool,
        /// Names or IDs.
        #[arg(required = true)]
        services: Vec<String>,
    },
    /// Set replica counts: SERVICE=N ...
    Scale {
        /// SERVICE=N pairs.
        #[arg(required = true)]
        pairs: Vec<String>,
    },
    /// Change a service; changed tasks roll over as --update-* says.
    Update(Box<UpdateArgs>),
    /// Go back to the service's previous spec (rolled out as an update).
    Rollback {
        /// Return at once instead of showing progress.
        #[arg(short, long)]
        detach: bool,
        /// Name or ID.
        service: String,
    },
    /// Remove services.
    Rm {
        /// Names or IDs.
        #[arg(required = true)]
        services: Vec<String>,
    },
}

fn spec_of(args: CreateArgs) -> ApiResult<ServiceSpec> {
    let mode = match (args.mode, args.replicas) {
        (ModeArg::Global, Some(_)) => return Err(ApiError::invalid("--replicas cannot be used with --mode global")),
        (ModeArg::Global, None) => ServiceMode::Global,
        (ModeArg::Replicated, r) => ServiceMode::Replicated {
            replicas: r.unwrap_or(1),
        },
    };
    let publish = args
        .publish
        .iter()
        .map(|p| PortPublish::parse(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::invalid)?;
    let spread_over = args
        .placement_pref
        .iter()
        .map(|p| parse_placement_pref(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::invalid)?;
    let spec = ServiceSpec {
        name: args.name,
        command: args.command,
        mode,
        env: parse_env(&args.env).map_err(ApiError::invalid)?,
        workdir: args.workdir,
        user: args.user,
        networks: args.network,
        publish,
        constraints: args.constraint,
        spread_over,
        max_per_node: args.replicas_max_per_node,
        restart: args.restart.applied_to(RestartPolicy::default())?,
        endpoint_mode: args.endpoint_mode.into(),
        lb: args.lb.applied_to(LbOptions::default())?,
        health: args.health.check()?,
        stop_grace_ms: duration_ms("stop-grace-period", &args.stop_grace_period)?,
        update: args.update.config()?,
        secrets: parse_refs(Kind::Secret, &args.secret)?,
        configs: parse_refs(Kind::Config, &args.config)?,
        security: args.security.security()?,
        resources: args.resources.resources()?,
        mounts: args
            .mount
            .iter()
            .map(|m| parse_mount(m))
            .collect::<Result<_, _>>()
            .map_err(ApiError::invalid)?,
    };
    spec.validate().map_err(ApiError::invalid)?;
    Ok(spec)
}

fn parse_refs(kind: Kind, texts: &[String]) -> ApiResult<Vec<crate::api::secret::BlobRef>> {
    texts
        .iter()
        .map(|t| crate::api::secret::parse_ref(kind, t))
        .collect::<Result<_, _>>()
        .map_err(ApiError::invalid)
}

/// Shows progress until the service's tasks all run (and its update, if
/// any, completed), as `docker service create/update` does without
/// `--detach`; fails if the update pauses.
async fn wait_converged(client: &Client, service: &str) -> ApiResult<()> {
    use crate::api::service::UpdateState;
    let mut last = String::new();
    let mut errors_seen = std::collections::BTreeSet::new();
    loop {
        let view = services(
            client
                .cluster(ClusterRequest::ServiceInspect {
                    service: service.to_string(),
                })
                .await?,
        )?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::not_found(format!("service {service} is gone")))?;
        let status = view.service.update_status.as_ref();
        let line = match status.map(|s| s.state) {
            Some(UpdateState::Updating) => format!("updating: {} out of {} tasks running", view.running, view.desired),
            Some(UpdateState::RollingBack) => {
                format!("rolling back: {} out of {} tasks running", view.running, view.desired)
            }
            _ => format!(
                "overall progress: {} out of {} tasks running",
                view.running, view.desired
            ),
        };
        if line != last {
            println!("{line}");
            last = line;
        }
        if let ClusterResponse::Tasks(tasks) = client
            .cluster(ClusterRequest::TaskList {
                service: service.to_string(),
            })
            .await?
        {
            for t in tasks.iter().filter(|t| {
                matches!(
                    t.task.state,
                    crate::api::service::TaskState::Failed | crate::api::service::TaskState::Rejected
                )
            }) {
                if errors_seen.insert(t.task.id) {
                    println!("task {}: {}", node_id_text(t.task.id), t.task.message);
                }
            }
        }
        match status.map(|s| (s.state, s.message.clone())) {
            Some((UpdateState::Paused | UpdateState::RollbackPaused, message)) => {
                return Err(ApiError::precondition(format!(
                    "{message}; fix the spec with `meshctl service update`, or go back with `meshctl service rollback {service}`"
                )));
            }
            Some((UpdateState::Updating | UpdateState::RollingBack, _)) => {}
            _ if view.running == view.desired => {
                println!("verify: service converged");
                return Ok(());
            }
            _ => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

fn ports_text(ports: &[PortPublish]) -> String {
    ports
        .iter()
        .map(|p| {
            let proto = if p.protocol == Protocol::Tcp { "tcp" } else { "udp" };
            let mode = if p.mode == PublishMode::Host { " (host)" } else { "" };
            format!("*:{}->{}/{proto}{mode}", p.published, p.target)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn services(client_reply: ClusterResponse) -> ApiResult<Vec<ServiceView>> {
    match client_reply {
        ClusterResponse::Services(s) => Ok(s),
        other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
    }
}

/// Runs a `service` subcommand.
pub(crate) async fn run(client: &Client, cmd: ServiceCommand) -> ApiResult<()> {
    match cmd {
        ServiceCommand::Create(args) => {
            let detach = args.detach;
            let spec = spec_of(*args)?;
            match client
                .cluster(ClusterRequest::ServiceCreate { spec: Box::new(spec) })
                .await?
            {
                ClusterResponse::ServiceCreated { id } => {
                    println!("{}", node_id_text(id));
                    if detach {
                        return Ok(());
                    }
                    wait_converged(client, &node_id_text(id)).await
                }
                other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
            }
        }
        ServiceCommand::Update(args) => {
            let (service, update, detach) = update_of(*args)?;
            client
                .cluster(ClusterRequest::ServiceUpdate {
                    service: service.clone(),
                    update: Box::new(update),
                })
                .await?;
            println!("{service}");
            if detach {
                return Ok(());
            }
            wait_converged(client, &service).await
        }
        ServiceCommand::Rollback { detach, service } => {
            client
                .cluster(ClusterRequest::ServiceRollback {
                    service: service.clone(),
                })
                .await?;
            println!("{service}");
            if detach {
                return Ok(());
            }
            wait_converged(client, &service).await
        }
        ServiceCommand::Ls(ListArgs { quiet, format }) => {
            let list = services(client.cluster(ClusterRequest::ServiceList).await?)?;
            if quiet {
                list.iter().for_each(|s| println!("{}", node_id_text(s.service.id)));
            } else if format == Format::Json {
                println!("{}", json(&list)?);
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|v| {
                        let s = &v.service;
                        vec![
                            node_id_text(s.id),
                            s.spec.name.clone(),
                            match s.spec.mode {
                                ServiceMode::Replicated { .. } => "replicated".into(),
                                ServiceMode::Global => "global".into(),
                            },
                            format!("{}/{}", v.running, v.desired),
                            s.spec.command.join(" "),
                            ports_text(&s.spec.publish),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table::render(&["ID", "NAME", "MODE", "REPLICAS", "COMMAND", "PORTS"], &rows)
                );
            }
            Ok(())
        }
        ServiceCommand::Ps { quiet, format, service } => {
            let tasks = match client.cluster(ClusterRequest::TaskList { service }).await? {
                ClusterResponse::Tasks(t) => t,
                other => return Err(ApiError::internal(format!("unexpected reply {other:?}"))),
            };
            if quiet {
                tasks.iter().for_each(|t| println!("{}", node_id_text(t.task.id)));
            } else if format == Format::Json {
                println!("{}", json(&tasks)?);
            } else {
                print!("{}", task_table(&tasks, crate::api::clock::unix_now()));
            }
            Ok(())
        }
        ServiceCommand::Logs { follow, tail, service } => {
            let tail =
                match tail.as_str() {
                    "all" => None,
                    n => Some(n.parse::<usize>().map_err(|_| {
                        ApiError::invalid(format!("--tail {n:?}: expected a number of lines or \"all\""))
                    })?),
                };
            let mut cursors: Vec<(u64, u64)> = Vec::new();
            loop {
                let request = LocalRequest::ServiceLogs {
                    service: service.clone(),
                    cursors: cursors.clone(),
                    tail,
                };
                let LocalResponse::Logs(chunks) = client.call(request).await? else {
                    return Err(ApiError::internal("unexpected reply to a log request"));
                };
                let mut out = String::new();
                for (label, chunk) in &chunks {
                    for line in chunk.text.lines() {
                        out.push_str(&format!("{label}    | {line}\n"));
                    }
                    match cursors.iter_mut().find(|(t, _)| *t == chunk.task) {
                        Some(c) => c.1 = chunk.next,
                        None => cursors.push((chunk.task, chunk.next)),
                    }
                }
                print!("{out}");
                if !follow {
                    return Ok(());
                }
                use std::io::Write;
                let _ = std::io::stdout().flush();
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
        ServiceCommand::Inspect {
            pretty,
            services: names,
        } => {
            let mut out = Vec::new();
            for name in names {
                out.extend(services(
                    client.cluster(ClusterRequest::ServiceInspect { service: name }).await?,
                )?);
            }
            if pretty {
                let now = crate::api::clock::unix_now_ms();
                let texts: Vec<String> = out.iter().map(|v| pretty_text(v, now)).collect();
                print!("{}", texts.join("\n"));
            } else {
                println!("{}", json(&out)?);
            }
            Ok(())
        }
        ServiceCommand::Scale { pairs } => {
            for pair in &pairs {
                let (service, n) = pair
                    .split_once('=')
                    .and_then(|(s, n)| n.parse::<u32>().ok().map(|n| (s.to_string(), n)))
                    .ok_or_else(|| {
                        ApiError::invalid(format!("invalid scale {pair:?}: expected SERVICE=REPLICAS, e.g. web=3"))
                    })?;
                client
                    .cluster(ClusterRequest::ServiceScale { service, replicas: n })
                    .await?;
                println!("{} scaled to {n}", pair.split('=').next().unwrap_or_default());
            }
            Ok(())
        }
        ServiceCommand::Rm { services: names } => {
            for name in names {
                client
                    .cluster(ClusterRequest::ServiceRemove { service: name.clone() })
                    .await?;
                println!("{name}");
            }
            Ok(())
        }
    }
}

/// The `service ps` table, newest first per slot.
pub(crate) fn task_table(tasks: &[TaskView], now: u64) -> String {
    let mut sorted: Vec<&TaskView> = tasks.iter().collect();
    sorted.sort_by(|a, b| {
        a.task
            .slot
            .cmp(&b.task.slot)
            .then(b.task.created_at.cmp(&a.task.created_at))
    });
    let rows: Vec<Vec<String>> = sorted
        .iter()
        .map(|v| {
            let t = &v.task;
            let name = if t.slot == 0 {
                v.service_name.clone()
            } else {
                format!("{}.{}", v.service_name, t.slot)
            };
            let desired = match t.desired {
                crate::api::service::DesiredState::Running => "Running",
                crate::api::service::DesiredState::Shutdown => "Shutdown",
            };
            let age = now.saturating_sub(t.updated_at);
            vec![
                node_id_text(t.id),
                name,
                v.node_hostname.clone().unwrap_or_default(),
                desired.to_string(),
                format!("{} {} ago", capitalised(t.state.name()), age_text(age)),
                t.message.clone(),
            ]
        })
        .collect();
    table::render(
        &["ID", "NAME", "NODE", "DESIRED STATE", "CURRENT STATE", "ERROR"],
        &rows,
    )
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

pub(crate) fn age_text(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs} seconds"),
        60..=3599 => format!("{} minutes", secs / 60),
        _ => format!("{} hours", secs / 3600),
    }
}

/// `service inspect --pretty`: the service as docker prints it, one field
/// a line, sub-fields indented.
pub(crate) fn pretty_text(view: &ServiceView, now_ms: u64) -> String {
    use crate::api::service::EndpointMode;
    let s = &view.service;
    let spec = &s.spec;
    let mut out = Vec::<(usize, &str, String)>::new();
    let mut line = |indent: usize, key: &'static str, value: String| out.push((indent, key, value));
    line(0, "ID", node_id_text(s.id));
    line(0, "Name", spec.name.clone());
    match spec.mode {
        ServiceMode::Replicated { replicas } => {
            line(0, "Service Mode", "Replicated".into());
            line(1, "Replicas", replicas.to_string());
        }
        ServiceMode::Global => line(0, "Service Mode", "Global".into()),
    }
    line(
        0,
        "Tasks",
        format!("{} running of {} desired", view.running, view.desired),
    );
    line(0, "Version", s.version.to_string());
    line(
        0,
        "Created",
        format!("{} ago", age_text((now_ms / 1000).saturating_sub(s.created_at))),
    );
    line(
        0,
        "Updated",
        format!("{} ago", age_text((now_ms / 1000).saturating_sub(s.updated_at))),
    );
    if let Some(u) = &s.update_status {
        line(0, "UpdateStatus", String::new());
        line(1, "State", kebab(&format!("{:?}", u.state)));
        line(
            1,
            "Started",
            format!("{} ago", age_text(now_ms.saturating_sub(u.started_at_ms) / 1000)),
        );
        if !u.message.is_empty() {
            line(1, "Message", u.message.clone());
        }
    }
    if !spec.constraints.is_empty() || !spec.spread_over.is_empty() || spec.max_per_node > 0 {
        line(0, "Placement", String::new());
        if !spec.constraints.is_empty() {
            line(1, "Constraints", format!("[{}]", spec.constraints.join(", ")));
        }
        for key in &spec.spread_over {
            line(1, "Preferences", format!("spread=node.labels.{key}"));
        }
        if spec.max_per_node > 0 {
            line(1, "Max Replicas Per Node", spec.max_per_node.to_string());
        }
    }
    let u = &spec.update;
    line(0, "UpdateConfig", String::new());
    line(1, "Parallelism", u.parallelism.to_string());
    line(1, "Delay", duration_text(u.delay_ms));
    line(1, "On failure", kebab(&format!("{:?}", u.failure_action)));
    line(1, "Update order", kebab(&format!("{:?}", u.order)));
    line(0, "RestartPolicy", String::new());
    line(1, "Condition", kebab(&format!("{:?}", spec.restart.condition)));
    line(1, "Delay", duration_text(spec.restart.delay_ms));
    line(1, "Max attempts", spec.restart.max_attempts.to_string());
    line(0, "TaskSpec", String::new());
    line(1, "Command", spec.command.join(" "));
    if !spec.env.is_empty() {
        let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        line(1, "Env", env.join(" "));
    }
    if let Some(dir) = &spec.workdir {
        line(1, "Dir", dir.clone());
    }
    if let Some(user) = &spec.user {
        line(1, "User", user.clone());
    }
    let security = &spec.security;
    if let Ok(caps) = security.capabilities() {
        line(1, "Capabilities", caps.names().join(" "));
    }
    if !security.cap_add.is_empty() {
        line(1, "CapAdd", security.cap_add.join(" "));
    }
    if !security.cap_drop.is_empty() {
        line(1, "CapDrop", security.cap_drop.join(" "));
    }
    if security.seccomp == Seccomp::Unconfined {
        line(1, "SecurityOpt", "seccomp=unconfined".into());
    }
    if security.read_only {
        line(1, "ReadOnly", "true".into());
    }
    if !spec.mounts.is_empty() {
        line(0, "Mounts", String::new());
        for m in &spec.mounts {
            line(1, "Mount", m.text());
        }
    }
    let r = &spec.resources;
    if r.memory_limit.is_some() || r.cpu_limit.is_some() || r.pids_limit.is_some() {
        line(0, "Limits", String::new());
        if let Some(m) = r.memory_limit {
            line(1, "Memory", bytes_text(m));
        }
        if let Some(c) = r.cpu_limit {
            line(1, "CPU", cpus_text(c));
        }
        if let Some(p) = r.pids_limit {
            line(1, "Pids", p.to_string());
        }
    }
    if r.memory_reservation.is_some() || r.cpu_reservation.is_some() {
        line(0, "Reservations", String::new());
        if let Some(m) = r.memory_reservation {
            line(1, "Memory", bytes_text(m));
        }
        if let Some(c) = r.cpu_reservation {
            line(1, "CPU", cpus_text(c));
        }
    }
    line(1, "StopGracePeriod", duration_text(spec.stop_grace_ms));
    if let Some(h) = &spec.health {
        line(0, "Healthcheck", String::new());
        line(1, "Command", h.command.clone());
        line(1, "Interval", duration_text(h.interval_ms));
        line(1, "Timeout", duration_text(h.timeout_ms));
        line(1, "Retries", h.retries.to_string());
        line(1, "Start Period", duration_text(h.start_period_ms));
    }
    if !spec.networks.is_empty() {
        line(0, "Networks", spec.networks.join(" "));
    }
    let mode = match spec.endpoint_mode {
        EndpointMode::Vip => "vip",
        EndpointMode::Dnsrr => "dnsrr",
    };
    line(0, "Endpoint Mode", mode.into());
    line(0, "Load Balancing", String::new());
    line(1, "Algorithm", spec.lb.algorithm.name().into());
    line(
        1,
        "Affinity",
        if spec.lb.client_affinity {
            format!(
                "client-ip ({})",
                duration_text(u64::from(spec.lb.affinity_timeout_s) * 1000)
            )
        } else {
            "none".into()
        },
    );
    if !spec.publish.is_empty() {
        line(0, "Ports", ports_text(&spec.publish));
    }
    let width = out.iter().map(|(i, k, _)| i + k.len()).max().unwrap_or(0) + 2;
    out.iter()
        .map(|(indent, key, value)| {
            let label = format!("{}{key}:", " ".repeat(*indent));
            if value.is_empty() {
                format!("{label}\n")
            } else {
                format!("{label:<width$}{value}\n")
            }
        })
        .collect()
}

/// `StopFirst` -> `stop-first`.
fn kebab(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('-');
        }
        out.extend(c.to_lowercase());
    }
    out
}

/// Milliseconds as docker prints durations: `500ms`, `1.5s`, `1m30s`.
fn duration_text(ms: u64) -> String {
    match ms {
        0 => "0s".into(),
        1..=999 => format!("{ms}ms"),
        _ if !ms.is_multiple_of(1000) && ms < 60_000 => {
            let text = format!("{}.{:03}", ms / 1000, ms % 1000);
            format!("{}s", text.trim_end_matches('0'))
        }
        _ => {
            let secs = ms / 1000;
            let parts = [(secs / 3600, "h"), (secs / 60 % 60, "m"), (secs % 60, "s")];
            parts
                .iter()
                .filter(|(n, _)| *n > 0)
                .map(|(n, unit)| format!("{n}{unit}"))
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_as_docker_does() {
        assert_eq!(duration_text(0), "0s");
        assert_eq!(duration_text(500), "500ms");
        assert_eq!(duration_text(1500), "1.5s");
        assert_eq!(duration_text(5000), "5s");
        assert_eq!(duration_text(90_000), "1m30s");
        assert_eq!(duration_text(3_600_000), "1h");
        assert_eq!(kebab("StopFirst"), "stop-first");
        assert_eq!(kebab("OnFailure"), "on-failure");
    }

    #[test]
    fn pretty_inspect_shows_the_spec() {
        let mut service = crate::api::service::Service::example(7);
        service.spec.env.insert("MODE".into(), "prod".into());
        service.spec.publish = vec![PortPublish::parse("8080:80").unwrap()];
        service.spec.constraints = vec!["node.labels.zone==a".into()];
        service.created_at = 100;
        service.updated_at = 160;
        let view = ServiceView {
            service,
            running: 1,
            desired: 1,
        };
        let text = pretty_text(&view, 220_000);
        for want in [
            "Name:",
            " s7\n",
            "Service Mode:",
            " Replicas:",
            "Tasks:",
            "1 running of 1 desired",
            "Created:",
            "2 minutes ago",
            " Constraints:",
            "[node.labels.zone==a]",
            " On failure:",
            "pause",
            " Condition:",
            "any",
            " Command:",
            "sleep 1000",
            "MODE=prod",
            "Endpoint Mode:",
            "vip",
            "*:8080->80/tcp",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(!text.contains("Healthcheck"), "no check, no section:\n{text}");
        let value_column = |l: &str| {
            let after = l.find(':').unwrap() + 1;
            after + l[after..].len() - l[after..].trim_start().len()
        };
        let columns: Vec<usize> = text.lines().filter(|l| !l.ends_with(':')).map(value_column).collect();
        assert!(columns.windows(2).all(|w| w[0] == w[1]), "values align:\n{text}");
    }
}
