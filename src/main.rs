//! The `pcgate` command: parse the command line, set up logging, load the config, run.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use pcgate::config::Config;
use pcgate::sandbox::{self, Sandbox, SandboxOptions};

/// Exit status for a bad config or command line (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// The config file used when neither --config nor $PCGATE_CONFIG names one.
const DEFAULT_CONFIG: &str = "config/pcgate.toml";

/// A caching sidecar gateway for the Partner Center billing API.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log format: readable text, or one JSON object a line (default: text on a terminal, else json).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: billing apps call `server.listen` instead of the Partner Center API.
    Run {
        /// The TOML config file (then overridden by PCGATE_* variables, e.g. PCGATE_UPSTREAM__BASE_URL).
        #[arg(long, env = "PCGATE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Load and validate the config; print the effective config with secrets redacted. Exit 0, or 64 with the reason.
    CheckConfig {
        /// The TOML config file (then overridden by PCGATE_* variables).
        #[arg(long, env = "PCGATE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// A local stand-in for the Partner Center billing API and its token endpoint, for offline
    /// work, tests and benchmarks. Inspect it at /__sandbox/requests, change faults with
    /// POST /__sandbox/faults.
    Sandbox(SandboxArgs),
    /// The sandbox and the gateway together in one process, ready for curl; Ctrl-C stops both.
    Demo {
        /// How the gateway authenticates: the sandbox's client secret, or a throwaway certificate
        /// made at start (signed client assertions).
        #[arg(long, value_enum, default_value_t = DemoCredentialArg::Secret)]
        credential: DemoCredentialArg,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DemoCredentialArg {
    Secret,
    Certificate,
}

#[derive(clap::Args)]
struct SandboxArgs {
    /// Address to serve on.
    #[arg(long, default_value_t = sandbox::DEFAULT_LISTEN)]
    listen: std::net::SocketAddr,
    /// How many invoices to generate.
    #[arg(long, default_value_t = sandbox::DEFAULT_INVOICES)]
    invoices: usize,
    /// Seed for the generated data (same seed, same data).
    #[arg(long, default_value_t = sandbox::DEFAULT_SEED)]
    seed: u64,
    /// Lifetime of the access tokens it issues.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    token_ttl: std::time::Duration,
    /// Share of API calls answered with --fail-status (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Status of injected failures.
    #[arg(long, default_value_t = sandbox::DEFAULT_FAIL_STATUS)]
    fail_status: u16,
    /// Delay added to every API answer.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    latency: std::time::Duration,
    /// API calls per second above which it answers 429 with Retry-After (e.g. 50/s).
    #[arg(long, value_parser = sandbox::parse_rate_limit)]
    rate_limit: Option<u32>,
    /// A PEM certificate whose key may sign client assertions (repeatable).
    #[arg(long = "client-certificate", value_name = "FILE")]
    client_certificates: Vec<PathBuf>,
}

/// Writes out the buffered log lines first, so a fatal message comes after them.
macro_rules! fatal {
    ($($message:tt)*) => {{
        pcgate::log::batch::flush();
        eprintln!($($message)*);
    }};
}

/// jemalloc (the default `jemalloc` feature): see Cargo.toml.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let code = run(cli);
    pcgate::log::batch::flush();
    code
}

fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(loaded) => {
                println!(
                    "# effective config from {} and PCGATE_* variables\n",
                    config.display()
                );
                print!("{}", loaded.to_toml());
                for warning in loaded.warnings() {
                    eprintln!("pcgate: warning: {warning}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&config, &e),
        },
        Command::Sandbox(args) => runtime().block_on(async {
            let mut client_certificates = Vec::new();
            for path in &args.client_certificates {
                match std::fs::read_to_string(path) {
                    Ok(pem) => client_certificates.push(pem),
                    Err(e) => {
                        fatal!("pcgate sandbox: --client-certificate {}: {e}", path.display());
                        return ExitCode::from(EXIT_USAGE);
                    }
                }
            }
            let options = SandboxOptions {
                client_certificates,
                listen: args.listen,
                invoices: args.invoices,
                seed: args.seed,
                token_ttl: args.token_ttl,
                fail_rate: args.fail_rate,
                fail_status: args.fail_status,
                latency: args.latency,
                rate_limit: args.rate_limit,
                ..SandboxOptions::default()
            };
            match Sandbox::bind(options).await {
                Ok(sandbox) => {
                    println!(
                        "pcgate sandbox on {}\n  token endpoint {}\n  client_id {} / client_secret {} / refresh token {}",
                        sandbox.base_url(),
                        sandbox.token_url(),
                        sandbox::SANDBOX_CLIENT_ID,
                        sandbox::SANDBOX_CLIENT_SECRET,
                        sandbox::SANDBOX_REFRESH_TOKEN
                    );
                    println!(
                        "  {} client certificate(s) trusted for signed assertions; POST \
                         /__sandbox/credentials changes what the token endpoint accepts",
                        args.client_certificates.len()
                    );
                    sandbox.serve(shutdown_signal()).await;
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    fatal!("pcgate sandbox: {e}");
                    ExitCode::from(EXIT_USAGE)
                }
            }
        }),
        Command::Demo { credential } => runtime().block_on(async {
            let credential = match credential {
                DemoCredentialArg::Secret => pcgate::demo::DemoCredential::Secret,
                DemoCredentialArg::Certificate => pcgate::demo::DemoCredential::Certificate,
            };
            match pcgate::demo::run(credential, shutdown_signal()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    fatal!("pcgate demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }),
        Command::Run { config: path } => {
            let config = match Config::load(&path) {
                Ok(config) => config,
                Err(e) => return config_error(&path, &e),
            };
            gateway_runtime().block_on(async {
                match pcgate::run(config, shutdown_signal()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        fatal!("pcgate: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

fn config_error(path: &std::path::Path, error: &pcgate::config::ConfigError) -> ExitCode {
    fatal!("pcgate: bad config ({}): {error}", path.display());
    ExitCode::from(EXIT_USAGE)
}

/// The runtime of `sandbox` and `demo`: tokio's default shape (a worker per core, or
/// `TOKIO_WORKER_THREADS`).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
}

/// The runtime of `run`: the gateway's listener runs on threads of its own (`server::serve_lanes`,
/// one per core or `TOKIO_WORKER_THREADS`), so this one keeps a single worker for the admin
/// listener, the token refreshers and the fleet tier's tasks.
fn gateway_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
}

fn init_tracing(format: Option<LogFormat>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let terminal = std::io::stderr().is_terminal();
    if !terminal {
        // A file or a pipe: lines below warning go out in batches (src/log/batch.rs).
        pcgate::log::batch::batch_stderr();
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(pcgate::log::batch::Stderr);
    match format.unwrap_or(if terminal {
        LogFormat::Text
    } else {
        LogFormat::Json
    }) {
        LogFormat::Text => builder.with_ansi(terminal).init(),
        LogFormat::Json => builder
            .fmt_fields(pcgate::log::JsonLines)
            .event_format(pcgate::log::JsonLines)
            .init(),
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        () = term => tracing::info!("SIGTERM: shutting down"),
    }
}
