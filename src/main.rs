use clap::Parser;
use qlora::cli::{
    classify, compare, eval, generate, inspect, merge, plan, quantize, train, Cli, Command,
};

fn main() -> anyhow::Result<()> {
    qlora::alloc::keep_freed_memory();
    match Cli::parse().command {
        Command::Quantize(args) => quantize::run(args),
        Command::Train(args) => train::run(*args),
        Command::Compare(args) => compare::run(*args),
        Command::Eval(args) => eval::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Merge(args) => merge::run(args),
        Command::Classify(args) => classify::run(args),
    }
}
