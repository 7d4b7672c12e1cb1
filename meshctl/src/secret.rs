//! `meshctl secret` and `meshctl config` (`docker secret|config`): create
//! from a file or standard input, list, inspect, remove. A secret's
//! content is never shown; a config's is, by `inspect`.

use std::{collections::BTreeMap, io::Read};

use clap::Subcommand;

use super::{json, table, Client, Format, ListArgs};
use crate::api::{
    error::{ApiError, ApiResult},
    messages::{BlobView, ClusterRequest, ClusterResponse},
    objects::node_id_text,
    secret::{check_data, check_name, Kind, MAX_SIZE},
};

/// `meshctl secret|config`.
#[derive(Subcommand, Debug)]
pub(crate) enum BlobCommand {
    /// Create one from FILE, or from standard input with `-`.
    Create {
        /// Label KEY=VALUE (repeatable).
        #[arg(short, long)]
        label: Vec<String>,
        /// Its name.
        name: String,
        /// The file holding it, or `-` for standard input.
        file: String,
    },
    /// List them.
    Ls(ListArgs),
    /// Show them in detail (JSON; a secret's content is never shown).
    Inspect {
        /// Names or IDs.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove them (refused while a service uses one).
    Rm {
        /// Names or IDs.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// Reads `file` (or standard input for `-`), refusing more than the limit
/// without reading it all.
fn read_content(kind: Kind, file: &str) -> ApiResult<Vec<u8>> {
    let mut data = Vec::new();
    let limit = MAX_SIZE as u64 + 1;
    let read = if file == "-" {
        std::io::stdin().take(limit).read_to_end(&mut data)
    } else {
        std::fs::File::open(file)
            .map_err(|e| ApiError::invalid(format!("cannot read {file}: {e}")))?
            .take(limit)
            .read_to_end(&mut data)
    };
    read.map_err(|e| ApiError::invalid(format!("reading the {}: {e}", kind.name())))?;
    check_data(kind, &data).map_err(ApiError::invalid)?;
    Ok(data)
}

fn labels(list: &[String]) -> ApiResult<BTreeMap<String, String>> {
    list.iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(ApiError::invalid(format!("invalid --label {l:?}: expected KEY=VALUE"))),
        })
        .collect()
}

fn blobs(reply: ClusterResponse) -> ApiResult<Vec<BlobView>> {
    match reply {
        ClusterResponse::Blobs(list) => Ok(list),
        other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
    }
}

/// "5 minutes ago", as docker prints ages.
fn ago(unix: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{} ago", super::service::age_text(now.saturating_sub(unix)))
}

/// The `ls` table.
pub(crate) fn blob_table(list: &[BlobView]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|b| vec![b.id.clone(), b.name.clone(), ago(b.created), ago(b.updated)])
        .collect();
    table::render(&["ID", "NAME", "CREATED", "UPDATED"], &rows)
}

/// Runs a `secret` or `config` subcommand.
pub(crate) async fn run(client: &Client, kind: Kind, cmd: BlobCommand) -> ApiResult<()> {
    match cmd {
        BlobCommand::Create { label, name, file } => {
            check_name(kind, &name).map_err(ApiError::invalid)?;
            let labels = labels(&label)?;
            let data = read_content(kind, &file)?;
            match client
                .cluster(ClusterRequest::BlobCreate {
                    kind,
                    name,
                    labels,
                    data,
                })
                .await?
            {
                ClusterResponse::BlobCreated { id } => {
                    println!("{}", node_id_text(id));
                    Ok(())
                }
                other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
            }
        }
        BlobCommand::Ls(ListArgs { quiet, format }) => {
            let list = blobs(client.cluster(ClusterRequest::BlobList { kind }).await?)?;
            if quiet {
                list.iter().for_each(|b| println!("{}", b.id));
            } else if format == Format::Json {
                println!("{}", json(&list)?);
            } else {
                print!("{}", blob_table(&list));
            }
            Ok(())
        }
        BlobCommand::Inspect { names } => {
            let mut out = Vec::new();
            for name in names {
                out.extend(blobs(
                    client.cluster(ClusterRequest::BlobInspect { kind, name }).await?,
                )?);
            }
            println!("{}", json(&out)?);
            Ok(())
        }
        BlobCommand::Rm { names } => {
            for name in names {
                client
                    .cluster(ClusterRequest::BlobRemove {
                        kind,
                        name: name.clone(),
                    })
                    .await?;
                println!("{name}");
            }
            Ok(())
        }
    }
}
