//! The `mqgate` binary: flags, tracing, then `app::run`.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

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
        /// How log lines are written to stdout: `text` for people, `json` (one JSON object per
        /// line: timestamp, level, target, message, fields, span) for log shippers.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a configuration file and print every error with file, line and column.
    Check {
        /// The YAML configuration file.
        #[arg(short, long, default_value = "config/mqgate.yaml")]
        config: PathBuf,
    },
    /// List, show, replay and purge the dead letters of a running gateway (through its admin
    /// API): messages that failed for good, kept with the reason, rule and target.
    DeadLetters {
        /// The admin API, e.g. http://127.0.0.1:9090 (default: from --config, else that).
        #[arg(long, global = true)]
        admin: Option<String>,
        /// Take the admin address from this config file's `admin.listen`.
        #[arg(short, long, global = true)]
        config: Option<PathBuf>,
        /// Print the API's JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: DeadLetterCommand,
    },
    /// Show where a message would go, without connecting anywhere: the ACL's decision, the
    /// rules whose filter matches, each `when:` (and why it does not hold), and what each
    /// target would send (exchange and routing key, queue, HTTP method, URL, headers and body,
    /// bridge topic).
    Route {
        /// The YAML configuration file.
        #[arg(short, long, default_value = "config/mqgate.yaml")]
        config: PathBuf,
        /// The message.
        #[command(flatten)]
        probe: RouteProbe,
        /// Print JSON (as `POST /api/v1/route` answers) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print an argon2 hash of a password, for `password_hash:` under `users:`. The password is
    /// read from stdin (one line; asked twice without echo on a terminal).
    Passwd {
        /// Take the password from this flag instead (for scripts; it shows in `ps`).
        #[arg(long)]
        password: Option<String>,
    },
}

/// `run --log-format`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// One human-readable line per event (tracing's default format).
    Text,
    /// One JSON object per line.
    Json,
}

/// `mqgate dead-letters ...`.
#[derive(Subcommand)]
enum DeadLetterCommand {
    /// List dead letters, oldest first (one page).
    List {
        /// Only those with ids above this (the next page).
        #[arg(long)]
        after: Option<u64>,
        /// At most this many (default 100).
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Show one dead letter in full: payload, properties, publisher.
    Show {
        /// Its id.
        id: u64,
    },
    /// Send a dead letter (or all) again: delivered ones are removed, failed ones kept with
    /// the new reason.
    Replay {
        /// The id to replay.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<u64>,
        /// Replay every dead letter (in id order).
        #[arg(long)]
        all: bool,
        /// Send to this target instead of each letter's own (`rule/index`, index from 0 in
        /// the rule's `to:` order).
        #[arg(long)]
        to: Option<String>,
        /// With --all: only letters of this rule.
        #[arg(long, requires = "all")]
        rule: Option<String>,
        /// With --all: only letters of this target (`rule/index`).
        #[arg(long, requires = "all")]
        target: Option<String>,
    },
    /// Remove one dead letter, or all of them.
    Purge {
        /// The id to remove; without it, every dead letter.
        id: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::DeadLetters { admin, config, json, action } => {
            dead_letters(admin, config, json, action)
        }
        Command::Passwd { password } => passwd(password),
        Command::Route { config, probe, json } => {
            let loaded = match Config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(2);
                }
            };
            match route(&loaded, probe, json) {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mqgate route: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
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
        Command::Run { config, log_format } => {
            let (file, loaded) = match mqgate::reload::ConfigFile::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(2);
                }
            };
            init_tracing(log_format);
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("mqgate: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(mqgate::app::run(loaded, Some(file), shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mqgate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `mqgate dead-letters`: one request to the admin API, printed.
fn dead_letters(
    admin: Option<String>,
    config: Option<PathBuf>,
    json: bool,
    action: DeadLetterCommand,
) -> ExitCode {
    use mqgate::deadletters::cli::{self, Action};
    let base = match (admin, config) {
        (Some(url), _) if url.contains("://") => url,
        (Some(addr), _) => format!("http://{addr}"),
        (None, Some(path)) => match Config::load(&path) {
            Ok(c) => cli::admin_url(c.admin_addr()),
            Err(errors) => {
                eprintln!("{errors}");
                return ExitCode::from(2);
            }
        },
        (None, None) => "http://127.0.0.1:9090".to_owned(),
    };
    let action = match action {
        DeadLetterCommand::List { after, limit } => Action::List { after, limit },
        DeadLetterCommand::Show { id } => Action::Show(id),
        DeadLetterCommand::Replay { id, all: _, to, rule, target } => {
            Action::Replay { id, to, rule, target }
        }
        DeadLetterCommand::Purge { id } => Action::Purge(id),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mqgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(&base, &action, json)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mqgate dead-letters: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The message `mqgate route` explains.
#[derive(clap::Args)]
struct RouteProbe {
    /// The topic published to.
    #[arg(long)]
    topic: String,
    /// The payload, as text.
    #[arg(long, conflicts_with = "payload_file")]
    payload: Option<String>,
    /// The payload, read from this file.
    #[arg(long)]
    payload_file: Option<PathBuf>,
    /// The QoS.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// The RETAIN flag.
    #[arg(long)]
    retain: bool,
    /// The publishing user (for the ACL and templates); anonymous without.
    #[arg(long)]
    user: Option<String>,
    /// The publishing client's id.
    #[arg(long, default_value = "mqgate-route")]
    client_id: String,
    /// An MQTT 5 user property, NAME=VALUE (repeatable).
    #[arg(long = "property", value_name = "NAME=VALUE")]
    properties: Vec<String>,
}

/// `mqgate route`: the dry-run on the config, nothing started; the report as text or JSON.
fn route(config: &Config, p: RouteProbe, json: bool) -> anyhow::Result<String> {
    use anyhow::Context;
    use mqgate::mqtt::codec::{Properties, QoS};
    let payload = match (p.payload, &p.payload_file) {
        (Some(text), _) => bytes::Bytes::from(text),
        (None, Some(path)) => std::fs::read(path)
            .map(bytes::Bytes::from)
            .with_context(|| format!("cannot read {}", path.display()))?,
        (None, None) => bytes::Bytes::new(),
    };
    let mut user_properties = Vec::new();
    for kv in &p.properties {
        let (k, v) = kv.split_once('=').context(format!("--property {kv:?}: NAME=VALUE"))?;
        user_properties.push((k.to_owned(), v.to_owned()));
    }
    let properties = Properties { user_properties, ..Properties::default() }.into();
    let qos = match p.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let msg = std::sync::Arc::new(mqgate::dryrun::message(
        p.topic,
        payload,
        qos,
        p.retain,
        p.user.as_deref(),
        &p.client_id,
        properties,
    ));
    // The HTTP kind builds its clients (and reads their TLS files) in a runtime's context;
    // nothing is spawned on it.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report = runtime.block_on(async { mqgate::dryrun::offline(config, &msg) })?;
    if json {
        let mut text = serde_json::to_string_pretty(&report)?;
        text.push('\n');
        Ok(text)
    } else {
        Ok(mqgate::dryrun::render_text(&report))
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
///
/// Text lines leave the target out (short lines for people); JSON lines keep it and put the
/// event's fields (`message` among them) at the top level beside `timestamp`, `level` and
/// `target`, with the current span (a session's `client_id`, `peer`) under `span`. Client
/// text is escaped by `logtext::LogText` before either format sees it; JSON escapes what
/// remains (quotes, the backslashes `LogText` wrote), so a line stays one line.
fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.with_target(false).init(),
        LogFormat::Json => {
            builder.json().flatten_event(true).with_current_span(true).with_span_list(false).init()
        }
    }
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
