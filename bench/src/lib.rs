//! vibstage benchmarks: the figures of staging (P1–P6) measured side by side with the tools an
//! operator would otherwise use, in one run, as ratios.
//!
//! Everything is set up here, in a scratch directory: signing keys and a development CA
//! ([`setup`]), a depot built with `vibstagectl`'s own library code and served over HTTPS on
//! loopback by nginx from the distribution ([`nginx`]), and real `vibstaged` processes built next
//! to this binary ([`agent`]). Baselines run the real tools (`curl`, `openssl dgst`, `sync`,
//! `dd`, [`tools`]) and P1's peers ([`containerd`], [`aria2`]) against the same nginx and the
//! same files within the same run, so every ratio compares like with like on whatever machine
//! runs it. Each figure is repeated and its median reported ([`report`]).
//!
//! | figure | module |
//! | --- | --- |
//! | P1 throughput, P2 memory | [`p1`], with the peers [`containerd`] and [`aria2`] |
//! | P3 resume | [`p3`] |
//! | P4 recovery and scrub | [`p4`] |
//! | P5 fan-out | [`p5`] |
//! | P6 API | [`p6`] with the load generator [`loadgen`] |
//! | P7 fleet: one controller, 1,000 agents, degraded runs | [`p7`] |
//! | P8 polite staging: workloads beside it, the rate limit | [`p8`] |
//! | S1 a hostile signed envelope refused | [`s1`] |
//!
//! Quick mode ([`Sizes::quick`]) runs every figure with small sizes so that a test can run the
//! whole harness; it measures the same things but its numbers mean nothing.

pub mod agent;
pub mod aria2;
pub mod cgroup;
pub mod containerd;
pub mod env;
pub mod http;
pub mod loadgen;
pub mod nginx;
pub mod p1;
pub mod p3;
pub mod p4;
pub mod p5;
pub mod p6;
pub mod p7;
pub mod p8;
pub mod procfs;
pub mod report;
pub mod s1;
pub mod setup;
pub mod tools;

use std::io::Write;
use std::path::PathBuf;

pub use env::Env;
pub use report::{Met, Row};

/// Why a benchmark could not run (setup failed, a tool or the agent misbehaved). A missed target
/// is not an error: it is a row of the table.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A file or process operation failed.
    #[error("failed to {what}: {source}")]
    Io {
        /// What was being done, on what.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Something the benchmark needs is missing or unusable.
    #[error("setup: {0}")]
    Setup(String),
    /// A measured run did not do what it should (a tool failed, a task did not succeed).
    #[error("{0}")]
    Run(String),
}

impl BenchError {
    /// A closure mapping an `io::Error` to [`BenchError::Io`] about `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, BenchError>;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// The sizes and repetitions of one benchmark run.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// Quick mode: numbers are not meaningful.
    pub quick: bool,
    /// P1: VIBs of the image.
    pub p1_vibs: usize,
    /// P1: bytes of each VIB.
    pub p1_vib_size: u64,
    /// P1/P2: measured repetitions.
    pub p1_runs: usize,
    /// P3: measured repetitions.
    pub p3_runs: usize,
    /// P4: staged blobs.
    pub p4_blobs: usize,
    /// P4: bytes of each blob.
    pub p4_blob_size: u64,
    /// P4: repetitions of the restart and of the scrub.
    pub p4_runs: usize,
    /// P5: agents.
    pub p5_agents: usize,
    /// P5: VIBs of the image each agent stages.
    pub p5_vibs: usize,
    /// P5: bytes of each VIB.
    pub p5_vib_size: u64,
    /// P5: repetitions.
    pub p5_runs: usize,
    /// P7: agents of the fleet.
    pub p7_agents: usize,
    /// P7: VIBs of the image each agent stages.
    pub p7_vibs: usize,
    /// P7: bytes of each VIB.
    pub p7_vib_size: u64,
    /// P7: agents whose maintenance hook fails during remediation.
    pub p7_failing: usize,
    /// P7: stagings of the whole fleet (the median is reported).
    pub p7_runs: usize,
    /// P6: keep-alive connections of the load generator.
    pub p6_connections: usize,
    /// P6: seconds of each measured window (after a warm-up of a fifth of it).
    pub p6_secs: f64,
    /// P6: the total rate of the paced run whose p99 is reported, requests per second.
    pub p6_rate: f64,
    /// P6: repetitions.
    pub p6_runs: usize,
}

impl Sizes {
    /// The sizes of the issue: a 1 GiB image of 8 VIBs, 10,000 blobs, 100 agents of 16 MiB.
    pub fn full() -> Self {
        Self {
            quick: false,
            p1_vibs: 8,
            p1_vib_size: 128 * MIB,
            p1_runs: 5,
            p3_runs: 3,
            p4_blobs: 10_000,
            p4_blob_size: 64 * KIB,
            p4_runs: 5,
            p5_agents: 100,
            p5_vibs: 2,
            p5_vib_size: 8 * MIB,
            p5_runs: 3,
            p7_agents: 1000,
            p7_vibs: 2,
            p7_vib_size: 512 * KIB,
            p7_failing: 3,
            p7_runs: 3,
            p6_connections: 16,
            p6_secs: 5.0,
            p6_rate: 5000.0,
            p6_runs: 3,
        }
    }

    /// Small sizes, one run each: exercises the whole harness in seconds, even with debug builds.
    pub fn quick() -> Self {
        Self {
            quick: true,
            p1_vibs: 8,
            p1_vib_size: 512 * KIB,
            p1_runs: 1,
            p3_runs: 1,
            p4_blobs: 200,
            p4_blob_size: 16 * KIB,
            p4_runs: 1,
            p5_agents: 4,
            p5_vibs: 2,
            p5_vib_size: 512 * KIB,
            p5_runs: 1,
            p7_agents: 50,
            p7_vibs: 2,
            p7_vib_size: 64 * KIB,
            p7_failing: 2,
            p7_runs: 1,
            p6_connections: 4,
            p6_secs: 0.5,
            p6_rate: 500.0,
            p6_runs: 1,
        }
    }

    /// Bytes of the P1 image.
    pub fn p1_bytes(&self) -> u64 {
        self.p1_vibs as u64 * self.p1_vib_size
    }

    /// Overrides every repetition count (at least 1).
    pub fn with_runs(mut self, runs: usize) -> Self {
        let runs = runs.max(1);
        self.p1_runs = runs;
        self.p3_runs = runs;
        self.p4_runs = runs;
        self.p5_runs = runs;
        self.p7_runs = runs;
        self.p6_runs = runs;
        self
    }
}

/// A figure of the issue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Figure {
    /// Staging throughput against curl + openssl dgst + sync.
    P1,
    /// Memory of the agent during P1 and idle.
    P2,
    /// Bytes fetched again after a kill at 50 %.
    P3,
    /// Restart with 10,000 staged blobs; scrub throughput.
    P4,
    /// One controller staging 100 agents.
    P5,
    /// Status requests per second and p99 over mTLS keep-alive.
    P6,
    /// One controller and a fleet of 1,000 agents.
    P7,
    /// Workloads kept while staging; `depot.max_bytes_per_sec` held.
    P8,
    /// A hostile envelope of thousands of signatures, refused.
    S1,
}

/// Where the benchmark works and what it runs.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Work directory (default: a new temporary directory on the system's temp filesystem,
    /// removed at the end).
    pub dir: Option<PathBuf>,
    /// Where `vibstaged` and `vibstagectl` are (default: next to this executable).
    pub bin_dir: Option<PathBuf>,
    /// Keep the work directory.
    pub keep: bool,
}

/// Runs `figures` (in P1..P6 order; P1 and P2 are one measurement) and returns the table's rows.
/// Progress and per-run details go to `log`.
pub fn run(
    figures: &[Figure],
    sizes: &Sizes,
    options: &Options,
    log: &mut dyn Write,
) -> Result<Vec<Row>> {
    let mut figures = figures.to_vec();
    figures.sort();
    figures.dedup();
    let env = Env::new(options, log)?;
    let mut rows = Vec::new();
    let mut p1_rate = None;
    if figures.contains(&Figure::P1) || figures.contains(&Figure::P2) {
        let result = p1::run(&env, sizes, log)?;
        p1_rate = Some(result.rate);
        rows.extend(result.rows.into_iter().filter(|r| {
            figures.contains(if r.figure == "P2" {
                &Figure::P2
            } else {
                &Figure::P1
            })
        }));
    }
    if figures.contains(&Figure::P3) {
        rows.extend(p3::run(&env, sizes, log)?);
    }
    if figures.contains(&Figure::P4) {
        rows.extend(p4::run(&env, sizes, log)?);
    }
    if figures.contains(&Figure::P5) {
        let rate = match p1_rate {
            Some(r) => r,
            None => p1::probe_rate(&env, sizes, log)?,
        };
        rows.extend(p5::run(&env, sizes, rate, log)?);
    }
    if figures.contains(&Figure::P6) {
        rows.extend(p6::run(&env, sizes, log)?);
    }
    if figures.contains(&Figure::P7) {
        let rate = match p1_rate {
            Some(r) => r,
            None => p1::probe_rate(&env, sizes, log)?,
        };
        rows.extend(p7::run(&env, sizes, rate, log)?);
    }
    if figures.contains(&Figure::P8) {
        rows.extend(p8::run(&env, sizes, log)?);
    }
    if figures.contains(&Figure::S1) {
        rows.extend(s1::run(&env, sizes, log)?);
    }
    env.finish(log);
    Ok(rows)
}

/// Writes a progress line to the log (ignoring a closed log: measurements go on).
pub(crate) fn say(log: &mut dyn Write, line: impl std::fmt::Display) {
    let _ = writeln!(log, "{line}");
    let _ = log.flush();
}
