//! S1 hostile envelope (issue 11, item 6): how long the agent takes to refuse a stage request of
//! about 3.3 MiB whose image envelope carries 11,500 signatures that all name the trusted image
//! key (each one, before the fix, hashed the whole payload again: ~21 s of CPU per request).
//! The baseline is a request of the same bytes refused while its JSON is parsed (an unknown
//! field at its end): the cost of receiving and parsing the body alone.

use std::io::Write;
use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::agent::AgentSetup;
use crate::env::Env;
use crate::procfs::cpu_seconds;
use crate::report::{self, Met, Row, median};
use crate::{BenchError, Result, Sizes, say};

/// Signatures in the hostile envelope.
const SIGNATURES: usize = 11_500;
/// Bytes of its payload (the signed image padded with JSON whitespace).
const PAYLOAD: usize = 1 << 20;
/// The target for the refusal.
const TARGET_SECS: f64 = 0.050;

fn hostile(envelope: &Value) -> Result<Value> {
    let bad = |what: &str| BenchError::Setup(format!("image envelope: {what}"));
    let payload = envelope["payload"]
        .as_str()
        .ok_or_else(|| bad("no payload"))?;
    let mut bytes = STANDARD
        .decode(payload)
        .map_err(|e| bad(&format!("payload is not base64: {e}")))?;
    bytes.resize(bytes.len().max(PAYLOAD), b' ');
    let signature = envelope["signatures"][0].clone();
    if signature.is_null() {
        return Err(bad("no signature"));
    }
    Ok(json!({
        "payloadType": envelope["payloadType"],
        "payload": STANDARD.encode(&bytes),
        "signatures": vec![signature; SIGNATURES],
    }))
}

/// Runs S1.
pub fn run(env: &Env, sizes: &Sizes, log: &mut dyn Write) -> Result<Vec<Row>> {
    let image = env.image("bench-s1", 1, 64 << 10, log)?;
    let mut agent = env.agent("s1", AgentSetup::default())?;
    agent.start()?;
    let envelope = hostile(&image.envelope)?;
    let depot = env.depot_url();
    let hostile_body = json!({"image": envelope, "depot": depot});
    let mut parse_refused = hostile_body.clone();
    parse_refused["zz_unknown"] = json!(1);
    let body_bytes = hostile_body.to_string().len();
    let pid = agent
        .pid()
        .ok_or_else(|| BenchError::Run("S1 agent has no pid".into()))?;
    let runs = sizes.p1_runs.max(3);
    let (mut ours, mut base, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let cpu_before = cpu_seconds(pid);
        let start = Instant::now();
        let r = agent.request("POST", "/v1/stage", Some(&hostile_body))?;
        let took = start.elapsed().as_secs_f64();
        let cpu_used = cpu_seconds(pid) - cpu_before;
        if r.status != 400 {
            return Err(BenchError::Run(format!(
                "S1: the hostile envelope got HTTP {}: {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            )));
        }
        let start = Instant::now();
        let b = agent.request("POST", "/v1/stage", Some(&parse_refused))?;
        let base_took = start.elapsed().as_secs_f64();
        if b.status != 400 {
            return Err(BenchError::Run(format!(
                "S1: the baseline body got HTTP {}",
                b.status
            )));
        }
        say(
            log,
            format!(
                "S1 run {}: hostile envelope refused in {} ({} CPU); same bytes refused by the parser in {}",
                run + 1,
                report::secs(took),
                report::secs(cpu_used),
                report::secs(base_took)
            ),
        );
        ours.push(took);
        base.push(base_took);
        cpu.push(cpu_used);
    }
    let (ours, base, cpu) = (median(&ours), median(&base), median(&cpu));
    agent.stop();
    Ok(vec![
        Row::new(
            "S1",
            format!(
                "hostile envelope ({}, {SIGNATURES} signatures of the trusted key id): refused in",
                report::mib(body_bytes as f64)
            ),
            report::secs(ours),
            report::secs(base),
            format!("{:.2}×", ours / base.max(1e-9)),
            "< 50 ms",
            Met::from(ours < TARGET_SECS),
        ),
        Row::new(
            "S1",
            "agent CPU per hostile request",
            if cpu > 0.0 {
                report::secs(cpu)
            } else {
                "< 10 ms (one clock tick)".to_owned()
            },
            "",
            "",
            "",
            Met::Info,
        ),
    ])
}
