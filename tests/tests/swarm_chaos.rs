//! Kernel lane: chaos under load, the short run. Five nodes
//! (three managers, two workers) serve a published HTTP service to a
//! client host while one fault of each kind hits them in a seeded order:
//! the leader's agent killed, a worker's agent killed, a manager cut off
//! the underlay, an agent restarted, a node drained. Requests may fail
//! while the swarm converges after a fault, never once it has; no
//! acknowledged write is lost, no task runs where it is not assigned, and
//! removing the service and network leaves every host's kernel as it was.
//!
//! The seed is printed with the report; `MESH_CHAOS_SEED=N` replays a run.
//! `cargo xtask chaos` runs a longer schedule (tests/src/bin/mesh-chaos.rs).

use std::collections::BTreeSet;

use mesh_tests::{
    chaos::{self, FaultKind},
    require_root,
};

#[test]
fn one_fault_of_each_kind_under_load_loses_nothing_leaks_nothing_and_fails_nothing_once_converged() {
    require_root();
    let config = chaos::Config::new(chaos::seed_from_env(), FaultKind::ALL.len());
    println!(
        "chaos: seed {} (MESH_CHAOS_SEED={} replays it)",
        config.seed, config.seed
    );
    let report = chaos::run(&config);
    println!("{}", report.render());
    let violations = report.violations();
    assert!(violations.is_empty(), "seed {}: {violations:#?}", report.seed);
    let kinds: BTreeSet<FaultKind> = report.faults.iter().map(|f| f.fault.kind).collect();
    assert_eq!(kinds.len(), FaultKind::ALL.len(), "every kind of fault ran: {kinds:?}");
    assert!(report.writes_acknowledged > 0, "the writers got writes through");
    assert!(
        report.faults.iter().all(|f| f.after.requests > 0),
        "every quiet window had requests to judge"
    );
}
