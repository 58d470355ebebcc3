//! On-disk invariants of SPEC §7 and RELIABILITY.md, checked by the crash loop after every kill
//! and by the model-based lifecycle test after every step (issues 8 and 12):
//! - every file under `blobs/` hashes to its name;
//! - every partial download is a prefix of its VIB;
//! - every staged image record parses and every blob it lists is there with its size;
//! - `state.json` and `tasks.json` parse and nothing was quarantined;
//! - the built-in installer's bank holds exactly the files its manifest lists, each hashing to
//!   the digest in its name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vibstage_protocol::{Digest, Envelope};

use crate::{AgentProc, World};

/// The invariants that hold whenever the agent is down. Returns how many files were checked.
pub fn check_down(agent: &AgentProc, world: &World) -> usize {
    let mut checked = 0;
    let blobs = agent.blobs();
    for (name, ok) in &blobs {
        assert!(ok, "blob {name} holds wrong bytes");
        checked += 1;
    }
    for entry in std::fs::read_dir(agent.scratch.join("ingest"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(hex) = name.strip_suffix(".partial") else {
            continue;
        };
        let part = std::fs::read(entry.path()).expect("partial");
        if let Ok(full) = std::fs::read(world.depot_dir.join("vibs").join(hex)) {
            assert!(
                part.len() <= full.len() && part[..] == full[..part.len()],
                "partial {hex} ({} bytes) is not a prefix of its VIB",
                part.len()
            );
        }
        checked += 1;
    }
    let held: BTreeMap<String, u64> = blobs
        .iter()
        .map(|(name, _)| {
            let len = std::fs::metadata(agent.scratch.join("blobs/sha256").join(name))
                .map_or(0, |m| m.len());
            (name.clone(), len)
        })
        .collect();
    for entry in std::fs::read_dir(agent.scratch.join("images"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            !name.ends_with(".broken"),
            "a record was quarantined: {name}"
        );
        if !name.ends_with(".json") {
            continue;
        }
        let record: Value = serde_json::from_slice(&std::fs::read(&path).expect("record"))
            .unwrap_or_else(|e| panic!("torn image record {}: {e}", path.display()));
        for vib in record["vibs"].as_array().expect("vibs") {
            let hex = vib["sha256"].as_str().expect("sha256");
            assert_eq!(
                held.get(hex).copied(),
                vib["size"].as_u64(),
                "staged image {name} claims blob {hex} it lacks"
            );
        }
        checked += 1;
    }
    for file in ["state.json", "tasks.json"] {
        let path = agent.state_dir.join(file);
        if let Ok(bytes) = std::fs::read(&path) {
            assert!(
                serde_json::from_slice::<Value>(&bytes).is_ok(),
                "torn {}",
                path.display()
            );
            checked += 1;
        }
        assert!(
            !agent.state_dir.join(format!("{file}.broken")).exists(),
            "{file} was quarantined"
        );
    }
    let bank = agent.state_dir.join("bootbank/current");
    if std::fs::read_dir(&bank).is_ok() {
        checked += check_bank(&bank, "").1;
    }
    checked
}

/// Checks an installer bank (`bootbank/current`): its manifest parses, and the bank holds
/// exactly the VIBs the manifest lists, no fewer (issue 11, item 2: an upgrade dropped the
/// unchanged ones) and no more, each file hashing to the digest in its name. `when` starts
/// every failure message ("after a power cut, "). Returns the manifest and how many files were
/// checked.
pub fn check_bank(bank: &Path, when: &str) -> (Value, usize) {
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(bank.join("manifest.json"))
            .unwrap_or_else(|e| panic!("{when}the bank has no manifest: {e}")),
    )
    .unwrap_or_else(|e| panic!("{when}the bank's manifest is torn: {e}"));
    let listed: BTreeSet<String> = manifest["vibs"]
        .as_array()
        .expect("manifest vibs")
        .iter()
        .map(|v| v.as_str().expect("digest").to_owned())
        .collect();
    let mut present = BTreeSet::new();
    let mut checked = 0;
    for entry in std::fs::read_dir(bank).expect("bank").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(hex) = name
            .strip_suffix(".vib")
            .and_then(|n| n.rsplit_once('-'))
            .map(|(_, h)| h.to_owned())
        else {
            continue;
        };
        let bytes = std::fs::read(entry.path()).expect("bank file");
        assert_eq!(
            Digest::of(&bytes).to_hex(),
            hex,
            "{when}installed file {name} holds wrong bytes"
        );
        present.insert(hex);
        checked += 1;
    }
    assert_eq!(
        present, listed,
        "{when}the bank's files are not what its manifest lists"
    );
    (manifest, checked)
}

/// The installed image's digest according to the installer's bank, if any.
pub fn bank_digest(agent: &AgentProc) -> Option<String> {
    let manifest = agent.state_dir.join("bootbank/current/manifest.json");
    let bytes = std::fs::read(manifest).ok()?;
    let m: Value = serde_json::from_slice(&bytes).expect("torn bank manifest");
    m["image"]["digest"].as_str().map(str::to_owned)
}

/// Brings an interrupted run to its end as an operator would: waits for a running task, and
/// requests the remediation of `image` (digest `digest`) again until the host is compliant with
/// it and out of maintenance mode (at most 5 requests). Returns how many requests it took.
/// Used by the crash loop after every restart and by the power-loss loop after every reboot.
pub fn remediate_until_done(
    agent: &AgentProc,
    image: &Envelope,
    digest: &str,
    depot: &str,
) -> usize {
    let body = json!({"image": image, "depot": depot});
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut requests = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "work never completed\n{}",
            agent.log_text()
        );
        let status = agent.status();
        let done = status["compliance"]["status"] == "compliant"
            && status["installed"]["image"]["digest"] == digest
            && status["maintenance"]["active"] == false;
        if done {
            return requests;
        }
        if let Some(id) = status["running_task"].as_str() {
            agent.wait_task(id, 120);
            continue;
        }
        requests += 1;
        assert!(
            requests <= 5,
            "remediation keeps failing: {status}\n{}",
            agent.log_text()
        );
        let r = agent.request("POST", "/v1/remediate", Some(&body));
        match r.status {
            202 => {
                let id = r.json["task"]["id"].as_str().expect("task id").to_owned();
                let task = agent.wait_task(&id, 120);
                assert_eq!(
                    task["state"],
                    "succeeded",
                    "remediation after an interruption: {task}\n{}",
                    agent.log_text()
                );
            }
            200 => assert!(
                status["maintenance"]["active"] == false,
                "the host is left in maintenance mode: remediation answers 'nothing to do': {status}"
            ),
            _ => panic!("remediate: {} {}", r.status, r.body),
        }
    }
}
