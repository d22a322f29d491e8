//! `tandem`: the command-line binary. It parses arguments, loads the configuration,
//! starts tracing and hands over to the crates; nothing else lives here.
//!
//! # Layout
//! - `main.rs`: arguments, tracing, and one function per subcommand (`run`, `check`,
//!   `demo`, `sim`, `bench`).
//! - `tests/cli.rs`: the binary's arguments, `check` on good and broken configurations.
//! - `tests/restart.rs`: SIGKILL during a gap and a restart that repairs it.
//! - `tests/deploy.rs`: the deployment artefacts (`deploy/`, `dashboards/`) against
//!   `promtool`, `nats-server`, `systemd-analyze`, and a real Prometheus scraping `tandem
//!   demo`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "tandem",
    version,
    about = "Consume X/Gnip enterprise streams over redundant connections without losing or duplicating an activity"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log filter in RUST_LOG syntax (e.g. `info`, `tandem_conn=debug`).
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

/// `tandem demo --api`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum DemoApiArg {
    Gnip,
    V2,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the consumer described by a configuration file (until SIGINT or SIGTERM).
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration and print what it would do, or every problem with its field.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the whole pipeline against the built-in simulator, with faults, and report
    /// whether anything was lost or duplicated.
    Demo {
        /// How long to stream (e.g. `60s`, `2m`).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        duration: Duration,
        /// Directory the run writes under (a subdirectory per run).
        #[arg(long, default_value = "./tandem-data")]
        data_dir: PathBuf,
        /// Where Prometheus metrics and `/status` are served during the run.
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics_listen: SocketAddr,
        /// Activities per second generated over both partitions.
        #[arg(long, default_value_t = 300.0)]
        rate: f64,
        /// The upstream API the simulator speaks: `gnip` (a Decahose) or `v2` (the X API
        /// v2 partitioned sample stream).
        #[arg(long, value_enum, default_value_t = DemoApiArg::Gnip)]
        api: DemoApiArg,
    },
    /// Measure the full pipeline against the simulator (null, file and JetStream sinks),
    /// at full speed or at a fixed offered rate, beside the inflate floor and the official
    /// X Python SDK as a baseline.
    Bench(BenchArgs),
    /// Run the upstream simulator as a standalone server.
    Sim {
        /// Simulator configuration (TOML); default: one Decahose stream.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Address to listen on (overrides the configuration).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
}

/// The settings of `tandem bench`.
#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// Activities per partition each path streams (default: 500 000 at full speed,
    /// 30 seconds' worth at a fixed `--rate`).
    #[arg(long)]
    activities: Option<u64>,
    /// Hold a fixed offered rate of raw activities per second (over 2 partitions x 2
    /// paths) and report hand-off and acknowledgement latency percentiles.
    #[arg(long)]
    rate: Option<f64>,
    /// Also run into JetStream (starts a nats-server).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    jetstream: bool,
    /// Activities the X SDK baseline reads.
    #[arg(long, default_value_t = 20_000)]
    xdk_activities: u64,
    /// Working directory (emptied per run).
    #[arg(long, default_value = "./tandem-data/bench")]
    work_dir: PathBuf,
    /// Pipeline runs, comma-separated: null, file, jetstream, kafka (kafka starts the
    /// `tansu` broker that scripts/setup-test-deps installs).
    #[arg(long, default_value = "null,file,jetstream", value_delimiter = ',')]
    sinks: Vec<String>,
    /// Run the X Python SDK baseline.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    xdk: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((t, "s"), |i| t.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 60s, 2m or 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn start_tracing(format: LogFormat, filter: &str, file: Option<&Path>) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("log filter {filter:?}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match (format, file) {
        (LogFormat::Json, None) => builder.json().with_writer(std::io::stderr).init(),
        (LogFormat::Text, None) => builder.with_writer(std::io::stderr).init(),
        (format, Some(path)) => {
            let f = std::fs::File::create(path)
                .with_context(|| format!("log file {}", path.display()))?;
            let writer = std::sync::Mutex::new(f);
            match format {
                LogFormat::Json => builder.json().with_ansi(false).with_writer(writer).init(),
                LogFormat::Text => builder.with_ansi(false).with_writer(writer).init(),
            }
        }
    }
    Ok(())
}

async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tandem: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { config } => run(&config, cli.log_format, &cli.log).await,
            Command::Check { config } => Ok(check(&config)),
            Command::Demo {
                duration,
                data_dir,
                metrics_listen,
                rate,
                api,
            } => {
                let opts = DemoArgs {
                    duration,
                    metrics_listen,
                    rate,
                    api: match api {
                        DemoApiArg::Gnip => tandem_scenario::demo::DemoApi::Gnip,
                        DemoApiArg::V2 => tandem_scenario::demo::DemoApi::V2,
                    },
                };
                demo(opts, &data_dir, cli.log_format, &cli.log).await
            }
            Command::Sim { config, listen } => {
                sim(config.as_deref(), listen, cli.log_format, &cli.log).await
            }
            Command::Bench(args) => bench(args, cli.log_format).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tandem: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(path: &Path, format: LogFormat, log: &str) -> anyhow::Result<ExitCode> {
    start_tracing(format, log, None)?;
    let loaded = match tandem_config::load_file(path) {
        Ok(l) => l,
        Err(problems) => {
            eprintln!(
                "tandem: {} has {} problem(s):\n{problems}",
                path.display(),
                problems.0.len()
            );
            return Ok(ExitCode::from(2));
        }
    };
    let pipeline = tandem_pipeline::Pipeline::start(loaded).await?;
    tracing::info!(endpoint = %pipeline.http_addr(), "running; metrics on /metrics, status on /status");
    signal().await;
    tracing::info!("signal received: draining");
    let report = pipeline.shutdown().await;
    for (sink, r) in &report.sinks {
        tracing::info!(sink = %sink, drained = r.drained, left_in_spool = r.left_in_spool, stored_total = r.stored_total, "sink drained");
    }
    Ok(ExitCode::SUCCESS)
}

fn check(path: &Path) -> ExitCode {
    match tandem_config::load_file(path) {
        Ok(loaded) => {
            println!(
                "{} is valid.\n\n{}",
                path.display(),
                tandem_config::plan(&loaded)
            );
            ExitCode::SUCCESS
        }
        Err(problems) => {
            println!("{} has {} problem(s):", path.display(), problems.0.len());
            for p in &problems.0 {
                println!("  {p}");
            }
            ExitCode::FAILURE
        }
    }
}

/// What `tandem demo` was asked for.
struct DemoArgs {
    duration: Duration,
    metrics_listen: SocketAddr,
    rate: f64,
    api: tandem_scenario::demo::DemoApi,
}

async fn demo(
    args: DemoArgs,
    data_dir: &Path,
    format: LogFormat,
    log: &str,
) -> anyhow::Result<ExitCode> {
    let DemoArgs {
        duration,
        metrics_listen,
        rate,
        api,
    } = args;
    let stamp = tandem_core_stamp();
    let run_dir = data_dir.join(format!("demo-{stamp}"));
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    start_tracing(format, log, Some(&run_dir.join("tandem.log")))?;
    let opts = tandem_scenario::demo::DemoOptions {
        duration,
        run_dir,
        metrics_listen,
        rate_per_sec: rate,
        api,
    };
    let report = tandem_scenario::demo::run(opts).await?;
    Ok(if report.verdict.clean() && report.verdict.settled {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn bench(args: BenchArgs, format: LogFormat) -> anyhow::Result<ExitCode> {
    start_tracing(format, "warn,async_nats=error", None)?;
    if args.rate.is_some_and(|r| !(r.is_finite() && r >= 100.0)) {
        anyhow::bail!("--rate: at least 100 raw activities per second");
    }
    // The baseline uses the project's virtualenv (scripts/python-env creates it).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python = std::process::Command::new(root.join("scripts/python-env"))
        .output()
        .ok()
        .filter(|o| args.xdk && o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    // At a fixed rate, 30 seconds of it (each of the 4 connections sends a quarter).
    let activities = args.activities.unwrap_or_else(|| {
        args.rate
            .map_or(500_000, |r| (r / 4.0 * 30.0).ceil() as u64)
    });
    let opts = tandem_scenario::bench::BenchOptions {
        exe: std::env::current_exe().context("locating the tandem executable")?,
        work_dir: args.work_dir,
        activities_per_partition: activities,
        jetstream: args.jetstream,
        python,
        xdk_activities: args.xdk_activities,
        sinks: args.sinks,
        rate: args.rate,
    };
    let report = tandem_scenario::bench::run(opts)
        .await
        .map_err(anyhow::Error::msg)?;
    println!("{report}");
    Ok(ExitCode::SUCCESS)
}

fn tandem_core_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    secs.to_string()
}

async fn sim(
    config: Option<&Path>,
    listen: Option<SocketAddr>,
    format: LogFormat,
    log: &str,
) -> anyhow::Result<ExitCode> {
    start_tracing(format, log, None)?;
    tandem_conn::install_crypto_provider();
    let mut cfg: tandem_sim::SimConfig = match config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| {
                format!("{} is not a valid simulator configuration", p.display())
            })?
        }
        None => tandem_sim::SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            ..tandem_sim::SimConfig::default()
        },
    };
    if let Some(l) = listen {
        cfg.listen = l;
    }
    let streams: Vec<String> = cfg.streams.iter().map(|s| s.name.clone()).collect();
    let sim = tandem_sim::Simulator::start(cfg).await?;
    println!(
        "simulator listening on {} (recovery host {})",
        sim.base_url(),
        sim.recovery_base_url()
    );
    for s in &streams {
        println!(
            "  stream {s}: {} (recovery {})",
            sim.stream_url(s)?,
            sim.recovery_url(s)?
        );
    }
    println!(
        "  admin: {0}/admin/connections {0}/admin/stats {0}/admin/truth?stream=NAME  (POST {0}/admin/faults, /admin/publish, /admin/rate)",
        sim.base_url()
    );
    signal().await;
    Ok(ExitCode::SUCCESS)
}
