//! The `shale` command: run a node, measure a server (`shale bench`), or print the configuration
//! a node would run with.

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
    /// Measure a server from the outside: line-protocol ingest (shale, VictoriaMetrics, InfluxDB
    /// 1.x) or SQL dashboard queries (shale, Arc).
    Bench {
        #[command(subcommand)]
        mode: BenchMode,
    },
    /// Operate a cluster: status and membership through any node's cluster API.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
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

#[derive(clap::Args)]
struct ClusterTarget {
    /// Base URL of any node, e.g. http://127.0.0.1:8000.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    target: String,
    /// The cluster's admin token (cluster.admin_token).
    #[arg(long, env = "SHALE_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl ClusterTarget {
    fn target(self) -> shale::cluster_cli::Target {
        shale::cluster_cli::Target {
            url: self.target,
            token: self.token,
        }
    }
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Create the cluster CA: <dir>/ca.pem and <dir>/ca.key (keep ca.key off the nodes).
    InitCa {
        /// Where to write the CA files.
        #[arg(long, default_value = "./certs")]
        dir: PathBuf,
        /// The cluster's name (cluster.cluster_id).
        #[arg(long)]
        cluster_id: String,
    },
    /// Issue a node certificate signed by the CA: <dir>/node-<id>.pem and .key, named
    /// node-<id>.<cluster_id>.
    IssueCert {
        /// The folder holding ca.pem and ca.key; the node's files are written there too.
        #[arg(long, default_value = "./certs")]
        dir: PathBuf,
        #[arg(long)]
        cluster_id: String,
        #[arg(long)]
        node_id: u64,
        /// IP addresses the node is reached at (repeatable).
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        /// DNS names the node is reached at (repeatable).
        #[arg(long)]
        dns: Vec<String>,
    },
    /// Leader, term, indexes and every member with its role, state and replication lag.
    Status {
        #[command(flatten)]
        target: ClusterTarget,
        /// Print the node's JSON answer as it is.
        #[arg(long)]
        json: bool,
    },
    /// The members, optionally filtered by Raft role (voter, learner) or state.
    Nodes {
        #[command(flatten)]
        target: ClusterTarget,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        state: Option<String>,
    },
    /// Add a node: learner first, a voter once it has the log (replica-only nodes stay
    /// learners). Nodes with cluster.peers set ask for this themselves when they start.
    Add {
        #[command(flatten)]
        target: ClusterTarget,
        /// The new node's id (node.id).
        id: u64,
        /// Its QUIC address, host:port.
        #[arg(long)]
        quic_addr: String,
        /// Its HTTP address, host:port.
        #[arg(long)]
        http_addr: String,
        #[arg(long, default_value = "")]
        name: String,
        /// writer, reader or replica-only.
        #[arg(long, default_value = "writer")]
        role: String,
    },
    /// Remove a node from the membership; it stops receiving the log and files.
    Remove {
        #[command(flatten)]
        target: ClusterTarget,
        id: u64,
    },
    /// Transfer the leadership to a node; waits until it leads.
    Leader {
        #[command(flatten)]
        target: ClusterTarget,
        id: u64,
    },
    /// The leader hands over to the most up-to-date healthy voter (or --preferred).
    Stepdown {
        #[command(flatten)]
        target: ClusterTarget,
        #[arg(long)]
        preferred: Option<u64>,
    },
    /// The node at --target leaves: it drains, hands the leadership over, waits until the
    /// others hold its files and is removed. Stop its process afterwards.
    Leave {
        #[command(flatten)]
        target: ClusterTarget,
    },
    /// Drain a node: it refuses writes (503 naming writable nodes), flushes its buffers,
    /// reports not ready, hands the leadership over, and still answers queries.
    Drain {
        #[command(flatten)]
        target: ClusterTarget,
        id: u64,
    },
    /// Make a drained node active again.
    Activate {
        #[command(flatten)]
        target: ClusterTarget,
        id: u64,
    },
    /// Compare every member's copies of a database's files with the manifest and with each
    /// other; exits non-zero unless every node is CONSISTENT.
    Verify {
        #[command(flatten)]
        target: ClusterTarget,
        database: String,
        /// Re-hash the bytes on disk instead of trusting the cached hashes.
        #[arg(long)]
        deep: bool,
        /// Print the node's JSON answer as it is.
        #[arg(long)]
        json: bool,
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
        /// Copies each write waits for on a shale cluster (`local`, `majority`, `all`; the
        /// `ack` query parameter). The server's `cluster.ack` when not given.
        #[arg(long)]
        ack: Option<String>,
        /// Load a dataset: generate every row while running (each worker its own hosts), so
        /// every (series, time) is distinct and the newest rows are about now. Needs --rows.
        /// Without it, workers cycle through 64 pre-generated batches (measures the server,
        /// not the loader's formatting).
        #[arg(long, requires = "rows")]
        unique: bool,
        /// Print the report as JSON (with a per-second `series`).
        #[arg(long)]
        json: bool,
        /// Also write an SVG chart of rows/s and latency p50/p99 per second to this file.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
    /// Run typical dashboard queries repeatedly over POST /api/v1/query (each worker cycles
    /// through the set) and report count, errors, latency percentiles and mean rows returned per
    /// query. Meant for data written by `shale bench ingest` with the same --shape and --database.
    Query {
        /// Base URL of the server, e.g. http://127.0.0.1:8000.
        #[arg(long, default_value = "http://127.0.0.1:8000")]
        target: String,
        /// Database queried (tables are <database>.cpu).
        #[arg(long, default_value = "bench")]
        database: String,
        /// Shape of the data, which decides tag and field names: tsbs-cpu or arc-narrow.
        #[arg(long, default_value = "arc-narrow")]
        shape: String,
        /// Concurrent connections, each with one query in flight.
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// How long to run: 30s, 2m, 500ms.
        #[arg(long, default_value = "30s")]
        duration: String,
        /// Comma-separated queries of the set to run (default: all).
        #[arg(
            long,
            value_delimiter = ',',
            value_parser = clap::builder::PossibleValuesParser::new(shale::bench::query::query_names()),
            conflicts_with = "sql"
        )]
        queries: Vec<String>,
        /// Time this one SQL query instead of the set, e.g. "SELECT count(*) FROM bench.cpu".
        /// `{end}` in it becomes the latest timestamp in <database>.cpu, as in the set.
        #[arg(long)]
        sql: Option<String>,
        /// Print the report as JSON (with a per-second `series`).
        #[arg(long)]
        json: bool,
        /// Also write an SVG chart of queries/s and latency p50/p99 per second to this file.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::Bench { mode } => bench(mode),
        Command::Cluster { action } => cluster(action),
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

fn cluster(action: ClusterAction) -> anyhow::Result<()> {
    match action {
        ClusterAction::InitCa { dir, cluster_id } => {
            shale::cluster_cli::init_ca(&dir, &cluster_id)?;
            println!("wrote {}/ca.pem and ca.key", dir.display());
        }
        ClusterAction::IssueCert {
            dir,
            cluster_id,
            node_id,
            ip,
            dns,
        } => {
            shale::cluster_cli::issue_cert(&dir, &cluster_id, node_id, &ip, &dns)?;
            println!(
                "wrote {}/node-{node_id}.pem and node-{node_id}.key",
                dir.display()
            );
        }
        ClusterAction::Status { target, json } => {
            let status = target.target().call("GET", "/api/v1/cluster", b"")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", shale::cluster_cli::format_status(&status));
            }
        }
        ClusterAction::Nodes {
            target,
            role,
            state,
        } => {
            let mut path = "/api/v1/cluster/nodes".to_string();
            let filters: Vec<String> = [("role", role), ("state", state)]
                .into_iter()
                .filter_map(|(key, value)| value.map(|v| format!("{key}={v}")))
                .collect();
            if !filters.is_empty() {
                path = format!("{path}?{}", filters.join("&"));
            }
            let nodes = target.target().call("GET", &path, b"")?;
            println!("{}", serde_json::to_string_pretty(&nodes)?);
        }
        ClusterAction::Add {
            target,
            id,
            quic_addr,
            http_addr,
            name,
            role,
        } => {
            let body = serde_json::json!({
                "id": id, "quic_addr": quic_addr, "http_addr": http_addr, "name": name, "role": role,
            });
            print_answer(target.target().call_following(
                "POST",
                "/api/v1/cluster/peer",
                body.to_string().as_bytes(),
            )?)?;
        }
        ClusterAction::Remove { target, id } => {
            let path = format!("/api/v1/cluster/peer/{id}");
            print_answer(target.target().call_following("DELETE", &path, b"")?)?;
        }
        ClusterAction::Leader { target, id } => {
            let body = serde_json::json!({ "id": id }).to_string();
            print_answer(target.target().call_following(
                "POST",
                "/api/v1/cluster/leader",
                body.as_bytes(),
            )?)?;
        }
        ClusterAction::Stepdown { target, preferred } => {
            let body = preferred
                .map(|id| serde_json::json!({ "preferred": id }).to_string())
                .unwrap_or_default();
            print_answer(target.target().call_following(
                "POST",
                "/api/v1/cluster/stepdown",
                body.as_bytes(),
            )?)?;
        }
        ClusterAction::Leave { target } => {
            print_answer(target.target().call("POST", "/api/v1/cluster/leave", b"")?)?;
        }
        ClusterAction::Drain { target, id } => {
            let path = format!("/api/v1/cluster/nodes/{id}/drain");
            print_answer(target.target().call("POST", &path, b"")?)?;
        }
        ClusterAction::Activate { target, id } => {
            let path = format!("/api/v1/cluster/nodes/{id}/activate");
            print_answer(target.target().call("POST", &path, b"")?)?;
        }
        ClusterAction::Verify {
            target,
            database,
            deep,
            json,
        } => {
            let report = shale::cluster_cli::verify(&target.target(), &database, deep)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", shale::cluster_cli::format_verify(&report));
            }
            // Scripts (Ansible) take the exit status as the verdict.
            let status = report["status"].as_str().unwrap_or("-");
            if status != "CONSISTENT" {
                anyhow::bail!("verify {database}: {status}");
            }
        }
    }
    Ok(())
}

fn print_answer(answer: serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(())
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
            ack,
            unique,
            json,
            plot,
        } => {
            let shape = parse_shape(&shape)?;
            let options = shale::bench::IngestOptions {
                target,
                shape,
                workers,
                duration: shale::bench::parse_duration(&duration)?,
                rows_max: rows,
                batch_lines,
                hosts,
                database,
                ack,
                batches_pregenerated: 64,
                unique,
                progress: !json,
            };
            let report = shale::bench::run_ingest(&options)?;
            emit(&report, report.svg(), report.to_text(), json, plot)
        }
        BenchMode::Query {
            target,
            database,
            shape,
            workers,
            duration,
            queries,
            sql,
            json,
            plot,
        } => {
            let shape = parse_shape(&shape)?;
            let queries = match sql {
                Some(sql) => vec![shale::bench::query::Query {
                    name: shale::bench::query::CUSTOM_QUERY_NAME.to_string(),
                    sql,
                }],
                None => shale::bench::query::select(shape, &database, &queries)?,
            };
            let options = shale::bench::query::QueryOptions {
                target,
                database,
                shape,
                workers,
                duration: shale::bench::parse_duration(&duration)?,
                queries,
                progress: !json,
            };
            let report = shale::bench::query::run_query(&options)?;
            emit(&report, report.svg(), report.to_text(), json, plot)
        }
    }
}

/// Writes the chart if asked for, then prints the report as JSON or as text.
fn emit(
    report: &impl serde::Serialize,
    svg: String,
    text: String,
    json: bool,
    plot: Option<PathBuf>,
) -> anyhow::Result<()> {
    if let Some(path) = plot {
        write_plot(&path, &svg)?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{text}");
    }
    Ok(())
}

fn parse_shape(shape: &str) -> anyhow::Result<shale::workload::Shape> {
    shale::workload::Shape::parse(shape)
        .ok_or_else(|| anyhow::anyhow!("unknown shape {shape:?}: use tsbs-cpu or arc-narrow"))
}

fn write_plot(path: &std::path::Path, svg: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::write(path, svg).with_context(|| format!("write chart {}", path.display()))
}
