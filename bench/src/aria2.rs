//! aria2c as a peer of P1: the download manager a user would pick to fetch a list of files in
//! parallel with a checksum each.
//!
//! One input file lists every VIB of the image with `checksum=sha-256=<hex>` and an output name;
//! `aria2c -j N` downloads N files at a time, one connection each, over HTTPS trusting the bench's
//! CA (`--ca-certificate`), from the same nginx and the same files as vibstage. Then `sync FILE…`
//! (fsync of each file), as in the operator's script.
//!
//! What aria2c guarantees (checked with `strace` on 1.36.0): after a file has downloaded it reads
//! the whole file back from disk to compute its sha-256 and fails (exit status 32) on a mismatch;
//! it fsyncs each file and its control file (`.aria2`) itself, so the `sync` after it finds
//! little to do; an interrupted download resumes from its control file (`-c`). It renames
//! nothing into place: a file is at its final name while it downloads. Nothing is signed.

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::env::{Env, ImageFile};
use crate::tools::PeerRun;
use crate::{BenchError, Result, report, say, tools};

/// aria2c's downloads at a time: the agent's default `concurrency`.
const JOBS: usize = 4;

/// P1's aria2c peer: the program and its input file, ready for all rounds.
#[derive(Debug)]
pub struct Peer {
    aria2c: PathBuf,
    input: PathBuf,
    /// Where aria2c writes, emptied after each round.
    out: PathBuf,
    files: Vec<PathBuf>,
}

impl Peer {
    /// Installs aria2 when missing ([`tools::ensure_package`]) and writes the input file for
    /// `image`.
    pub fn start(env: &Env, image: &ImageFile, log: &mut dyn Write) -> Result<Peer> {
        let aria2c = tools::ensure_package("aria2c", "aria2", log)?;
        let input = env.dir.join("p1-aria2-input.txt");
        let out = env.dir.join("p1-aria2");
        let files = input_file(&input, image, &env.depot_url(), &out)?;
        say(log, format!("P1 peer: {}", tools::version(&aria2c)));
        Ok(Peer {
            aria2c,
            input,
            out,
            files,
        })
    }

    /// One round: aria2c fetches and checks every file, `sync` flushes them; each file is
    /// checked to have its size (aria2c checked its sha-256), then removed.
    pub fn run_once(&self, env: &Env, image: &ImageFile) -> Result<PeerRun> {
        std::fs::create_dir_all(&self.out).map_err(BenchError::io("create aria2c dir"))?;
        let nginx0 = env.nginx.cpu();
        let (fetch, _) = tools::measured(&command(
            &self.aria2c,
            &env.ca_pem(),
            &self.input,
            &self.out,
            JOBS,
        ))?;
        let (sync, _) = tools::measured(Command::new("sync").args(&self.files))?;
        let nginx_cpu = env.nginx.cpu() - nginx0;
        for (file, (_, _, size)) in self.files.iter().zip(&image.vibs) {
            let len = std::fs::metadata(file).map_or(0, |m| m.len());
            if len != *size {
                return Err(BenchError::Run(format!(
                    "aria2c succeeded but {} has {len} bytes of {size}",
                    file.display()
                )));
            }
        }
        let _ = std::fs::remove_dir_all(&self.out);
        tools::settle();
        Ok(PeerRun {
            cost: fetch.then(sync),
            nginx_cpu,
            detail: format!(
                "aria2c {:.2} s, {:.2} CPU-s, {} + sync {:.2} s",
                fetch.wall,
                fetch.cpu,
                report::mib(fetch.peak as f64),
                sync.wall
            ),
        })
    }
}

/// Writes aria2c's input file for `image` at `path`: one entry per VIB, fetched from `depot`
/// into `vib-<i>` with its sha-256. Returns the files aria2c will write under `out`.
pub fn input_file(path: &Path, image: &ImageFile, depot: &str, out: &Path) -> Result<Vec<PathBuf>> {
    let mut text = String::new();
    let mut files = Vec::new();
    for (i, ((_, digest, _), url)) in image.vibs.iter().zip(image.urls(depot)).enumerate() {
        let name = format!("vib-{i}");
        let _ = write!(
            text,
            "{url}\n  out={name}\n  checksum=sha-256={}\n",
            digest.to_hex()
        );
        files.push(out.join(name));
    }
    std::fs::write(path, text).map_err(BenchError::io(format!("write {}", path.display())))?;
    Ok(files)
}

/// `aria2c` downloading the entries of `input` into `out`, `jobs` files at a time with one
/// connection each, trusting `ca`; quiet apart from errors, overwriting what a previous run left.
pub fn command(aria2c: &Path, ca: &Path, input: &Path, out: &Path, jobs: usize) -> Command {
    let mut cmd = Command::new(aria2c);
    cmd.arg(format!("--ca-certificate={}", ca.display()))
        .arg(format!("--input-file={}", input.display()))
        .arg(format!("--dir={}", out.display()))
        .arg(format!("--max-concurrent-downloads={jobs}"))
        .args([
            "--max-connection-per-server=1",
            "--split=1",
            "--console-log-level=warn",
            "--show-console-readout=false",
            "--summary-interval=0",
            "--download-result=hide",
            "--allow-overwrite=true",
            "--auto-file-renaming=false",
        ]);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use vibstage_protocol::Digest;

    #[test]
    fn input_file_lists_each_vib_with_its_checksum() {
        let dir = tempfile::tempdir().expect("temp dir");
        let digest = Digest::of(b"vib");
        let image = ImageFile {
            path: dir.path().join("image.json"),
            envelope: serde_json::Value::Null,
            vibs: vec![(dir.path().join("v"), digest, 3)],
        };
        let input = dir.path().join("input.txt");
        let out = dir.path().join("out");
        let files = input_file(&input, &image, "https://127.0.0.1:1/", &out).expect("written");
        assert_eq!(files, vec![out.join("vib-0")]);
        let text = std::fs::read_to_string(&input).expect("read");
        let hex = digest.to_hex();
        assert_eq!(
            text,
            format!("https://127.0.0.1:1/vibs/{hex}\n  out=vib-0\n  checksum=sha-256={hex}\n")
        );
    }
}
