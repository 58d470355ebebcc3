//! The host subcommands (`status`, `check`, `stage`, `remediate`, `staged`, `tasks`, `task`):
//! one request per target, fanned out in parallel (R3) with `--parallel N` as the bound, a
//! progress bar per host while waiting when stdout is a terminal, and a summary at the end.
//! `remediate` goes one host at a time by default, follows each host's task to its end before
//! the next (so with several hosts it needs `--wait`) and stops the rollout after
//! `--max-failures`.
//!
//! Hosts are untrusted (issue 18). Every host string is parsed into host and port
//! ([`HostAddr`]) before anything is sent; a task id a host returns must look like an id and is
//! percent-encoded into paths; polling long-polls with the agent's wait but never faster than
//! [`MIN_POLL_INTERVAL`] and backs off on errors; `--timeout` bounds the whole command; each
//! host's outcome is printed as soon as it is known, so a hung host withholds nothing but its
//! own result, and Ctrl-C prints what is known; everything a host said is escaped
//! ([`escape()`]) before it reaches the terminal or a progress bar.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal as _, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use vibstage_protocol::api::{Task, TaskResponse, TaskState};
use vibstage_protocol::{Envelope, Image, VibDescriptor};

use super::escape::escape;
use super::{CliError, Context, emit, emit_json};
use crate::client::{AgentClient, ClientError, HostAddr, path_segment};

/// Up to this many hosts, every host's outcome is printed; beyond it only the hosts that did not
/// succeed (and every host with `--verbose`), as SPEC §3 asks of "many hosts".
const SMALL_FLEET: usize = 10;

/// The most characters of one printed host line: enough for any honest message, short enough
/// that a host cannot flood the terminal (`--json` has everything).
const LINE_CHARS: usize = 2000;

/// The most characters of a task step shown in a progress bar.
const STEP_CHARS: usize = 60;

/// Seconds of the agent-side long-poll (`?wait=`); the agent answers earlier when the task ends.
const POLL_WAIT_SECS: u64 = 30;

/// The deadline of one long-poll request: the wait plus room for a slow answer.
const POLL_TIMEOUT: Duration = Duration::from_secs(POLL_WAIT_SECS + 30);

/// Never poll one host faster than this, whatever it answers (issue 18, item 3).
pub const MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Polling errors in a row (unreachable, 5xx) after which a host's task is given up on.
const MAX_POLL_ERRORS: u32 = 6;

/// The longest pause between polls after errors.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The longest task id accepted from a host or the command line.
const MAX_TASK_ID: usize = 128;

/// `check --image FILE`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The signed image (e.g. `depot/images/NAME.json`).
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,
}

/// `stage` and `remediate`.
#[derive(Debug, clap::Args)]
pub struct LifecycleArgs {
    /// The signed image.
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,
    /// Base URL of the depot the agents fetch from.
    #[arg(long, value_name = "URL")]
    pub depot: String,
    /// Wait for the task to end and report its result (required by `remediate` with several
    /// hosts, which finishes each host before it starts the next).
    #[arg(long)]
    pub wait: bool,
    /// (remediate) Stop the rollout after this many failed hosts.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub max_failures: usize,
}

/// `staged` / `staged rm DIGEST`.
#[derive(Debug, clap::Args)]
pub struct StagedArgs {
    /// `rm DIGEST` deletes staged content.
    #[command(subcommand)]
    pub command: Option<StagedCommand>,
}

/// `staged` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum StagedCommand {
    /// Delete one staged image's content.
    Rm {
        /// `sha256:<hex>` of the image.
        digest: String,
    },
}

/// `task ID [--wait]`.
#[derive(Debug, clap::Args)]
pub struct TaskArgs {
    /// Task id.
    pub id: String,
    /// Wait until it ends.
    #[arg(long)]
    pub wait: bool,
}

/// What one host's operation produced.
struct Outcome {
    line: String,
    json: Value,
    failed: bool,
    facts: Facts,
}

/// What the summary counts across hosts, when the command learns it.
#[derive(Default)]
struct Facts {
    /// Compliance status.
    compliance: Option<String>,
    /// The staged mark.
    staged: Option<bool>,
    /// Notification codes.
    notifications: Vec<String>,
}

fn ok(line: String, json: Value, facts: Facts) -> Outcome {
    Outcome {
        line,
        json,
        failed: false,
        facts,
    }
}

/// Refuses task ids that are not plain ids: a host could otherwise steer later requests with an
/// id such as `../status#` (issue 18, item 7).
fn check_task_id(id: &str) -> Result<(), String> {
    let plain = !id.is_empty()
        && id.len() <= MAX_TASK_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && id.bytes().any(|b| b != b'.');
    if plain {
        Ok(())
    } else {
        Err(format!(
            "task id \"{}\" is not 1 to {MAX_TASK_ID} letters, digits, '-', '_' or '.'",
            escape(id, 80)
        ))
    }
}

/// The targets: the local socket, or every `--host` and `--hosts` line parsed into host and
/// port. A line that is not a host is a usage error naming its line; a host named twice is
/// contacted once, with a warning.
fn targets(ctx: &Context) -> Result<Vec<AgentClient>, CliError> {
    let mut named: Vec<(String, String)> = ctx
        .target
        .host
        .iter()
        .map(|h| ("--host".to_owned(), h.clone()))
        .collect();
    if let Some(file) = &ctx.target.hosts {
        let text = super::read_config_text("hosts file", file)?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if !line.is_empty() && !line.starts_with('#') {
                named.push((
                    format!("{} line {}", file.display(), n + 1),
                    line.to_owned(),
                ));
            }
        }
    }
    let setup = |e: ClientError| CliError::Usage(e.to_string());
    if named.is_empty() {
        let socket = ctx
            .target
            .socket
            .clone()
            .unwrap_or_else(|| super::DEFAULT_SOCKET.into());
        return Ok(vec![AgentClient::local(&socket).map_err(setup)?]);
    }
    let mut parsed = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    for (source, raw) in named {
        let addr: HostAddr = raw.parse().map_err(|why| {
            CliError::Usage(format!(
                "{source}: \"{}\" is not HOST or HOST:PORT: {why}",
                escape(&raw, 100)
            ))
        })?;
        if let Some(first) = seen.get(&addr.authority()) {
            eprintln!(
                "warning: {source} names {addr} again (first named by {first}); it is contacted once"
            );
            continue;
        }
        seen.insert(addr.authority(), source);
        parsed.push((addr, raw));
    }
    let Some(tls_dir) = &ctx.target.tls_dir else {
        return Err(CliError::Usage(
            "--host/--hosts need --tls-dir DIR (ca.pem, client.pem, client.key)".into(),
        ));
    };
    parsed
        .iter()
        .map(|(addr, raw)| AgentClient::remote(addr, raw, tls_dir).map_err(setup))
        .collect()
}

fn read_image(path: &PathBuf) -> Result<Envelope, CliError> {
    let text = super::read_config_text("image", path)?;
    serde_json::from_str(&text)
        .map_err(|e| CliError::config("image", path, format!("not a signed image envelope: {e}")))
}

/// The sum of the VIB sizes an image names: no honest host needs more bytes for it, so a larger
/// `bytes_total` from a host is not believed.
fn image_bytes(image: &Envelope) -> Option<u64> {
    let image: Image = serde_json::from_slice(&image.payload).ok()?;
    image
        .components
        .iter()
        .flat_map(|c| &c.vibs)
        .try_fold(0u64, |sum, vib| {
            let d: VibDescriptor = serde_json::from_slice(&vib.payload).ok()?;
            sum.checked_add(d.size)
        })
}

/// What an operation may tell the fan-out about its host while it runs.
#[derive(Clone, Default)]
pub(crate) struct Watch {
    /// The host's progress bar, when bars are shown.
    bar: Option<ProgressBar>,
    /// The task the host is running for us, named when the host is cut off or interrupted.
    task: Arc<Mutex<Option<String>>>,
    /// The most bytes a task of this command can honestly need ([`image_bytes`]).
    max_bytes: Option<u64>,
}

impl Watch {
    /// A watch that only moves `bar` (the demo's single agent).
    pub(crate) fn with_bar(bar: Option<ProgressBar>) -> Watch {
        Watch {
            bar,
            ..Watch::default()
        }
    }

    fn started(&self, id: &str) {
        if let Ok(mut task) = self.task.lock() {
            *task = Some(id.to_owned());
        }
    }

    fn task(&self) -> Option<String> {
        self.task.lock().ok().and_then(|t| t.clone())
    }

    /// Moves the bar along with what the host reports, bounded by what the image can need.
    fn progress(&self, task: &Task) {
        let Some(bar) = &self.bar else { return };
        let total = self.max_bytes.map_or(task.progress.bytes_total, |m| {
            task.progress.bytes_total.min(m)
        });
        bar.set_length(total);
        bar.set_position(task.progress.bytes_done.min(total));
        bar.set_message(escape(task.step.as_deref().unwrap_or_default(), STEP_CHARS));
    }
}

/// How one host ended.
enum End {
    /// The operation ran to an answer (or an error).
    Done(Result<Outcome, ClientError>),
    /// Not started: the rollout stopped after too many failures.
    Skipped,
    /// Cut off by `--timeout`; `started` says whether a request had been sent.
    TimedOut { started: bool, task: Option<String> },
    /// Cut off by Ctrl-C.
    Interrupted { started: bool, task: Option<String> },
}

/// The outcome classes the summary counts.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Ok,
    Failed,
    Unreachable,
    Skipped,
    TimedOut,
    Interrupted,
}

impl Class {
    fn word(self) -> &'static str {
        match self {
            Class::Ok => "ok",
            Class::Failed => "failed",
            Class::Unreachable => "unreachable or refused",
            Class::Skipped => "skipped",
            Class::TimedOut => "timed out",
            Class::Interrupted => "interrupted",
        }
    }
}

/// The printed line (unescaped), the `--json` entry and the class of one host's end.
fn describe(end: &End, timeout: Option<Duration>) -> (String, Value, Class) {
    let after = timeout.map_or(String::new(), |t| format!(" after {}s", t.as_secs()));
    match end {
        End::Done(Ok(o)) => (
            o.line.clone(),
            o.json.clone(),
            if o.failed { Class::Failed } else { Class::Ok },
        ),
        End::Done(Err(e)) => (
            format!("error: {}: {}", e.code(), e.message()),
            json!({"error": {"code": e.code(), "message": e.message()}}),
            if e.is_refusal() {
                Class::Unreachable
            } else {
                Class::Failed
            },
        ),
        End::Skipped => (
            "skipped (rollout stopped after too many failures)".into(),
            json!({"skipped": "rollout stopped after too many failures"}),
            Class::Skipped,
        ),
        End::TimedOut { started, task } => {
            let line = match (started, task) {
                (_, Some(t)) => {
                    format!("timed out{after}; task {t} may still be running on the host")
                }
                (true, None) => format!("timed out{after} waiting for an answer"),
                (false, None) => format!("timed out{after} before it was started"),
            };
            let secs = timeout.map(|t| t.as_secs());
            (
                line,
                json!({"timed_out": {"after_secs": secs, "started": started, "task": task}}),
                Class::TimedOut,
            )
        }
        End::Interrupted { started, task } => {
            let line = match (started, task) {
                (_, Some(t)) => format!("interrupted; task {t} continues on the host"),
                (true, None) => "interrupted while waiting for an answer".into(),
                (false, None) => "interrupted before it was started".into(),
            };
            (
                line,
                json!({"interrupted": {"started": started, "task": task}}),
                Class::Interrupted,
            )
        }
    }
}

/// What the dispatcher tells the printing loop.
enum Event {
    /// A request is about to be sent to the host.
    Started,
    /// The host ended.
    Ended(End),
}

/// Starts `op` on every target in order, at most `parallel` at once, skipping the rest once
/// `max_failures` hosts failed. Dropping (aborting) the returned future aborts every host.
async fn dispatch<F, Fut>(
    clients: Vec<(AgentClient, Watch)>,
    parallel: usize,
    max_failures: Option<usize>,
    op: Arc<F>,
    tx: mpsc::UnboundedSender<(usize, Event)>,
) where
    F: Fn(AgentClient, Watch) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Outcome, ClientError>> + Send + 'static,
{
    let limit = Arc::new(tokio::sync::Semaphore::new(parallel));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut running = tokio::task::JoinSet::new();
    for (i, (client, watch)) in clients.into_iter().enumerate() {
        // Taking the permit here, in target order, makes `--parallel 1` go host by host in the
        // order given; a host's permit is released only after its failure is counted.
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        if max_failures.is_some_and(|m| failures.load(Ordering::SeqCst) >= m) {
            let _ = tx.send((i, Event::Ended(End::Skipped)));
            continue;
        }
        let _ = tx.send((i, Event::Started));
        let (tx, failures, op) = (tx.clone(), failures.clone(), op.clone());
        running.spawn(async move {
            let result = op(client, watch.clone()).await;
            if let Some(bar) = &watch.bar {
                bar.finish_and_clear();
            }
            if !matches!(&result, Ok(o) if !o.failed) {
                failures.fetch_add(1, Ordering::SeqCst);
            }
            drop(permit);
            let _ = tx.send((i, Event::Ended(End::Done(result))));
        });
    }
    while running.join_next().await.is_some() {}
}

/// Sums host byte counts for the total bar without wrapping: a host reporting `u64::MAX` makes
/// the total large, not small.
fn saturating_total(values: impl Iterator<Item = u64>) -> u64 {
    values.fold(0u64, u64::saturating_add)
}

/// Writes one host's line, escaped and bounded, above the progress bars.
fn print_line(
    out: &mut dyn Write,
    bars: Option<&MultiProgress>,
    name: &str,
    line: &str,
) -> Result<(), CliError> {
    let text = escape(&format!("{name}: {line}"), LINE_CHARS);
    match bars {
        Some(m) => m.suspend(|| emit(out, &text)),
        None => emit(out, &text),
    }
}

/// Runs `op` on every target with at most `parallel` at once; `max_failures` stops starting new
/// hosts once that many have failed. Prints each host's outcome as it ends, the summary at the
/// end (or at `--timeout`, or Ctrl-C), and maps the results to an exit code.
fn fan_out<F, Fut>(
    ctx: &Context,
    out: &mut dyn Write,
    clients: Vec<AgentClient>,
    default_parallel: Option<usize>,
    max_failures: Option<usize>,
    max_bytes: Option<u64>,
    op: F,
) -> Result<(), CliError>
where
    F: Fn(AgentClient, Watch) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Outcome, ClientError>> + Send + 'static,
{
    let parallel = ctx
        .target
        .parallel
        .map(|n| n.get())
        .or(default_parallel)
        .unwrap_or(clients.len())
        .max(1);
    let timeout = ctx.target.timeout;
    let names: Vec<String> = clients.iter().map(|c| c.name.clone()).collect();
    let every_line = ctx.target.verbose || names.len() <= SMALL_FLEET;
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| CliError::io("start", "the async runtime", e))?;
    let bars = (std::io::stdout().is_terminal() && !ctx.json).then(MultiProgress::new);
    let (ends, interrupted) = runtime.block_on(async {
        let deadline = timeout.map(|t| Instant::now() + t);
        // With several hosts, a total bar sums the hosts' bars (finished ones keep their counts).
        let total = bars.as_ref().filter(|_| clients.len() > 1).map(|m| {
            let total = m.add(ProgressBar::new(0));
            total.set_style(bar_style());
            total.set_prefix("total");
            total
        });
        let mut watches = Vec::new();
        let mut host_bars = Vec::new();
        for client in clients {
            let bar = bars.as_ref().map(|m| {
                let bar = match &total {
                    Some(total) => m.insert_before(total, ProgressBar::new(0)),
                    None => m.add(ProgressBar::new(0)),
                };
                bar.set_style(bar_style());
                bar.set_prefix(escape(&client.name, 40));
                host_bars.push(bar.clone());
                bar
            });
            let watch = Watch {
                bar,
                max_bytes,
                ..Watch::default()
            };
            watches.push((client, watch));
        }
        let task_of: Vec<Watch> = watches.iter().map(|(_, w)| w.clone()).collect();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let dispatcher = tokio::spawn(dispatch(watches, parallel, max_failures, Arc::new(op), tx));
        let ticker = total.clone().map(|total| {
            tokio::spawn(async move {
                loop {
                    total.set_length(saturating_total(
                        host_bars.iter().filter_map(ProgressBar::length),
                    ));
                    total.set_position(saturating_total(
                        host_bars.iter().map(ProgressBar::position),
                    ));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        });
        let mut ends: Vec<Option<End>> = names.iter().map(|_| None).collect();
        let mut started = vec![false; names.len()];
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let mut ctrl_c_armed = true;
        let mut cut: Option<bool> = None; // Some(true) = interrupted, Some(false) = timed out
        while cut.is_none() {
            tokio::select! {
                event = rx.recv() => match event {
                    Some((i, Event::Started)) => started[i] = true,
                    Some((i, Event::Ended(end))) => {
                        let (line, _, class) = describe(&end, timeout);
                        if !ctx.json && (every_line || class != Class::Ok) {
                            print_line(out, bars.as_ref(), &names[i], &line)?;
                        }
                        ends[i] = Some(end);
                    }
                    None => break,
                },
                () = sleep_until(deadline) => cut = Some(false),
                signal = &mut ctrl_c, if ctrl_c_armed => match signal {
                    Ok(()) => cut = Some(true),
                    // No handler could be installed: Ctrl-C keeps its default effect.
                    Err(_) => ctrl_c_armed = false,
                },
            }
        }
        dispatcher.abort();
        if let Some(ticker) = ticker {
            ticker.abort();
        }
        if let Some(total) = total {
            total.finish_and_clear();
        }
        for (i, end) in ends.iter_mut().enumerate() {
            if end.is_none() {
                if let Some(bar) = &task_of[i].bar {
                    bar.finish_and_clear();
                }
                let (started, task) = (started[i], task_of[i].task());
                let cut_end = if cut == Some(true) {
                    End::Interrupted { started, task }
                } else {
                    End::TimedOut { started, task }
                };
                let (line, _, _) = describe(&cut_end, timeout);
                if !ctx.json {
                    print_line(out, bars.as_ref(), &names[i], &line)?;
                }
                *end = Some(cut_end);
            }
        }
        Ok::<_, CliError>((ends, cut == Some(true)))
    })?;
    // Host tasks may still be blocked in a request; do not wait for them.
    runtime.shutdown_background();

    let mut report = serde_json::Map::new();
    let mut classes = Vec::new();
    let mut facts = Vec::new();
    for (name, end) in names.iter().zip(ends) {
        let Some(end) = end else { continue };
        let (_, value, class) = describe(&end, timeout);
        classes.push((name.as_str(), class));
        if let End::Done(Ok(o)) = end {
            facts.push(o.facts);
        }
        report.insert(name.clone(), value);
    }
    if ctx.json {
        emit_json(out, &Value::Object(report))?;
    } else if names.len() > 1 {
        for line in summary(&classes, &facts) {
            emit(out, escape(&line, LINE_CHARS))?;
        }
    }
    let any = |c: Class| classes.iter().any(|(_, k)| *k == c);
    if interrupted {
        Err(CliError::Interrupted)
    } else if any(Class::Unreachable) {
        Err(CliError::Unreachable {
            target: "one or more hosts".into(),
            message: "unreachable or refused the request".into(),
        })
    } else if classes.iter().any(|(_, k)| *k != Class::Ok) {
        let message = if any(Class::TimedOut) {
            "the operation failed or timed out on at least one host"
        } else {
            "the operation failed on at least one host"
        };
        Err(CliError::Failed {
            code: vibstage_protocol::ErrorCode::Internal,
            message: message.into(),
        })
    } else {
        Ok(())
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The most distinct notification codes the summary lists.
const SUMMARY_CODES: usize = 20;

/// SPEC §3's summary of several hosts: counts by outcome, compliance, staged mark and
/// notifications, then the hosts that did not succeed.
fn summary(classes: &[(&str, Class)], facts: &[Facts]) -> Vec<String> {
    let mut lines = Vec::new();
    let mut by_class: BTreeMap<Class, usize> = BTreeMap::new();
    for (_, c) in classes {
        *by_class.entry(*c).or_default() += 1;
    }
    let counts: Vec<String> = by_class
        .iter()
        .map(|(c, n)| format!("{n} {}", c.word()))
        .collect();
    lines.push(format!(
        "summary: {} hosts: {}",
        classes.len(),
        counts.join(", ")
    ));
    let mut compliance: BTreeMap<&str, usize> = BTreeMap::new();
    let mut staged: BTreeMap<bool, usize> = BTreeMap::new();
    let mut codes: BTreeMap<&str, usize> = BTreeMap::new();
    for f in facts {
        if let Some(c) = &f.compliance {
            *compliance.entry(c.as_str()).or_default() += 1;
        }
        if let Some(s) = f.staged {
            *staged.entry(s).or_default() += 1;
        }
        for code in &f.notifications {
            *codes.entry(code.as_str()).or_default() += 1;
        }
    }
    let join = |m: Vec<String>| m.join(", ");
    if !compliance.is_empty() {
        lines.push(format!(
            "  compliance: {}",
            join(compliance.iter().map(|(k, n)| format!("{k} {n}")).collect())
        ));
    }
    if !staged.is_empty() {
        lines.push(format!(
            "  staged: {}",
            join(staged.iter().map(|(k, n)| format!("{k} {n}")).collect())
        ));
    }
    if !codes.is_empty() {
        let mut shown: Vec<String> = codes
            .iter()
            .take(SUMMARY_CODES)
            .map(|(k, n)| format!("{} {n}", escape(k, 60)))
            .collect();
        if codes.len() > SUMMARY_CODES {
            shown.push(format!("and {} more codes", codes.len() - SUMMARY_CODES));
        }
        lines.push(format!("  notifications: {}", shown.join(", ")));
    }
    let not_ok: Vec<String> = classes
        .iter()
        .filter(|(_, c)| *c != Class::Ok)
        .map(|(name, c)| format!("{name} ({})", c.word()))
        .collect();
    if !not_ok.is_empty() {
        lines.push(format!("  not ok: {}", not_ok.join(", ")));
    }
    lines
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>20} [{bar:30}] {bytes}/{total_bytes} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn word<T: serde::Serialize>(v: &T) -> String {
    to_json(v).as_str().unwrap_or("?").to_owned()
}

fn codes(notifications: &[vibstage_protocol::api::Notification]) -> Vec<String> {
    notifications.iter().map(|n| n.code.clone()).collect()
}

/// `status`.
pub fn status(ctx: &Context, out: &mut dyn Write) -> Result<(), CliError> {
    let clients = targets(ctx)?;
    fan_out(
        ctx,
        out,
        clients,
        None,
        None,
        None,
        |client, _| async move {
            let s: vibstage_protocol::api::HostStatus = client.get("/v1/status").await?;
            let line = format!(
                "{} compliance={} staged={} staging={} firmware={} persistent={} bytes={} maintenance={} installed={} scratch_free={}{}",
                s.host_id,
                word(&s.compliance.status),
                s.staging.staged,
                word(&s.staging.state),
                word(&s.staging.firmware),
                s.staging.persistent,
                s.staging.bytes,
                s.maintenance.active,
                s.installed
                    .image
                    .as_ref()
                    .map_or("none".into(), |i| format!("{}#{}", i.name, i.serial)),
                s.scratch.free_bytes,
                s.running_task
                    .as_ref()
                    .map_or(String::new(), |t| format!(" task={t}")),
            );
            let facts = Facts {
                compliance: Some(word(&s.compliance.status)),
                staged: Some(s.staging.staged),
                notifications: codes(&s.compliance.notifications),
            };
            Ok(ok(line, to_json(&s), facts))
        },
    )
}

/// `check --image FILE`.
pub fn check(args: CheckArgs, ctx: &Context, out: &mut dyn Write) -> Result<(), CliError> {
    let image = Arc::new(read_image(&args.image)?);
    let clients = targets(ctx)?;
    fan_out(ctx, out, clients, None, None, None, move |client, _| {
        let image = image.clone();
        async move {
            let (_, r): (u16, vibstage_protocol::api::ComplianceReport) = client
                .post("/v1/compliance/check", &json!({"image": *image}))
                .await?;
            let changes: Vec<String> = r
                .components
                .iter()
                .map(|c| format!("{} {}", c.component, word(&c.change)))
                .collect();
            let line = format!(
                "{} impact={} {}",
                word(&r.status),
                word(&r.impact),
                changes.join(", ")
            );
            let facts = Facts {
                compliance: Some(word(&r.status)),
                staged: None,
                notifications: codes(&r.notifications),
            };
            Ok(ok(line, to_json(&r), facts))
        }
    })
}

/// Follows `task` until it ends: long-polls the agent with `?wait=`, never more often than
/// [`MIN_POLL_INTERVAL`], backs off on transient errors and gives up after
/// [`MAX_POLL_ERRORS`] of them in a row. An answer about another task, or a task id that is not
/// a plain id, is a protocol violation.
pub(crate) async fn follow(
    client: &AgentClient,
    mut task: Task,
    watch: &Watch,
) -> Result<Task, ClientError> {
    check_task_id(&task.id).map_err(ClientError::Protocol)?;
    watch.started(&task.id);
    watch.progress(&task);
    let path = format!("/v1/tasks/{}?wait={POLL_WAIT_SECS}", path_segment(&task.id));
    let mut errors = 0u32;
    while !task.state.is_final() {
        let asked = Instant::now();
        match client.get_within::<Task>(&path, POLL_TIMEOUT).await {
            Ok(next) => {
                if next.id != task.id {
                    return Err(ClientError::Protocol(format!(
                        "asked about task {}, answered about task \"{}\"",
                        task.id, next.id
                    )));
                }
                errors = 0;
                task = next;
                watch.progress(&task);
                if !task.state.is_final() {
                    tokio::time::sleep_until(asked + MIN_POLL_INTERVAL).await;
                }
            }
            Err(e) if e.is_transient() && errors + 1 < MAX_POLL_ERRORS => {
                errors += 1;
                let backoff = MIN_POLL_INTERVAL
                    .saturating_mul(1 << errors.min(5))
                    .min(MAX_BACKOFF);
                tokio::time::sleep_until(asked + backoff).await;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(task)
}

/// A task's outcome. `succeeded` counts only with no error: a host that says both is not
/// believed.
fn task_outcome(task: &Task) -> Outcome {
    let failed = task.state != TaskState::Succeeded || task.error.is_some();
    let line = match &task.error {
        Some(e) if task.state == TaskState::Succeeded => format!(
            "failed: task {} claims to have succeeded but reports an error: {}: {}",
            task.id, e.code, e.message
        ),
        Some(e) => format!(
            "{} task {}: {}: {}",
            word(&task.state),
            task.id,
            e.code,
            e.message
        ),
        None => format!(
            "{} task {} ({} bytes, {} downloaded)",
            word(&task.state),
            task.id,
            task.progress.bytes_total,
            task.bytes_downloaded
        ),
    };
    Outcome {
        line,
        json: to_json(task),
        failed,
        facts: Facts {
            notifications: codes(&task.notifications),
            ..Facts::default()
        },
    }
}

/// `stage` and `remediate`.
pub fn lifecycle(
    remediate: bool,
    args: LifecycleArgs,
    ctx: &Context,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let image = Arc::new(read_image(&args.image)?);
    let clients = targets(ctx)?;
    let wait = args.wait;
    if remediate && !wait && clients.len() > 1 {
        return Err(CliError::Usage(
            "remediate with several hosts finishes each host before it starts the next, so it \
             needs --wait (without it every host would enter maintenance mode at once)"
                .into(),
        ));
    }
    let max_bytes = image_bytes(&image);
    let depot = Arc::new(args.depot);
    let path = if remediate {
        "/v1/remediate"
    } else {
        "/v1/stage"
    };
    let (parallel, max_failures) = if remediate {
        (Some(1), Some(args.max_failures.max(1)))
    } else {
        (None, None)
    };
    fan_out(
        ctx,
        out,
        clients,
        parallel,
        max_failures,
        max_bytes,
        move |client, watch| {
            let (image, depot) = (image.clone(), depot.clone());
            async move {
                let (_, r): (u16, TaskResponse) = client
                    .post(path, &json!({"image": *image, "depot": *depot}))
                    .await?;
                let Some(task) = r.task else {
                    let why: Vec<&str> =
                        r.notifications.iter().map(|n| n.message.as_str()).collect();
                    let facts = Facts {
                        notifications: codes(&r.notifications),
                        ..Facts::default()
                    };
                    return Ok(ok(
                        format!("nothing to do: {}", why.join("; ")),
                        to_json(&r),
                        facts,
                    ));
                };
                check_task_id(&task.id).map_err(ClientError::Protocol)?;
                if !wait {
                    return Ok(ok(
                        format!("task {} started", task.id),
                        to_json(&task),
                        Facts::default(),
                    ));
                }
                let task = follow(&client, task, &watch).await?;
                Ok(task_outcome(&task))
            }
        },
    )
}

/// `staged` and `staged rm DIGEST`.
pub fn staged(args: StagedArgs, ctx: &Context, out: &mut dyn Write) -> Result<(), CliError> {
    match args.command {
        None => {
            let clients = targets(ctx)?;
            fan_out(
                ctx,
                out,
                clients,
                None,
                None,
                None,
                |client, _| async move {
                    let list: vibstage_protocol::api::StagedList = client.get("/v1/staged").await?;
                    let items: Vec<String> = list
                        .staged
                        .iter()
                        .map(|s| {
                            format!(
                                "{} {}#{} {} {} bytes {}",
                                s.image.digest,
                                s.image.name,
                                s.image.serial,
                                word(&s.state),
                                s.bytes,
                                if s.persistent {
                                    "persistent"
                                } else {
                                    "volatile"
                                }
                            )
                        })
                        .collect();
                    let line = if items.is_empty() {
                        "nothing staged".into()
                    } else {
                        items.join("; ")
                    };
                    Ok(ok(line, to_json(&list), Facts::default()))
                },
            )
        }
        Some(StagedCommand::Rm { digest }) => {
            let digest: vibstage_protocol::ImageDigest = digest
                .parse()
                .map_err(|e| CliError::Usage(format!("{e}")))?;
            let clients = targets(ctx)?;
            fan_out(
                ctx,
                out,
                clients,
                None,
                None,
                None,
                move |client, _| async move {
                    let v: Value = client
                        .delete(&format!("/v1/staged/{}", path_segment(&digest.to_string())))
                        .await?;
                    Ok(ok(format!("deleted {digest}"), v, Facts::default()))
                },
            )
        }
    }
}

/// `tasks`.
pub fn tasks(ctx: &Context, out: &mut dyn Write) -> Result<(), CliError> {
    let clients = targets(ctx)?;
    fan_out(
        ctx,
        out,
        clients,
        None,
        None,
        None,
        |client, _| async move {
            let list: vibstage_protocol::api::TaskList = client.get("/v1/tasks").await?;
            let items: Vec<String> = list
                .tasks
                .iter()
                .map(|t| format!("{} {} {}", t.id, word(&t.kind), word(&t.state)))
                .collect();
            Ok(ok(
                format!("{} task(s): {}", items.len(), items.join("; ")),
                to_json(&list),
                Facts::default(),
            ))
        },
    )
}

/// `task ID [--wait]`.
pub fn task(args: TaskArgs, ctx: &Context, out: &mut dyn Write) -> Result<(), CliError> {
    check_task_id(&args.id).map_err(CliError::Usage)?;
    let (id, wait) = (Arc::new(args.id), args.wait);
    let clients = targets(ctx)?;
    fan_out(ctx, out, clients, None, None, None, move |client, watch| {
        let id = id.clone();
        async move {
            let task: Task = client
                .get(&format!("/v1/tasks/{}", path_segment(&id)))
                .await?;
            if task.id != *id {
                return Err(ClientError::Protocol(format!(
                    "asked about task {id}, answered about task \"{}\"",
                    task.id
                )));
            }
            let task = if wait {
                follow(&client, task, &watch).await?
            } else {
                task
            };
            Ok(task_outcome(&task))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_must_be_plain() {
        assert!(check_task_id("0123456789abcdef").is_ok());
        assert!(check_task_id("task-1.2_3").is_ok());
        for bad in [
            "",
            ".",
            "..",
            "../status#",
            "a/b",
            "a?wait=0",
            "a b",
            "\u{1b}[2J",
        ] {
            assert!(check_task_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_task_id(&"a".repeat(MAX_TASK_ID + 1)).is_err());
    }

    #[test]
    fn total_bar_sum_saturates_instead_of_wrapping() {
        assert_eq!(saturating_total([u64::MAX, 5].into_iter()), u64::MAX);
        assert_eq!(saturating_total([1, 2, 3].into_iter()), 6);
    }

    #[test]
    fn a_task_claiming_success_with_an_error_is_a_failure() {
        let now = time::OffsetDateTime::now_utc();
        let task = Task {
            id: "t1".into(),
            kind: vibstage_protocol::api::TaskKind::Stage,
            state: TaskState::Succeeded,
            progress: Default::default(),
            error: Some(vibstage_protocol::api::ErrorDetail::new(
                vibstage_protocol::ErrorCode::Internal,
                "lie",
            )),
            created_at: now,
            updated_at: now,
            image: None,
            bytes_downloaded: 0,
            notifications: vec![],
            step: None,
        };
        let o = task_outcome(&task);
        assert!(o.failed);
        assert!(o.line.starts_with("failed:"), "{}", o.line);
    }

    #[test]
    fn summary_counts_outcomes_and_names_the_hosts_that_did_not_succeed() {
        let classes = [("a", Class::Ok), ("b", Class::TimedOut), ("c", Class::Ok)];
        let facts = [
            Facts {
                compliance: Some("staged".into()),
                staged: Some(true),
                notifications: vec!["firmware_staging_unsupported".into()],
            },
            Facts::default(),
        ];
        let lines = summary(&classes, &facts);
        assert_eq!(lines[0], "summary: 3 hosts: 2 ok, 1 timed out");
        assert!(
            lines.contains(&"  compliance: staged 1".to_owned()),
            "{lines:?}"
        );
        assert!(
            lines.contains(&"  not ok: b (timed out)".to_owned()),
            "{lines:?}"
        );
    }
}
