//! Stateful, model-based testing of the agent (issue 12, part 1), after proptest's state-machine
//! testing, Jepsen's generators and checkers, and the seeded, replayable, shrunk simulations of
//! TigerBeetle's VOPR and FoundationDB.
//!
//! A generator ([`Op`] sequences, from `proptest-state-machine`) drives a real `vibstaged` and
//! the fault-injecting depot through ordinary operations: compliance checks, staging and
//! remediation of four images that share VIBs (firmware of a stageable and of an unstageable
//! vendor, a DPU VIB, newer and older serials), deletions of staged content, task waits, SIGHUP
//! with changed trust keys, SIGTERM and SIGKILL (at a random moment) with restarts, reboots (the
//! volatile path wiped), depot faults, scratch filled up, the state directory made read-only,
//! failing and hanging hooks, and two clients at once. The reference model
//! (`vibstage_e2e::model`) says what SPEC allows; after every step the observation (status,
//! staged list, tasks, files under `blobs/` of both stores, the bank) must be what the model
//! allows, and the on-disk invariants of RELIABILITY.md must hold. Where an outcome is
//! legitimately one of several (the agent killed in the middle of a remediation, a fault switched
//! while a task runs, two clients racing), the model is resynced from the observation once it is
//! shown to be one of the allowed states.
//!
//! The generator is `proptest-state-machine`'s `ReferenceStateMachine` (its sequential strategy
//! generates and shrinks the sequences; its reference state only keeps what preconditions need);
//! the runner is ours rather than `StateMachineTest`, because the model lives with the system
//! under test, where it is resynced from observations, and regression tests replay a literal
//! sequence through the same runner.
//!
//! Each case gets a fresh agent (new directories) in one shared world (depot, keys, images,
//! tmpfs scratch), so a case costs about as much as its operations. A failing run prints the
//! seed and the shrunk sequence; `VIBSTAGE_MODEL_SEED` replays it. Knobs:
//! `VIBSTAGE_MODEL_CASES` (default 40), `VIBSTAGE_MODEL_STEPS` (most operations per case,
//! default 20), `VIBSTAGE_MODEL_SEED`, `VIBSTAGE_MODEL_SHRINK_ITERS` (default 64).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};
use proptest_state_machine::ReferenceStateMachine;
use serde_json::{Value, json};
use vibstage_e2e::invariants::{bank_digest, check_down};
use vibstage_e2e::model::{
    Answer, Compliance, Env, Firmware, Host, Img, Kind, Model, Outcome, SCRATCH_ROOM, Staged, Vib,
};
use vibstage_e2e::{ANY_PATH, AgentOptions, AgentProc, Fault, VibFile, World};
use vibstage_protocol::{Digest, Envelope};

/// Depot faults the generator switches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DepotFaults {
    /// Every download works (slowly).
    None,
    /// Every VIB answers 503.
    Down,
    /// Firmware VIBs answer 503.
    FirmwareDown,
}

/// Hook behaviour the generator switches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hooks {
    /// Every hook works.
    Ok,
    /// `maintenance.enter` fails.
    EnterFails,
    /// `maintenance.exit` fails.
    ExitFails,
    /// `install.command` fails (no effect with the built-in installer).
    InstallFails,
    /// `install.command` outlives the timeout (no effect with the built-in installer).
    InstallHangs,
}

/// One operation of a sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `POST /v1/compliance/check`.
    Check(Img),
    /// `POST /v1/stage`; with `wait`, waits for its task.
    Stage(Img, bool),
    /// `POST /v1/remediate`; with `wait`, waits for its task.
    Remediate(Img, bool),
    /// `DELETE /v1/staged/{digest}`.
    Delete(Img),
    /// Waits for the running task, if any.
    Wait,
    /// Two clients stage or remediate at the same moment.
    Concurrent(Kind, Img, Img),
    /// The image key in the trust store replaced by another (true) or restored, then SIGHUP.
    Sighup(bool),
    /// SIGTERM, then start again.
    Term,
    /// SIGKILL this many milliseconds later, then start again.
    Kill(u16),
    /// SIGKILL, the volatile path wiped, start again.
    Reboot,
    /// Switches depot faults.
    Depot(DepotFaults),
    /// Fills scratch up (true) or frees it.
    Scratch(bool),
    /// Makes the state directory read-only (true) or writable again.
    StateReadOnly(bool),
    /// Switches hook behaviour.
    Hooks(Hooks),
}

/// What the generator keeps track of (the full model lives with the system under test, where it
/// can be resynced from observations).
#[derive(Clone, Debug)]
pub struct Gen {
    host: Host,
    state_ro: bool,
}

struct Lifecycle;

fn img() -> impl Strategy<Value = Img> {
    prop_oneof![
        1 => Just(Img::Old),
        3 => Just(Img::Base),
        3 => Just(Img::Next),
        2 => Just(Img::Lab),
    ]
}

impl ReferenceStateMachine for Lifecycle {
    type State = Gen;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Gen> {
        (any::<bool>(), any::<bool>(), prop::bool::weighted(0.8))
            .prop_map(|(dpus, builtin_installer, volatile)| Gen {
                host: Host {
                    dpus,
                    builtin_installer,
                    volatile,
                },
                state_ro: false,
            })
            .boxed()
    }

    fn transitions(state: &Gen) -> BoxedStrategy<Op> {
        prop_oneof![
            3 => img().prop_map(Op::Check),
            6 => (img(), any::<bool>()).prop_map(|(i, w)| Op::Stage(i, w)),
            5 => (img(), prop::bool::weighted(0.7)).prop_map(|(i, w)| Op::Remediate(i, w)),
            3 => img().prop_map(Op::Delete),
            2 => Just(Op::Wait),
            1 => (prop_oneof![Just(Kind::Stage), Just(Kind::Remediate)], img(), img())
                .prop_map(|(k, a, b)| Op::Concurrent(k, a, b)),
            1 => any::<bool>().prop_map(Op::Sighup),
            1 => Just(Op::Term),
            3 => (0u16..400).prop_map(Op::Kill),
            1 => Just(Op::Reboot),
            2 => prop_oneof![
                2 => Just(DepotFaults::None),
                1 => Just(DepotFaults::Down),
                1 => Just(DepotFaults::FirmwareDown)
            ]
            .prop_map(Op::Depot),
            1 => any::<bool>().prop_map(Op::Scratch),
            1 => Just(Op::StateReadOnly(!state.state_ro)),
            2 => prop_oneof![
                3 => Just(Hooks::Ok),
                1 => Just(Hooks::EnterFails),
                1 => Just(Hooks::ExitFails),
                1 => Just(Hooks::InstallFails),
                1 => Just(Hooks::InstallHangs)
            ]
            .prop_map(Op::Hooks),
        ]
        .boxed()
    }

    fn apply(mut state: Gen, op: &Op) -> Gen {
        if let Op::StateReadOnly(ro) = op {
            state.state_ro = *ro;
        }
        state
    }

    fn preconditions(state: &Gen, op: &Op) -> bool {
        match op {
            // The agent is never restarted on a read-only state directory: it refuses to start
            // there (RELIABILITY.md, known limits), which is not a lifecycle state.
            Op::Term | Op::Kill(_) | Op::Reboot => !state.state_ro,
            Op::StateReadOnly(ro) => *ro != state.state_ro,
            _ => true,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The shared universe: one world, its depot, the four signed images, a tmpfs for scratch.

struct Universe {
    world: World,
    images: BTreeMap<Img, (Envelope, String)>,
    vibs: BTreeMap<Vib, String>,
    by_hex: BTreeMap<String, Vib>,
    /// A tmpfs the cases' scratch directories live on (so it can be filled up).
    scratchfs: PathBuf,
    image_pub: Vec<u8>,
    rogue_pub: Vec<u8>,
    cases: AtomicU64,
    stats: Mutex<Stats>,
}

/// Figures of a run.
#[derive(Default, Debug)]
struct Stats {
    sequences: u64,
    steps: u64,
    ops: BTreeMap<&'static str, u64>,
    kills: u64,
    restarts: u64,
    resyncs: u64,
    tasks: BTreeMap<String, u64>,
}

impl Drop for Universe {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.scratchfs)
            .status();
    }
}

fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    std::fs::create_dir_all(dir).expect("mount point");
    let out = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0700"),
            "tmpfs",
        ])
        .arg(dir)
        .output()
        .expect("run mount");
    if out.status.success() {
        return true;
    }
    assert!(
        !nix::unistd::geteuid().is_root(),
        "mount tmpfs failed as root: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("skipped: the lifecycle model test mounts tmpfs and bind mounts (needs root)");
    false
}

fn universe() -> Option<&'static Universe> {
    static U: std::sync::OnceLock<Option<&'static Universe>> = std::sync::OnceLock::new();
    *U.get_or_init(|| {
        let world = World::new();
        let scratchfs = world.dir.path().join("scratchfs");
        if !mount_tmpfs(&scratchfs, "6m") {
            return None;
        }
        let mut vibs = BTreeMap::new();
        for v in Vib::ALL {
            let (component, version) = v.component();
            let name = format!("{v:?}").to_lowercase();
            let file = match v {
                Vib::Bios => VibFile::firmware(&name, "dell", v.size()),
                Vib::Nic => VibFile::firmware(&name, "hpe", v.size()),
                Vib::Dpu => VibFile::dpu(&name, v.size()),
                _ => VibFile::software(&name, v.size()),
            };
            let file = VibFile {
                component: component.into(),
                version: version.into(),
                ..file
            };
            vibs.insert(v, world.add_vibs(&[file]).remove(0));
        }
        let mut images = BTreeMap::new();
        for i in Img::ALL {
            let comps = i.components();
            let refs: Vec<&str> = comps.iter().map(String::as_str).collect();
            let env = world.image(i.name(), i.serial(), &refs);
            let digest = format!("sha256:{}", Digest::of(&env.payload).to_hex());
            images.insert(i, (env, digest));
        }
        let rogue = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let rogue_pub = vibstage_protocol::dsse::verifying_key_to_pem(&rogue.verifying_key())
            .expect("pem")
            .into_bytes();
        let image_pub = std::fs::read(world.dir.path().join("image.pub")).expect("image.pub");
        let by_hex = vibs.iter().map(|(v, h)| (h.clone(), *v)).collect();
        Some(&*Box::leak(Box::new(Universe {
            world,
            images,
            vibs,
            by_hex,
            scratchfs,
            image_pub,
            rogue_pub,
            cases: AtomicU64::new(0),
            stats: Mutex::new(Stats::default()),
        })))
    })
}

// ---------------------------------------------------------------------------------------------
// The system under test: one agent, its switches, and the model resynced from observations.

struct Sut {
    u: &'static Universe,
    agent: AgentProc,
    model: Model,
    /// Compliance in status may lag behind the model after a remediation was cut short (the
    /// report is stored at the request, not re-evaluated at start-up): only what it claims is
    /// checked until the next evaluation.
    compliance_stale: bool,
    flags: PathBuf,
    hook_log: PathBuf,
    marker: PathBuf,
    volatile: PathBuf,
    ro_mount: bool,
    filler: PathBuf,
    /// The images of two racing requests, while their tasks are settled.
    racing: Vec<Img>,
    /// Tasks that ended while the state directory was read-only (their end is not saved).
    ended_unsaved: Vec<String>,
    /// A compliance check of this image was answered while the running task ran.
    checked_during_task: Option<Img>,
    step: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sut {
    fn new(u: &'static Universe, host: Host) -> Sut {
        let n = u.cases.fetch_add(1, Ordering::Relaxed);
        u.world.depot.clear_faults();
        std::fs::write(u.world.dir.path().join("image.pub"), &u.image_pub).expect("image.pub");
        let name = format!("case-{n}");
        let case_dir = u.world.dir.path().join(&name);
        let flags = case_dir.join("flags");
        std::fs::create_dir_all(&flags).expect("flags");
        let hook_log = case_dir.join("hooks.log");
        let marker = case_dir.join("in-maintenance");
        let scratch = u.scratchfs.join(&name);
        let volatile = case_dir.join("volatile");
        let filler = u.scratchfs.join("filler");
        let _ = std::fs::remove_file(&filler);
        let mut agent = u.world.agent(
            &name,
            AgentOptions {
                dpus: if host.dpus {
                    vec!["dpu0".into()]
                } else {
                    vec![]
                },
                firmware_vendors: vec!["dell".into()],
                scratch: Some(scratch),
                volatile: Some(if host.volatile {
                    volatile.display().to_string()
                } else {
                    String::new()
                }),
                retries: Some(0),
                timeout_secs: Some(5),
                ..AgentOptions::default()
            },
        );
        let f = flags.display();
        let (log, mark) = (hook_log.display(), marker.display());
        let mut extra = format!(
            r#"
[maintenance]
enter = ["sh", "-c", "echo enter >> {log}; test ! -e {f}/enter-fails || exit 4; touch {mark}"]
exit = ["sh", "-c", "echo exit-start >> {log}; test ! -e {f}/exit-fails || exit 5; rm -f {mark}; echo exit >> {log}"]
timeout_secs = 2
"#
        );
        if !host.builtin_installer {
            extra.push_str(&format!(
                r#"
[install]
command = ["sh", "-c", "test ! -e {f}/install-hangs || sleep 30; test ! -e {f}/install-fails || exit 3; echo install $# >> {log}", "install"]
"#
            ));
        }
        agent.merge_config(&extra);
        agent.start();
        let mut sut = Sut {
            u,
            agent,
            model: Model::new(host),
            compliance_stale: false,
            flags,
            hook_log,
            marker,
            volatile,
            ro_mount: false,
            filler,
            checked_during_task: None,
            ended_unsaved: Vec::new(),
            racing: Vec::new(),
            step: 0,
        };
        sut.set_depot(DepotFaults::None);
        sut
    }

    fn env(&self, i: Img) -> &Envelope {
        &self.u.images[&i].0
    }

    fn digest(&self, i: Img) -> &str {
        &self.u.images[&i].1
    }

    fn img_of(&self, digest: &str) -> Img {
        *self
            .u
            .images
            .iter()
            .find(|(_, (_, d))| d == digest)
            .unwrap_or_else(|| panic!("an image the universe does not have: {digest}"))
            .0
    }

    fn set_depot(&mut self, faults: DepotFaults) {
        let depot = &self.u.world.depot;
        depot.clear_faults();
        // Downloads trickle, so kills and switches land inside them as well as around them.
        depot.fault(
            ANY_PATH,
            Fault::SlowDrip {
                bytes_per_sec: 3 << 20,
            },
            usize::MAX,
        );
        for v in Vib::ALL {
            let down = match faults {
                DepotFaults::None => false,
                DepotFaults::Down => true,
                DepotFaults::FirmwareDown => v.firmware(),
            };
            if down {
                let path = vibstage_e2e::Depot::vib_path(&self.u.vibs[&v]);
                depot.fault(&path, Fault::Status(503), usize::MAX);
            }
        }
        self.model.env.depot_down = faults == DepotFaults::Down;
        self.model.env.firmware_down = faults == DepotFaults::FirmwareDown;
    }

    fn set_flag(&self, name: &str, on: bool) {
        let path = self.flags.join(name);
        if on {
            std::fs::write(path, "").expect("flag");
        } else {
            let _ = std::fs::remove_file(path);
        }
    }

    fn set_scratch_full(&mut self, full: bool) {
        if !full {
            let _ = std::fs::remove_file(&self.filler);
        }
        self.model.env.scratch_full = full;
        self.top_up();
    }

    /// Keeps a full scratch at exactly [`SCRATCH_ROOM`] free bytes: content staged or collected
    /// since would otherwise change how full it is.
    fn top_up(&self) {
        if !self.model.env.scratch_full {
            return;
        }
        let space = nix::sys::statvfs::statvfs(&self.u.scratchfs).expect("statvfs");
        let free = space.blocks_available() as u64 * space.fragment_size() as u64;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.filler)
            .expect("filler");
        let len = file.metadata().expect("filler").len();
        if free < SCRATCH_ROOM {
            file.set_len(len.saturating_sub(SCRATCH_ROOM - free))
                .expect("shrink filler");
            return;
        }
        let chunk = vec![0u8; 1 << 20];
        let mut left = free - SCRATCH_ROOM;
        let mut w = std::io::BufWriter::new(file);
        // A download running at the same time may take the last bytes first: full is full.
        let full = |r: std::io::Result<()>| match r {
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => true,
            other => {
                other.expect("fill");
                false
            }
        };
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if full(std::io::Write::write_all(&mut w, &chunk[..n])) {
                break;
            }
            left -= n as u64;
        }
        let _ = full(std::io::Write::flush(&mut w));
    }

    /// Partial downloads per store, by VIB.
    fn observe_partials(&mut self) {
        for (i, store) in [self.agent.scratch.clone(), self.volatile.clone()]
            .iter()
            .enumerate()
        {
            self.model.partials[i] = std::fs::read_dir(store.join("ingest"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let hex = name.strip_suffix(".partial")?.to_owned();
                    let vib = *self.u.by_hex.get(&hex)?;
                    Some((vib, e.metadata().ok()?.len()))
                })
                .collect();
        }
    }

    fn set_state_ro(&mut self, ro: bool) {
        let dir = self.agent.state_dir.display().to_string();
        let run = |args: &[&str]| {
            let out = Command::new("mount").args(args).output().expect("mount");
            assert!(
                out.status.success(),
                "mount {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        if ro && !self.ro_mount {
            run(&["--bind", &dir, &dir]);
            self.ro_mount = true;
            // A state file being written through the new mount at this moment makes it busy:
            // try again until no write is open.
            let mut tries = 0;
            loop {
                let out = Command::new("mount")
                    .args(["-o", "remount,bind,ro", &dir])
                    .output()
                    .expect("mount");
                if out.status.success() {
                    break;
                }
                tries += 1;
                assert!(
                    tries < 500,
                    "remount ro {dir}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        } else if !ro && self.ro_mount {
            let _ = Command::new("umount").arg("-l").arg(&dir).status();
            self.ro_mount = false;
        }
        self.model.env.state_ro = ro;
    }

    /// Starts the agent again after a stop, with the invariants of a stopped agent checked.
    fn restart(&mut self, reboot: bool) {
        check_down(&self.agent, &self.u.world);
        if reboot {
            let _ = std::fs::remove_dir_all(&self.volatile);
        }
        self.agent.start();
        lock(&self.u.stats).restarts += 1;
        let log = self.agent.log_text();
        assert!(!log.contains("panicked"), "the agent panicked:\n{log}");
        assert!(
            !log.contains("was corrupt"),
            "state quarantined after a stop:\n{log}"
        );
        if !self.ended_unsaved.is_empty() {
            self.resync_unsaved(reboot);
        } else if !self.model.restarted(reboot) {
            self.mark_uncertain();
        }
    }

    /// A task that ended while the state directory was read-only could not save its end
    /// (RELIABILITY.md, known limits): after a restart it is resumed (staging) or failed
    /// (remediation), and what it did is in memory no longer. The observation is taken once it
    /// is one the model allows.
    fn resync_unsaved(&mut self, reboot: bool) {
        lock(&self.u.stats).resyncs += 1;
        let ids = std::mem::take(&mut self.ended_unsaved);
        let before = self.model.clone();
        self.model.restarted(reboot);
        for id in &ids {
            self.model.finished.remove(id);
        }
        let status = self.agent.status();
        if let Some(id) = status["running_task"].as_str() {
            let t = self.task(id);
            assert!(
                ids.iter().any(|i| i == id) || before.running.as_ref().is_some_and(|r| r.id == id),
                "a task runs that neither ran nor ended unsaved: {t}"
            );
            let kind = if t["kind"] == "remediate" {
                Kind::Remediate
            } else {
                Kind::Stage
            };
            let img = self.img_of(t["image"]["digest"].as_str().expect("digest"));
            self.model.running = Some(vibstage_e2e::model::Running {
                id: id.to_owned(),
                kind,
                img,
                uncertain: true,
            });
        } else {
            self.model.running = None;
        }
        let installed = status["installed"]["image"]["digest"]
            .as_str()
            .map(|d| self.img_of(d));
        self.model.installed = installed;
        self.model.maintenance = status["maintenance"]["active"] == true;
        self.model.checked = status["compliance"]["image"]["digest"]
            .as_str()
            .map(|d| self.img_of(d));
        self.compliance_stale = true;
        self.adopt_staged(&[]);
    }

    /// Takes the staged record and blobs from disk; `allowed` (if not empty) lists the images
    /// the record may be of.
    fn adopt_staged(&mut self, allowed: &[Img]) {
        self.model.staged = None;
        let staged = self.agent.request("GET", "/v1/staged", None).json;
        let list = staged["staged"].as_array().cloned().unwrap_or_default();
        assert!(list.len() <= 1, "more than one staged image: {staged}");
        if let Some(s) = list.first() {
            let img = self.img_of(s["image"]["digest"].as_str().expect("digest"));
            assert!(
                allowed.is_empty() || allowed.contains(&img),
                "staged {img:?}, not one of {allowed:?}"
            );
            self.model.staged = Some(self.record(img, s["persistent"] == true));
        }
        self.model.blobs = [self.blob_set(false), self.blob_set(true)];
    }

    fn mark_uncertain(&mut self) {
        if let Some(r) = self.model.running.as_mut() {
            r.uncertain = true;
        }
    }

    fn task(&self, id: &str) -> Value {
        let r = self.agent.request("GET", &format!("/v1/tasks/{id}"), None);
        assert_eq!(r.status, 200, "task {id}: {}", r.body);
        r.json
    }

    /// If the model's running task has ended on the agent, applies its end to the model.
    /// `wait` waits for it to end.
    fn poll(&mut self, wait: bool) {
        let Some(r) = self.model.running.clone() else {
            return;
        };
        let task = if wait {
            self.agent.wait_task(&r.id, 120)
        } else {
            self.task(&r.id)
        };
        if matches!(task["state"].as_str(), Some("queued" | "running")) {
            return;
        }
        *lock(&self.u.stats)
            .tasks
            .entry(format!(
                "{} {} {}",
                task["kind"].as_str().unwrap_or("?"),
                task["state"].as_str().unwrap_or("?"),
                task["error"]["code"].as_str().unwrap_or("")
            ))
            .or_default() += 1;
        if self.model.env.state_ro {
            self.ended_unsaved.push(r.id.clone());
        }
        if r.uncertain {
            self.resync(&r, &task);
            return;
        }
        let (id, outcome) = self.model.finish().expect("running");
        self.compliance_stale = false;
        if let Some(checked) = self.checked_during_task.take() {
            let status = self.agent.status();
            if let Some(d) = status["compliance"]["image"]["digest"].as_str() {
                let i = self.img_of(d);
                assert!(
                    i == checked || i == r.img,
                    "compliance names {i:?}, neither the task's {:?} nor the check's {checked:?}",
                    r.img
                );
                self.model.checked = Some(i);
            }
        }
        let want = match &outcome {
            Outcome::Succeeded => ("succeeded", None),
            Outcome::Failed(code) => ("failed", Some(*code)),
        };
        assert_eq!(
            (task["state"].as_str(), task["error"]["code"].as_str()),
            (Some(want.0), want.1),
            "task {id} ({:?} {:?}) ended otherwise than the model says: {task}",
            r.kind,
            r.img
        );
    }

    /// After an end that is one of several allowed ones: checks the observation is one of them
    /// and takes it as the model's state.
    fn resync(&mut self, r: &vibstage_e2e::model::Running, task: &Value) {
        lock(&self.u.stats).resyncs += 1;
        self.checked_during_task = None;
        let before = self.model.clone();
        self.model.running = None;
        let outcome = match task["state"].as_str() {
            Some("succeeded") => Outcome::Succeeded,
            Some("failed") => Outcome::Failed(match task["error"]["code"].as_str() {
                Some("internal") => "internal",
                Some("depot_unreachable") => "depot_unreachable",
                Some("insufficient_space") => "insufficient_space",
                Some("maintenance_failed") => "maintenance_failed",
                Some("install_failed") => "install_failed",
                Some("untrusted_key") => "untrusted_key",
                other => panic!(
                    "task {} failed with an unexpected code {other:?}: {task}",
                    r.id
                ),
            }),
            other => panic!("task {} ended {other:?}: {task}", r.id),
        };
        self.model.finished.insert(r.id.clone(), outcome.clone());
        let status = self.agent.status();
        let installed = status["installed"]["image"]["digest"]
            .as_str()
            .map(|d| self.img_of(d));
        assert!(
            installed == before.installed
                || installed == Some(r.img)
                || installed.is_some_and(|i| self.racing.contains(&i)),
            "installed {installed:?} is neither the image before ({:?}) nor the one remediated ({:?})",
            before.installed,
            r.img
        );
        if outcome == Outcome::Succeeded && r.kind == Kind::Remediate && self.racing.is_empty() {
            assert_eq!(installed, Some(r.img), "remediation succeeded: {status}");
        }
        if r.kind == Kind::Stage && self.racing.is_empty() {
            assert_eq!(installed, before.installed, "staging installed something");
        }
        self.model.installed = installed;
        self.model.maintenance = status["maintenance"]["active"] == true;
        // Serials were raised by the request already; the checked image is the task's.
        self.model.checked = Some(r.img);
        self.compliance_stale = true;
        let mut allowed = vec![r.img];
        allowed.extend(before.staged.as_ref().map(|s| s.img));
        // Two clients at once: the other request's task may have run too.
        allowed.extend(self.racing.iter().copied());
        self.adopt_staged(&allowed);
    }

    /// The staged record of `img` as it is on disk.
    fn record(&self, img: Img, persistent: bool) -> Staged {
        let store = if persistent {
            self.agent.scratch.clone()
        } else {
            self.volatile.clone()
        };
        let path = store
            .join("images")
            .join(format!("{}.json", self.digest(img)));
        let rec: Value = serde_json::from_slice(
            &std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        )
        .expect("record");
        let vibs = rec["vibs"]
            .as_array()
            .expect("vibs")
            .iter()
            .map(|v| self.u.by_hex[v["sha256"].as_str().expect("sha256")])
            .collect();
        let firmware = match rec["firmware"].as_str() {
            Some("staged") => Firmware::Staged,
            Some("not_supported") => Firmware::NotSupported,
            Some("failed") => Firmware::Failed,
            Some("not_applicable") => Firmware::NotApplicable,
            other => panic!("record firmware {other:?}"),
        };
        Staged {
            img,
            persistent,
            vibs,
            firmware,
        }
    }

    fn blob_set(&self, volatile: bool) -> BTreeSet<Vib> {
        let store = if volatile {
            &self.volatile
        } else {
            &self.agent.scratch
        };
        // Not `blobs_in`: a blob collected by a running task between the listing and the read
        // is gone, not wrong.
        let dir = store.join("blobs/sha256");
        std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let hex = e.file_name().to_string_lossy().into_owned();
                let bytes = match std::fs::read(e.path()) {
                    Ok(b) => b,
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
                    Err(err) => panic!("blob {hex}: {err}"),
                };
                assert_eq!(
                    Digest::of(&bytes).to_hex(),
                    hex,
                    "blob {hex} holds wrong bytes"
                );
                Some(
                    *self
                        .u
                        .by_hex
                        .get(&hex)
                        .unwrap_or_else(|| panic!("a blob of no VIB: {hex}")),
                )
            })
            .collect()
    }

    fn body(&self, i: Img) -> Value {
        json!({"image": self.env(i), "depot": self.u.world.depot.url()})
    }

    fn path(kind: Kind) -> &'static str {
        match kind {
            Kind::Stage => "/v1/stage",
            Kind::Remediate => "/v1/remediate",
        }
    }

    /// Sends a stage or remediate request and compares its answer with the model's.
    fn lifecycle(&mut self, kind: Kind, img: Img, wait: bool) {
        let reply = self
            .agent
            .request("POST", Self::path(kind), Some(&self.body(img)));
        // A task the model thinks runs may have ended just before: busy or joined say it still
        // ran; any other answer means it had ended.
        let still = matches!(reply.status, 409 | 202)
            && self.model.running.as_ref().is_some_and(|r| {
                reply.json["task"]["id"] == r.id.as_str() || reply.json["error"]["code"] == "busy"
            });
        // A task that ended only now changed scratch after the step's top-up: where the new
        // task stages on a full scratch is then one of two places.
        let ended_now = !still && self.model.running.is_some();
        if !still {
            self.poll(true);
        }
        let expected = self.model.request(kind, img);
        self.compliance_stale &= !matches!(expected, Answer::NewTask | Answer::NothingToDo)
            && !matches!(expected, Answer::Refused("incompatible"));
        match expected {
            Answer::NewTask => {
                assert_eq!(reply.status, 202, "{kind:?} {img:?}: {}", reply.body);
                let id = reply.json["task"]["id"].as_str().expect("id").to_owned();
                assert!(
                    !self.model.finished.contains_key(&id),
                    "a new task reuses id {id}"
                );
                self.model.started(id, kind, img);
                // Starting a task saved the state and the task list, ends included.
                self.ended_unsaved.clear();
                if ended_now && self.model.env.scratch_full {
                    self.mark_uncertain();
                }
            }
            Answer::Joined => {
                assert_eq!(reply.status, 202, "{kind:?} {img:?}: {}", reply.body);
                let running = self.model.running.as_ref().expect("running");
                assert_eq!(reply.json["task"]["id"], running.id.as_str(), "join");
            }
            Answer::NothingToDo => {
                assert_eq!(reply.status, 200, "{kind:?} {img:?}: {}", reply.body);
                assert!(reply.json["task"].is_null(), "{}", reply.body);
            }
            Answer::Refused(code) => {
                assert!(
                    reply.status >= 400,
                    "{kind:?} {img:?} must be refused with {code}: {}",
                    reply.body
                );
                assert_eq!(
                    reply.json["error"]["code"], code,
                    "{kind:?} {img:?}: {}",
                    reply.body
                );
            }
        }
        if wait {
            self.poll(true);
        }
    }

    fn check(&mut self, img: Img) {
        let reply = self.agent.request(
            "POST",
            "/v1/compliance/check",
            Some(&json!({"image": self.env(img)})),
        );
        // While a task runs its end may come before or after the check: both are allowed.
        let before = self.model.clone();
        let mut alt = None;
        if self.model.running.is_some() {
            let mut after = self.model.clone();
            let uncertain = after.running.as_ref().is_some_and(|r| r.uncertain);
            if !uncertain {
                after.finish();
                alt = Some(after.check(img));
            }
        }
        let expected = self.model.check(img);
        let got = if reply.status == 200 {
            Ok(reply.json["status"].as_str().unwrap_or("?").to_owned())
        } else {
            Err(reply.json["error"]["code"]
                .as_str()
                .unwrap_or("?")
                .to_owned())
        };
        let as_str = |r: &Result<Compliance, &str>| match r {
            Ok(c) => Ok(c.as_str().to_owned()),
            Err(e) => Err((*e).to_owned()),
        };
        let running_uncertain = before.running.as_ref().is_some_and(|r| r.uncertain);
        // A remediation between its staging and its install has the image staged and not
        // installed, and other images' records already replaced.
        let mid_remediation = before
            .running
            .as_ref()
            .is_some_and(|r| r.kind == Kind::Remediate)
            && expected.is_ok()
            && matches!(got.as_deref(), Ok("staged" | "non_compliant"));
        if !running_uncertain && !mid_remediation {
            assert!(
                got == as_str(&expected) || alt.as_ref().is_some_and(|a| got == as_str(a)),
                "check {img:?}: got {got:?}, the model allows {:?} (or {:?} if the running task just ended)",
                as_str(&expected),
                alt.as_ref().map(as_str)
            );
        }
        if expected.is_ok() {
            self.compliance_stale = running_uncertain;
        }
        // The running task's end also evaluates compliance, and the check may land before or
        // after that evaluation: status then names either image (see `poll`).
        if before.running.is_some() && expected.is_ok() {
            self.checked_during_task = Some(img);
            self.poll(false);
        }
    }

    fn delete(&mut self, img: Img) {
        let reply = self
            .agent
            .request("DELETE", &format!("/v1/staged/{}", self.digest(img)), None);
        if reply.status == 409 {
            assert_eq!(reply.json["error"]["code"], "busy", "{}", reply.body);
            assert!(
                self.model.running.is_some(),
                "DELETE answered busy with no task running: {}",
                reply.body
            );
            return;
        }
        self.poll(true);
        let existed = self.model.delete(img);
        assert_eq!(
            reply.status,
            if existed { 200 } else { 404 },
            "DELETE {img:?}: {}",
            reply.body
        );
    }

    fn concurrent(&mut self, kind: Kind, a: Img, b: Img) {
        let agent = &self.agent;
        let (ra, rb) = std::thread::scope(|s| {
            let ta = s.spawn(|| agent.request("POST", Self::path(kind), Some(&self.body(a))));
            let tb = s.spawn(|| agent.request("POST", Self::path(kind), Some(&self.body(b))));
            (ta.join().expect("client a"), tb.join().expect("client b"))
        });
        // Every task either request started, then the model from what happened.
        let mut ids: BTreeSet<String> = BTreeSet::new();
        for (i, r) in [(a, &ra), (b, &rb)] {
            match r.status {
                202 => {
                    ids.insert(r.json["task"]["id"].as_str().expect("id").to_owned());
                }
                200 => assert!(r.json["task"].is_null(), "{}", r.body),
                _ => {
                    let code = r.json["error"]["code"].as_str().unwrap_or("?");
                    assert!(
                        matches!(
                            code,
                            "busy"
                                | "rollback_refused"
                                | "incompatible"
                                | "untrusted_key"
                                | "internal"
                        ),
                        "concurrent {kind:?} {i:?}: {}",
                        r.body
                    );
                }
            }
        }
        if a == b && ra.status == 202 && rb.status == 202 && self.model.running.is_none() {
            // Two requests for one image: the second joins the first unless it had ended.
            let tasks = self.tasks();
            if ids.len() == 2 {
                let ends: Vec<&Value> = tasks
                    .iter()
                    .filter(|t| ids.contains(t["id"].as_str().unwrap_or("")))
                    .collect();
                assert!(
                    ends.iter().any(|t| t["state"] != "running"),
                    "two tasks for one image: {tasks:?}"
                );
            }
        }
        // Settle: wait for whatever runs, then take the observation (checked against the model
        // of both orders by the step's invariants).
        let prior = self.model.running.clone();
        for id in &ids {
            self.agent.wait_task(id, 120);
        }
        if let Some(p) = &prior {
            self.agent.wait_task(&p.id, 120);
        }
        let mut fresh: Vec<(String, String)> = ids
            .iter()
            .filter(|id| prior.as_ref().is_none_or(|p| &p.id != *id))
            .map(|id| {
                let created = self.task(id)["created_at"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                (created, id.clone())
            })
            .collect();
        fresh.sort();
        self.racing = vec![a, b];
        if let Some(p) = prior {
            if !fresh.is_empty() {
                self.model.running = Some(vibstage_e2e::model::Running {
                    uncertain: true,
                    ..p
                });
            }
            self.poll(true);
        }
        for (_, id) in fresh {
            let t = self.task(&id);
            let i = self.img_of(t["image"]["digest"].as_str().expect("digest"));
            let serial = self.model.serials.entry(i.name()).or_insert(0);
            *serial = (*serial).max(i.serial());
            self.model.running = Some(vibstage_e2e::model::Running {
                id,
                kind,
                img: i,
                uncertain: true,
            });
            self.poll(true);
        }
        self.racing.clear();
        // The last evaluation is one of the requests' or the tasks': take it from status once
        // it is one of them.
        let status = self.agent.status();
        if let Some(d) = status["compliance"]["image"]["digest"].as_str() {
            let i = self.img_of(d);
            assert!(
                i == a || i == b || Some(i) == self.model.checked,
                "compliance names {i:?} after requests for {a:?} and {b:?}"
            );
            self.model.checked = Some(i);
            self.compliance_stale = true;
        }
    }

    fn tasks(&self) -> Vec<Value> {
        let r = self.agent.request("GET", "/v1/tasks", None);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json["tasks"].as_array().cloned().unwrap_or_default()
    }

    fn apply(&mut self, op: &Op) {
        self.step += 1;
        {
            let mut stats = lock(&self.u.stats);
            stats.steps += 1;
            let kind = match op {
                Op::Check(_) => "check",
                Op::Stage(_, true) => "stage (wait)",
                Op::Stage(_, false) => "stage",
                Op::Remediate(_, true) => "remediate (wait)",
                Op::Remediate(_, false) => "remediate",
                Op::Delete(_) => "delete staged",
                Op::Wait => "task wait",
                Op::Concurrent(..) => "two clients at once",
                Op::Sighup(_) => "SIGHUP (trust keys)",
                Op::Term => "SIGTERM + restart",
                Op::Kill(_) => "SIGKILL + restart",
                Op::Reboot => "reboot",
                Op::Depot(_) => "depot faults",
                Op::Scratch(_) => "scratch full/free",
                Op::StateReadOnly(_) => "state dir ro/rw",
                Op::Hooks(_) => "hook faults",
            };
            *stats.ops.entry(kind).or_default() += 1;
            if matches!(op, Op::Kill(_) | Op::Reboot) {
                stats.kills += 1;
            }
        }
        let switching_under_task = self.model.running.is_some();
        if !switching_under_task {
            self.top_up();
            self.observe_partials();
        }
        match op {
            Op::Check(i) => self.check(*i),
            Op::Stage(i, wait) => self.lifecycle(Kind::Stage, *i, *wait),
            Op::Remediate(i, wait) => self.lifecycle(Kind::Remediate, *i, *wait),
            Op::Delete(i) => self.delete(*i),
            Op::Wait => self.poll(true),
            Op::Concurrent(k, a, b) => self.concurrent(*k, *a, *b),
            Op::Sighup(changed) => {
                let key = if *changed {
                    &self.u.rogue_pub
                } else {
                    &self.u.image_pub
                };
                std::fs::write(self.u.world.dir.path().join("image.pub"), key).expect("image.pub");
                let before = self
                    .agent
                    .log_text()
                    .matches("trust store reloaded")
                    .count();
                self.agent.signal(nix::sys::signal::Signal::SIGHUP);
                let deadline = Instant::now() + Duration::from_secs(10);
                while self
                    .agent
                    .log_text()
                    .matches("trust store reloaded")
                    .count()
                    == before
                {
                    assert!(Instant::now() < deadline, "SIGHUP not handled");
                    std::thread::sleep(Duration::from_millis(10));
                }
                self.model.env.trust_changed = *changed;
            }
            Op::Term => {
                let (status, took) = self.agent.terminate(Duration::from_secs(12));
                assert!(status.success(), "SIGTERM exit: {status}");
                assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}");
                self.restart(false);
            }
            Op::Kill(ms) => {
                std::thread::sleep(Duration::from_millis(u64::from(*ms)));
                self.agent.kill9();
                self.restart(false);
            }
            Op::Reboot => {
                self.agent.kill9();
                self.restart(true);
            }
            Op::Depot(f) => {
                self.set_depot(*f);
                if switching_under_task {
                    self.mark_uncertain();
                }
            }
            Op::Scratch(full) => {
                self.set_scratch_full(*full);
                if switching_under_task {
                    self.mark_uncertain();
                }
            }
            Op::StateReadOnly(ro) => {
                self.set_state_ro(*ro);
                if switching_under_task {
                    self.mark_uncertain();
                }
            }
            Op::Hooks(h) => {
                for (flag, on) in [
                    ("enter-fails", *h == Hooks::EnterFails),
                    ("exit-fails", *h == Hooks::ExitFails),
                    ("install-fails", *h == Hooks::InstallFails),
                    ("install-hangs", *h == Hooks::InstallHangs),
                ] {
                    self.set_flag(flag, on);
                }
                self.model.env = Env {
                    enter_fails: *h == Hooks::EnterFails,
                    exit_fails: *h == Hooks::ExitFails,
                    install_fails: *h == Hooks::InstallFails,
                    install_hangs: *h == Hooks::InstallHangs,
                    ..self.model.env
                };
                if switching_under_task {
                    self.mark_uncertain();
                }
            }
        }
        self.poll(false);
    }

    /// After every step: the observation must be one the model allows.
    fn check_invariants(&mut self) {
        // Status first; if it says no task runs while the model has one, the task ended in
        // between: take its end, then look again.
        let mut status = self.agent.status();
        if self.model.running.as_ref().map(|r| r.id.as_str()) != status["running_task"].as_str() {
            self.poll(true);
            status = self.agent.status();
        }
        let m = &self.model;
        assert_eq!(
            status["running_task"].as_str(),
            m.running.as_ref().map(|r| r.id.as_str()),
            "running task: {status}"
        );
        let running_uncertain = m.running.as_ref().is_some_and(|r| r.uncertain);
        let digest = |i: Option<Img>| i.map(|i| self.digest(i).to_owned());

        // Blobs of both stores: every file hashes to its name (checked in blob_set).
        let blobs = [self.blob_set(false), self.blob_set(true)];
        let staged = self.agent.request("GET", "/v1/staged", None);
        assert_eq!(staged.status, 200, "{}", staged.body);
        let list = staged.json["staged"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for s in &list {
            assert_eq!(s["state"], "staged", "a staged image lacks content: {s}");
        }
        if !running_uncertain && m.running.as_ref().is_none_or(|r| r.kind == Kind::Stage) {
            assert_eq!(
                status["maintenance"]["active"], m.maintenance,
                "maintenance: {status}"
            );
            assert_eq!(
                status["installed"]["image"]["digest"]
                    .as_str()
                    .map(str::to_owned),
                digest(m.installed),
                "installed: {status}"
            );
        }
        if m.running.is_none() {
            let want: Vec<(String, bool)> = m
                .staged
                .iter()
                .map(|s| (self.digest(s.img).to_owned(), s.persistent))
                .collect();
            let got: Vec<(String, bool)> = list
                .iter()
                .map(|s| {
                    (
                        s["image"]["digest"].as_str().unwrap_or("?").to_owned(),
                        s["persistent"] == true,
                    )
                })
                .collect();
            assert_eq!(got, want, "staged list: {}", staged.body);
            if let Some(s) = &m.staged {
                let on_disk = self.record(s.img, s.persistent);
                assert_eq!(&on_disk, s, "staged record");
            }
            assert_eq!(blobs, m.blobs, "blobs under [scratch, volatile]");
            if self.model.host.builtin_installer {
                assert_eq!(
                    bank_digest(&self.agent),
                    digest(m.installed),
                    "the bank and the model disagree"
                );
            }
        }
        // Compliance: what status claims must be true on disk whatever happened; exactly the
        // model's when it is certain.
        let claimed = status["compliance"]["status"].as_str().unwrap_or("?");
        let image = status["compliance"]["image"]["digest"].as_str();
        if claimed == "staged" {
            assert!(
                status["staging"]["staged"] == true
                    && matches!(
                        status["staging"]["state"].as_str(),
                        Some("staged" | "staging")
                    ),
                "compliance says staged, staging does not: {status}"
            );
        }
        if claimed == "compliant" {
            assert_eq!(
                status["installed"]["image"]["digest"].as_str(),
                image,
                "compliance says compliant with another image installed: {status}"
            );
        }
        // (Only with no task running: a remediation removes the record it installed between
        // the two readings.)
        if m.running.is_none()
            && status["staging"]["staged"] == true
            && status["staging"]["state"] != "none"
        {
            let d = image.expect("an image of interest");
            let img = self.img_of(d);
            let s = list
                .iter()
                .find(|s| s["image"]["digest"] == d)
                .unwrap_or_else(|| panic!("staged: true for {img:?} with no record: {status}"));
            let rec = self.record(img, s["persistent"] == true);
            assert!(
                rec.mark(),
                "staged: true but the firmware is {:?}: {status}",
                rec.firmware
            );
        }
        if m.running.is_none() && !self.compliance_stale {
            let want = m.status_compliance();
            assert_eq!(
                image.map(str::to_owned),
                want.map(|(i, _)| self.digest(i).to_owned()),
                "compliance image: {status}"
            );
            assert_eq!(
                claimed,
                want.map_or("unknown", |(_, c)| c.as_str()),
                "compliance status (model: {:?}): {status}",
                want
            );
        }
        // Tasks: the ended ones as the model says; never two lifecycle tasks at once.
        let tasks = self.tasks();
        let mut running = 0;
        for t in &tasks {
            let id = t["id"].as_str().unwrap_or("?");
            let state = t["state"].as_str().unwrap_or("?");
            if matches!(state, "running" | "queued") {
                running += 1;
                continue;
            }
            if let Some(o) = m.finished.get(id) {
                let want = match o {
                    Outcome::Succeeded => ("succeeded", None),
                    Outcome::Failed(c) => ("failed", Some(*c)),
                };
                assert_eq!(
                    (Some(state), t["error"]["code"].as_str()),
                    (Some(want.0), want.1),
                    "task {id}: {t}"
                );
            }
            if state == "succeeded" && matches!(t["kind"].as_str(), Some("stage" | "remediate")) {
                assert!(t["error"].is_null(), "{t}");
            }
        }
        assert!(running <= 1, "two lifecycle tasks at once: {tasks:?}");
        let mut spans: Vec<(String, String)> = tasks
            .iter()
            .filter(|t| t["state"] != "running")
            .map(|t| {
                (
                    t["created_at"].as_str().unwrap_or("").to_owned(),
                    t["updated_at"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(
                w[0].1 <= w[1].0 || w[0].1.len() != w[1].0.len(),
                "two lifecycle tasks overlapped in time: {w:?}"
            );
        }
        // Maintenance: after a successful remediation the hooks agree that it was left.
        if m.running.is_none() && !m.maintenance && self.marker.exists() {
            let last_exit_ok = std::fs::read_to_string(&self.hook_log)
                .unwrap_or_default()
                .lines()
                .last()
                .is_some_and(|l| l == "exit");
            assert!(
                !last_exit_ok,
                "the exit hook ran last but the maintenance marker is still there"
            );
        }
    }
}

impl Drop for Sut {
    fn drop(&mut self) {
        self.agent.kill9();
        self.set_state_ro(false);
        let _ = std::fs::remove_file(&self.filler);
        let _ = std::fs::remove_dir_all(&self.agent.scratch);
        let _ = std::fs::remove_dir_all(&self.agent.home);
    }
}

/// Runs one sequence (as the generator or a regression test gives it), checking after every
/// step.
fn run_sequence(host: Host, ops: &[Op]) {
    run_counted(host, ops, None);
}

/// [`run_sequence`], telling the strategy how many operations were applied (it shrinks by first
/// dropping those never reached).
fn run_counted(host: Host, ops: &[Op], seen: Option<&std::sync::atomic::AtomicUsize>) {
    let Some(u) = universe() else { return };
    // One sequence at a time: they share the depot's fault switches, the trust key file and
    // the scratch filesystem.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = lock(&ONE_AT_A_TIME);
    lock(&u.stats).sequences += 1;
    let mut sut = Sut::new(u, host);
    sut.check_invariants();
    for op in ops {
        if let Some(seen) = seen {
            seen.fetch_add(1, Ordering::SeqCst);
        }
        sut.apply(op);
        sut.check_invariants();
    }
    // The end: whatever runs completes, and the host can always be brought to an image.
    sut.poll(true);
    sut.check_invariants();
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn random_operation_sequences_keep_the_agent_within_the_model() {
    if universe().is_none() {
        return;
    }
    let cases = env_u64("VIBSTAGE_MODEL_CASES", 40) as u32;
    let steps = env_u64("VIBSTAGE_MODEL_STEPS", 20) as usize;
    let seed = env_u64(
        "VIBSTAGE_MODEL_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    );
    eprintln!(
        "lifecycle model: {cases} sequences of up to {steps} operations, seed {seed} (VIBSTAGE_MODEL_SEED={seed} replays it)"
    );
    let config = Config {
        cases,
        max_shrink_iters: env_u64("VIBSTAGE_MODEL_SHRINK_ITERS", 64) as u32,
        failure_persistence: None,
        ..Config::default()
    };
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let started = Instant::now();
    let result = runner.run(
        &Lifecycle::sequential_strategy(1..=steps),
        |(g, ops, seen)| {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_counted(g.host, &ops, seen.as_deref())
            }));
            match outcome {
                Ok(()) => Ok(()),
                Err(e) => {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_default();
                    Err(TestCaseError::fail(msg))
                }
            }
        },
    );
    let stats = lock(&universe().expect("universe").stats);
    eprintln!(
        "lifecycle model: seed {seed}, {} sequences (shrinking included), {} steps, {} kills, {} restarts, {} resyncs in {} s",
        stats.sequences,
        stats.steps,
        stats.kills,
        stats.restarts,
        stats.resyncs,
        started.elapsed().as_secs()
    );
    for (op, n) in &stats.ops {
        eprintln!("  {op}: {n}");
    }
    for (t, n) in &stats.tasks {
        eprintln!("  task {t}: {n}");
    }
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, (g, ops, _))) => panic!(
            "the agent left the model (seed {seed}; VIBSTAGE_MODEL_SEED={seed} replays it)\n{why}\nshrunk sequence on host {:?}:\n{ops:#?}",
            g.host
        ),
        Err(e) => panic!("seed {seed}: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Shrunk sequences of the defects the model found, kept as regression tests (issue 12).

fn host(dpus: bool, builtin_installer: bool, volatile: bool) -> Host {
    Host {
        dpus,
        builtin_installer,
        volatile,
    }
}

/// Found by the model: with the state directory read-only, a compliance check was refused
/// (`internal`, its report could not be saved) and yet status went on showing that image's
/// compliance, which a restart then forgot.
#[test]
fn issue12_a_check_refused_for_a_read_only_state_dir_changes_nothing() {
    run_sequence(
        host(false, false, false),
        &[Op::StateReadOnly(true), Op::Check(Img::Old)],
    );
}

/// The same defect on the stage path: a stage refused because the state could not be saved
/// still raised the rollback serial in memory, so an older serial was then refused
/// (`rollback_refused`) although the newer image had never been accepted.
#[test]
fn issue12_a_stage_refused_for_a_read_only_state_dir_raises_no_serial() {
    run_sequence(
        host(true, true, true),
        &[
            Op::StateReadOnly(true),
            Op::Stage(Img::Base, true),
            Op::StateReadOnly(false),
            Op::Stage(Img::Old, true),
        ],
    );
}

/// Found by the model: status kept saying compliance `staged` after the staged content was
/// deleted (the stored report was not re-derived from disk), so a controller gating remediation
/// on it was told a host was ready that had nothing staged.
#[test]
fn issue12_status_is_not_staged_after_the_staged_content_is_deleted() {
    run_sequence(
        host(false, false, false),
        &[Op::Stage(Img::Lab, true), Op::Delete(Img::Lab)],
    );
}

/// The same with the volatile path lost in a reboot: the report said `staged` for content that
/// was gone.
#[test]
fn issue12_status_is_not_staged_after_a_reboot_lost_the_volatile_content() {
    run_sequence(
        host(false, true, true),
        &[
            Op::Scratch(true),
            Op::Stage(Img::Lab, true),
            Op::Reboot,
            Op::Scratch(false),
        ],
    );
}

/// Found by the model: after a remediation had fetched firmware of a vendor the host cannot
/// stage and then failed to install (compliance `staged`, R8), staging the same image again
/// rewrote its record without that firmware: the staged mark and compliance `staged` were lost
/// although every byte was still there (and a status read during that staging said `staged` in
/// compliance and `staged: false` in staging).
#[test]
fn issue12_staging_again_after_a_failed_remediation_keeps_the_image_staged() {
    run_sequence(
        host(false, false, false),
        &[
            Op::Hooks(Hooks::InstallFails),
            Op::Remediate(Img::Next, true),
            Op::Stage(Img::Next, true),
        ],
    );
}
