//! `mesh-agent run --config FILE`: a TOML file of the same settings as the
//! flags, keys named like the flags (`data-dir`, `lb-backend`, ...). The
//! file becomes flags placed before the command line's, so the command
//! line wins; a key whose environment variable is set is left to the
//! environment, so the environment wins over the file. Unknown keys, and
//! values of the wrong shape, are refused with the key named.

/// The flags `text` stands for, for `command` (the `run` subcommand's
/// definition). `env_set` says whether an environment variable is set.
pub fn args_from_toml(
    text: &str,
    command: &clap::Command,
    env_set: &dyn Fn(&str) -> bool,
) -> Result<Vec<String>, String> {
    let table: toml::Table = text.parse().map_err(|e| format!("not valid TOML: {e}"))?;
    let mut args = Vec::new();
    for (key, value) in &table {
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && key != "config")
            .ok_or_else(|| {
                let known: Vec<&str> = command
                    .get_arguments()
                    .filter_map(|a| a.get_long())
                    .filter(|l| *l != "config" && *l != "help")
                    .collect();
                format!("unknown key {key:?} (known: {})", known.join(", "))
            })?;
        if arg.get_env().and_then(|e| e.to_str()).is_some_and(env_set) {
            continue;
        }
        let flag = format!("--{key}");
        if !arg.get_action().takes_values() {
            match value {
                toml::Value::Boolean(true) => args.push(flag),
                toml::Value::Boolean(false) => {}
                other => return Err(format!("{key}: expected true or false, found {other}")),
            }
            continue;
        }
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => return Err(format!("{key}: expected a string or a number, found {other}")),
        };
        args.push(flag);
        args.push(text);
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction, Command};

    fn command() -> Command {
        Command::new("run")
            .arg(Arg::new("config").long("config"))
            .arg(Arg::new("data-dir").long("data-dir").env("MESH_DATA_DIR"))
            .arg(Arg::new("raft-snapshot-interval").long("raft-snapshot-interval"))
            .arg(
                Arg::new("force-new-cluster")
                    .long("force-new-cluster")
                    .action(ArgAction::SetTrue),
            )
    }

    #[test]
    fn keys_become_flags_and_the_environment_wins() {
        let text = "data-dir = \"/srv/mesh\"\nraft-snapshot-interval = 500\nforce-new-cluster = true\n";
        let args = args_from_toml(text, &command(), &|_| false).unwrap();
        assert_eq!(
            args,
            vec![
                "--data-dir",
                "/srv/mesh",
                "--force-new-cluster",
                "--raft-snapshot-interval",
                "500"
            ]
        );
        let args = args_from_toml(text, &command(), &|e| e == "MESH_DATA_DIR").unwrap();
        assert!(!args.contains(&"--data-dir".to_string()), "{args:?}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let err = args_from_toml("data_dir = \"/x\"", &command(), &|_| false).unwrap_err();
        assert!(
            err.contains("unknown key \"data_dir\"") && err.contains("data-dir"),
            "{err}"
        );
        assert!(args_from_toml("config = \"/x\"", &command(), &|_| false).is_err());
        assert!(args_from_toml("force-new-cluster = \"yes\"", &command(), &|_| false)
            .unwrap_err()
            .contains("true or false"));
        assert!(args_from_toml("data-dir = [1]", &command(), &|_| false).is_err());
        assert!(args_from_toml("data-dir = ", &command(), &|_| false)
            .unwrap_err()
            .contains("TOML"));
    }
}
