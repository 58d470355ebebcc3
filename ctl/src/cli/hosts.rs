//! The host subcommands (`status`, `check`, `stage`, `remediate`, `staged`, `tasks`, `task`):
//! what each asks one agent and how its answer reads, run on every target by the fan-out
//! (`fanout.rs`: parallel (R3) within `--parallel N`, per-host lines as hosts end, the summary,
//! `--timeout`, Ctrl-C). `remediate` goes one host at a time by default, follows each host's
//! task to its end before the next (so with several hosts it needs `--wait`) and stops the
//! rollout after `--max-failures`.
//!
//! Hosts are untrusted (issue 18). Every host string is parsed into host and port
//! ([`HostAddr`]) before anything is sent, and a host named twice is contacted once; a task id a
//! host returns must look like an id and is percent-encoded into paths; polling long-polls with
//! the agent's wait but never faster than [`MIN_POLL_INTERVAL`] and backs off on errors; a task
//! is a success only if it says `succeeded` with no error.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;
use vibstage_protocol::api::{Task, TaskResponse, TaskState};
use vibstage_protocol::{Envelope, Image, VibDescriptor};

use super::escape::escape;
use super::fanout::{Facts, Outcome, Plan, Watch, fan_out, ok};
use super::{CliError, Context, TargetArgs};
use crate::client::{AgentClient, ClientError, Fleet, HostAddr, path_segment};

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
    /// Which agents.
    #[command(flatten)]
    pub target: TargetArgs,
}

/// `stage`.
#[derive(Debug, clap::Args)]
pub struct StageArgs {
    /// The signed image (e.g. `depot/images/NAME.json`).
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,
    /// Base URL of a depot the agents fetch from (http:// or https://); repeat it (at most 8)
    /// for depots tried in order for each blob (a site cache, a mirror, the origin).
    #[arg(long, value_name = "URL", required = true, value_parser = parse_depot_url)]
    pub depot: Vec<String>,
    /// Wait for the task to end and report its result (required by `remediate` with several
    /// hosts, which finishes each host before it starts the next).
    #[arg(long)]
    pub wait: bool,
    /// Which agents.
    #[command(flatten)]
    pub target: TargetArgs,
}

/// `remediate`: `stage`'s arguments and the rollout's failure budget.
#[derive(Debug, clap::Args)]
pub struct RemediateArgs {
    /// Image, depot, wait, targets.
    #[command(flatten)]
    pub stage: StageArgs,
    /// Stop the rollout after this many failed hosts.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub max_failures: usize,
}

/// `staged` / `staged rm DIGEST`.
#[derive(Debug, clap::Args)]
pub struct StagedArgs {
    /// `rm DIGEST` deletes staged content.
    #[command(subcommand)]
    pub command: Option<StagedCommand>,
    /// Which agents.
    #[command(flatten)]
    pub target: TargetArgs,
}

/// `staged` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum StagedCommand {
    /// Delete one staged image's content.
    Rm {
        /// `sha256:<hex>` of the image.
        digest: String,
        /// Which agents.
        #[command(flatten)]
        target: TargetArgs,
    },
}

/// `task ID [--wait]`.
#[derive(Debug, clap::Args)]
pub struct TaskArgs {
    /// Task id (as printed by `stage`, `remediate` or `tasks`).
    pub id: String,
    /// Wait until it ends.
    #[arg(long)]
    pub wait: bool,
    /// Which agents (one host: task ids differ from host to host).
    #[command(flatten)]
    pub target: TargetArgs,
}

/// A depot URL as the agents need it: `http://` or `https://` and a host. Caught here, with
/// exit 2, rather than as a failed task on every host (issue 17, item 8).
fn parse_depot_url(s: &str) -> Result<String, String> {
    let hint = "expected a depot base URL such as https://depot.example/ or http://127.0.0.1:8080/";
    let url = reqwest::Url::parse(s).map_err(|e| format!("{e}; {hint}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme \"{}\" is neither http nor https; {hint}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("no host in the URL; {hint}"));
    }
    Ok(s.to_owned())
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
    let Some(parsed) = remote_targets(ctx)? else {
        let socket = ctx
            .target
            .socket
            .clone()
            .unwrap_or_else(|| super::DEFAULT_SOCKET.into());
        check_socket(&socket)?;
        return AgentClient::local(&socket)
            .map(|c| vec![c])
            .map_err(|e| CliError::Usage(e.to_string()));
    };
    let Some(tls_dir) = &ctx.target.tls_dir else {
        return Err(CliError::Usage(
            "--host/--hosts need --tls-dir DIR (ca.pem, client.pem, client.key)".into(),
        ));
    };
    open_files_for(parsed.len(), ctx.target.parallel.map(|p| p.get()));
    let fleet = Fleet::new(tls_dir).map_err(|e| CliError::Usage(e.to_string()))?;
    parsed
        .iter()
        .map(|(addr, raw)| {
            fleet
                .agent(addr, raw)
                .map_err(|e| CliError::Usage(e.to_string()))
        })
        .collect()
}

/// Files the controller keeps open besides its connections (standard streams, the runtime's
/// event and signal descriptors, a file being read), with room to spare.
const SPARE_FILES: u64 = 32;

/// Makes room for one connection per host in flight: raises the soft limit on open files up to
/// the hard limit when `hosts` (or `--parallel`) connections would not fit under it, as Go and
/// nginx do, since a login shell's soft limit of 1024 would otherwise fail a fleet of a thousand
/// hosts with "too many open files" half way. When even the hard limit is too low, says so and
/// how to cope, and goes on.
fn open_files_for(hosts: usize, parallel: Option<usize>) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let in_flight = parallel.map_or(hosts, |p| p.min(hosts)) as u64;
    let needed = in_flight.saturating_add(SPARE_FILES);
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= needed {
        return;
    }
    let wanted = hard.min(needed);
    let limit = match setrlimit(Resource::RLIMIT_NOFILE, wanted, hard) {
        Ok(()) => wanted,
        Err(_) => soft,
    };
    if limit < needed {
        eprintln!(
            "warning: {in_flight} hosts at once need about {needed} open files, but at most \
             {limit} may be open (`ulimit -Hn`); hosts beyond that fail to connect. Raise the \
             limit or pass --parallel {}",
            limit.saturating_sub(SPARE_FILES).max(1)
        );
    }
}

/// The remote targets, parsed and without duplicates, or `None` for the local socket.
fn remote_targets(ctx: &Context) -> Result<Option<Vec<(HostAddr, String)>>, CliError> {
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
    if named.is_empty() {
        return Ok(None);
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
    Ok(Some(parsed))
}

/// Tries the local socket once before the real request so that the two usual mistakes get a
/// sentence saying what to do instead of a raw `os error` (issue 17, item 9): no agent there
/// (exit 3), or a user other than root (the socket is mode 0600; exit 3, the agent refuses us).
fn check_socket(socket: &std::path::Path) -> Result<(), CliError> {
    let unreachable = |message: String| CliError::Unreachable {
        target: "local agent".into(),
        message,
    };
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => Ok(()),
        Err(e) => match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                Err(unreachable(format!(
                    "no agent listening at {}: is vibstaged running? use --socket PATH for \
                     another socket, or --host HOST for a remote agent",
                    socket.display()
                )))
            }
            std::io::ErrorKind::PermissionDenied => Err(unreachable(
                "the local socket is root-only: run as root (sudo) or use --host HOST over \
                 mutual TLS"
                    .into(),
            )),
            _ => Err(unreachable(format!(
                "cannot connect to the local agent: {}",
                super::io_message(&e)
            ))),
        },
    }
}

fn read_image(path: &PathBuf) -> Result<Envelope, CliError> {
    let bytes =
        std::fs::read(path).map_err(|e| CliError::config("image", path, super::io_message(&e)))?;
    crate::publish::image::parse_image_file(path, &bytes).map_err(CliError::Usage)
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

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn codes(notifications: &[vibstage_protocol::api::Notification]) -> Vec<(String, String)> {
    notifications
        .iter()
        .map(|n| (n.code.clone(), n.message.clone()))
        .collect()
}

/// One row of `status`'s table (issue 17, item 13): compliance, staged mark, firmware, free
/// scratch space, running task.
/// The host id the agent reports closes the row: an address in `--hosts` says little about
/// which machine answered.
fn status_row(
    compliance: &str,
    staged: &str,
    firmware: &str,
    free: &str,
    task: &str,
    host_id: &str,
) -> String {
    format!("{compliance:<14} {staged:<6} {firmware:<14} {free:>12}  {task:<16}  {host_id}")
}

/// `status`.
pub fn status(ctx: &Context, out: &mut dyn Write) -> Result<(), CliError> {
    let clients = targets(ctx)?;
    fan_out(
        ctx,
        out,
        clients,
        Plan {
            header: Some(status_row(
                "COMPLIANCE",
                "STAGED",
                "FIRMWARE",
                "SCRATCH FREE",
                "TASK",
                "HOST ID",
            )),
            ..Plan::default()
        },
        |client, _| async move {
            let s: vibstage_protocol::api::HostStatus = client.get("/v1/status").await?;
            let line = status_row(
                s.compliance.status.as_str(),
                &s.staging.staged.to_string(),
                s.staging.firmware.as_str(),
                &super::fanout::human_bytes(s.scratch.free_bytes),
                &match (&s.running_task, s.maintenance.active) {
                    (Some(t), true) => format!("{t} (in maintenance mode)"),
                    (Some(t), false) => t.clone(),
                    (None, true) => "- (in maintenance mode)".into(),
                    (None, false) => "-".into(),
                },
                &s.host_id,
            );
            let facts = Facts {
                compliance: Some(s.compliance.status.as_str().to_owned()),
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
    fan_out(ctx, out, clients, Plan::default(), move |client, _| {
        let image = image.clone();
        async move {
            let (_, r): (u16, vibstage_protocol::api::ComplianceReport) = client
                .post("/v1/compliance/check", &json!({"image": *image}))
                .await?;
            let changes: Vec<String> = r
                .components
                .iter()
                .map(|c| format!("{} {}", c.component, c.change.as_str().to_owned()))
                .collect();
            let line = format!(
                "{} impact={} {}",
                r.status.as_str().to_owned(),
                r.impact.as_str().to_owned(),
                changes.join(", ")
            );
            let facts = Facts {
                compliance: Some(r.status.as_str().to_owned()),
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
    // With a bar to move, ask every second (every few seconds for a fleet, whose hosts only
    // feed the total bar): the agent answers then with the progress so far; without a bar,
    // long-poll until the task ends.
    let wait = watch.progress_wait().unwrap_or(POLL_WAIT_SECS);
    let path = format!("/v1/tasks/{}?wait={wait}", path_segment(&task.id));
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
                let why = match e.code().as_str() {
                    "internal" => e.message(),
                    code => format!("{code}: {}", e.message()),
                };
                watch.note(&format!(
                    "retry {errors}/{} in {}s: {why}",
                    MAX_POLL_ERRORS - 1,
                    backoff.as_secs(),
                ));
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
    // A task still queued or running has not failed: `task ID` without `--wait` reports it
    // and succeeds (found by an outside review: it exited 1, "task failed").
    let failed =
        matches!(task.state, TaskState::Failed | TaskState::Cancelled) || task.error.is_some();
    let line = match &task.error {
        Some(e) if task.state == TaskState::Succeeded => format!(
            "failed: task {} claims to have succeeded but reports an error: {}: {}",
            task.id, e.code, e.message
        ),
        Some(e) => format!(
            "{} task {}: {}: {}",
            task.state.as_str().to_owned(),
            task.id,
            e.code,
            e.message
        ),
        None => format!(
            "{} task {} ({} needed, {} downloaded)",
            task.state.as_str().to_owned(),
            task.id,
            super::fanout::human_bytes(task.progress.bytes_total),
            super::fanout::human_bytes(task.bytes_downloaded)
        ),
    };
    Outcome {
        more: Vec::new(),
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
    args: StageArgs,
    max_failures: Option<usize>,
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
    if args.depot.len() > vibstage_protocol::api::DepotList::MAX {
        return Err(CliError::Usage(format!(
            "at most {} --depot URLs may be given; {} were",
            vibstage_protocol::api::DepotList::MAX,
            args.depot.len()
        )));
    }
    let depot = Arc::new(vibstage_protocol::api::DepotList::from(args.depot));
    let path = if remediate {
        "/v1/remediate"
    } else {
        "/v1/stage"
    };
    let (parallel, max_failures) = if remediate {
        (Some(1), Some(max_failures.unwrap_or(1).max(1)))
    } else {
        (None, None)
    };
    fan_out(
        ctx,
        out,
        clients,
        Plan {
            parallel,
            max_failures,
            max_bytes,
            ..Plan::default()
        },
        move |client, watch| {
            let (image, depot) = (image.clone(), depot.clone());
            async move {
                let (_, r): (u16, TaskResponse) = client
                    .post(path, &json!({"image": *image, "depot": *depot}))
                    .await?;
                let Some(task) = r.task else {
                    let facts = Facts {
                        notifications: codes(&r.notifications),
                        ..Facts::default()
                    };
                    return Ok(ok("nothing to do".into(), to_json(&r), facts));
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
            let plan = Plan {
                lists: true,
                ..Plan::default()
            };
            fan_out(ctx, out, clients, plan, |client, _| async move {
                let list: vibstage_protocol::api::StagedList = client.get("/v1/staged").await?;
                let items: Vec<String> = list
                    .staged
                    .iter()
                    .map(|s| {
                        format!(
                            "  {} {}#{} {} {} {}",
                            s.image.digest,
                            s.image.name,
                            s.image.serial,
                            s.state.as_str().to_owned(),
                            super::fanout::human_bytes(s.bytes),
                            if s.persistent {
                                "persistent"
                            } else {
                                "volatile (lost on reboot)"
                            }
                        )
                    })
                    .collect();
                let line = match items.len() {
                    0 => "nothing staged".into(),
                    1 => "1 staged image:".into(),
                    n => format!("{n} staged images:"),
                };
                let mut o = ok(line, to_json(&list), Facts::default());
                o.more = items;
                Ok(o)
            })
        }
        Some(StagedCommand::Rm { digest, .. }) => {
            let digest: vibstage_protocol::ImageDigest = digest
                .parse()
                .map_err(|e| CliError::Usage(format!("{e}")))?;
            let clients = targets(ctx)?;
            fan_out(
                ctx,
                out,
                clients,
                Plan::default(),
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
    let plan = Plan {
        lists: true,
        ..Plan::default()
    };
    fan_out(ctx, out, clients, plan, |client, _| async move {
        let list: vibstage_protocol::api::TaskList = client.get("/v1/tasks").await?;
        let items: Vec<String> = list
            .tasks
            .iter()
            .map(|t| {
                let updated = t
                    .updated_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                let error = t
                    .error
                    .as_ref()
                    .map_or(String::new(), |e| format!(" {}: {}", e.code, e.message));
                format!(
                    "  {} {:<9} {:<9} {updated}{error}",
                    t.id,
                    t.kind.as_str().to_owned(),
                    t.state.as_str().to_owned()
                )
            })
            .collect();
        let line = match items.len() {
            0 => "no tasks".into(),
            1 => "1 task:".into(),
            n => format!("{n} tasks, newest first:"),
        };
        let mut o = ok(line, to_json(&list), Facts::default());
        o.more = items;
        Ok(o)
    })
}

/// `task ID [--wait]`.
pub fn task(args: TaskArgs, ctx: &Context, out: &mut dyn Write) -> Result<(), CliError> {
    check_task_id(&args.id).map_err(CliError::Usage)?;
    let (id, wait) = (Arc::new(args.id), args.wait);
    if remote_targets(ctx)?.is_some_and(|hosts| hosts.len() > 1) {
        // Each host numbers its own tasks: one id names one task on one host (issue 17, item 11).
        return Err(CliError::Usage(format!(
            "a task id names a task on one host, and ids differ from host to host, so `task {}` \
             takes a single --host; `tasks` lists each host's tasks, and `stage`/`remediate` print \
             each host's task id",
            escape(&id, 80)
        )));
    }
    let clients = targets(ctx)?;
    fan_out(ctx, out, clients, Plan::default(), move |client, watch| {
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
    fn depot_urls_need_a_web_scheme_and_a_host() {
        assert!(parse_depot_url("https://depot.example/").is_ok());
        assert!(parse_depot_url("http://127.0.0.1:8080").is_ok());
        for bad in [
            "htp://depot",
            "depot.example",
            "/srv/depot",
            "https://",
            "file:///srv",
        ] {
            assert!(parse_depot_url(bad).is_err(), "{bad:?}");
        }
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
            depots: vec![],
        };
        let o = task_outcome(&task);
        assert!(o.failed);
        assert!(o.line.starts_with("failed:"), "{}", o.line);
    }

    #[test]
    fn a_running_task_is_reported_not_failed() {
        let now = time::OffsetDateTime::now_utc();
        for (state, failed) in [
            (TaskState::Queued, false),
            (TaskState::Running, false),
            (TaskState::Succeeded, false),
            (TaskState::Failed, true),
            (TaskState::Cancelled, true),
        ] {
            let task = Task {
                id: "t1".into(),
                kind: vibstage_protocol::api::TaskKind::Stage,
                state,
                progress: Default::default(),
                error: None,
                created_at: now,
                updated_at: now,
                image: None,
                bytes_downloaded: 0,
                notifications: vec![],
                step: None,
                depots: vec![],
            };
            assert_eq!(task_outcome(&task).failed, failed, "{state:?}");
        }
    }
}
