//! What the agent counts as it goes, process-wide: Raft proposal latency
//! and elections, reconcile durations and kernel errors per mechanism,
//! scheduler decisions.

use std::sync::OnceLock;

use prometheus::{core::Collector, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

/// The mechanisms a node reconciles (labels of the per-mechanism metrics).
pub(crate) const MECHANISMS: [&str; 3] = ["overlay", "tasks", "mesh"];

/// What the agent counts as it goes.
pub(crate) struct Instruments {
    pub(super) registry: Registry,
    /// Seconds from proposing a Raft command to its being applied here.
    pub(crate) proposal_seconds: Histogram,
    /// Elections this manager saw (each new term is one).
    pub(crate) raft_elections: IntCounter,
    /// Seconds one reconcile of a mechanism took, by mechanism.
    pub(crate) reconcile_seconds: HistogramVec,
    /// Failed reconciles, by mechanism (each is a kernel refusal or an
    /// unreachable kernel object).
    pub(crate) kernel_errors: IntCounterVec,
    /// Tasks the scheduler placed, or could not place, by outcome.
    pub(crate) scheduler_decisions: IntCounterVec,
}

/// The process-wide instruments.
pub(crate) fn instruments() -> &'static Instruments {
    static INSTRUMENTS: OnceLock<Instruments> = OnceLock::new();
    INSTRUMENTS.get_or_init(|| {
        let registry = Registry::new();
        let latency = vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
        let proposal_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "mesh_raft_proposal_duration_seconds",
                "Seconds from proposing a Raft command to its being applied on this manager.",
            )
            .buckets(latency.clone()),
        )
        .expect("reason: a valid histogram");
        let raft_elections = IntCounter::new(
            "mesh_raft_elections_total",
            "Raft elections this manager saw (terms it entered).",
        )
        .expect("reason: a valid counter");
        let reconcile_seconds = HistogramVec::new(
            HistogramOpts::new(
                "mesh_reconcile_duration_seconds",
                "Seconds one reconcile of this node's kernel state took, by mechanism.",
            )
            .buckets(latency),
            &["mechanism"],
        )
        .expect("reason: a valid histogram");
        let kernel_errors = IntCounterVec::new(
            Opts::new(
                "mesh_kernel_errors_total",
                "Reconciles the kernel refused or that failed, by mechanism.",
            ),
            &["mechanism"],
        )
        .expect("reason: a valid counter");
        let scheduler_decisions = IntCounterVec::new(
            Opts::new(
                "mesh_scheduler_decisions_total",
                "Tasks the scheduler placed on a node or could not place, by outcome.",
            ),
            &["outcome"],
        )
        .expect("reason: a valid counter");
        // Every series exists from the start, at zero (so rates and alerts
        // see the first increase).
        for mechanism in MECHANISMS {
            kernel_errors.with_label_values(&[mechanism]);
            reconcile_seconds.with_label_values(&[mechanism]);
        }
        for outcome in ["placed", "unplaceable"] {
            scheduler_decisions.with_label_values(&[outcome]);
        }
        for c in [
            Box::new(proposal_seconds.clone()) as Box<dyn Collector>,
            Box::new(raft_elections.clone()),
            Box::new(reconcile_seconds.clone()),
            Box::new(kernel_errors.clone()),
            Box::new(scheduler_decisions.clone()),
        ] {
            registry.register(c).expect("reason: names are unique");
        }
        Instruments {
            registry,
            proposal_seconds,
            raft_elections,
            reconcile_seconds,
            kernel_errors,
            scheduler_decisions,
        }
    })
}

/// An enum's serialized name in lower case, as a label value (`Ready` ->
/// `ready`).
pub(crate) fn label<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_lowercase))
        .unwrap_or_default()
}

/// Times one reconcile of `mechanism` and counts it as a kernel error
/// when it failed.
pub(crate) fn record_reconcile<T, E>(mechanism: &str, started: std::time::Instant, outcome: &Result<T, E>) {
    let i = instruments();
    i.reconcile_seconds
        .with_label_values(&[mechanism])
        .observe(started.elapsed().as_secs_f64());
    if outcome.is_err() {
        i.kernel_errors.with_label_values(&[mechanism]).inc();
    }
}
