//! `cargo xtask chaos [--seed N] [--faults N]`: the long chaos run
//! (tests/src/chaos.rs). Five nodes serve a published HTTP service to a
//! client host under steady load while `--faults` faults (default 15) hit
//! them in the order `--seed` draws: the leader's agent killed, a worker's
//! agent killed, a manager partitioned, an agent restarted, a node
//! drained. Prints the report as a table and exits non-zero if any
//! must-be-zero figure is not zero: failed requests after convergence,
//! acknowledged writes lost, orphaned tasks, kernel objects leaked.

use anyhow::{bail, Context, Result};
use mesh_tests::{chaos, require_root};

const DEFAULT_FAULTS: usize = 15;

fn main() -> Result<()> {
    let mut seed = chaos::seed_from_env();
    let mut faults = DEFAULT_FAULTS;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<u64> {
            args.next()
                .with_context(|| format!("{name} needs a number"))?
                .parse()
                .with_context(|| format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--seed" => seed = value("--seed")?,
            "--faults" => faults = usize::try_from(value("--faults")?)?,
            other => bail!("unknown argument {other:?}: mesh-chaos [--seed N] [--faults N]"),
        }
    }
    if faults == 0 {
        bail!("--faults must be at least 1");
    }
    require_root();
    let config = chaos::Config::new(seed, faults);
    println!(
        "== chaos: seed {seed}, {faults} faults on 5 nodes (3 managers, 2 workers), a published service under load\n"
    );
    let report = chaos::run(&config);
    println!("\n{}", report.render());
    let violations = report.violations();
    if !violations.is_empty() {
        bail!("{} must-be-zero figures are not zero (seed {seed})", violations.len());
    }
    Ok(())
}
