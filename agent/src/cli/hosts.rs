//! The host subcommands (`status`, `check`, `stage`, `remediate`, `staged`, `tasks`, `task`):
//! one request per target, fanned out in parallel (R3) with `--parallel N` as the bound, a
//! progress bar per host while waiting when stdout is a terminal, and a summary at the end.
//! `remediate` goes one host at a time by default and stops the rollout after `--max-failures`.

use std::io::{IsTerminal as _, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use vibstage_protocol::Envelope;
use vibstage_protocol::api::{Task, TaskResponse};

use super::{CliError, Context, emit, emit_json};
use crate::client::{AgentClient, ClientError};

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
    /// Wait for the task to end and report its result.
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
}

fn ok(line: String, json: Value) -> Outcome {
    Outcome {
        line,
        json,
        failed: false,
    }
}

fn targets(ctx: &Context) -> Result<Vec<AgentClient>, CliError> {
    let mut hosts = ctx.target.host.clone();
    if let Some(file) = &ctx.target.hosts {
        let text = super::read_config_text("hosts file", file)?;
        hosts.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
    }
    let setup = |e: ClientError| CliError::Usage(e.to_string());
    if hosts.is_empty() {
        let socket = ctx
            .target
            .socket
            .clone()
            .unwrap_or_else(|| super::DEFAULT_SOCKET.into());
        return Ok(vec![AgentClient::local(&socket).map_err(setup)?]);
    }
    let Some(tls_dir) = &ctx.target.tls_dir else {
        return Err(CliError::Usage(
            "--host/--hosts need --tls-dir DIR (ca.pem, client.pem, client.key)".into(),
        ));
    };
    hosts
        .iter()
        .map(|h| AgentClient::remote(h, tls_dir).map_err(setup))
        .collect()
}

fn read_image(path: &PathBuf) -> Result<Envelope, CliError> {
    let text = super::read_config_text("image", path)?;
    serde_json::from_str(&text)
        .map_err(|e| CliError::config("image", path, format!("not a signed image envelope: {e}")))
}

/// Runs `op` on every target with at most `parallel` at once; `max_failures` stops starting new
/// hosts once that many have failed. Prints the summary and maps the results to an exit code.
fn fan_out<F, Fut>(
    ctx: &Context,
    out: &mut dyn Write,
    default_parallel: Option<usize>,
    max_failures: Option<usize>,
    op: F,
) -> Result<(), CliError>
where
    F: Fn(AgentClient, Option<ProgressBar>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Outcome, ClientError>> + Send + 'static,
{
    let clients = targets(ctx)?;
    let parallel = ctx
        .target
        .parallel
        .map(|n| n.get())
        .or(default_parallel)
        .unwrap_or(clients.len())
        .max(1);
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| CliError::io("start", "the async runtime", e))?;
    let bars = (std::io::stdout().is_terminal() && !ctx.json).then(MultiProgress::new);
    let results = runtime.block_on(async {
        let limit = Arc::new(tokio::sync::Semaphore::new(parallel));
        let failures = Arc::new(AtomicUsize::new(0));
        let op = Arc::new(op);
        let mut handles = Vec::new();
        // With several hosts, a total bar sums the hosts' bars (finished ones keep their counts).
        let total = bars.as_ref().filter(|_| clients.len() > 1).map(|m| {
            let total = m.add(ProgressBar::new(0));
            total.set_style(bar_style());
            total.set_prefix("total");
            total
        });
        let mut host_bars = Vec::new();
        for client in clients {
            let (failures, op) = (failures.clone(), op.clone());
            let bar = bars.as_ref().map(|m| {
                let bar = match &total {
                    Some(total) => m.insert_before(total, ProgressBar::new(0)),
                    None => m.add(ProgressBar::new(0)),
                };
                bar.set_style(bar_style());
                bar.set_prefix(client.name.clone());
                host_bars.push(bar.clone());
                bar
            });
            // Taking the permit here, in target order, makes `--parallel 1` go host by host in
            // the order given.
            let Ok(permit) = limit.clone().acquire_owned().await else {
                break;
            };
            handles.push(tokio::spawn(async move {
                let name = client.name.clone();
                let _permit = permit;
                if max_failures.is_some_and(|m| failures.load(Ordering::SeqCst) >= m) {
                    return (name, None);
                }
                let result = op(client, bar.clone()).await;
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
                if !matches!(&result, Ok(o) if !o.failed) {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                (name, Some(result))
            }));
        }
        let ticker = total.clone().map(|total| {
            tokio::spawn(async move {
                loop {
                    total.set_length(host_bars.iter().filter_map(ProgressBar::length).sum());
                    total.set_position(host_bars.iter().map(ProgressBar::position).sum());
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            })
        });
        let mut results = Vec::new();
        for h in handles {
            if let Ok(r) = h.await {
                results.push(r);
            }
        }
        if let Some(ticker) = ticker {
            ticker.abort();
        }
        if let Some(total) = total {
            total.finish_and_clear();
        }
        results
    });

    let (mut refused, mut failed) = (false, false);
    let mut report = serde_json::Map::new();
    for (name, result) in results {
        match result {
            None => {
                failed = true;
                report.insert(
                    name.clone(),
                    json!({"skipped": "rollout stopped after too many failures"}),
                );
                if !ctx.json {
                    emit(
                        out,
                        format!("{name}: skipped (rollout stopped after too many failures)"),
                    )?;
                }
            }
            Some(Ok(o)) => {
                failed |= o.failed;
                if !ctx.json {
                    emit(out, format!("{name}: {}", o.line))?;
                }
                report.insert(name, o.json);
            }
            Some(Err(e)) => {
                refused |= e.is_refusal();
                failed = true;
                let (code, message) = match &e {
                    ClientError::Api { detail, .. } => {
                        (detail.code.as_str().to_owned(), detail.message.clone())
                    }
                    ClientError::Unreachable(m) => ("unreachable".into(), m.clone()),
                    ClientError::Setup(m) => ("setup".into(), m.clone()),
                };
                if !ctx.json {
                    emit(out, format!("{name}: error: {code}: {message}"))?;
                }
                report.insert(name, json!({"error": {"code": code, "message": message}}));
            }
        }
    }
    if ctx.json {
        emit_json(out, &Value::Object(report))?;
    }
    if refused {
        Err(CliError::Unreachable {
            target: "one or more hosts".into(),
            message: "unreachable or refused the request".into(),
        })
    } else if failed {
        Err(CliError::Failed {
            code: vibstage_protocol::ErrorCode::Internal,
            message: "the operation failed on at least one host".into(),
        })
    } else {
        Ok(())
    }
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>20} [{bar:30}] {bytes}/{total_bytes} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// `status`.
pub fn status(ctx: &Context, out: &mut dyn Write) -> Result<(), CliError> {
    fan_out(ctx, out, None, None, |client, _| async move {
        let s: vibstage_protocol::api::HostStatus = client.get("/v1/status").await?;
        let line = format!(
            "{} compliance={} staged={} staging={} firmware={} persistent={} bytes={} maintenance={} installed={} scratch_free={}{}",
            s.host_id,
            to_json(&s.compliance.status).as_str().unwrap_or("?"),
            s.staging.staged,
            to_json(&s.staging.state).as_str().unwrap_or("?"),
            to_json(&s.staging.firmware).as_str().unwrap_or("?"),
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
        Ok(ok(line, to_json(&s)))
    })
}

/// `check --image FILE`.
pub fn check(args: CheckArgs, ctx: &Context, out: &mut dyn Write) -> Result<(), CliError> {
    let image = Arc::new(read_image(&args.image)?);
    fan_out(ctx, out, None, None, move |client, _| {
        let image = image.clone();
        async move {
            let (_, r): (u16, vibstage_protocol::api::ComplianceReport) = client
                .post("/v1/compliance/check", &json!({"image": *image}))
                .await?;
            let changes: Vec<String> = r
                .components
                .iter()
                .map(|c| {
                    format!(
                        "{} {}",
                        c.component,
                        to_json(&c.change).as_str().unwrap_or("?")
                    )
                })
                .collect();
            let line = format!(
                "{} impact={} {}",
                to_json(&r.status).as_str().unwrap_or("?"),
                to_json(&r.impact).as_str().unwrap_or("?"),
                changes.join(", ")
            );
            Ok(ok(line, to_json(&r)))
        }
    })
}

/// Follows `task` until it ends, long-polling the agent, and moves `bar` along.
pub(crate) async fn follow(
    client: &AgentClient,
    mut task: Task,
    bar: Option<&ProgressBar>,
) -> Result<Task, ClientError> {
    while !task.state.is_final() {
        task = client.get(&format!("/v1/tasks/{}?wait=1", task.id)).await?;
        if let Some(bar) = bar {
            bar.set_length(task.progress.bytes_total);
            bar.set_position(task.progress.bytes_done);
            bar.set_message(task.step.clone().unwrap_or_default());
        }
    }
    Ok(task)
}

fn task_outcome(task: &Task) -> Outcome {
    let failed = task.state != vibstage_protocol::api::TaskState::Succeeded;
    let line = match &task.error {
        Some(e) => format!(
            "{} task {}: {}: {}",
            to_json(&task.state).as_str().unwrap_or("?"),
            task.id,
            e.code,
            e.message
        ),
        None => format!(
            "{} task {} ({} bytes, {} downloaded)",
            to_json(&task.state).as_str().unwrap_or("?"),
            task.id,
            task.progress.bytes_total,
            task.bytes_downloaded
        ),
    };
    Outcome {
        line,
        json: to_json(task),
        failed,
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
    let depot = Arc::new(args.depot);
    let wait = args.wait;
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
    fan_out(ctx, out, parallel, max_failures, move |client, bar| {
        let (image, depot) = (image.clone(), depot.clone());
        async move {
            let (_, r): (u16, TaskResponse) = client
                .post(path, &json!({"image": *image, "depot": *depot}))
                .await?;
            let Some(task) = r.task else {
                let why: Vec<&str> = r.notifications.iter().map(|n| n.message.as_str()).collect();
                return Ok(ok(
                    format!("nothing to do: {}", why.join("; ")),
                    to_json(&r),
                ));
            };
            if !wait {
                return Ok(ok(format!("task {} started", task.id), to_json(&task)));
            }
            let task = follow(&client, task, bar.as_ref()).await?;
            Ok(task_outcome(&task))
        }
    })
}

/// `staged` and `staged rm DIGEST`.
pub fn staged(args: StagedArgs, ctx: &Context, out: &mut dyn Write) -> Result<(), CliError> {
    match args.command {
        None => fan_out(ctx, out, None, None, |client, _| async move {
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
                        to_json(&s.state).as_str().unwrap_or("?"),
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
            Ok(ok(line, to_json(&list)))
        }),
        Some(StagedCommand::Rm { digest }) => {
            let digest: vibstage_protocol::ImageDigest = digest
                .parse()
                .map_err(|e| CliError::Usage(format!("{e}")))?;
            fan_out(ctx, out, None, None, move |client, _| async move {
                let v: Value = client.delete(&format!("/v1/staged/{digest}")).await?;
                Ok(ok(format!("deleted {digest}"), v))
            })
        }
    }
}

/// `tasks`.
pub fn tasks(ctx: &Context, out: &mut dyn Write) -> Result<(), CliError> {
    fan_out(ctx, out, None, None, |client, _| async move {
        let list: vibstage_protocol::api::TaskList = client.get("/v1/tasks").await?;
        let items: Vec<String> = list
            .tasks
            .iter()
            .map(|t| {
                format!(
                    "{} {} {}",
                    t.id,
                    to_json(&t.kind).as_str().unwrap_or("?"),
                    to_json(&t.state).as_str().unwrap_or("?")
                )
            })
            .collect();
        Ok(ok(
            format!("{} task(s): {}", items.len(), items.join("; ")),
            to_json(&list),
        ))
    })
}

/// `task ID [--wait]`.
pub fn task(args: TaskArgs, ctx: &Context, out: &mut dyn Write) -> Result<(), CliError> {
    let (id, wait) = (Arc::new(args.id), args.wait);
    fan_out(ctx, out, None, None, move |client, bar| {
        let id = id.clone();
        async move {
            let task: Task = client.get(&format!("/v1/tasks/{id}")).await?;
            let task = if wait {
                follow(&client, task, bar.as_ref()).await?
            } else {
                task
            };
            Ok(task_outcome(&task))
        }
    })
}
