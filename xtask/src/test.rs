//! `cargo xtask test`: setup, then every lane. (Being written.)
use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: &Args) -> Result<()> {
    Ok(())
}
