//! The `pcgate` command: parse the command line, set up logging, load the config, run.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use pcgate::config::Config;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(loaded) => {
                println!(
                    "# effective config from {} and PCGATE_* variables\n",
                    config.display()
                );
                print!("{}", loaded.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&config, &e),
        },
        Command::Run { config: path } => {
            let config = match Config::load(&path) {
                Ok(config) => config,
                Err(e) => return config_error(&path, &e),
            };
            runtime().block_on(async {
                match pcgate::run(config, shutdown_signal()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("pcgate: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

fn config_error(path: &std::path::Path, error: &pcgate::config::ConfigError) -> ExitCode {
    eprintln!("pcgate: bad config ({}): {error}", path.display());
    ExitCode::from(EXIT_USAGE)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
}

fn init_tracing(format: Option<LogFormat>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let terminal = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format.unwrap_or(if terminal {
        LogFormat::Text
    } else {
        LogFormat::Json
    }) {
        LogFormat::Text => builder.with_ansi(terminal).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
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
