//! The `mqgate` binary: flags, tracing, then `app::run`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: per message the gateway allocates and frees a few
/// short-lived objects across threads, where glibc's allocator spent ~20% of the CPU
/// (`_int_malloc`, `malloc_consolidate`) in a perf profile of the QoS 1 bench.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use mqgate::config::Config;

#[derive(Parser)]
#[command(name = "mqgate", version, about = "MQTT to AMQP/HTTP bridge gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        /// The YAML configuration file.
        #[arg(short, long, default_value = "config/mqgate.yaml")]
        config: PathBuf,
    },
    /// Validate a configuration file and print every error with file, line and column.
    Check {
        /// The YAML configuration file.
        #[arg(short, long, default_value = "config/mqgate.yaml")]
        config: PathBuf,
    },
    /// Print an argon2 hash of a password, for `password_hash:` under `users:`. The password is
    /// read from stdin (one line; asked twice without echo on a terminal).
    Passwd {
        /// Take the password from this flag instead (for scripts; it shows in `ps`).
        #[arg(long)]
        password: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Passwd { password } => passwd(password),
        Command::Check { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let loaded = match Config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(2);
                }
            };
            init_tracing();
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("mqgate: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(mqgate::app::run(loaded, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mqgate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `mqgate passwd`: prints the PHC string for a password.
fn passwd(password: Option<String>) -> ExitCode {
    let password = match password {
        Some(p) => p,
        None => match read_password() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("mqgate passwd: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    if password.is_empty() {
        eprintln!("mqgate passwd: empty password");
        return ExitCode::FAILURE;
    }
    match mqgate::auth::passwd::hash_password(password.as_bytes()) {
        Ok(phc) => {
            println!("{phc}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mqgate passwd: cannot hash: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the password: from a terminal twice without echo, otherwise the first line of stdin.
fn read_password() -> Result<String, String> {
    use std::io::{BufRead, IsTerminal};
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ").map_err(|e| e.to_string())?;
        let again = rpassword::prompt_password("Again: ").map_err(|e| e.to_string())?;
        if first != again {
            return Err("the passwords differ".into());
        }
        return Ok(first);
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|e| format!("cannot read stdin: {e}"))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

/// Logs at info by default (RUST_LOG overrides). The AMQP sink speaks AMQP itself and reports
/// every connection change and failure; no client library logs of its own remain.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).init();
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
