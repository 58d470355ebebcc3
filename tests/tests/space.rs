//! Running out of scratch space (issue 3, "Must show"; SPEC §4 `[scratch]`, §6 R9, §7).
//!
//! Scratch lives on a small tmpfs the test mounts itself (tests run as root in CI; without root
//! they are skipped with a message). An image that does not fit scratch after `reserve_bytes`
//! goes to the volatile path and is reported `persistent: false`; with no volatile path it is
//! refused with `insufficient_space`. A disk that fills up during the download fails the task with
//! `insufficient_space`, removes the partial download and leaves earlier staged content intact.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use vibstage_e2e::{AgentOptions, AgentProc, Depot, Fault, VibFile, World};

const MIB: usize = 1 << 20;

/// A tmpfs mounted by the test; unmounted (lazily, so a leftover open file cannot keep it) on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"8m"`) on `dir`. `None` (with a message) when the test
    /// does not run as root; a root that cannot mount is a failure.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
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
            return Some(Tmpfs {
                dir: dir.to_owned(),
            });
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: mounting a tmpfs needs root ({})", stderr.trim());
            return None;
        }
        panic!(
            "mount -t tmpfs on {} failed as root: {stderr}",
            dir.display()
        );
    }

    /// Free bytes on the tmpfs.
    fn free(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.dir).expect("statvfs");
        st.blocks_available() as u64 * st.fragment_size() as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Files under `<store>/ingest`.
fn ingest_files(store: &Path) -> Vec<String> {
    std::fs::read_dir(store.join("ingest"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// A big image: two software VIBs of 3 MiB and 2 MiB (5 MiB).
fn big_image(world: &World) -> (Vec<String>, vibstage_protocol::Envelope) {
    let hexes = world.add_vibs(&[
        VibFile::software("esx-base", 3 * MIB),
        VibFile::software("esx-ui", 2 * MIB),
    ]);
    (hexes, world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]))
}

fn volatile_of(agent: &AgentProc) -> PathBuf {
    agent.home.join("volatile")
}

#[test]
fn image_larger_than_scratch_after_reserve_is_staged_into_the_volatile_path() {
    let world = World::new();
    let Some(tmpfs) = Tmpfs::mount(&world.dir.path().join("tmpfs"), "8m") else {
        return;
    };
    let (hexes, image) = big_image(&world);
    let mut agent = world.agent(
        "esx-01",
        AgentOptions {
            scratch: Some(tmpfs.dir.join("scratch")),
            // 8 MiB − 4 MiB leaves less than the image's 5 MiB.
            reserve_bytes: 4 * MIB as u64,
            ..AgentOptions::default()
        },
    );
    agent.start();

    let task = agent.stage_and_wait(&image, &world.depot.url());
    assert_eq!(
        task["state"],
        "succeeded",
        "{task}\nlog:\n{}",
        agent.log_text()
    );
    let volatile = volatile_of(&agent);
    let status = agent.status();
    assert_eq!(status["staging"]["state"], "staged", "{status}");
    assert_eq!(status["staging"]["staged"], true, "{status}");
    assert_eq!(status["staging"]["persistent"], false, "{status}");
    assert_eq!(
        status["staging"]["location"],
        volatile.display().to_string(),
        "{status}"
    );
    let staged = agent.request("GET", "/v1/staged", None).json;
    assert_eq!(staged["staged"][0]["persistent"], false, "{staged}");

    // The bytes are in the volatile store, verified; scratch holds none of them.
    let mut expected: Vec<(String, bool)> = hexes.iter().map(|h| (h.clone(), true)).collect();
    expected.sort();
    assert_eq!(vibstage_e2e::agent::blobs_in(&volatile), expected);
    assert_eq!(agent.blobs(), vec![]);
    drop(agent);
}

#[test]
fn image_larger_than_scratch_without_a_volatile_path_is_insufficient_space() {
    let world = World::new();
    let Some(tmpfs) = Tmpfs::mount(&world.dir.path().join("tmpfs"), "8m") else {
        return;
    };
    let (_, image) = big_image(&world);
    let mut agent = world.agent(
        "esx-01",
        AgentOptions {
            scratch: Some(tmpfs.dir.join("scratch")),
            volatile: Some(String::new()),
            reserve_bytes: 4 * MIB as u64,
            ..AgentOptions::default()
        },
    );
    agent.start();

    let r = agent.stage(&image, &world.depot.url());
    let error = match r.status {
        202 => {
            let id = r.json["task"]["id"].as_str().expect("task id");
            let task = agent.wait_task(id, 60);
            assert_eq!(task["state"], "failed", "{task}");
            task["error"].clone()
        }
        _ => r.json["error"].clone(),
    };
    assert_eq!(error["code"], "insufficient_space", "{}", r.body);
    assert_eq!(agent.blobs(), vec![], "nothing under blobs/");
    assert_eq!(
        ingest_files(&agent.scratch),
        Vec::<String>::new(),
        "nothing under ingest/"
    );
    assert_eq!(world.depot.bytes_served(), 0, "nothing was downloaded");
    let staged = agent.request("GET", "/v1/staged", None).json;
    assert_eq!(staged["staged"], serde_json::json!([]), "{staged}");
    drop(agent);
}

#[test]
fn disk_filling_up_mid_download_is_insufficient_space_and_keeps_earlier_staged_content() {
    let world = World::new();
    let Some(tmpfs) = Tmpfs::mount(&world.dir.path().join("tmpfs"), "8m") else {
        return;
    };
    let first_hex = world
        .add_vibs(&[VibFile::software("esx-base", MIB + 7)])
        .remove(0);
    let first = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
    let big = VibFile {
        component: "Tools".into(),
        version: "1.0".into(),
        ..VibFile::software("tools", 5 * MIB)
    };
    let big_hex = world.add_vibs(&[big]).remove(0);
    let second = world.image("tools-1.0", 1, &["Tools=1.0"]);

    let mut agent = world.agent(
        "esx-01",
        AgentOptions {
            scratch: Some(tmpfs.dir.join("scratch")),
            volatile: Some(String::new()),
            reserve_bytes: 0,
            timeout_secs: Some(10),
            ..AgentOptions::default()
        },
    );
    agent.start();
    let task = agent.stage_and_wait(&first, &world.depot.url());
    assert_eq!(task["state"], "succeeded", "{task}");
    let first_digest = task["image"]["digest"].clone();
    assert!(first_digest.is_string(), "{task}");

    // The second image fits when the agent checks (about 6.9 MiB free for 5 MiB), then the depot
    // pauses while the test fills the filesystem.
    world.depot.fault(
        &Depot::vib_path(&big_hex),
        Fault::Stall {
            after: 512 * 1024,
            for_: Duration::from_secs(2),
        },
        1,
    );
    let r = agent.stage(&second, &world.depot.url());
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json["task"]["id"].as_str().expect("task id").to_owned();
    let partial = agent
        .scratch
        .join("ingest")
        .join(format!("{big_hex}.partial"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !partial.exists() {
        assert!(Instant::now() < deadline, "the download never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    fill(&tmpfs.dir.join("filler"));
    assert!(
        tmpfs.free() < MIB as u64,
        "{} bytes still free",
        tmpfs.free()
    );

    let task = agent.wait_task(&id, 60);
    assert_eq!(
        task["state"],
        "failed",
        "{task}\nlog:\n{}",
        agent.log_text()
    );
    assert_eq!(task["error"]["code"], "insufficient_space", "{task}");
    let ingest = ingest_files(&agent.scratch);
    assert!(
        !ingest.iter().any(|f| f.ends_with(".partial")),
        "partial download left on the full disk: {ingest:?}"
    );
    // The earlier image is intact and still listed.
    assert_eq!(agent.blobs(), vec![(first_hex.clone(), true)]);
    let staged = agent.request("GET", "/v1/staged", None).json;
    let listed: Vec<&Value> = staged["staged"]
        .as_array()
        .expect("staged")
        .iter()
        .collect();
    assert_eq!(listed.len(), 1, "{staged}");
    assert_eq!(listed[0]["image"]["digest"], first_digest, "{staged}");
    assert_eq!(listed[0]["state"], "staged", "{staged}");
    drop(agent);
}

/// Writes `path` until the filesystem is full.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).expect("create filler");
    let chunk = vec![0xA5u8; 64 * 1024];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => panic!("filler: {e}"),
        }
    }
    let _ = file.sync_all();
}
