//! The `courier` command line: `serve`, `check`, `secret`, and the operator commands that talk
//! to a running courier (`deliveries`, `dlq`, `endpoints`, `stats`, `send`) or check a
//! webhook offline (`verify`).

mod backup;
mod client;
mod table;
pub mod verify;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::config::Config;
use client::Api;

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
    /// List or inspect deliveries of a running courier.
    Deliveries {
        #[command(subcommand)]
        cmd: DeliveriesCmd,
    },
    /// List or replay the dead-letter queue of a running courier.
    Dlq {
        #[command(subcommand)]
        cmd: DlqCmd,
    },
    /// List, pause, resume or test the endpoints of a running courier.
    Endpoints {
        #[command(subcommand)]
        cmd: EndpointsCmd,
    },
    /// Save a consistent copy of a running courier's database (an online backup) to FILE,
    /// checked before it takes that name; `-` writes it to standard output. Restore: stop
    /// courier and put the file in place of `courier.redb` in its data dir.
    Backup {
        #[command(flatten)]
        remote: Remote,
        /// Where to save it (`-`: standard output). An existing file is never replaced.
        #[arg(long, short, value_name = "FILE")]
        out: PathBuf,
    },
    /// Put a backup (from `courier backup`) in place of the database of a stopped courier's
    /// data dir. The files it replaces are renamed aside (`.before-restore-<ms>`), not
    /// deleted.
    Restore {
        /// The data dir (`server.data_dir`), e.g. /var/lib/courier.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// The backup file.
        backup: PathBuf,
    },
    /// Delivery statistics of a running courier.
    Stats {
        #[command(flatten)]
        remote: Remote,
        #[arg(long)]
        endpoint: Option<String>,
        /// RFC 3339 time (default: the last 24 hours).
        #[arg(long)]
        since: Option<String>,
    },
    /// Send an event: the JSON payload from FILE, or stdin when FILE is omitted or `-`.
    Send {
        #[command(flatten)]
        remote: Remote,
        #[arg(long)]
        event_type: String,
        /// Deliver to this endpoint only (default: every subscribed endpoint).
        #[arg(long)]
        endpoint: Option<String>,
        /// Your own event id (becomes the webhook-id).
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        idempotency_key: Option<String>,
        file: Option<PathBuf>,
    },
    /// Load-test a running courier: a built-in receiver, C producers, N events of S bytes;
    /// reports accepted and delivered events/s, latency, and the machine's own HTTP baselines.
    Bench {
        #[command(flatten)]
        remote: Target,
        /// Events to send (at least 1).
        #[arg(short = 'n', long, default_value_t = 10_000, value_parser = at_least_one)]
        events: usize,
        /// Concurrent producers (keep-alive connections; at least 1).
        #[arg(short = 'c', long, default_value_t = 64, value_parser = at_least_one)]
        concurrency: usize,
        /// Payload size in bytes (at least the payload's own fields: send time and sequence
        /// number, about 50 bytes).
        #[arg(short = 's', long, default_value_t = 1024)]
        size: usize,
        /// Pace the producers at this many events per second overall (0 = flat out).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Deliver to this URL instead of the built-in receiver (no latency figures).
        #[arg(long)]
        receiver: Option<String>,
        /// Skip the bare-HTTP baselines.
        #[arg(long)]
        no_baselines: bool,
        /// Report the peak RSS and CPU time of this process (the courier under test, if
        /// local); without it, no memory figure.
        #[arg(long)]
        pid: Option<u32>,
        /// Seconds to wait for the last deliveries; events neither delivered nor dead by
        /// then are reported missing (exit 1).
        #[arg(long, default_value_t = 300)]
        drain_timeout: u64,
        /// Seconds one request to courier may take before it counts as an error.
        #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = at_least_one_u64)]
        request_timeout: u64,
        /// Report ingest only: do not wait for deliveries. With the built-in receiver (no
        /// --receiver), which ends with this run, the bench endpoint is deleted at exit all
        /// the same, and the deliveries still queued for it are dropped (the report counts
        /// them); with --receiver the endpoint is kept.
        #[arg(long)]
        no_wait: bool,
        /// Backlog mode: hold deliveries (endpoint paused, as if the receiver were down) while
        /// the events go in, then release them and report the drain rate.
        #[arg(long)]
        backlog: bool,
        /// Where the durable baseline server keeps its journal (in a temporary directory it
        /// makes and removes): a directory on the disk courier's data dir is on. Default: the
        /// system's temporary directory.
        #[arg(long, value_name = "DIR")]
        durable_dir: Option<PathBuf>,
    },
    /// The bare HTTP server `courier bench` measures in a process of its own: answers 202
    /// to everything on 127.0.0.1, prints its address, and stops when stdin closes.
    #[command(hide = true)]
    BenchServer {
        /// Put each request's body on disk before answering (the durable baseline).
        #[arg(long)]
        durable: bool,
        /// Where the durable server's journal goes (a temporary directory under it).
        #[arg(long, requires = "durable")]
        dir: Option<PathBuf>,
    },
    /// Check a received webhook's signatures. Reads the webhook as an HTTP message (headers,
    /// an empty line, the body) from FILE or stdin.
    Verify {
        /// The endpoint's `whsec_` secret.
        #[arg(long, env = "COURIER_VERIFY_SECRET", hide_env_values = true)]
        secret: String,
        /// Skip the 5-minute timestamp check (for old captures).
        #[arg(long)]
        no_timestamp_check: bool,
        file: Option<PathBuf>,
    },
}

/// Where the running courier is.
#[derive(Args)]
struct Target {
    /// courier's base URL.
    #[arg(long, env = "COURIER_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// An API token (admin scope to read, ingest scope to send).
    #[arg(long, env = "COURIER_KEY", hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Where the running courier is, and how long to wait for it.
#[derive(Args)]
struct Remote {
    #[command(flatten)]
    target: Target,
    /// How long a request to courier may take in all, like "30s" or "2m" (connecting: at
    /// most 10s of it). Default 30s; 70s for `endpoints test`, which waits for the first
    /// attempt; 1h for `dlq replay`, which works through the whole dead-letter queue in one
    /// request, and for `backup`, which downloads the whole database.
    #[arg(long, value_name = "DURATION", value_parser = positive_duration)]
    timeout: Option<Duration>,
}

impl Remote {
    fn api(&self) -> anyhow::Result<Api> {
        self.api_within(Duration::from_secs(30))
    }

    /// With `default` as the time limit unless `--timeout` gives one. A bulk replay is one
    /// request that pages through the dead-letter queue on courier's side: giving up on it
    /// closes the connection, which ends the replay part way.
    fn api_within(&self, default: Duration) -> anyhow::Result<Api> {
        Api::new(
            &self.target.url,
            self.target.token.clone(),
            self.timeout.unwrap_or(default),
        )
    }
}

/// A duration flag above zero (`--timeout`).
fn positive_duration(s: &str) -> Result<Duration, String> {
    match crate::config::parse_duration(s)? {
        d if d.is_zero() => Err("must be greater than 0".into()),
        d => Ok(d),
    }
}

/// A delivery status, as `GET /v1/deliveries?status=` takes it.
#[derive(Clone, Copy, ValueEnum)]
enum Status {
    Pending,
    Delivered,
    Dead,
    Dropped,
}

impl Status {
    fn name(self) -> String {
        self.to_possible_value()
            .expect("every status has a name")
            .get_name()
            .to_string()
    }
}

#[derive(Subcommand)]
enum DeliveriesCmd {
    /// Recent deliveries, newest first.
    List {
        #[command(flatten)]
        remote: Remote,
        #[arg(long, value_enum)]
        status: Option<Status>,
        #[command(flatten)]
        filter: Filter,
        #[command(flatten)]
        page: Page,
    },
    /// One delivery with every attempt.
    Show {
        #[command(flatten)]
        remote: Remote,
        id: String,
    },
    /// Start a new round of attempts for a dead, delivered or dropped delivery.
    Replay {
        #[command(flatten)]
        remote: Remote,
        id: String,
    },
}

#[derive(Subcommand)]
enum DlqCmd {
    /// Dead deliveries.
    List {
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        filter: Filter,
        #[command(flatten)]
        page: Page,
    },
    /// Requeue every dead delivery matching the filter (without one, only with --all).
    Replay {
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        filter: Filter,
        /// Requeue every dead delivery (needed when no filter is given).
        #[arg(long, conflicts_with_all = ["endpoint", "since", "until"])]
        all: bool,
    },
}

#[derive(Subcommand)]
enum EndpointsCmd {
    /// Every endpoint, from the config file and made through the API, by name.
    List {
        #[command(flatten)]
        remote: Remote,
        /// Only the endpoints of this tenant.
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        page: Page,
    },
    /// Hold an endpoint's deliveries (kept across restarts) until it is resumed.
    Pause {
        #[command(flatten)]
        remote: Remote,
        name: String,
    },
    /// Let a paused endpoint's deliveries go again.
    Resume {
        #[command(flatten)]
        remote: Remote,
        name: String,
    },
    /// Send the endpoint a `courier.test` event and show its first attempt (exit 1 unless it
    /// was accepted).
    Test {
        #[command(flatten)]
        remote: Remote,
        name: String,
    },
}

/// Which deliveries (endpoint and RFC 3339 time range).
#[derive(Args)]
struct Filter {
    /// Only deliveries to this endpoint.
    #[arg(long)]
    endpoint: Option<String>,
    /// Created at or after this RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// Created at or before this RFC 3339 time.
    #[arg(long)]
    until: Option<String>,
}

impl Filter {
    fn pairs(&self) -> Vec<(&'static str, Option<String>)> {
        vec![
            ("endpoint", self.endpoint.clone()),
            ("since", self.since.clone()),
            ("until", self.until.clone()),
        ]
    }
}

/// Which page of a listing.
#[derive(Args)]
struct Page {
    /// Rows per page, 1 to 1000 (default: 50 deliveries, 100 endpoints).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1000))]
    limit: Option<u16>,
    /// `next_cursor` of the previous page.
    #[arg(long)]
    cursor: Option<String>,
}

impl Page {
    fn pairs(&self) -> Vec<(&'static str, Option<String>)> {
        vec![
            ("limit", self.limit.map(|l| l.to_string())),
            ("cursor", self.cursor.clone()),
        ]
    }
}

/// The command that lists the next page: `command` and the query it was given (less the
/// cursor, which the next page's replaces), each value quoted for a POSIX shell.
fn next_page_command(command: &str, query: &[(&str, Option<String>)]) -> String {
    let mut line = format!("courier {command}");
    for (k, v) in query {
        if let Some(v) = v
            && *k != "cursor"
        {
            line.push_str(&format!(" --{k} {}", shell_word(v)));
        }
    }
    line
}

/// `s` as one word for a POSIX shell: bare when that is safe, else in single quotes.
fn shell_word(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_.:/@%+=,".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Ends the process as clap ends it on a usage error (exit 2): `message`, then the usage
/// of the subcommand at `path`.
fn usage_error(path: &[&str], kind: clap::error::ErrorKind, message: String) -> ! {
    use clap::CommandFactory;
    let mut cli = Cli::command();
    cli.build();
    let mut cmd = &mut cli;
    for name in path {
        cmd = cmd.find_subcommand_mut(name).expect("a subcommand");
    }
    cmd.error(kind, message).exit()
}

/// `courier restore`: the backup in place of the data dir's database (see
/// [`crate::store::restore`]).
fn restore(data_dir: &std::path::Path, backup: &std::path::Path) -> anyhow::Result<()> {
    if !data_dir.is_dir() {
        anyhow::bail!("{} is not a directory", data_dir.display());
    }
    let db = data_dir.join(crate::server::DB_FILE);
    let restored = crate::store::restore(&db, backup)
        .with_context(|| format!("cannot restore {}", backup.display()))?;
    println!("restored {} as {}", backup.display(), db.display());
    for kept in &restored.kept {
        println!("kept what it replaced as {}", kept.display());
    }
    Ok(())
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
        Command::Restore { data_dir, backup } => restore(&data_dir, &backup),
        Command::BenchServer { durable, dir } => crate::bench::serve_bare(durable, dir.as_deref()),
        Command::Verify {
            secret,
            no_timestamp_check,
            file,
        } => verify_cmd(&secret, no_timestamp_check, file.as_ref()),
        remote => operator(remote),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The error may quote a server's answer: no control characters reach the terminal.
            eprintln!("courier: {}", table::clean(&format!("{e:#}"), true));
            // `verify` tells a webhook that does not verify (1) from one it could not read (2).
            if e.downcast_ref::<Unreadable>().is_some() {
                ExitCode::from(2)
            } else if let Some(i) = e.downcast_ref::<crate::bench::Interrupted>() {
                // `bench` stopped by a signal, once it has cleaned up: as the shell reports it.
                ExitCode::from(u8::try_from(128 + i.signal).unwrap_or(1))
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// A count flag that must be at least 1 (`bench -n`, `-c`).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// [`at_least_one`] for seconds.
fn at_least_one_u64(s: &str) -> Result<u64, String> {
    at_least_one(s).map(|n| n as u64)
}

/// Input `verify` could not read (as opposed to a webhook that does not verify).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Unreadable(String);

fn read_input(file: Option<&PathBuf>) -> anyhow::Result<Vec<u8>> {
    match file {
        Some(p) if p.as_os_str() != "-" => {
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
        }
        _ => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read stdin")?;
            Ok(buf)
        }
    }
}

fn verify_cmd(
    secret: &str,
    no_timestamp_check: bool,
    file: Option<&PathBuf>,
) -> anyhow::Result<()> {
    // A secret that cannot be one is a mistake in the command, not a webhook that fails.
    crate::deliver::sign::decode_secret(secret)
        .map_err(|e| Unreadable(format!("--secret: {e}")))?;
    let input = read_input(file).map_err(|e| Unreadable(format!("{e:#}")))?;
    let webhook =
        verify::parse(&input).map_err(|e| Unreadable(format!("cannot read the webhook: {e}")))?;
    let now = (!no_timestamp_check).then(|| crate::model::now_ms() as i64 / 1000);
    let report = verify::verify(&webhook, secret, now);
    for line in &report.lines {
        println!("{line}");
    }
    if report.valid {
        println!("valid");
        Ok(())
    } else {
        anyhow::bail!("the webhook does not verify with this secret")
    }
}

/// The commands that call a running courier's API.
fn operator(command: Command) -> anyhow::Result<()> {
    // The load tool needs both cores; the other commands make one request.
    let rt = if matches!(command, Command::Bench { .. }) {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .context("cannot start the async runtime")?;
    rt.block_on(async move {
        match command {
            Command::Deliveries {
                cmd:
                    DeliveriesCmd::List {
                        remote,
                        status,
                        filter,
                        page,
                    },
            } => {
                let mut query = vec![("status", status.map(Status::name))];
                query.extend(filter.pairs());
                query.extend(page.pairs());
                let v = remote.api()?.get(&["v1", "deliveries"], &query).await?;
                let more = next_page_command("deliveries list", &query);
                show(&remote, &v, |v| client::deliveries_table(v, &more));
            }
            Command::Deliveries {
                cmd: DeliveriesCmd::Show { remote, id },
            } => {
                let api = remote.api()?;
                let v = api.get(&["v1", "deliveries", &id], &[]).await?;
                // A pending delivery may be held past its next-attempt time by its endpoint
                // (paused, a Retry-After hold, an open circuit): its stats say. `--json` is
                // the API's answer alone.
                let health = match v["endpoint"].as_str() {
                    Some(ep)
                        if !remote.target.json
                            && v["status"] == "pending"
                            && v["endpoint_missing"] != true =>
                    {
                        Some(
                            api.get(&["v1", "endpoints", ep, "stats"], &[])
                                .await
                                .map_err(|e| format!("{e:#}")),
                        )
                    }
                    _ => None,
                };
                show(&remote, &v, |v| client::delivery_detail(v, health.as_ref()));
            }
            Command::Deliveries {
                cmd: DeliveriesCmd::Replay { remote, id },
            } => {
                let v = remote
                    .api()?
                    .post_raw(&["v1", "deliveries", &id, "replay"], None)
                    .await?
                    .value;
                show(&remote, &v, client::replayed);
            }
            Command::Dlq {
                cmd:
                    DlqCmd::List {
                        remote,
                        filter,
                        page,
                    },
            } => {
                let mut query = filter.pairs();
                query.extend(page.pairs());
                let v = remote.api()?.get(&["v1", "dlq"], &query).await?;
                let more = next_page_command("dlq list", &query);
                show(&remote, &v, |v| client::deliveries_table(v, &more));
            }
            Command::Dlq {
                cmd:
                    DlqCmd::Replay {
                        remote,
                        filter,
                        all,
                    },
            } => {
                let mut body = json!({});
                for (k, v) in filter.pairs() {
                    if let Some(v) = v {
                        // An empty filter would widen the replay to everything (an unset
                        // shell variable, say): refuse it.
                        if v.trim().is_empty() {
                            usage_error(
                                &["dlq", "replay"],
                                clap::error::ErrorKind::ValueValidation,
                                format!(
                                    "--{k} is empty: an empty filter value is refused rather than read as \"all\"; give a value, or leave --{k} out"
                                ),
                            );
                        }
                        body[k] = v.into();
                    }
                }
                if body.as_object().is_some_and(|b| b.is_empty()) && !all {
                    usage_error(
                        &["dlq", "replay"],
                        clap::error::ErrorKind::MissingRequiredArgument,
                        "no filter given: name the dead deliveries to requeue with --endpoint, --since or --until, or give --all to requeue every one".into(),
                    );
                }
                let v = remote
                    .api_within(Duration::from_secs(3600))?
                    .post(&["v1", "dlq", "replay"], &body)
                    .await?;
                show(&remote, &v, client::dlq_replayed);
            }
            Command::Endpoints {
                cmd:
                    EndpointsCmd::List {
                        remote,
                        tenant,
                        page,
                    },
            } => {
                let mut query = vec![("tenant", tenant)];
                query.extend(page.pairs());
                let v = remote.api()?.get(&["v1", "endpoints"], &query).await?;
                let more = next_page_command("endpoints list", &query);
                show(&remote, &v, |v| client::endpoints_table(v, &more));
            }
            Command::Endpoints {
                cmd:
                    cmd @ (EndpointsCmd::Pause { .. } | EndpointsCmd::Resume { .. }),
            } => {
                let (action, remote, name) = match cmd {
                    EndpointsCmd::Pause { remote, name } => ("pause", remote, name),
                    EndpointsCmd::Resume { remote, name } => ("resume", remote, name),
                    _ => unreachable!("matched above"),
                };
                let v = remote
                    .api()?
                    .post_raw(&["v1", "endpoints", &name, action], None)
                    .await?
                    .value;
                show(&remote, &v, client::paused);
            }
            Command::Endpoints {
                cmd: EndpointsCmd::Test { remote, name },
            } => {
                // Courier waits for the first attempt up to the endpoint's timeout (at most
                // 60 s) and 5 s more.
                let v = remote
                    .api_within(Duration::from_secs(70))?
                    .post_raw(&["v1", "endpoints", &name, "test"], None)
                    .await?
                    .value;
                show(&remote, &v, client::tested);
                // The report first, then whether the endpoint took the event.
                if v["success"] != true {
                    if v["attempt"].is_null() {
                        anyhow::bail!(
                            "the test delivery had no attempt yet; see `courier deliveries show {}`",
                            shell_word(v["delivery_id"].as_str().unwrap_or("?"))
                        );
                    }
                    anyhow::bail!("endpoint `{name}` did not accept the test event");
                }
            }
            Command::Backup { remote, out } => {
                // The whole database in one answer: as long as it takes.
                let api = remote.api_within(Duration::from_secs(3600))?;
                let saved = backup::save(&api, &out).await?;
                let rows = saved.rows.map_or(String::new(), |r| format!(", {r} rows"));
                let line = format!(
                    "backup saved to {} ({} bytes{rows})",
                    out.display(),
                    saved.bytes
                );
                let report = if remote.target.json {
                    json!({"path": out, "bytes": saved.bytes, "rows": saved.rows}).to_string()
                } else {
                    line
                };
                // With `-` the backup is on stdout: the report goes to stderr.
                if out == std::path::Path::new("-") {
                    eprintln!("{report}");
                } else {
                    println!("{report}");
                }
            }
            Command::Stats {
                remote,
                endpoint,
                since,
            } => {
                let v = remote
                    .api()?
                    .get(
                        &["v1", "stats"],
                        &[("endpoint", endpoint.clone()), ("since", since)],
                    )
                    .await?;
                show(&remote, &v, client::stats_text);
                // A name that is not an endpoint (a typo, a deleted one) is answered with
                // its figures, zero or left over; the report first, then the error (exit 1),
                // so that it cannot pass for a healthy endpoint.
                if let Some(name) = endpoint.filter(|e| !e.is_empty())
                    && client::stats_endpoint_missing(&v)
                {
                    anyhow::bail!(
                        "no endpoint `{name}`: the figures above are of the deliveries courier still holds for that name (none, for a name never used)"
                    );
                }
            }
            Command::Send {
                remote,
                event_type,
                endpoint,
                id,
                idempotency_key,
                file,
            } => {
                let payload = read_input(file.as_ref())?;
                let body = client::event_body(
                    &payload,
                    &event_type,
                    endpoint.as_deref(),
                    id.as_deref(),
                    idempotency_key.as_deref(),
                )?;
                let answer = remote
                    .api()?
                    .post_raw(&["v1", "events"], Some(body))
                    .await?;
                // courier answers a repeated idempotency key with the first answer, marked
                // only by this header.
                let replayed = answer
                    .headers
                    .get("idempotent-replayed")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
                let mut v = answer.value;
                if replayed && let Some(o) = v.as_object_mut() {
                    o.insert("idempotent_replayed".into(), true.into());
                }
                show(&remote, &v, |v| client::sent(v, replayed));
            }
            Command::Bench {
                remote,
                events,
                concurrency,
                size,
                rate,
                receiver,
                no_baselines,
                pid,
                drain_timeout,
                request_timeout,
                no_wait,
                backlog,
                durable_dir,
            } => {
                // A usage error, as clap reports its own (exit 2): the smallest size depends
                // on -n (the sequence number's digits).
                let min = crate::bench::min_size(events);
                if size < min {
                    usage_error(
                        &["bench"],
                        clap::error::ErrorKind::ValueValidation,
                        format!(
                            "invalid value '{size}' for '--size <SIZE>': the payload's own fields (send time, sequence number) take {min} bytes with -n {events}; give -s {min} or more"
                        ),
                    );
                }
                let token = remote.token.clone().ok_or_else(|| {
                    anyhow::anyhow!(
                        "courier bench needs --token or COURIER_KEY (ingest and admin scopes)"
                    )
                })?;
                let opts = crate::bench::Options {
                    url: remote.url.clone(),
                    token,
                    events,
                    concurrency,
                    size,
                    rate,
                    receiver,
                    no_baselines,
                    pid,
                    drain_timeout: std::time::Duration::from_secs(drain_timeout),
                    request_timeout: std::time::Duration::from_secs(request_timeout),
                    no_wait,
                    backlog,
                    // The same binary serves the bare baseline in a process of its own.
                    bare_server_exe: std::env::current_exe().ok(),
                    durable_dir,
                };
                let report = crate::bench::run(&opts).await?;
                if remote.json {
                    client::print_json(&crate::bench::json(&report));
                } else {
                    print!("{}", crate::bench::human(&report));
                }
                // The report first, then why the run failed: events not accepted, or
                // accepted and not delivered.
                if !report.problems.is_empty() {
                    anyhow::bail!("{}", report.problems.join("; "));
                }
            }
            _ => unreachable!("local commands are handled before"),
        }
        Ok(())
    })
}

/// Prints courier's answer: its JSON with `--json`, else `human`'s text, in which no control
/// character (from a receiver's answer, say) reaches the terminal.
fn show(remote: &Remote, v: &serde_json::Value, human: impl Fn(&serde_json::Value) -> String) {
    if remote.target.json {
        client::print_json(v);
    } else {
        print!("{}", table::clean(&human(v), true));
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
        // A key's error names the file too, as a reload's does.
        Some(p) => Config::load(p).map_err(|e| match &e {
            crate::config::ConfigError::Invalid { .. } => anyhow::anyhow!("{}: {e}", p.display()),
            _ => e.into(),
        }),
        None => Ok(Config::defaults()),
    }
}

fn check(path: &PathBuf) -> anyhow::Result<()> {
    let config = load(Some(path))?;
    if let Err(errors) = crate::plugins::check(&config.plugins) {
        anyhow::bail!("{}", errors.join("\n"));
    }
    for w in config.warnings() {
        eprintln!("warning: {w}");
    }
    if config.server.data_dir.join("courier.redb").exists() {
        eprintln!(
            "note: endpoints made through the API (kept in {}) are checked against this file when courier starts or reloads it, not here",
            config.server.data_dir.display()
        );
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
        match (&running.created_key, &running.generated_key_path) {
            (Some(key), Some(path)) => println!(
                "courier: no [[keys]] configured; created an all-scopes API key (saved in {}):\n  {key}\nIt is not printed again.",
                path.display()
            ),
            (None, Some(path)) => println!(
                "courier: no [[keys]] configured; using the all-scopes API key saved in {}",
                path.display()
            ),
            _ => {}
        }
        // Handlers first: whoever saw the line below may send SIGTERM at once.
        let mut signals = StopSignals::install().context("cannot handle SIGTERM/SIGINT")?;
        println!("courier listening on http://{}", running.addr);
        let _ = std::io::stdout().flush();
        let stop = running.app.shutdown.clone();
        tokio::spawn(async move {
            signals.next().await;
            tracing::info!("shutdown requested: finishing in-flight attempts");
            stop.cancel();
            // A second signal means now: what was acknowledged is in the journal, and an
            // attempt cut short is made again after the restart. The same handlers take it,
            // so one that comes while the first is being handled is not lost.
            signals.next().await;
            tracing::warn!("second shutdown signal: exiting at once");
            std::process::exit(130);
        });
        running.wait().await;
        Ok(())
    })
}

/// The SIGTERM and SIGINT handlers, installed once for the process's whole life.
struct StopSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<StopSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(StopSignals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(StopSignals {})
        }
    }

    /// Completes on the next SIGTERM or SIGINT.
    async fn next(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
