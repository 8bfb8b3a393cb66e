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
    /// Measure a server with a line-protocol load (shale, VictoriaMetrics, InfluxDB 1.x).
    Bench {
        #[command(subcommand)]
        mode: BenchMode,
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

#[derive(Subcommand)]
enum BenchMode {
    /// Write pre-generated batches as fast as the server acknowledges them, then report rows/s,
    /// MB/s, request latency percentiles and the server's own counters.
    Ingest {
        /// Base URL of the server, e.g. http://127.0.0.1:8000.
        #[arg(long, default_value = "http://127.0.0.1:8000")]
        target: String,
        /// tsbs-cpu (10 tags, 10 integer fields, ~350 B/line) or arc-narrow (~85 B/line).
        #[arg(long, default_value = "arc-narrow")]
        shape: String,
        /// Concurrent connections, each with one request in flight.
        #[arg(long, default_value_t = 8)]
        workers: usize,
        /// How long to run: 30s, 2m, 500ms.
        #[arg(long, default_value = "30s")]
        duration: String,
        /// Stop after this many rows, if that comes before --duration.
        #[arg(long)]
        rows: Option<u64>,
        /// Lines per request.
        #[arg(long, default_value_t = 1000)]
        batch_lines: usize,
        /// Distinct series (hosts).
        #[arg(long, default_value_t = 1000)]
        hosts: usize,
        /// Database written to (the `db` query parameter).
        #[arg(long, default_value = "bench")]
        database: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::Bench { mode } => bench(mode),
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

fn bench(mode: BenchMode) -> anyhow::Result<()> {
    match mode {
        BenchMode::Ingest {
            target,
            shape,
            workers,
            duration,
            rows,
            batch_lines,
            hosts,
            database,
            json,
        } => {
            let shape = shale::workload::Shape::parse(&shape).ok_or_else(|| {
                anyhow::anyhow!("unknown shape {shape:?}: use tsbs-cpu or arc-narrow")
            })?;
            let options = shale::bench::IngestOptions {
                target,
                shape,
                workers,
                duration: shale::bench::parse_duration(&duration)?,
                rows_max: rows,
                batch_lines,
                hosts,
                database,
                batches_pregenerated: 64,
                progress: !json,
            };
            let report = shale::bench::run_ingest(&options)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }
    }
}
