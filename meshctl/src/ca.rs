//! `meshctl swarm ca` and `meshctl swarm operator-cert`: the swarm's
//! trusted roots and the operator certificates the store honours.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::{duration_ms, json, table, Client, Format, ListArgs};
use crate::api::{
    clock::unix_now,
    error::{ApiError, ApiResult},
    messages::{CaView, ClusterRequest, ClusterResponse, OperatorCertView},
};
use mesh_api::ca::pki::NodeKey;

/// `swarm ca`.
#[derive(Args, Debug)]
pub(crate) struct CaArgs {
    /// Replace the root CA; nodes renew their certificates.
    #[arg(long)]
    rotate: bool,
    /// After --rotate, how long the previous root stays trusted at most; it
    /// goes sooner, once every node and live operator certificate comes
    /// from the new root.
    #[arg(long, default_value = "24h")]
    previous_root_ttl: String,
}

/// `swarm operator-cert`: issue with --name and --out, or list and revoke.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct OperatorCertArgs {
    #[command(subcommand)]
    action: Option<OperatorCertCommand>,
    /// Who it is for (the certificate's name; one live certificate per name).
    #[arg(long)]
    name: Option<String>,
    /// Directory to write key.pem (0600), cert.pem and ca.pem into.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Validity.
    #[arg(long, default_value = "720h")]
    expiry: String,
}

#[derive(Subcommand, Debug)]
enum OperatorCertCommand {
    /// List the operator certificates the swarm honours.
    Ls(ListArgs),
    /// Revoke operator certificates: the next call with one is refused.
    Rm {
        /// Operator names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// Runs `swarm ca`.
pub(crate) async fn ca(client: &Client, args: CaArgs) -> ApiResult<()> {
    if !args.rotate {
        let view = match client.cluster(ClusterRequest::CaInspect).await? {
            ClusterResponse::Ca(view) => view,
            other => return Err(ApiError::internal(format!("unexpected reply {other:?}"))),
        };
        print!("{}", ca_text(&view));
        return Ok(());
    }
    let previous_root_ttl_secs = duration_ms("previous-root-ttl", &args.previous_root_ttl)? / 1000;
    match client
        .cluster(ClusterRequest::CaRotate { previous_root_ttl_secs })
        .await?
    {
        ClusterResponse::CaDigest(d) => {
            println!(
                "Root CA rotated; new CA digest sha256:{d}. Nodes renew their certificates at their next heartbeat; the join tokens changed with it."
            );
            println!(
                "The previous root stays trusted until every node and operator certificate comes from the new one, or for {} at most (`meshctl swarm ca` shows which).",
                args.previous_root_ttl
            );
            Ok(())
        }
        other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
    }
}

/// `swarm ca` without --rotate.
pub(crate) fn ca_text(view: &CaView) -> String {
    let mut out = format!("Current root: sha256:{}\n", view.current);
    if view.previous.is_empty() {
        out.push_str("No previous root is trusted.\n");
        return out;
    }
    for digest in &view.previous {
        out.push_str(&format!(
            "Previous root: sha256:{digest}, trusted until every node and operator has moved, or until {} at the latest\n",
            utc_text(view.previous_until)
        ));
    }
    if !view.nodes_pending.is_empty() {
        out.push_str(&format!("Nodes not yet renewed: {}\n", view.nodes_pending.join(", ")));
    }
    if !view.operators_pending.is_empty() {
        out.push_str(&format!(
            "Operators with a certificate from the previous root: {} (issue them new ones)\n",
            view.operators_pending.join(", ")
        ));
    }
    out
}

/// Runs `swarm operator-cert`.
pub(crate) async fn operator_cert(client: &Client, args: OperatorCertArgs) -> ApiResult<()> {
    match args.action {
        Some(OperatorCertCommand::Ls(ListArgs { quiet, format })) => {
            let list = match client.cluster(ClusterRequest::OperatorCertList).await? {
                ClusterResponse::OperatorCerts(list) => list,
                other => return Err(ApiError::internal(format!("unexpected reply {other:?}"))),
            };
            if quiet {
                list.iter().for_each(|o| println!("{}", o.name));
            } else if format == Format::Json {
                println!("{}", json(&list)?);
            } else {
                print!("{}", operator_table(&list, unix_now()));
            }
            Ok(())
        }
        Some(OperatorCertCommand::Rm { names }) => {
            for name in names {
                client
                    .cluster(ClusterRequest::OperatorCertRemove { name: name.clone() })
                    .await?;
                println!("{name}");
            }
            Ok(())
        }
        None => {
            let (Some(name), Some(out)) = (args.name, args.out) else {
                return Err(ApiError::invalid(
                    "give --name NAME and --out DIR to issue an operator certificate, or use `operator-cert ls` / `operator-cert rm NAME`",
                ));
            };
            issue(client, &name, &out, &args.expiry).await
        }
    }
}

async fn issue(client: &Client, name: &str, out: &Path, expiry: &str) -> ApiResult<()> {
    let validity_secs = duration_ms("expiry", expiry)? / 1000;
    let key = NodeKey::generate().map_err(|e| ApiError::internal(e.to_string()))?;
    let csr_pem = key.csr_pem().map_err(|e| ApiError::internal(e.to_string()))?;
    match client
        .cluster(ClusterRequest::IssueOperatorCert {
            name: name.to_string(),
            csr_pem,
            validity_secs,
        })
        .await?
    {
        ClusterResponse::Certificate { cert_pem, ca_pems } => {
            write_operator_files(out, &key.key_pem(), &cert_pem, &ca_pems)?;
            println!("Operator certificate for {name} written to {}.", out.display());
            println!(
                "Use it with: meshctl --host MANAGER:2377 --tls-dir {} node ls",
                out.display()
            );
            println!("Revoke it with: meshctl swarm operator-cert rm {name}");
            Ok(())
        }
        other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
    }
}

fn write_operator_files(dir: &Path, key: &str, cert: &str, roots: &[String]) -> ApiResult<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| ApiError::invalid(format!("{}: {e}", dir.display())))?;
    let write = |name: &str, text: &str| {
        mesh_api::ca::keystore::write_private(&dir.join(name), text.as_bytes())
            .map_err(|e| ApiError::internal(e.to_string()))
    };
    write("key.pem", key)?;
    write("cert.pem", cert)?;
    write("ca.pem", &roots.concat())
}

/// The `operator-cert ls` table at `now`.
pub(crate) fn operator_table(list: &[OperatorCertView], now: u64) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|o| {
            vec![
                o.name.clone(),
                o.issued.serial.clone(),
                utc_text(o.issued.issued_at),
                utc_text(o.issued.not_after),
                if o.issued.not_after < now { "expired" } else { "valid" }.to_string(),
            ]
        })
        .collect();
    table::render(&["NAME", "SERIAL", "ISSUED", "EXPIRES", "STATUS"], &rows)
}

/// `2026-12-07 20:15 UTC`.
fn utc_text(unix: u64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix as i64) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        ),
        Err(_) => format!("unix time {unix}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::cert_records::Issued;

    #[test]
    fn times_print_in_utc() {
        assert_eq!(utc_text(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_text(1_796_674_500), "2026-12-07 20:15 UTC");
    }

    #[test]
    fn the_roots_say_why_the_previous_one_is_still_trusted() {
        let mut view = CaView {
            current: "aa".into(),
            previous: vec![],
            previous_until: 0,
            nodes_pending: vec![],
            operators_pending: vec![],
        };
        assert!(ca_text(&view).contains("No previous root"));
        view.previous = vec!["bb".into()];
        view.previous_until = 1_796_674_500;
        view.nodes_pending = vec!["node-2".into()];
        let text = ca_text(&view);
        assert!(
            text.contains("sha256:bb") && text.contains("2026-12-07 20:15 UTC"),
            "{text}"
        );
        assert!(text.contains("Nodes not yet renewed: node-2"), "{text}");
    }

    #[test]
    fn expired_operator_certificates_show_as_such() {
        let list = vec![OperatorCertView {
            name: "alice".into(),
            issued: Issued {
                serial: "0a".into(),
                ca: "c".into(),
                issued_at: 0,
                not_after: 100,
            },
        }];
        assert!(operator_table(&list, 50).contains("valid"));
        assert!(operator_table(&list, 101).contains("expired"));
    }
}
