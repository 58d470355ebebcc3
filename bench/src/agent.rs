//! Real `vibstaged` processes with generated configurations, each in its own directory with its
//! own scratch, state, socket and (optionally) mTLS port, trusting the depot's CA and the
//! benchmark's keys. Driven over the root Unix socket; memory read from `/proc/<pid>/status`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vibstage_protocol::config::Config;

use crate::env::{Env, ImageFile};
use crate::http::{self, Reply};
use crate::procfs::{self, Memory};
use crate::{BenchError, Result, tools};

/// Choices for one agent's configuration.
#[derive(Clone, Debug, Default)]
pub struct AgentSetup {
    /// Listen for mTLS on a free port of 127.0.0.1 (otherwise the socket only).
    pub tcp: bool,
    /// `scratch.concurrency` (default: the product's default).
    pub concurrency: Option<usize>,
    /// `depot.max_bytes_per_sec` (default: unlimited).
    pub max_bytes_per_sec: Option<u64>,
    /// Run it as the packaged unit does (`Nice=10`, best-effort I/O priority 7: see
    /// `systemd/vibstaged.service`), through `nice` and `ionice`.
    pub unit_priority: bool,
    /// Its own server certificate and key (default: the one nginx uses, shared by all).
    pub server_cert: Option<(PathBuf, PathBuf)>,
    /// `maintenance.enter` (default: none, only the agent's own state).
    pub maintenance_enter: Vec<String>,
}

/// A `vibstaged` process (started or not).
#[derive(Debug)]
pub struct Agent {
    /// Host id.
    pub name: String,
    /// Its directory.
    pub home: PathBuf,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its Unix socket.
    pub socket: PathBuf,
    /// Its scratch directory (`scratch.path`).
    pub scratch: PathBuf,
    /// Its mTLS port, if it listens on one.
    pub port: Option<u16>,
    /// Its stderr, appended across restarts.
    pub log: PathBuf,
    /// The configuration it was started with (see [`Agent::reconfigure`]).
    pub settings: Config,
    binary: PathBuf,
    unit_priority: bool,
    child: Option<Child>,
}

impl Agent {
    /// Writes the agent's configuration under `<env.dir>/agents/<name>`.
    pub fn create(env: &Env, name: &str, setup: AgentSetup) -> Result<Agent> {
        let home = env.dir.join("agents").join(name);
        std::fs::create_dir_all(&home)
            .map_err(BenchError::io(format!("create {}", home.display())))?;
        let port = if setup.tcp {
            Some(tools::free_port()?)
        } else {
            None
        };
        let host_id = name
            .parse()
            .map_err(|e| BenchError::Setup(format!("agent name {name:?}: {e}")))?;
        let mut config = Config::local(
            host_id,
            &home,
            &env.dir.join("image.pub"),
            &env.dir.join("vendor.pub"),
        );
        config.scratch.volatile_path = PathBuf::new();
        config.scratch.reserve_bytes = 0;
        if let Some(c) = setup.concurrency {
            config.scratch.concurrency = c;
        }
        config.listen.tcp = port.map(|p| format!("127.0.0.1:{p}")).unwrap_or_default();
        (config.tls.cert, config.tls.key) = setup.server_cert.clone().unwrap_or_else(|| {
            (
                env.tls_dir.join("server.pem"),
                env.tls_dir.join("server.key"),
            )
        });
        config.maintenance.enter = setup.maintenance_enter.clone();
        config.tls.client_ca = env.tls_dir.join("ca.pem");
        config.depot.ca = env.tls_dir.join("ca.pem");
        if let Some(r) = setup.max_bytes_per_sec {
            config.depot.max_bytes_per_sec = r;
        }
        let path = home.join("agent.toml");
        write_config(&path, name, &config)?;
        Ok(Agent {
            name: name.to_owned(),
            config: path,
            settings: config,
            socket: home.join("api.sock"),
            scratch: home.join("scratch"),
            log: home.join("agent.log"),
            port,
            home,
            binary: env.bins.vibstaged.clone(),
            unit_priority: setup.unit_priority,
            child: None,
        })
    }

    /// Rewrites the configuration with `edit` applied and makes a running agent reload it
    /// (SIGHUP: trust keys and the TLS allow-lists).
    pub fn reconfigure(&mut self, edit: impl FnOnce(&mut Config)) -> Result<()> {
        edit(&mut self.settings);
        write_config(&self.config, &self.name, &self.settings)?;
        if let Some(pid) = self.pid() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGHUP,
            )
            .map_err(|e| BenchError::Run(format!("SIGHUP to agent {}: {e}", self.name)))?;
        }
        Ok(())
    }

    /// `127.0.0.1:PORT`, if it listens for mTLS.
    pub fn addr(&self) -> Option<String> {
        self.port.map(|p| format!("127.0.0.1:{p}"))
    }

    /// Starts the process and waits until its API answers; returns the time from spawn to the
    /// first answered `GET /v1/status`.
    pub fn start(&mut self) -> Result<Duration> {
        let start = Instant::now();
        self.spawn()?;
        self.wait_ready(Duration::from_secs(60))?;
        Ok(start.elapsed())
    }

    /// Starts the process without waiting.
    pub fn spawn(&mut self) -> Result<()> {
        if self.child.is_some() {
            return Err(BenchError::Run(format!("agent {} already runs", self.name)));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(BenchError::io(format!("open {}", self.log.display())))?;
        let mut cmd = if self.unit_priority {
            let mut c = Command::new("nice");
            c.args(["-n", "10", "ionice", "-c", "2", "-n", "7"])
                .arg(&self.binary);
            c
        } else {
            Command::new(&self.binary)
        };
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(BenchError::io(format!("start {}", self.binary.display())))?;
        self.child = Some(child);
        Ok(())
    }

    /// Polls `GET /v1/status` on the socket every millisecond until it answers 200.
    pub fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(BenchError::Run(format!(
                    "vibstaged {} exited ({status}); its log:\n{}",
                    self.name,
                    self.log_tail()
                )));
            }
            if http::request(&self.socket, "GET", "/v1/status", None).is_ok_and(|r| r.status == 200)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Run(format!(
                    "vibstaged {} not ready after {limit:?}; its log:\n{}",
                    self.name,
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until the agent's log contains `text`.
    pub fn wait_log(&self, text: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while !std::fs::read_to_string(&self.log).is_ok_and(|l| l.contains(text)) {
            if Instant::now() > deadline {
                return Err(BenchError::Run(format!(
                    "agent {} did not log {text:?} within {limit:?}; its log:\n{}",
                    self.name,
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The last lines of the agent's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its memory now.
    pub fn memory(&self) -> Result<Memory> {
        let pid = self
            .pid()
            .ok_or_else(|| BenchError::Run(format!("agent {} is not running", self.name)))?;
        procfs::memory_of(pid)
    }

    /// CPU seconds used by the process so far.
    pub fn cpu(&self) -> f64 {
        self.pid().map_or(0.0, procfs::cpu_seconds)
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait up to 15 s (then SIGKILL).
    pub fn stop(&mut self) {
        tools::stop(
            &mut self.child,
            nix::sys::signal::Signal::SIGTERM,
            Duration::from_secs(15),
        );
    }

    /// A request on the socket.
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Reply> {
        http::request(&self.socket, method, path, body)
    }

    /// `POST /v1/stage` of `image` from `depot`; returns the task id.
    pub fn stage(&self, image: &ImageFile, depot: &str) -> Result<String> {
        let r = self.request(
            "POST",
            "/v1/stage",
            Some(&json!({"image": image.envelope, "depot": depot})),
        )?;
        if r.status != 202 {
            return Err(BenchError::Run(format!(
                "stage on {} answered {}: {}",
                self.name,
                r.status,
                String::from_utf8_lossy(&r.body)
            )));
        }
        r.json["task"]["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| BenchError::Run(format!("stage on {}: no task id", self.name)))
    }

    /// `GET /v1/tasks/{id}` (with `?wait=SECS` when `wait` is given).
    pub fn task(&self, id: &str, wait: Option<u64>) -> Result<Value> {
        let path = match wait {
            Some(s) => format!("/v1/tasks/{id}?wait={s}"),
            None => format!("/v1/tasks/{id}"),
        };
        let r = self.request("GET", &path, None)?;
        if r.status != 200 {
            return Err(BenchError::Run(format!(
                "task {id} on {}: HTTP {}",
                self.name, r.status
            )));
        }
        Ok(r.json)
    }

    /// Long-polls task `id` until it ends; an error unless it succeeded.
    pub fn wait_task(&self, id: &str) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(1800);
        loop {
            let task = self.task(id, Some(30))?;
            match task["state"].as_str() {
                Some("queued" | "running") if Instant::now() < deadline => continue,
                Some("succeeded") => return Ok(task),
                _ => {
                    return Err(BenchError::Run(format!(
                        "task {id} on {} did not succeed: {task}\nlog:\n{}",
                        self.name,
                        self.log_tail()
                    )));
                }
            }
        }
    }
}

/// Writes `config` as the agent's `agent.toml`.
fn write_config(path: &std::path::Path, name: &str, config: &Config) -> Result<()> {
    let text = config
        .to_toml()
        .map_err(|e| BenchError::Setup(format!("agent {name}: {e}")))?;
    std::fs::write(path, format!("# generated by vibstage-bench\n{text}"))
        .map_err(BenchError::io(format!("write {}", path.display())))
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}
