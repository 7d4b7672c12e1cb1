//! The agent's settings file (`mesh-agent run --config FILE`, TOML), read
//! against the real flags of `mesh-agent run`.
//!
//! Asserts: a file that is accepted becomes only flags the agent has (each
//! once, with a value where the flag takes one), a key whose environment
//! variable is set is left out, every value reaches its flag as a value
//! (refused, if at all, for what it is, never read as another flag), and
//! the command line still wins over whatever the file says.
#![no_main]

use std::sync::OnceLock;

use clap::{error::ErrorKind, Args, FromArgMatches};
use libfuzzer_sys::fuzz_target;
use mesh_agent::config_file::{args_from_toml, RunArgs};

/// `mesh-agent run`'s flags, built once (clap's checks of a command on
/// its first parse would otherwise dominate every run).
static RUN: OnceLock<clap::Command> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let run = RUN.get_or_init(|| {
        let mut run = RunArgs::augment_args(clap::Command::new("run").no_binary_name(true));
        run.build();
        run
    });
    // Some variables set, some not, so both paths are taken.
    let env_set = |name: &str| name.len().is_multiple_of(3);
    let Ok(args) = args_from_toml(text, run, &env_set) else {
        return;
    };
    let mut seen = Vec::new();
    for flag in &args {
        let flag = flag.strip_prefix("--").expect("every argument starts with a flag");
        let (long, value) = match flag.split_once('=') {
            Some((long, value)) => (long, Some(value)),
            None => (flag, None),
        };
        let arg = run
            .get_arguments()
            .find(|a| a.get_long() == Some(long))
            .expect("only the agent's own flags");
        assert!(long != "config", "the file cannot name another file");
        assert!(
            !arg.get_env().and_then(|e| e.to_str()).is_some_and(env_set),
            "the environment wins over the file for --{long}"
        );
        assert!(!seen.contains(&long), "--{long} given twice");
        seen.push(long);
        assert_eq!(
            arg.get_action().takes_values(),
            value.is_some(),
            "--{long}: a value exactly where the flag takes one"
        );
        if value.is_some() {
            if let Err(e) = run.clone().try_get_matches_from([format!("--{flag}")]) {
                assert!(
                    matches!(e.kind(), ErrorKind::InvalidValue | ErrorKind::ValueValidation),
                    "--{flag} from the file is misread: {e}"
                );
            }
        }
    }
    let mut argv = args.clone();
    argv.extend(["--metrics-addr".to_string(), "off".to_string()]);
    if let Ok(matches) = run.clone().try_get_matches_from(&argv) {
        let parsed = RunArgs::from_arg_matches(&matches).expect("matched arguments convert");
        assert_eq!(parsed.metrics_addr, "off", "the command line wins over the file");
    }
});
