//! P4 recovery: an agent restarting over a store of 10,000 staged blobs, and a full scrub.
//!
//! The store is laid out as SPEC §7 fixes it (`blobs/sha256/<hex>`, mode 0400, and the image
//! record of a real signed image listing every blob), written directly rather than downloaded:
//! staging 10,000 VIBs would time the depot, not the restart. The store is opened once with the
//! agent's own [`Store::open`] so that its directories are exactly the agent's.
//!
//! - Ready: time from spawning `vibstaged` to its first answered `GET /v1/status` (which reads
//!   the staged record and checks its blobs), against the same for an empty store.
//! - Scrub: [`Store::recover`] with `scrub` (every blob re-hashed, as the agent's store code
//!   does it), against `openssl dgst -sha256` over the same files (`find | xargs`).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use vibstage::store::{ImageRecord, StagedVib, Store};
use vibstage_protocol::api::{DpuState, FirmwareState, ImageRef};
use vibstage_protocol::{
    AcceptanceLevel, Component, Digest, Envelope, IMAGE_PAYLOAD_TYPE, Image, ImageDigest, Name,
    VIB_PAYLOAD_TYPE, Version, VibDescriptor, VibKind, VibTarget,
};

use crate::agent::AgentSetup;
use crate::env::Env;
use crate::report::{self, Met, Row, median};
use crate::setup::write_random;
use crate::{BenchError, Result, Sizes, say, tools};

fn name(s: &str) -> Result<Name> {
    s.parse()
        .map_err(|e| BenchError::Setup(format!("name {s}: {e}")))
}

/// Fills the store at `root` with `count` blobs of `size` bytes and the record of a signed image
/// listing them all.
fn populate(env: &Env, root: &std::path::Path, count: usize, size: u64) -> Result<()> {
    let (store, _) = Store::open(root).map_err(|e| BenchError::Setup(format!("store: {e}")))?;
    let blobs = root.join("blobs/sha256");
    let tmp = root.join("bench.tmp");
    let component = name("bench-p4")?;
    let mut envelopes = Vec::with_capacity(count);
    let mut staged = Vec::with_capacity(count);
    for i in 0..count {
        write_random(&tmp, &format!("p4/{i}"), size)?;
        let bytes = std::fs::read(&tmp).map_err(BenchError::io("read back a blob"))?;
        let digest = Digest::of(&bytes);
        let path = blobs.join(digest.to_hex());
        std::fs::rename(&tmp, &path)
            .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)))
            .map_err(BenchError::io(format!("write {}", path.display())))?;
        let vib = name(&format!("blob-{i}"))?;
        let descriptor = VibDescriptor {
            name: vib.clone(),
            version: Version("1.0".into()),
            vendor: "bench".into(),
            component: component.clone(),
            component_version: Version("1.0".into()),
            acceptance: AcceptanceLevel::Partner,
            kind: VibKind::Software,
            target: VibTarget::Host,
            sha256: digest,
            size,
            maintenance_mode: true,
            reboot_required: true,
        };
        let payload = serde_json::to_vec(&descriptor)
            .map_err(|e| BenchError::Setup(format!("descriptor: {e}")))?;
        envelopes.push(Envelope::sign(VIB_PAYLOAD_TYPE, payload, &env.vendor_key));
        staged.push(StagedVib {
            name: vib,
            component: component.clone(),
            kind: VibKind::Software,
            target: VibTarget::Host,
            sha256: digest,
            size,
        });
    }
    let now = OffsetDateTime::now_utc();
    let image = Image {
        name: component.clone(),
        serial: 1,
        expires: now + time::Duration::days(30),
        base_image: Version("1.0".into()),
        components: vec![Component {
            name: component.clone(),
            version: Version("1.0".into()),
            vibs: envelopes,
        }],
    };
    let payload =
        serde_json::to_vec(&image).map_err(|e| BenchError::Setup(format!("image: {e}")))?;
    let digest = ImageDigest(Digest::of(&payload));
    let record = ImageRecord {
        image: ImageRef {
            name: component,
            serial: 1,
            digest,
        },
        envelope: Envelope::sign(IMAGE_PAYLOAD_TYPE, payload, &env.image_key),
        vibs: staged,
        firmware: FirmwareState::NotApplicable,
        dpu: DpuState::NotApplicable,
        notifications: Vec::new(),
        staged_at: now,
    };
    store
        .write_record(&record)
        .map_err(|e| BenchError::Setup(format!("image record: {e}")))?;
    drop(store);
    tools::settle();
    Ok(())
}

/// Runs P4.
pub fn run(env: &Env, sizes: &Sizes, log: &mut dyn Write) -> Result<Vec<Row>> {
    let (count, size) = (sizes.p4_blobs, sizes.p4_blob_size);
    let total = count as u64 * size;
    let mut agent = env.agent("p4", AgentSetup::default())?;
    let mut empty = env.agent("p4-empty", AgentSetup::default())?;
    let start = Instant::now();
    populate(env, &agent.scratch, count, size)?;
    say(
        log,
        format!(
            "P4: store of {count} blobs ({}) written in {}",
            report::mib(total as f64),
            report::secs(start.elapsed().as_secs_f64())
        ),
    );
    // First start: the agent makes the store its own; then check it reports what is there.
    agent.start()?;
    let status = agent.request("GET", "/v1/status", None)?.json;
    if status["staging"]["staged"] != true || status["staging"]["bytes"] != total {
        return Err(BenchError::Run(format!(
            "P4: the agent does not report the {count} staged blobs: {status}"
        )));
    }
    empty.start()?;
    let (mut ready, mut ready_empty) = (Vec::new(), Vec::new());
    for run in 0..sizes.p4_runs {
        agent.stop();
        ready.push(agent.start()?.as_secs_f64());
        empty.stop();
        ready_empty.push(empty.start()?.as_secs_f64());
        say(
            log,
            format!(
                "P4 run {}: ready in {} with {count} blobs, {} empty",
                run + 1,
                report::secs(ready[run]),
                report::secs(ready_empty[run])
            ),
        );
    }
    agent.stop();
    empty.stop();

    let (mut scrub, mut dgst) = (Vec::new(), Vec::new());
    let blobs = agent.scratch.join("blobs/sha256");
    for run in 0..sizes.p4_runs {
        let start = Instant::now();
        let (store, _) =
            Store::open(&agent.scratch).map_err(|e| BenchError::Run(format!("store: {e}")))?;
        let rec = store
            .recover(true, Duration::from_secs(7 * 24 * 3600))
            .map_err(|e| BenchError::Run(format!("scrub: {e}")))?;
        scrub.push(start.elapsed().as_secs_f64());
        drop(store);
        if !rec.blobs_removed.is_empty() {
            return Err(BenchError::Run(format!(
                "P4: the scrub removed {} good blobs",
                rec.blobs_removed.len()
            )));
        }
        let (t, _) = tools::timed(
            Command::new("sh")
                .arg("-c")
                .arg("find \"$1\" -type f -print0 | xargs -0 openssl dgst -sha256 > /dev/null")
                .arg("sh")
                .arg(&blobs),
        )?;
        dgst.push(t);
        say(
            log,
            format!(
                "P4 scrub run {}: vibstage {}, openssl dgst {}",
                run + 1,
                report::rate(total as f64, scrub[run]),
                report::rate(total as f64, dgst[run])
            ),
        );
    }
    env.discard(&agent);
    let (ready, ready_empty) = (median(&ready), median(&ready_empty));
    let (scrub, dgst) = (median(&scrub), median(&dgst));
    let r = dgst / scrub;
    Ok(vec![
        Row::new(
            "P4",
            format!("restart until status answers, {count} staged blobs vs empty store"),
            report::secs(ready),
            report::secs(ready_empty),
            report::ratio(ready / ready_empty),
            "≤ 1 s",
            Met::from(ready <= 1.0),
        ),
        Row::new(
            "P4",
            format!(
                "full scrub of {count} blobs ({}) vs openssl dgst -sha256",
                report::mib(total as f64)
            ),
            report::rate(total as f64, scrub),
            report::rate(total as f64, dgst),
            report::ratio(r),
            "≥ 0.9×",
            Met::from(r >= 0.9),
        ),
    ])
}
