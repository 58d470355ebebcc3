//! The benchmark's world: a work directory with signing keys, a development CA with the
//! controller's client certificate and one server certificate shared by the agents, a depot built
//! with `vibstagectl`'s library code (`depot add`, `image create`) and served by nginx.

use std::cell::RefCell;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use ed25519_dalek::SigningKey;
use time::OffsetDateTime;
use vibstage_ctl::pki::{DevCa, Validity, issue_client, issue_server};
use vibstage_ctl::publish::depot::VibSpec;
use vibstage_ctl::publish::image::{ComponentRef, ImageSpec};
use vibstage_protocol::{AcceptanceLevel, Version, VibKind, VibTarget};

use crate::agent::{Agent, AgentSetup};
use crate::env::{Bins, Env, ImageFile};
use crate::nginx::{self, Nginx};
use crate::{BenchError, Options, Result, say};

fn fresh_key() -> Result<SigningKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed)
        .map_err(|e| BenchError::Setup(format!("no randomness for a signing key: {e}")))?;
    Ok(SigningKey::from_bytes(&seed))
}

fn write(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    std::fs::write(path, bytes).map_err(BenchError::io(format!("write {}", path.display())))
}

impl Env {
    /// Creates the work directory, keys, certificates and depot, and starts nginx.
    pub fn new(options: &Options, log: &mut dyn Write) -> Result<Env> {
        let bins = Bins::find(options.bin_dir.as_deref())?;
        let nginx_bin = nginx::ensure_installed(log)?;
        crate::tools::need("curl", "curl")?;
        crate::tools::need("openssl", "openssl")?;
        crate::tools::need("dd", "coreutils")?;
        let (temp, dir) = match &options.dir {
            Some(d) => {
                std::fs::create_dir_all(d)
                    .map_err(BenchError::io(format!("create {}", d.display())))?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("vibstage-bench-")
                    .tempdir()
                    .map_err(BenchError::io("create a temporary directory"))?;
                let path = t.path().to_owned();
                if options.keep {
                    (None, t.keep())
                } else {
                    (Some(t), path)
                }
            }
        };
        say(log, format!("work directory: {}", dir.display()));

        let (image_key, vendor_key) = (fresh_key()?, fresh_key()?);
        for (name, k) in [("image", &image_key), ("vendor", &vendor_key)] {
            let pem = vibstage_protocol::dsse::verifying_key_to_pem(&k.verifying_key())
                .map_err(|e| BenchError::Setup(format!("encode {name} key: {e}")))?;
            write(&dir.join(format!("{name}.pub")), pem)?;
        }
        let now = OffsetDateTime::now_utc();
        let ca = DevCa::generate(Validity::standard(now))
            .map_err(|e| BenchError::Setup(format!("development CA: {e}")))?;
        let (from, to) = (
            now - time::Duration::hours(1),
            now + time::Duration::days(7),
        );
        let tls_dir = dir.join("tls");
        std::fs::create_dir_all(&tls_dir).map_err(BenchError::io("create tls dir"))?;
        let client = issue_client(&ca, "controller", from, to)
            .map_err(|e| BenchError::Setup(format!("client certificate: {e}")))?;
        let server = issue_server(&ca, "127.0.0.1", from, to)
            .map_err(|e| BenchError::Setup(format!("server certificate: {e}")))?;
        write(&tls_dir.join("ca.pem"), ca.cert_pem())?;
        write(&tls_dir.join("ca.key"), ca.key_pem())?;
        write(&tls_dir.join("client.pem"), &client.cert_pem)?;
        write(&tls_dir.join("client.key"), &client.key_pem)?;
        write(&tls_dir.join("server.pem"), &server.cert_pem)?;
        write(&tls_dir.join("server.key"), &server.key_pem)?;

        let depot_dir = dir.join("depot");
        std::fs::create_dir_all(&depot_dir).map_err(BenchError::io("create depot dir"))?;
        let status_file = dir.join("status.json");
        write(&status_file, "{}")?;
        let oci_dir = dir.join("oci");
        std::fs::create_dir_all(&oci_dir).map_err(BenchError::io("create oci dir"))?;
        let nginx = Nginx::start(
            &nginx_bin,
            &dir.join("nginx"),
            &nginx::Files {
                depot: &depot_dir,
                cert: &tls_dir.join("server.pem"),
                key: &tls_dir.join("server.key"),
                client_ca: &tls_dir.join("ca.pem"),
                status: &status_file,
                oci: &oci_dir,
            },
        )?;
        say(log, format!("nginx depot at {}", nginx.url()));
        Ok(Env {
            _temp: temp,
            dir,
            bins,
            image_key,
            vendor_key,
            tls_dir,
            depot_dir,
            nginx,
            status_file,
            oci_dir,
            keep: options.keep || options.dir.is_some(),
            images: RefCell::default(),
        })
    }

    /// The depot URL agents stage from.
    pub fn depot_url(&self) -> String {
        self.nginx.url()
    }

    /// The CA that signed nginx's and the agents' certificates.
    pub fn ca_pem(&self) -> PathBuf {
        self.tls_dir.join("ca.pem")
    }

    /// Adds `count` VIBs of `size` bytes of fresh pseudo-random content (seeded by `name`) to the
    /// depot as component `name` 1.0, and signs image `name` of that component.
    pub fn image(
        &self,
        name: &str,
        count: usize,
        size: u64,
        log: &mut dyn Write,
    ) -> Result<ImageFile> {
        if let Some(image) = self.images.borrow().get(name)
            && image.vibs.len() == count
            && image.vibs.iter().all(|v| v.2 == size)
        {
            return Ok(image.clone());
        }
        let start = Instant::now();
        let src = self.dir.join("src");
        std::fs::create_dir_all(&src).map_err(BenchError::io("create src dir"))?;
        let component: vibstage_protocol::Name = name
            .parse()
            .map_err(|e| BenchError::Setup(format!("component name {name}: {e}")))?;
        let spec = VibSpec {
            component: component.clone(),
            component_version: Version::from("1.0"),
            vendor: "bench".into(),
            acceptance: AcceptanceLevel::Partner,
            kind: VibKind::Software,
            target: VibTarget::Host,
            version: None,
            maintenance_mode: true,
            reboot_required: true,
        };
        let mut vibs = Vec::new();
        for i in 0..count {
            let file = src.join(format!("{name}-{i}.vib"));
            write_random(&file, &format!("{name}/{i}"), size)?;
            let added = vibstage_ctl::publish::depot::add(
                &self.depot_dir,
                &self.vendor_key,
                &spec,
                None,
                std::slice::from_ref(&file),
            )
            .map_err(|e| BenchError::Setup(format!("depot add {}: {e}", file.display())))?;
            let _ = std::fs::remove_file(&file);
            let a = added
                .first()
                .ok_or_else(|| BenchError::Setup("depot add added nothing".into()))?;
            vibs.push((a.blob.clone(), a.descriptor.sha256, a.descriptor.size));
        }
        let now = OffsetDateTime::now_utc();
        let created = vibstage_ctl::publish::image::create(
            &self.depot_dir,
            &self.image_key,
            &ImageSpec {
                name: component.clone(),
                serial: 1,
                expires: now + time::Duration::days(30),
                base_image: Version::from("1.0"),
                components: vec![ComponentRef {
                    name: component,
                    version: Version::from("1.0"),
                }],
            },
            &[self.vendor_key.verifying_key()],
            now,
            &mut |_| {},
        )
        .map_err(|e| BenchError::Setup(format!("image create {name}: {e}")))?;
        let text = std::fs::read_to_string(&created.path)
            .map_err(BenchError::io(format!("read {}", created.path.display())))?;
        let envelope = serde_json::from_str(&text)
            .map_err(|e| BenchError::Setup(format!("image {name} is not JSON: {e}")))?;
        say(
            log,
            format!(
                "depot: image {name} of {count} × {} ready in {}",
                crate::report::mib(size as f64),
                crate::report::secs(start.elapsed().as_secs_f64())
            ),
        );
        let image = ImageFile {
            path: created.path,
            envelope,
            vibs,
        };
        self.images
            .borrow_mut()
            .insert(name.to_owned(), image.clone());
        Ok(image)
    }

    /// A new agent named `name` in `<dir>/agents/<name>` (not started).
    pub fn agent(&self, name: &str, setup: AgentSetup) -> Result<Agent> {
        Agent::create(self, name, setup)
    }

    /// Removes a stopped agent's directory (its staged bytes), unless the work directory is kept.
    pub fn discard(&self, agent: &Agent) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&agent.home);
        }
    }

    /// Stops nginx; says where the work directory is if it is kept.
    pub fn finish(mut self, log: &mut dyn Write) {
        self.nginx.stop();
        if self._temp.is_none() {
            say(log, format!("work directory kept: {}", self.dir.display()));
        }
    }
}

/// Writes `size` bytes of xorshift output seeded by `seed` (incompressible, reproducible).
pub fn write_random(path: &Path, seed: &str, size: u64) -> Result<()> {
    let what = || format!("write {}", path.display());
    let file = File::create(path).map_err(BenchError::io(what()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut x: u64 = seed.bytes().fold(0x9E37_79B9_7F4A_7C15, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3)
    }) | 1;
    let mut block = vec![0u8; 1 << 16];
    let mut left = size;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n]).map_err(BenchError::io(what()))?;
        left -= n as u64;
    }
    out.flush().map_err(BenchError::io(what()))
}
