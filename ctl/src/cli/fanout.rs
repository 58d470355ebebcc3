//! The fan-out behind every host subcommand: one operation per target, at most `--parallel` at
//! once, in target order; `remediate`'s `--max-failures` stops starting hosts. Each host's
//! outcome is printed the moment it is known, so a hung host withholds only its own result;
//! `--timeout` and Ctrl-C cut off the hosts still running and print what is known; then the
//! summary of SPEC §3 and one exit code. Everything printed passes through [`escape()`]: lines
//! carry what hosts said.
//!
//! On a terminal each host has a line from the start (waiting, sending, retrying and why), which
//! becomes a bar once the host reports a size, under a total with rate and time left; sizes are
//! binary units everywhere ([`human_bytes`]), so final lines read like the bars (issue 17).
//! `status` prints a table (a header, then one row per host) instead of `host: line`.

use std::collections::BTreeMap;
use std::io::{IsTerminal as _, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;
use vibstage_protocol::api::Task;

use super::escape::escape;
use super::{CliError, Context, emit, emit_json};
use crate::client::{AgentClient, ClientError};

/// Up to this many hosts, every host's outcome is printed; beyond it only the hosts that did not
/// succeed (and every host with `--verbose`), as SPEC §3 asks of "many hosts".
const SMALL_FLEET: usize = 10;

/// How often a host of a fleet reports its progress for the total bar, seconds.
const FLEET_PROGRESS_SECS: u64 = 5;

/// The most characters of one printed host line: enough for any honest message, short enough
/// that a host cannot flood the terminal (`--json` has everything).
const LINE_CHARS: usize = 2000;

/// The most characters of a task step shown in a progress bar.
const STEP_CHARS: usize = 60;

/// What one host's operation produced.
pub(super) struct Outcome {
    /// The host's line (without the host name), unescaped.
    pub(super) line: String,
    /// The host's `--json` entry.
    pub(super) json: Value,
    /// Whether the operation failed on the host (exit 1, counts for `--max-failures`).
    pub(super) failed: bool,
    /// What the summary counts.
    pub(super) facts: Facts,
    /// Lines printed under the host's line (one per task, per staged image), unescaped.
    pub(super) more: Vec<String>,
}

/// What the summary counts across hosts, when the command learns it.
#[derive(Default)]
pub(super) struct Facts {
    /// Compliance status.
    pub(super) compliance: Option<String>,
    /// The staged mark.
    pub(super) staged: Option<bool>,
    /// Notifications, as (code, message): counted by code in the summary, and printed under
    /// the host's line, since a notification is how a host says why `staged` stays false
    /// (issue 17, item 4).
    pub(super) notifications: Vec<(String, String)>,
}

/// A successful outcome.
pub(super) fn ok(line: String, json: Value, facts: Facts) -> Outcome {
    Outcome {
        line,
        json,
        failed: false,
        facts,
        more: Vec::new(),
    }
}

/// What an operation may tell the fan-out about its host while it runs.
#[derive(Clone, Default)]
pub(crate) struct Watch {
    /// The host's progress bar, when bars are shown. It reads as a status line ("sending the
    /// request", "retrying: …") until the task's size is known, then as a bar with sizes: a
    /// bar of `0 B/0 B` drawn full says nothing true.
    bar: Option<ProgressBar>,
    /// Whether `bar` shows sizes yet.
    sized: Arc<std::sync::atomic::AtomicBool>,
    /// The task the host is running for us, named when the host is cut off or interrupted.
    task: Arc<Mutex<Option<String>>>,
    /// The most bytes a task of this command can honestly need ([`image_bytes`]).
    max_bytes: Option<u64>,
    /// `bar` is not drawn, only summed into the total (a fleet of more than [`SMALL_FLEET`]).
    hidden: bool,
}

impl Watch {
    /// A watch that only moves `bar` (the demo's single agent).
    pub(crate) fn with_bar(bar: Option<ProgressBar>) -> Watch {
        Watch {
            bar,
            ..Watch::default()
        }
    }

    /// How long a poll of the host's task may wait when a bar shows its progress: a second for
    /// a drawn bar; for a fleet, whose hosts only feed the total bar, [`FLEET_PROGRESS_SECS`]
    /// (a thousand hosts asking every second would be a polling storm for one bar). `None`
    /// without a bar: the poll waits for the task's end.
    pub(crate) fn progress_wait(&self) -> Option<u64> {
        match (&self.bar, self.hidden) {
            (None, _) => None,
            (Some(_), false) => Some(1),
            (Some(_), true) => Some(FLEET_PROGRESS_SECS),
        }
    }

    /// Names the task the host runs for us.
    pub(super) fn started(&self, id: &str) {
        if let Ok(mut task) = self.task.lock() {
            *task = Some(id.to_owned());
        }
    }

    fn task(&self) -> Option<String> {
        self.task.lock().ok().and_then(|t| t.clone())
    }

    /// Moves the bar along with what the host reports, bounded by what the image can need.
    pub(super) fn progress(&self, task: &Task) {
        let Some(bar) = &self.bar else { return };
        let total = self.max_bytes.map_or(task.progress.bytes_total, |m| {
            task.progress.bytes_total.min(m)
        });
        let step = task.step.as_deref().unwrap_or_default();
        let message = if step.is_empty() {
            format!("task {} {}", task.id, state_word(task))
        } else {
            format!("task {} {}", task.id, step)
        };
        bar.set_message(escape(&message, STEP_CHARS));
        if total == 0 {
            return;
        }
        if !self.sized.swap(true, Ordering::SeqCst) {
            bar.set_style(bar_style());
        }
        bar.set_length(total);
        bar.set_position(task.progress.bytes_done.min(total));
    }

    /// Says on the host's bar what it is waiting for ("sending the request", "retrying in 4s:
    /// unreachable: …"), so a host that is down or retrying shows why.
    pub(super) fn note(&self, text: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(escape(text, STEP_CHARS + 60));
        }
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
            if let Some(bar) = &watch.bar {
                bar.finish_and_clear();
            }
            let _ = tx.send((i, Event::Ended(End::Skipped)));
            continue;
        }
        watch.note("sending the request");
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

/// Writes one host's line (`name` already carries its separator, see `row_name`), escaped and
/// bounded, above the progress bars.
fn print_line(
    out: &mut dyn Write,
    bars: Option<&MultiProgress>,
    name: &str,
    line: &str,
) -> Result<(), CliError> {
    let text = escape(&format!("{name}{line}"), LINE_CHARS);
    match bars {
        Some(m) => m.suspend(|| emit(out, &text)),
        None => emit(out, &text),
    }
}

/// Prints the table's header if it is still due.
fn print_header(
    out: &mut dyn Write,
    bars: Option<&MultiProgress>,
    header: &mut Option<String>,
) -> Result<(), CliError> {
    match (header.take(), bars) {
        (Some(h), Some(m)) => m.suspend(|| emit(out, &h)),
        (Some(h), None) => emit(out, &h),
        (None, _) => Ok(()),
    }
}

/// How a host command fans out and prints, beyond the target flags.
#[derive(Default)]
pub(super) struct Plan {
    /// Hosts at a time unless `--parallel` says otherwise [default: all].
    pub(super) parallel: Option<usize>,
    /// Stop starting hosts after this many failed (`remediate --max-failures`).
    pub(super) max_failures: Option<usize>,
    /// The most bytes a task can honestly need (the image's VIB sizes), bounding the bars.
    pub(super) max_bytes: Option<u64>,
    /// A table header: rows are `host  line` under it instead of `host: line` (`status`).
    pub(super) header: Option<String>,
    /// Every host's lines are the answer (`staged`, `tasks`): printed for any number of hosts,
    /// not only for the ones that failed.
    pub(super) lists: bool,
}

/// Runs `op` on every target with at most `parallel` at once; `max_failures` stops starting new
/// hosts once that many have failed. Prints each host's outcome as it ends, the summary at the
/// end (or at `--timeout`, or Ctrl-C), and maps the results to an exit code.
pub(super) fn fan_out<F, Fut>(
    ctx: &Context,
    out: &mut dyn Write,
    clients: Vec<AgentClient>,
    plan: Plan,
    op: F,
) -> Result<(), CliError>
where
    F: Fn(AgentClient, Watch) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Outcome, ClientError>> + Send + 'static,
{
    let Plan {
        parallel: default_parallel,
        max_failures,
        max_bytes,
        header,
        lists,
    } = plan;
    let header = header.as_deref();
    let parallel = ctx
        .target
        .parallel
        .map(|n| n.get())
        .or(default_parallel)
        .unwrap_or(clients.len())
        .max(1);
    let timeout = ctx.target.timeout;
    let names: Vec<String> = clients.iter().map(|c| c.name.clone()).collect();
    let every_line = ctx.target.verbose || lists || names.len() <= SMALL_FLEET;
    // A table (`status`): the host column padded to the longest name, under a header line;
    // otherwise `host: line`.
    let width = names
        .iter()
        .map(|n| escape(n, 40).chars().count())
        .max()
        .unwrap_or(0)
        .max(4);
    let row_name = |i: usize| match header {
        Some(_) => {
            let name = escape(&names[i], 40);
            let pad = width.saturating_sub(name.chars().count());
            format!("{name}{}  ", " ".repeat(pad))
        }
        None => format!("{}: ", names[i]),
    };
    // The table's header goes above its first row: with many hosts that all succeed there is
    // no row, only the summary.
    let mut header = header
        .filter(|_| !ctx.json)
        .map(|h| format!("{:<width$}  {h}", "HOST"));
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| CliError::io("start", "the async runtime", e))?;
    let bars = (std::io::stdout().is_terminal() && !ctx.json).then(MultiProgress::new);
    let (ends, interrupted) = runtime.block_on(async {
        let deadline = timeout.map(|t| Instant::now() + t);
        // With several hosts, a total bar sums the hosts' bars (finished ones keep their counts).
        // Beyond a small fleet only the total is drawn (a thousand bars do not fit a terminal);
        // the hosts' bars are hidden and only summed, and the total counts the hosts done.
        let hosts = clients.len();
        let total = bars.as_ref().filter(|_| hosts > 1).map(|m| {
            let total = m.add(ProgressBar::new(0));
            total.set_style(waiting_style());
            total.set_prefix(if every_line {
                "total".to_owned()
            } else {
                format!("total 0/{hosts} done")
            });
            total
        });
        let mut watches = Vec::new();
        let mut host_bars = Vec::new();
        for client in clients {
            let bar = bars.as_ref().map(|m| {
                let bar = match &total {
                    _ if !every_line => ProgressBar::hidden(),
                    Some(total) => m.insert_before(total, ProgressBar::new(0)),
                    None => m.add(ProgressBar::new(0)),
                };
                bar.set_style(waiting_style());
                bar.set_prefix(escape(&client.name, 40));
                bar.set_message("waiting for its turn");
                host_bars.push(bar.clone());
                bar
            });
            let watch = Watch {
                bar,
                max_bytes,
                hidden: !every_line,
                ..Watch::default()
            };
            watches.push((client, watch));
        }
        let task_of: Vec<Watch> = watches.iter().map(|(_, w)| w.clone()).collect();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let dispatcher = tokio::spawn(dispatch(watches, parallel, max_failures, Arc::new(op), tx));
        let ticker = total.clone().map(|total| {
            tokio::spawn(async move {
                let mut sized = false;
                loop {
                    let length = saturating_total(host_bars.iter().filter_map(ProgressBar::length));
                    if length > 0 && !sized {
                        total.set_style(total_style());
                        sized = true;
                    }
                    total.set_length(length);
                    total.set_position(saturating_total(
                        host_bars.iter().map(ProgressBar::position),
                    ));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        });
        let mut ends: Vec<Option<End>> = names.iter().map(|_| None).collect();
        let mut started = vec![false; names.len()];
        let mut done = 0usize;
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let mut ctrl_c_armed = true;
        let mut cut: Option<bool> = None; // Some(true) = interrupted, Some(false) = timed out
        while cut.is_none() {
            tokio::select! {
                event = rx.recv() => match event {
                    Some((i, Event::Started)) => started[i] = true,
                    Some((i, Event::Ended(end))) => {
                        done += 1;
                        if let Some(total) = total.as_ref().filter(|_| !every_line) {
                            total.set_prefix(format!("total {done}/{} done", names.len()));
                        }
                        let (line, _, class) = describe(&end, timeout);
                        if !ctx.json && (every_line || class != Class::Ok) {
                            print_header(out, bars.as_ref(), &mut header)?;
                            print_line(out, bars.as_ref(), &row_name(i), &line)?;
                            if let End::Done(Ok(o)) = &end {
                                for more in &o.more {
                                    print_line(out, bars.as_ref(), &row_name(i), more)?;
                                }
                                for (code, message) in &o.facts.notifications {
                                    let note = format!("  note: {code}: {message}");
                                    print_line(out, bars.as_ref(), &row_name(i), &note)?;
                                }
                            }
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
        if cut == Some(true) && !ctx.json && task_of.iter().any(|w| w.task().is_some()) {
            let note =
                "interrupted: only the waiting stopped; the tasks below go on on their hosts";
            match bars.as_ref() {
                Some(m) => m.suspend(|| emit(out, note))?,
                None => emit(out, note)?,
            }
        }
        for (i, end) in ends.iter_mut().enumerate() {
            if end.is_none() {
                if let Some(bar) = &task_of[i].bar {
                    bar.finish_and_clear();
                }
                let (started, task) = (started[i], task_of[i].task());
                let cut_end = match cut {
                    Some(true) => End::Interrupted { started, task },
                    Some(false) => End::TimedOut { started, task },
                    // Only a panic in the host's operation ends it without a result.
                    None => End::Done(Err(ClientError::Setup(
                        "internal error: the host's result was lost".into(),
                    ))),
                };
                let (mut line, _, _) = describe(&cut_end, timeout);
                if let Some(task) = task_of[i].task() {
                    line.push_str(&format!(
                        "; follow it with: {}",
                        follow_command(ctx, &names[i], &task)
                    ));
                }
                if !ctx.json {
                    print_header(out, bars.as_ref(), &mut header)?;
                    print_line(out, bars.as_ref(), &row_name(i), &line)?;
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
        let hosts: Vec<&str> = classes
            .iter()
            .filter(|(_, k)| *k == Class::Unreachable)
            .map(|(name, _)| *name)
            .collect();
        let shown = if hosts.len() > 5 {
            format!("{} and {} more", hosts[..5].join(", "), hosts.len() - 5)
        } else {
            hosts.join(", ")
        };
        Err(CliError::Unreachable {
            target: ctx.command.into(),
            message: escape(
                &format!("could not reach, or was refused by, {shown} (see the lines above)"),
                LINE_CHARS,
            ),
        })
    } else if classes.iter().any(|(_, k)| *k != Class::Ok) {
        let not_ok: Vec<&str> = classes
            .iter()
            .filter(|(_, k)| *k != Class::Ok)
            .map(|(name, _)| *name)
            .collect();
        let what = if any(Class::TimedOut) {
            "failed or timed out"
        } else {
            "failed"
        };
        let hosts = if not_ok.len() > 5 {
            format!(
                "{} hosts ({} and {} more)",
                not_ok.len(),
                not_ok[..5].join(", "),
                not_ok.len() - 5
            )
        } else {
            not_ok.join(", ")
        };
        Err(CliError::OnHosts(escape(
            &format!(
                "{} {what} on {hosts}{}",
                ctx.command,
                if names.len() == 1 {
                    " (see the line above)"
                } else {
                    " (see each host's line above)"
                }
            ),
            LINE_CHARS,
        )))
    } else {
        Ok(())
    }
}

/// The command line that follows `task` on the host named `name` with the same target flags:
/// what to type after Ctrl-C or `--timeout` to see the task to its end.
fn follow_command(ctx: &Context, name: &str, task: &str) -> String {
    let mut words = vec!["vibstagectl".to_owned()];
    let quote = |s: &str| {
        if !s.is_empty()
            && s.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(b, b'-' | b'_' | b'.' | b'/' | b':' | b'[' | b']')
            })
        {
            s.to_owned()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    if ctx.target.host.is_empty() && ctx.target.hosts.is_none() {
        if let Some(socket) = &ctx.target.socket {
            words.push(format!("--socket {}", quote(&socket.display().to_string())));
        }
    } else {
        if let Some(dir) = &ctx.target.tls_dir {
            words.push(format!("--tls-dir {}", quote(&dir.display().to_string())));
        }
        words.push(format!("--host {}", quote(name)));
    }
    words.push(format!("task {} --wait", quote(task)));
    words.join(" ")
}

/// `bytes` in binary units (`512 B`, `1.50 KiB`, `40.00 GiB`), exactly as the progress bars
/// show them.
pub(crate) fn human_bytes(bytes: u64) -> String {
    indicatif::BinaryBytes(bytes).to_string()
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The most hosts the summary's `not ok` line names: with a thousand hosts down, the line
/// stays readable; each of them has its own line above it anyway.
const SUMMARY_HOSTS: usize = 20;

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
        for (code, _) in &f.notifications {
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
            .map(|(k, n)| format!("{} {n}", shorten(k, 60)))
            .collect();
        if codes.len() > SUMMARY_CODES {
            shown.push(format!("and {} more codes", codes.len() - SUMMARY_CODES));
        }
        lines.push(format!("  notifications: {}", shown.join(", ")));
    }
    let not_ok: Vec<String> = classes
        .iter()
        .filter(|(_, c)| *c != Class::Ok)
        .map(|(name, c)| format!("{} ({})", shorten(name, 60), c.word()))
        .collect();
    if not_ok.len() > SUMMARY_HOSTS {
        lines.push(format!(
            "  not ok: {}, and {} more (each has its line above; --json has every host)",
            not_ok[..SUMMARY_HOSTS].join(", "),
            not_ok.len() - SUMMARY_HOSTS
        ));
    } else if !not_ok.is_empty() {
        lines.push(format!("  not ok: {}", not_ok.join(", ")));
    }
    lines
}

/// At most `max` characters of `text` (then `…`), not yet escaped: summary lines are escaped
/// once, whole, when printed, so that a name or code is never escaped twice.
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// A host's bar once its size is known: binary units, as [`human_bytes`] prints the final lines.
fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:>22} [{bar:30}] {binary_bytes:>10}/{binary_total_bytes:<10} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

/// A host's line before its size is known: only what it is doing.
fn waiting_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>22} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// The total of several hosts: the sum of their bars, with the rate and the time left.
fn total_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:>22} [{bar:30}] {binary_bytes:>10}/{binary_total_bytes:<10} {binary_bytes_per_sec} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

/// A task's state as a word.
fn state_word(task: &Task) -> String {
    task.state.as_str().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(40 << 30), "40.00 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.00 EiB");
    }

    #[test]
    fn total_bar_sum_saturates_instead_of_wrapping() {
        assert_eq!(saturating_total([u64::MAX, 5].into_iter()), u64::MAX);
        assert_eq!(saturating_total([1, 2, 3].into_iter()), 6);
    }

    #[test]
    fn summary_counts_outcomes_and_names_the_hosts_that_did_not_succeed() {
        let classes = [("a", Class::Ok), ("b", Class::TimedOut), ("c", Class::Ok)];
        let facts = [
            Facts {
                compliance: Some("staged".into()),
                staged: Some(true),
                notifications: vec![("firmware_staging_unsupported".into(), "m".into())],
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

    #[test]
    fn summary_names_at_most_twenty_hosts_that_did_not_succeed() {
        let names: Vec<String> = (0..1000).map(|i| format!("h{i}")).collect();
        let classes: Vec<(&str, Class)> = names
            .iter()
            .map(|n| (n.as_str(), Class::Unreachable))
            .collect();
        let lines = summary(&classes, &[]);
        let not_ok = lines
            .iter()
            .find(|l| l.starts_with("  not ok: "))
            .expect("a not ok line");
        assert!(
            not_ok.starts_with("  not ok: h0 (unreachable or refused), h1 "),
            "{not_ok}"
        );
        assert!(
            not_ok.contains("h19 (unreachable or refused), and 980 more"),
            "{not_ok}"
        );
        assert!(!not_ok.contains("h20 "), "{not_ok}");
    }
}
