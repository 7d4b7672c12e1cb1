//! A service's resources: `--limit-memory`, `--limit-cpu`, `--limit-pids`,
//! `--reserve-memory`, `--reserve-cpu`, with Docker's names and units.

use serde::{Deserialize, Serialize};

use crate::api::error::Invalid;

/// Billionths of a CPU in one CPU (Docker's NanoCPUs).
pub const NANOS_PER_CPU: u64 = 1_000_000_000;

/// The smallest memory limit Docker takes (6 MiB): below it a process
/// cannot even start.
pub const MIN_MEMORY_LIMIT: u64 = 6 * 1024 * 1024;

/// What a task may use and what the scheduler keeps for it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    /// `--limit-memory`, bytes: over it, the task is OOM killed.
    #[serde(default)]
    pub memory_limit: Option<u64>,
    /// `--limit-cpu`, billionths of a CPU: the task is throttled beyond it.
    #[serde(default)]
    pub cpu_limit: Option<u64>,
    /// `--limit-pids`: processes and threads the task may have at once.
    #[serde(default)]
    pub pids_limit: Option<u64>,
    /// `--reserve-memory`, bytes the scheduler keeps for the task on its node.
    #[serde(default)]
    pub memory_reservation: Option<u64>,
    /// `--reserve-cpu`, billionths of a CPU the scheduler keeps for it.
    #[serde(default)]
    pub cpu_reservation: Option<u64>,
}

impl Resources {
    /// Checks the values against each other.
    pub fn validate(&self) -> Result<(), Invalid> {
        if let Some(limit) = self.memory_limit {
            if limit < MIN_MEMORY_LIMIT {
                return Err(crate::invalid!(
                    "--limit-memory {}: the minimum is 6MiB",
                    bytes_text(limit)
                ));
            }
        }
        if let (Some(limit), Some(reserve)) = (self.memory_limit, self.memory_reservation) {
            if reserve > limit {
                return Err(crate::invalid!(
                    "--reserve-memory {} is more than --limit-memory {}",
                    bytes_text(reserve),
                    bytes_text(limit)
                ));
            }
        }
        if let (Some(limit), Some(reserve)) = (self.cpu_limit, self.cpu_reservation) {
            if reserve > limit {
                return Err(crate::invalid!(
                    "--reserve-cpu {} is more than --limit-cpu {}",
                    cpus_text(reserve),
                    cpus_text(limit)
                ));
            }
        }
        if self.pids_limit == Some(0) {
            return Err("--limit-pids 0 would not let the task start: give 1 or more".into());
        }
        Ok(())
    }

    /// Whether any limit is set (the node must have the cgroups for it).
    pub fn limits_anything(&self) -> bool {
        self.memory_limit.is_some() || self.cpu_limit.is_some() || self.pids_limit.is_some()
    }
}

/// What a node has for tasks, as it reports it in its heartbeats.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeResources {
    /// Its CPUs, in billionths.
    pub nano_cpus: u64,
    /// Its memory, bytes.
    pub memory_bytes: u64,
}

impl NodeResources {
    /// What is left of it once `used` is kept for tasks.
    pub fn less(self, used: NodeResources) -> NodeResources {
        NodeResources {
            nano_cpus: self.nano_cpus.saturating_sub(used.nano_cpus),
            memory_bytes: self.memory_bytes.saturating_sub(used.memory_bytes),
        }
    }

    /// `self` and `other` together.
    pub fn plus(self, other: NodeResources) -> NodeResources {
        NodeResources {
            nano_cpus: self.nano_cpus.saturating_add(other.nano_cpus),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
        }
    }
}

impl Resources {
    /// What the scheduler keeps on a node for one task.
    pub fn reserved(&self) -> NodeResources {
        NodeResources {
            nano_cpus: self.cpu_reservation.unwrap_or(0),
            memory_bytes: self.memory_reservation.unwrap_or(0),
        }
    }
}

/// A memory size as Docker takes it: a number with an optional unit
/// `b`, `k`, `m`, `g` (powers of 1024; `kb`, `KiB` and the like too).
pub fn parse_bytes(flag: &str, text: &str) -> Result<u64, Invalid> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if number.is_empty() {
        return Err(crate::invalid!(
            "--{flag} {text:?}: expected a size such as 512m or 1.5g"
        ));
    }
    let unit = unit.trim().to_ascii_lowercase();
    let scale: u64 = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => {
            return Err(crate::invalid!(
                "--{flag} {text:?}: unknown unit {unit:?}; use a number with b, k, m or g (e.g. 512m)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| crate::invalid!("--{flag} {text:?}: expected a size such as 512m or 1.5g"))?;
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(crate::invalid!("--{flag} {text:?}: out of range"));
    }
    Ok(bytes as u64)
}

/// A CPU count as Docker takes it (`0.5`, `2`), in billionths.
pub fn parse_cpus(flag: &str, text: &str) -> Result<u64, Invalid> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| crate::invalid!("--{flag} {text:?}: expected a number of CPUs such as 0.5 or 2"))?;
    if !value.is_finite() || value <= 0.0 || value > 1_000_000.0 {
        return Err(crate::invalid!("--{flag} {text:?}: give a number of CPUs above 0"));
    }
    Ok((value * NANOS_PER_CPU as f64).round() as u64)
}

/// Bytes as `service inspect` shows them (`32MiB`).
pub fn bytes_text(bytes: u64) -> String {
    for (unit, scale) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= scale && bytes.is_multiple_of((scale / 1024).max(1)) {
            let value = bytes as f64 / scale as f64;
            return if value.fract() == 0.0 {
                format!("{value:.0}{unit}")
            } else {
                format!("{value:.2}{unit}")
            };
        }
    }
    format!("{bytes}B")
}

/// Billionths of a CPU as `service inspect` shows them (`0.5`).
pub fn cpus_text(nanos: u64) -> String {
    let cpus = nanos as f64 / NANOS_PER_CPU as f64;
    let text = format!("{cpus:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_docker_takes_them() {
        assert_eq!(parse_bytes("limit-memory", "32M").unwrap(), 32 << 20);
        assert_eq!(parse_bytes("limit-memory", "512mb").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("limit-memory", "1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("limit-memory", "4096").unwrap(), 4096);
        assert_eq!(parse_bytes("limit-memory", "2KiB").unwrap(), 2048);
        let e = parse_bytes("limit-memory", "32Q").unwrap_err();
        assert!(e.0.contains("unknown unit"), "{e}");
        assert!(parse_bytes("limit-memory", "lots").is_err());
        assert!(parse_bytes("limit-memory", "0").is_err());
        assert_eq!(bytes_text(32 << 20), "32MiB");
        assert_eq!(bytes_text(3 << 29), "1.50GiB");
    }

    #[test]
    fn cpus_parse_in_billionths() {
        assert_eq!(parse_cpus("limit-cpu", "0.5").unwrap(), 500_000_000);
        assert_eq!(parse_cpus("limit-cpu", "2").unwrap(), 2 * NANOS_PER_CPU);
        assert!(parse_cpus("limit-cpu", "0").is_err());
        assert!(parse_cpus("limit-cpu", "-1").is_err());
        assert_eq!(cpus_text(500_000_000), "0.5");
        assert_eq!(cpus_text(2 * NANOS_PER_CPU), "2");
    }

    #[test]
    fn limits_and_reservations_are_checked_together() {
        let r = Resources {
            memory_limit: Some(4 << 20),
            ..Resources::default()
        };
        assert!(r.validate().unwrap_err().0.contains("minimum is 6MiB"));
        let r = Resources {
            memory_limit: Some(64 << 20),
            memory_reservation: Some(128 << 20),
            ..Resources::default()
        };
        assert!(r.validate().unwrap_err().0.contains("more than --limit-memory"));
        let r = Resources {
            pids_limit: Some(0),
            ..Resources::default()
        };
        assert!(r.validate().is_err());
    }
}
