//! The `courier` command line: `serve`, `check`, `secret`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "courier",
    version,
    about = "A durable, self-hosted webhook delivery proxy"
)]
struct Cli {
    /// Log format (level from RUST_LOG, default info).
    #[arg(long, value_enum, default_value = "pretty", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (embedded defaults without --config).
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config file; exits non-zero naming the key at fault.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print a new random `whsec_` signing secret.
    Secret,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => {
            init_logging(cli.log_format);
            serve(config)
        }
        Command::Check { config } => check(&config),
        Command::Secret => {
            println!("{}", crate::deliver::sign::generate_secret());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("courier: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

fn load(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Ok(Config::load(p)?),
        None => Ok(Config::defaults()),
    }
}

fn check(path: &PathBuf) -> anyhow::Result<()> {
    let config = load(Some(path))?;
    if let Err(errors) = crate::plugins::check(&config.plugins) {
        anyhow::bail!("{}", errors.join("\n"));
    }
    println!(
        "{}: ok ({} endpoints, {} keys, {} plugins, {} workflows)",
        path.display(),
        config.endpoints.len(),
        config.keys.len(),
        config.plugins.len(),
        config.workflows.len()
    );
    Ok(())
}

fn serve(path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = load(path.as_ref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let running = crate::server::start(config).await?;
        if let Some(key) = &running.created_key {
            let dir = running.app.config.load().server.data_dir.clone();
            println!(
                "courier: no [[keys]] configured; created an all-scopes API key (saved in {}):\n  {key}\nIt is not printed again.",
                dir.join("admin.key").display()
            );
        }
        println!("courier listening on http://{}", running.addr);
        let _ = std::io::stdout().flush();
        let stop = running.app.shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested: finishing in-flight attempts");
            stop.cancel();
        });
        running.wait().await;
        Ok(())
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
