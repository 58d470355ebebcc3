//! containerd as a peer of P1: what a user would run instead of vibstage to get verified content
//! onto a host, `ctr content fetch` into containerd's content store.
//!
//! The bench starts its own `containerd` (Debian's package) with its own root, state directory
//! and sockets inside the work directory and a configuration that loads no CRI, no tracing and
//! no `/opt` plugin, so a system containerd is never touched. The same nginx that serves the
//! depot serves one OCI image whose layers are the P1 image's VIBs (hard links to the same files)
//! under the distribution API's read paths (`/v2/<name>/manifests/sha256:…`,
//! `/v2/<name>/blobs/sha256:…`, see [`crate::nginx`]), with the same certificate; `ctr` pulls it
//! by digest and trusts the bench's CA through a `hosts.toml`. Between runs every blob is removed
//! (`ctr content rm`) and the bench waits until containerd's garbage collector has deleted the
//! files, since a blob still on disk would not be fetched again.
//!
//! What containerd guarantees (checked with `strace` on 1.6.20): each blob is written under
//! `ingest/`, hashed while it is written and refused on a digest or size mismatch, fsync'd, then
//! renamed into `blobs/sha256/<hex>` (the directory is not fsync'd); its metadata goes into a
//! bolt database (fdatasync per transaction). An interrupted ingest is resumed from its offset.
//! Nothing is signed: the reference's digest pins the manifest, which pins the layers.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vibstage_protocol::Digest;

use crate::env::{Env, ImageFile};
use crate::procfs::{self, Memory};
use crate::tools::{Cost, PeerRun};
use crate::{BenchError, Result, report, say, tools};

/// The repository of the P1 image in the OCI tree.
const REPOSITORY: &str = "vibstage-bench/p1";

/// The containerd namespace the bench fetches into.
const NAMESPACE: &str = "vibstage-bench";

/// An image of the depot laid out as an OCI image in the distribution tree nginx serves.
#[derive(Debug, Clone)]
pub struct OciImage {
    /// `127.0.0.1:<port>/<repository>@sha256:<manifest>`: a pull by digest.
    pub reference: String,
    /// Every blob a fetch stores (`sha256:<hex>`): manifest, config and layers.
    pub blobs: Vec<String>,
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(BenchError::io(format!("write {}", path.display())))
}

/// Lays `image` out under `root` (nginx's `/v2/` tree) as one OCI image whose layers are its VIBs
/// in order (hard links to the depot's files, copies where a link is refused), with a minimal
/// image configuration; `registry` is `host:port` of nginx's depot server.
pub fn lay_out(root: &Path, image: &ImageFile, registry: &str) -> Result<OciImage> {
    let repo = root.join("v2").join(REPOSITORY);
    let (blobs_dir, manifests) = (repo.join("blobs"), repo.join("manifests"));
    for d in [&blobs_dir, &manifests] {
        std::fs::create_dir_all(d).map_err(BenchError::io(format!("create {}", d.display())))?;
    }
    let mut blobs = Vec::new();
    let mut layers = Vec::new();
    for (file, digest, size) in &image.vibs {
        let name = format!("sha256:{}", digest.to_hex());
        let target = blobs_dir.join(&name);
        if !target.exists() && std::fs::hard_link(file, &target).is_err() {
            std::fs::copy(file, &target).map_err(BenchError::io(format!(
                "copy {} to {}",
                file.display(),
                target.display()
            )))?;
        }
        layers.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": name,
            "size": size,
        }));
        blobs.push(name);
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": blobs },
    }))
    .map_err(|e| BenchError::Setup(format!("encode an OCI config: {e}")))?;
    let config_name = format!("sha256:{}", Digest::of(&config).to_hex());
    write(&blobs_dir.join(&config_name), &config)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_name,
            "size": config.len(),
        },
        "layers": layers,
    }))
    .map_err(|e| BenchError::Setup(format!("encode an OCI manifest: {e}")))?;
    let manifest_name = format!("sha256:{}", Digest::of(&manifest).to_hex());
    write(&manifests.join(&manifest_name), &manifest)?;
    blobs.push(config_name);
    blobs.push(manifest_name.clone());
    Ok(OciImage {
        reference: format!("{registry}/{REPOSITORY}@{manifest_name}"),
        blobs,
    })
}

/// P1's containerd peer: the daemon and the OCI image of the P1 VIBs, started once for all
/// rounds.
#[derive(Debug)]
pub struct Peer {
    daemon: Containerd,
    image: OciImage,
}

impl Peer {
    /// Installs containerd when missing ([`tools::ensure_package`]), lays `image` out in the
    /// OCI tree nginx serves and starts a daemon in the work directory.
    pub fn start(env: &Env, image: &ImageFile, log: &mut dyn Write) -> Result<Peer> {
        let binary = tools::ensure_package("containerd", "containerd", log)?;
        let ctr = tools::ensure_package("ctr", "containerd", log)?;
        let registry = format!("127.0.0.1:{}", env.nginx.port);
        let oci = lay_out(&env.oci_dir, image, &registry)?;
        let dir = env.dir.join("containerd");
        std::fs::create_dir_all(&dir).map_err(BenchError::io("create containerd dir"))?;
        let daemon = Containerd::start(&binary, &ctr, &dir, &registry, &env.ca_pem())?;
        say(
            log,
            format!(
                "P1 peer: {}, pulling {}",
                tools::version(&binary),
                oci.reference
            ),
        );
        Ok(Peer { daemon, image: oci })
    }

    /// One round: `ctr content fetch` of the image, checked to be in the store, then removed
    /// from it. The cost is `ctr`'s plus the daemon's CPU and peak RSS.
    pub fn run_once(&self, env: &Env) -> Result<PeerRun> {
        let c = &self.daemon;
        c.reset_peak()?;
        let (daemon0, nginx0) = (c.cpu(), env.nginx.cpu());
        let (client, _) = tools::measured(&c.fetch(&self.image))?;
        let (daemon_cpu, nginx_cpu) = (c.cpu() - daemon0, env.nginx.cpu() - nginx0);
        let daemon_peak = c.memory()?.peak;
        let missing = c.missing(&self.image);
        if missing > 0 {
            return Err(BenchError::Run(format!(
                "ctr content fetch succeeded but {missing} blobs are not in containerd's store"
            )));
        }
        c.remove(&self.image)?;
        Ok(PeerRun {
            cost: Cost {
                wall: client.wall,
                cpu: client.cpu + daemon_cpu,
                peak: client.peak + daemon_peak,
            },
            nginx_cpu,
            detail: format!(
                "ctr {:.2} CPU-s, {} + containerd {:.2} CPU-s, {}",
                client.cpu,
                report::mib(client.peak as f64),
                daemon_cpu,
                report::mib(daemon_peak as f64),
            ),
        })
    }
}

/// A containerd daemon of the bench's own.
#[derive(Debug)]
pub struct Containerd {
    child: Option<Child>,
    /// Its directory: configuration, root, state, sockets, log, `hosts.d`.
    dir: PathBuf,
    /// `ctr`, the client that fetches.
    ctr: PathBuf,
    /// Its gRPC socket.
    socket: PathBuf,
    /// `hosts.d`: how to reach the registry (HTTPS, the bench's CA).
    hosts: PathBuf,
    /// `blobs/sha256` of its content store, watched until a removal has reached the disk.
    blobs: PathBuf,
}

impl Containerd {
    /// Writes a configuration into `dir` and starts `binary` with it; `registry` (`host:port`)
    /// is reached over HTTPS trusting `ca`. Waits until `ctr version` answers.
    pub fn start(
        binary: &Path,
        ctr: &Path,
        dir: &Path,
        registry: &str,
        ca: &Path,
    ) -> Result<Containerd> {
        let hosts = dir.join("hosts.d");
        let host_dir = hosts.join(registry);
        std::fs::create_dir_all(&host_dir)
            .map_err(BenchError::io(format!("create {}", host_dir.display())))?;
        let d = dir.display();
        // containerd talks plain HTTP to a registry on 127.0.0.1 unless told otherwise.
        write(
            &host_dir.join("hosts.toml"),
            format!(
                "server = \"https://{registry}\"\n\n[host.\"https://{registry}\"]\n  \
                 capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
                ca.display()
            )
            .as_bytes(),
        )?;
        let config = format!(
            r#"# generated by vibstage-bench: a containerd of the bench's own, nothing shared
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.internal.v1.opt",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
"#
        );
        let conf = dir.join("config.toml");
        write(&conf, config.as_bytes())?;
        let log = std::fs::File::create(dir.join("containerd.log"))
            .map_err(BenchError::io("create containerd.log"))?;
        let log2 = log
            .try_clone()
            .map_err(BenchError::io("open containerd.log"))?;
        let child = Command::new(binary)
            .arg("--config")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(BenchError::io(format!("start {}", binary.display())))?;
        let mut containerd = Containerd {
            child: Some(child),
            dir: dir.to_owned(),
            ctr: ctr.to_owned(),
            socket: dir.join("containerd.sock"),
            hosts,
            blobs: dir.join("root/io.containerd.content.v1.content/blobs/sha256"),
        };
        containerd.wait_ready()?;
        Ok(containerd)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(BenchError::Setup(format!(
                    "containerd exited at start ({status}): {}",
                    self.log_tail()
                )));
            }
            if self.socket.exists()
                && self
                    .ctr_cmd()
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Setup(format!(
                    "containerd does not answer on {} after 20 s: {}",
                    self.socket.display(),
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// `ctr` talking to this daemon in the bench's namespace.
    fn ctr_cmd(&self) -> Command {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(NAMESPACE)
            .stdin(Stdio::null());
        cmd
    }

    /// `ctr content fetch` of `image` (its progress display goes to the captured stdout).
    pub fn fetch(&self, image: &OciImage) -> Command {
        let mut cmd = self.ctr_cmd();
        cmd.args(["content", "fetch", "--hosts-dir"])
            .arg(&self.hosts)
            .arg(&image.reference);
        cmd
    }

    /// Its process id.
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// CPU seconds the daemon used so far.
    pub fn cpu(&self) -> f64 {
        self.pid().map_or(0.0, procfs::cpu_seconds)
    }

    /// Its memory now; `peak` since the last [`Containerd::reset_peak`].
    pub fn memory(&self) -> Result<Memory> {
        let pid = self
            .pid()
            .ok_or_else(|| BenchError::Run("containerd is not running".into()))?;
        procfs::memory_of(pid)
    }

    /// Resets the daemon's peak resident set (`VmHWM`) to its resident set now, so that each
    /// run's peak is its own (`5` into `/proc/<pid>/clear_refs`).
    pub fn reset_peak(&self) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| BenchError::Run("containerd is not running".into()))?;
        let path = format!("/proc/{pid}/clear_refs");
        std::fs::write(&path, "5").map_err(BenchError::io(format!("write {path}")))
    }

    /// How many of `image`'s blobs are not in the content store's directory.
    pub fn missing(&self, image: &OciImage) -> usize {
        image
            .blobs
            .iter()
            .filter_map(|b| b.strip_prefix("sha256:"))
            .filter(|hex| !self.blobs.join(hex).exists())
            .count()
    }

    /// Removes `image`'s blobs from the content store and waits until their files are gone
    /// from the disk (the garbage collector deletes them after the records); else a fetch of
    /// the same image would find them there and download nothing.
    pub fn remove(&self, image: &OciImage) -> Result<()> {
        let out = self
            .ctr_cmd()
            .args(["content", "ls", "--quiet"])
            .output()
            .map_err(BenchError::io("run ctr content ls"))?;
        let listed: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if !listed.is_empty() {
            // A blob the collector removed meanwhile makes this fail: what counts is the disk.
            let _ = self
                .ctr_cmd()
                .args(["content", "rm"])
                .args(&listed)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let n = image.blobs.len() - self.missing(image);
            if n == 0 {
                tools::settle();
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Run(format!(
                    "containerd still holds {n} blobs in {} 60 s after `ctr content rm`",
                    self.blobs.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the daemon (SIGTERM, then SIGKILL after 10 s) and waits for it.
    pub fn stop(&mut self) {
        crate::tools::stop(
            &mut self.child,
            nix::sys::signal::Signal::SIGTERM,
            Duration::from_secs(10),
        );
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oci_layout_links_the_vibs_and_pins_them_by_digest() {
        let dir = tempfile::tempdir().expect("temp dir");
        let vibs: Vec<(PathBuf, Digest, u64)> = [&b"first"[..], b"second"]
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                let path = dir.path().join(format!("vib-{i}"));
                std::fs::write(&path, bytes).expect("write vib");
                (path, Digest::of(bytes), bytes.len() as u64)
            })
            .collect();
        let image = ImageFile {
            path: dir.path().join("image.json"),
            envelope: serde_json::Value::Null,
            vibs: vibs.clone(),
        };
        let root = dir.path().join("oci");
        let oci = lay_out(&root, &image, "127.0.0.1:5000").expect("laid out");
        let repo = root.join("v2").join(REPOSITORY);
        let (_, manifest_name) = oci.reference.split_once('@').expect("a digest reference");
        assert!(
            oci.reference
                .starts_with("127.0.0.1:5000/vibstage-bench/p1@sha256:")
        );
        let manifest = std::fs::read(repo.join("manifests").join(manifest_name)).expect("manifest");
        assert_eq!(
            format!("sha256:{}", Digest::of(&manifest).to_hex()),
            manifest_name
        );
        let manifest: serde_json::Value = serde_json::from_slice(&manifest).expect("json");
        let layers = manifest["layers"].as_array().expect("layers");
        assert_eq!(layers.len(), 2);
        for ((path, digest, size), layer) in vibs.iter().zip(layers) {
            let name = format!("sha256:{}", digest.to_hex());
            assert_eq!(layer["digest"], name.as_str());
            assert_eq!(layer["size"], *size);
            let blob = std::fs::read(repo.join("blobs").join(&name)).expect("blob");
            assert_eq!(blob, std::fs::read(path).expect("vib"));
        }
        let config = manifest["config"]["digest"].as_str().expect("config");
        let bytes = std::fs::read(repo.join("blobs").join(config)).expect("config blob");
        assert_eq!(format!("sha256:{}", Digest::of(&bytes).to_hex()), config);
        assert_eq!(oci.blobs.len(), 4);
    }
}
