//! One test case against a misbehaving depot: a world with one software VIB, an image of it and a
//! running agent, plus the assertions every fault test makes (shared by `depot_faults.rs` and
//! `hostile_depot.rs`).

use std::path::PathBuf;

use serde_json::Value;
use vibstage_protocol::Envelope;

use crate::{AgentOptions, AgentProc, Depot, Fault, RequestLog, VibFile, World};

/// Size of the VIB: several 64 KiB chunks, not a multiple of the chunk size.
pub const SIZE: u64 = 1_000_003;

/// One world with one software VIB in its depot, an image of it and a running agent.
pub struct FaultCase {
    /// The world (depot, keys, CA).
    pub world: World,
    /// The running agent.
    pub agent: AgentProc,
    /// The signed image of the one VIB.
    pub image: Envelope,
    /// sha256 hex of the VIB.
    pub hex: String,
    /// `/vibs/<hex>`.
    pub path: String,
}

impl FaultCase {
    /// A case whose agent gives up on a stall after `timeout_secs` and retries `retries` times.
    pub fn new(timeout_secs: u64, retries: u32) -> FaultCase {
        let world = World::new();
        let hex = world
            .add_vibs(&[VibFile::software("esx-base", SIZE as usize)])
            .remove(0);
        let image = world.image("esx-8.0u2", 1, &["ESXi=8.0.2-0.20"]);
        let mut agent = world.agent(
            "esx-01",
            AgentOptions {
                timeout_secs: Some(timeout_secs),
                retries: Some(retries),
                ..AgentOptions::default()
            },
        );
        agent.start();
        let path = Depot::vib_path(&hex);
        FaultCase {
            world,
            agent,
            image,
            hex,
            path,
        }
    }

    /// Makes the depot misbehave for the VIB's path, `times` requests long.
    pub fn fault(&self, fault: Fault, times: usize) {
        self.world.depot.fault(&self.path, fault, times);
    }

    /// Stages the image and returns the finished task.
    pub fn stage(&self) -> Value {
        self.agent
            .stage_and_wait(&self.image, &self.world.depot.url())
    }

    /// The depot's requests for the VIB, in order.
    pub fn vib_requests(&self) -> Vec<RequestLog> {
        self.world
            .depot
            .requests()
            .into_iter()
            .filter(|r| r.path == self.path)
            .collect()
    }

    /// The VIB's bytes as the depot has them.
    pub fn depot_bytes(&self) -> Vec<u8> {
        std::fs::read(self.world.depot_dir.join("vibs").join(&self.hex)).expect("depot vib")
    }

    /// Where the agent keeps the VIB's partial download.
    pub fn partial(&self) -> PathBuf {
        self.agent
            .scratch
            .join("ingest")
            .join(format!("{}.partial", self.hex))
    }

    /// Length of the partial download, if there is one.
    pub fn partial_len(&self) -> Option<u64> {
        std::fs::metadata(self.partial()).ok().map(|m| m.len())
    }

    /// Whatever happened: every blob hashes to its name, a partial download is a prefix.
    pub fn assert_no_wrong_bytes(&self) {
        for (name, ok) in self.agent.blobs() {
            assert!(ok, "blob {name} holds wrong bytes");
        }
        if let Ok(part) = std::fs::read(self.partial())
            && !part.is_empty()
        {
            let full = self.depot_bytes();
            assert!(
                part.len() <= full.len() && part[..] == full[..part.len()],
                "partial download ({} bytes) is not a prefix of the VIB",
                part.len()
            );
        }
    }

    /// The task succeeded and the store holds exactly the VIB, byte for byte the depot's.
    pub fn assert_staged(&self, task: &Value) {
        assert_eq!(
            task["state"],
            "succeeded",
            "{task}\nlog:\n{}",
            self.agent.log_text()
        );
        assert_eq!(task["error"], Value::Null, "{task}");
        self.assert_no_wrong_bytes();
        assert_eq!(self.agent.blobs(), vec![(self.hex.clone(), true)]);
        let blob =
            std::fs::read(self.agent.scratch.join("blobs/sha256").join(&self.hex)).expect("blob");
        assert!(
            blob == self.depot_bytes(),
            "blob bytes differ from the depot's"
        );
        assert!(!self.partial().exists(), "partial download left behind");
        let status = self.agent.status();
        assert_eq!(status["staging"]["state"], "staged", "{status}");
        assert_eq!(status["staging"]["staged"], true, "{status}");
    }

    /// The task failed with `code` and nothing of the VIB is in `blobs/`.
    pub fn assert_failed(&self, task: &Value, code: &str) {
        assert_eq!(
            task["state"],
            "failed",
            "{task}\nlog:\n{}",
            self.agent.log_text()
        );
        assert_eq!(task["error"]["code"], code, "{task}");
        self.assert_no_wrong_bytes();
        assert_eq!(
            self.agent.blobs(),
            Vec::<(String, bool)>::new(),
            "no blob for a failed VIB"
        );
        let staged = self.agent.request("GET", "/v1/staged", None);
        assert_eq!(
            staged.json["staged"],
            serde_json::json!([]),
            "{}",
            staged.body
        );
        let status = self.agent.status();
        assert_eq!(status["staging"]["staged"], false, "{status}");
    }

    /// Bytes mismatches throw the partial download away: wrong bytes are not kept for a resume.
    pub fn assert_no_partial(&self) {
        assert!(
            !self.partial().exists(),
            "partial download of wrong bytes left behind"
        );
    }
}

/// The start offset of a `Range: bytes=N-` header.
pub fn range_start(range: &Option<String>) -> Option<u64> {
    range
        .as_deref()?
        .strip_prefix("bytes=")?
        .strip_suffix('-')?
        .parse()
        .ok()
}
