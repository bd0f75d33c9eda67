use clap::Parser;
use qlora::cli::{quantize, Cli, Command};

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Quantize(args) => quantize::run(args),
    }
}
