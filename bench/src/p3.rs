//! P3 resume: a fresh agent stages the P1 image; when its task reports half of the bytes done
//! the agent is killed (SIGKILL), restarted, and left to resume the interrupted task by itself.
//! nginx's access log says how many body bytes it sent for requests that began after the
//! restart: that is what was fetched again, as a share of the image. The ideal is what was not
//! yet held on disk at the kill (about 50 %).

use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::agent::AgentSetup;
use crate::env::Env;
use crate::procfs::bytes_under;
use crate::report::{self, Met, Row, median};
use crate::{BenchError, Result, Sizes, say, tools};

/// Runs P3.
pub fn run(env: &Env, sizes: &Sizes, log: &mut dyn Write) -> Result<Vec<Row>> {
    let image = crate::p1::image(env, sizes, log)?;
    let total = image.bytes();
    let (mut again, mut held_share, mut at_kill) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..sizes.p3_runs {
        let mut agent = env.agent(&format!("p3-{run}"), AgentSetup::default())?;
        agent.start()?;
        let id = agent.stage(&image, &env.depot_url())?;
        let deadline = Instant::now() + Duration::from_secs(600);
        let done = loop {
            let task = agent.task(&id, None)?;
            let done = task["progress"]["bytes_done"].as_u64().unwrap_or(0);
            if done * 2 >= total {
                agent.kill9();
                break done;
            }
            if task["state"] != "running" && task["state"] != "queued" {
                return Err(BenchError::Run(format!(
                    "P3: the task ended before half of it was done: {task}"
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Run("P3: staging does not progress".into()));
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let held =
            bytes_under(&agent.scratch.join("ingest")) + bytes_under(&agent.scratch.join("blobs"));
        let restarted = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        agent.start()?;
        let task = agent.wait_task(&id)?;
        let fetched: u64 = env
            .nginx
            .accesses()
            .iter()
            .filter(|a| a.start() >= restarted - 0.0005 && a.uri.starts_with("/vibs/"))
            .map(|a| a.bytes)
            .sum();
        agent.stop();
        env.discard(&agent);
        tools::settle();
        let share = fetched as f64 / total as f64;
        say(
            log,
            format!(
                "P3 run {}: killed at {} done ({} on disk), fetched after restart {} = {:.1} % \
                 (task says {} downloaded)",
                run + 1,
                report::mib(done as f64),
                report::mib(held as f64),
                report::mib(fetched as f64),
                share * 100.0,
                report::mib(task["bytes_downloaded"].as_f64().unwrap_or(0.0)),
            ),
        );
        again.push(share);
        at_kill.push(done as f64 / total as f64);
        held_share.push(1.0 - held as f64 / total as f64);
    }
    let share = median(&again);
    Ok(vec![Row::new(
        "P3",
        format!(
            "fetched again after SIGKILL at {:.0} % of P1 (ideal: {:.1} % not on disk)",
            median(&at_kill) * 100.0,
            median(&held_share) * 100.0
        ),
        format!("{:.1} %", share * 100.0),
        format!("{} (the image)", report::mib(total as f64)),
        format!("{share:.3}"),
        "≤ 55 %",
        Met::from(share <= 0.55),
    )])
}
