//! LazyFS for power-loss tests (issue 12): a FUSE filesystem with its own page cache that keeps
//! every write in memory until it is fsynced, so that dropping that cache (`lazyfs::clear-cache`),
//! or killing LazyFS at a chosen operation, loses exactly what a power cut loses and nothing that
//! a SIGKILL of the agent would lose. Metadata operations (create, rename, unlink, mkdir) go to
//! the underlying directory at once: LazyFS models lost *data*, not lost directory entries.
//!
//! [`binary`] builds LazyFS once from the vendored sources (`shared/vendor/`, found beside the
//! repository or through `VIBSTAGE_VENDOR_DIR`) into `target/lazyfs/`, under a lock, with
//! `tests/lazyfs/build.sh`; later runs reuse it. [`LazyFs`] mounts it over a directory of the
//! real disk and injects faults through its FIFO.
//!
//! The harness refuses to pass silently: without `/dev/fuse`, `fusermount3` or a build, it
//! panics saying what is missing. `VIBSTAGE_POWER_LOSS=skip` is the one explicit opt-out, for
//! developer machines without FUSE ([`available`] then returns `false`); CI never sets it.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The environment variable that, set to `skip`, lets power-loss tests pass without running.
pub const OPT_OUT: &str = "VIBSTAGE_POWER_LOSS";

/// Whether power-loss tests should run: `false` only if the operator opted out explicitly.
/// Panics with the reason if FUSE is missing and they did not.
pub fn available() -> bool {
    if std::env::var(OPT_OUT).is_ok_and(|v| v == "skip") {
        eprintln!("{OPT_OUT}=skip: power-loss tests NOT run (no FUSE on this machine?)");
        return false;
    }
    let missing = |what: &str| -> ! {
        panic!(
            "power-loss tests need FUSE and {what} is missing: install fuse3 and libfuse3-dev \
             (`.ci/run` does, as root), or set {OPT_OUT}=skip to opt out on a machine without FUSE"
        )
    };
    if !Path::new("/dev/fuse").exists() {
        missing("/dev/fuse");
    }
    if !on_path("fusermount3") {
        missing("fusermount3");
    }
    true
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// `target/` of this build, from the test binary's place (`target/<profile>/deps/`).
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "target"))
        .map(Path::to_path_buf)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

fn vendor_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VIBSTAGE_VENDOR_DIR") {
        return PathBuf::from(dir);
    }
    // shared/ lies beside the repository (or the worktree) on developer machines and in CI.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dir = std::fs::canonicalize(&repo).unwrap_or(repo);
    dir.pop();
    dir.join("shared/vendor")
}

/// The LazyFS binary, built on first use (about half a minute on 2 cores) and cached in
/// `target/lazyfs/`. Concurrent test processes wait for one build under a file lock.
pub fn binary() -> PathBuf {
    let out = target_dir().join("lazyfs");
    let binary = out.join("lazyfs-a47a5ba/lazyfs/build/lazyfs");
    std::fs::create_dir_all(target_dir()).expect("target dir");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(target_dir().join("lazyfs.lock"))
        .expect("lazyfs lock file");
    lock.lock().expect("lock for the LazyFS build");
    if !out.join("ok").exists() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("lazyfs/build.sh");
        let vendor = vendor_dir();
        eprintln!(
            "building LazyFS from {} into {}",
            vendor.display(),
            out.display()
        );
        let log = target_dir().join("lazyfs-build.log");
        let status = Command::new("bash")
            .arg(&script)
            .arg(&vendor)
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("build log"))
            .stderr(std::fs::File::create(&log).expect("build log"))
            .status()
            .expect("run tests/lazyfs/build.sh");
        let tail: String = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            status.success() && binary.is_file(),
            "building LazyFS failed ({status}); power-loss tests cannot run. Needs g++ cmake \
             libfuse3-dev fuse3 (`.ci/run` installs them) and the sources in {}.\n{tail}",
            vendor.display()
        );
    }
    drop(lock);
    binary
}

/// A fault that kills LazyFS (losing its cache, like a power cut) at an operation.
#[derive(Clone, Debug)]
pub struct Crash {
    /// `before` or `after`.
    pub timing: &'static str,
    /// `write`, `fsync`, `rename`, `create`, `unlink`, `symlink`, ….
    pub op: &'static str,
    /// A regex on the operation's (source) path on the underlying disk.
    pub from: Option<String>,
    /// A regex on the destination path (rename, link, symlink only).
    pub to: Option<String>,
}

/// One LazyFS mount of `disk` (a directory of the real filesystem) on `mnt`.
pub struct LazyFs {
    binary: PathBuf,
    /// The underlying directory: what a power cut leaves is read here, with LazyFS unmounted.
    pub disk: PathBuf,
    /// The mount point the agent uses.
    pub mnt: PathBuf,
    config: PathBuf,
    fifo: PathBuf,
    /// LazyFS's own log (fault acknowledgements).
    pub log: PathBuf,
    /// `[[injection]]` tables for the next mount (torn writes: see [`torn_op`]).
    injections: String,
    /// The process that serves the mount: LazyFS detaches from the one started, even with `-f`.
    pid: Option<i32>,
}

impl LazyFs {
    /// Prepares `dir/disk` and `dir/mnt` (root-owned, 0700) and mounts.
    pub fn mount_in(dir: &Path) -> LazyFs {
        let disk = dir.join("disk");
        let mnt = dir.join("mnt");
        for d in [&disk, &mnt] {
            std::fs::create_dir_all(d).expect("mkdir");
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        }
        let fifo = dir.join("faults.fifo");
        let log = dir.join("lazyfs.log");
        let config = dir.join("lazyfs.toml");
        let mut fs = LazyFs {
            binary: binary(),
            disk,
            mnt,
            config,
            fifo,
            log,
            pid: None,
            injections: String::new(),
        };
        fs.mount();
        fs
    }

    /// Faults LazyFS takes only from its configuration, for the next [`LazyFs::mount`]: the
    /// FIFO takes commands of at most 100 bytes, too short for a path that ends in a sha256.
    pub fn set_injections(&mut self, tables: String) {
        self.injections = tables;
    }

    fn write_config(&self) {
        std::fs::write(
            &self.config,
            format!(
                "[faults]\nfifo_path=\"{}\"\n[cache]\napply_eviction=false\n[cache.simple]\n\
                 custom_size=\"256mb\"\nblocks_per_page=1\n[filesystem]\nlog_all_operations={}\n\
                 logfile=\"{}\"\n{}",
                self.fifo.display(),
                // Every operation in LazyFS's log, to see what a fault met.
                std::env::var_os("VIBSTAGE_LAZYFS_LOG_OPS").is_some(),
                self.log.display(),
                self.injections,
            ),
        )
        .expect("lazyfs config");
    }

    /// Mounts (again) and waits until the mount and its fault FIFO are there.
    pub fn mount(&mut self) {
        assert!(self.pid.is_none(), "LazyFS already mounted");
        self.write_config();
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log.with_extension("out"))
            .expect("lazyfs stdout");
        let mut child = Command::new(&self.binary)
            .arg(&self.mnt)
            .arg("--config-path")
            .arg(&self.config)
            // default_permissions: the kernel checks modes as on a local filesystem (the agent
            // relies on 0700 directories and 0400 blobs); allow_other: LazyFS's own advice.
            .args(["-o", "allow_other", "-o", "default_permissions"])
            .args(["-o", "modules=subdir", "-o"])
            .arg(format!("subdir={}", self.disk.display()))
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("start LazyFS");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !(self.mounted() && self.fifo_has_reader()) {
            if let Ok(Some(status)) = child.try_wait()
                && !status.success()
            {
                panic!(
                    "LazyFS exited at mount ({status}): {}",
                    std::fs::read_to_string(self.log.with_extension("out")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "LazyFS did not mount in 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.pid = Some(
            self.server_pid()
                .expect("the LazyFS process serving the mount"),
        );
        // The one started may stay (then it is the server) or have exited: reap it either way
        // once it is done, from a thread, so that it never lingers as a zombie.
        std::thread::spawn(move || child.wait());
    }

    /// The LazyFS process whose command line names this mount point.
    fn server_pid(&self) -> Option<i32> {
        let mnt = self.mnt.as_os_str().as_encoded_bytes().to_vec();
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let mut args = cmdline.split(|b| *b == 0);
            let exe = args.next()?;
            (exe == self.binary.as_os_str().as_encoded_bytes() && args.any(|a| a == mnt))
                .then_some(pid)
        })
    }

    /// Whether `mnt` is a mount point of LazyFS now.
    pub fn mounted(&self) -> bool {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mnt = self.mnt.display().to_string();
        mounts
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(mnt.as_str()) && l.contains("fuse.lazyfs"))
    }

    fn fifo_has_reader(&self) -> bool {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK)
            .open(&self.fifo)
            .is_ok()
    }

    /// Whether LazyFS is still running (a crash fault kills it).
    pub fn alive(&mut self) -> bool {
        // A zombie still answers kill(0): look at its state too.
        self.pid.is_some_and(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
                .is_some_and(|zombie| !zombie)
        })
    }

    /// Sends one command line to LazyFS's fault FIFO.
    pub fn command(&self, line: &str) {
        // LazyFS reads 100 bytes at a time and would act on a truncated command.
        assert!(line.len() < 100, "LazyFS command too long: {line}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&self.fifo)
            {
                Ok(mut f) => {
                    f.write_all(format!("{line}\n").as_bytes())
                        .expect("write to the LazyFS FIFO");
                    return;
                }
                Err(e) => assert!(Instant::now() < deadline, "LazyFS FIFO has no reader: {e}"),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches(needle)
            .count()
    }

    /// Drops every un-fsynced byte, and waits until LazyFS says it did.
    pub fn clear_cache(&self) {
        let before = self.log_count("cache is cleared");
        self.command("lazyfs::clear-cache");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log_count("cache is cleared") == before {
            assert!(Instant::now() < deadline, "LazyFS never cleared its cache");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Writes every cached byte to the disk (a clean shutdown: unmounting does not).
    pub fn checkpoint(&self) {
        let before = self.log_count("checkpoint is done");
        self.command("lazyfs::cache-checkpoint");
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.log_count("checkpoint is done") == before {
            assert!(
                Instant::now() < deadline,
                "LazyFS never finished a checkpoint"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Arms a crash fault; LazyFS dies at the next matching operation.
    pub fn arm_crash(&self, crash: &Crash) {
        let mut line = format!("lazyfs::crash::timing={}::op={}", crash.timing, crash.op);
        if let Some(from) = &crash.from {
            line.push_str(&format!("::from_rgx={from}"));
        }
        if let Some(to) = &crash.to {
            line.push_str(&format!("::to_rgx={to}"));
        }
        self.command(&line);
    }

    /// Unmounts (the agent must be stopped). Whatever LazyFS still held un-fsynced is lost, as
    /// in a power cut; a LazyFS that crashed leaves a dead mount, which is detached.
    pub fn unmount(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.mounted() {
            let lazy = !self.alive();
            let _ = Command::new("fusermount3")
                .arg(if lazy { "-uz" } else { "-u" })
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status();
            if !self.mounted() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "could not unmount {}",
                self.mnt.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.alive()
            && let Some(pid) = self.pid
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        self.pid = None;
    }

    /// Where `path` (under [`LazyFs::mnt`]) lies on the underlying disk.
    pub fn on_disk(&self, path: &Path) -> PathBuf {
        self.disk.join(
            path.strip_prefix(&self.mnt)
                .expect("a path under the mount"),
        )
    }
}

/// A torn write (for [`LazyFs::set_injections`]) of `file`, a path under [`LazyFs::disk`]: its
/// `occurrence`-th write is split in `parts`, only those in `persist` (1-based) reach the disk,
/// and LazyFS dies.
pub fn torn_op(file: &Path, occurrence: u32, parts: u32, persist: &[u32]) -> String {
    format!(
        "[[injection]]\ntype=\"torn-op\"\nfile=\"{}\"\noccurrence={occurrence}\nparts={parts}\npersist=[{}]\n",
        file.display(),
        join(persist)
    )
}

/// A torn sequence (for [`LazyFs::set_injections`]) of `file`: of its `occurrence`-th run of
/// writes with no fsync between them, only the writes in `persist` (1-based) reach the disk,
/// and LazyFS dies after the last of them.
pub fn torn_seq(file: &Path, occurrence: u32, persist: &[u32]) -> String {
    format!(
        "[[injection]]\ntype=\"torn-seq\"\nop=\"write\"\nfile=\"{}\"\noccurrence={occurrence}\npersist=[{}]\n",
        file.display(),
        join(persist)
    )
}

fn join(values: &[u32]) -> String {
    values
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if self.mounted() {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status();
        }
        if self.alive()
            && let Some(pid) = self.pid
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
