//! The `shale` command: run a node, or print the configuration it would run with.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use shale::config::Config;

#[derive(Parser)]
#[command(
    name = "shale",
    version,
    about = "shale: a shared-nothing time-series database node",
    long_about = "shale ingests metrics over HTTP (InfluxDB line protocol), makes every \
                  acknowledged write durable in a write-ahead log, and stores it as Parquet \
                  files registered in a Raft-committed manifest.\n\n\
                  Configuration comes from the embedded defaults, then an optional TOML file \
                  (--config), then environment variables SHALE_<SECTION>_<KEY> \
                  (for example SHALE_HTTP_ADDR=0.0.0.0:8000, SHALE_WAL_FSYNC=false)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node until SIGINT or SIGTERM. With no --config it runs standalone on the embedded
    /// defaults: HTTP on 127.0.0.1:8000, data under ./data, fsync on.
    Serve {
        /// A TOML file whose values override the embedded defaults.
        #[arg(long, short, env = "SHALE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the effective configuration (defaults, file and environment merged) as TOML.
    Config {
        /// A TOML file whose values override the embedded defaults.
        #[arg(long, short, env = "SHALE_CONFIG")]
        config: Option<PathBuf>,
        /// Print the embedded defaults with their comments instead.
        #[arg(long)]
        defaults: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::Config { config, defaults } => {
            if defaults {
                print!("{}", shale::config::DEFAULT_TOML);
                Ok(())
            } else {
                Config::load(config.as_deref()).map(|c| print!("{}", c.to_toml()))
            }
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shale: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn serve(config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = Config::load(config_path.as_deref())?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHALE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    shale::node::run(config)
}
