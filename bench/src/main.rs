//! `vibstage-bench`: runs the benchmarks of `BENCHMARKS.md` and prints one table.
//!
//! ```text
//! cargo build --release -p vibstage -p vibstage-ctl --bins
//! cargo run --release -p vibstage-bench -- all            # the full run (several minutes)
//! cargo run --release -p vibstage-bench -- all --quick    # small sizes, seconds; numbers meaningless
//! cargo run --release -p vibstage-bench -- p1 p6         # some figures only
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vibstage_bench::{Figure, Options, Sizes, report, tools};

/// Benchmarks of vibstage against curl, openssl, sync, dd, nginx, containerd and aria2c, as one
/// table of ratios.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// What to run: `all`, or figures among p1 p2 p3 p4 p5 p6 p7 p8 s1.
    #[arg(value_name = "WHAT", required = true)]
    what: Vec<String>,
    /// Small sizes and one run of each: checks the harness, measures nothing meaningful.
    #[arg(long)]
    quick: bool,
    /// Repetitions of each measurement (the median is reported) [default: 5, 3 or 1].
    #[arg(long, value_name = "N")]
    runs: Option<usize>,
    /// Work directory [default: a new temporary directory, removed at the end].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Keep the temporary work directory (agent logs, nginx logs).
    #[arg(long)]
    keep: bool,
    /// Where vibstaged and vibstagectl are [default: next to this executable].
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
}

fn figures(what: &[String]) -> Result<Vec<Figure>, String> {
    let mut out = Vec::new();
    for w in what {
        match w.to_ascii_lowercase().as_str() {
            "all" => out.extend([
                Figure::P1,
                Figure::P2,
                Figure::P3,
                Figure::P4,
                Figure::P5,
                Figure::P6,
                Figure::P7,
                Figure::P8,
                Figure::S1,
            ]),
            "p1" => out.push(Figure::P1),
            "p2" => out.push(Figure::P2),
            "p3" => out.push(Figure::P3),
            "p4" => out.push(Figure::P4),
            "p5" => out.push(Figure::P5),
            "p6" => out.push(Figure::P6),
            "p7" => out.push(Figure::P7),
            "p8" => out.push(Figure::P8),
            "s1" => out.push(Figure::S1),
            other => {
                return Err(format!(
                    "unknown figure {other:?}: expected all, p1, p2, p3, p4, p5, p6, p7, p8 or s1"
                ));
            }
        }
    }
    Ok(out)
}

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == tools::MEASURE_ARG) {
        return tools::measure_main(&argv[2..]);
    }
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => return vibstage::daemon_args::clap_exit(e),
    };
    let figures = match figures(&args.what) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let mut sizes = if args.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    if let Some(n) = args.runs {
        sizes = sizes.with_runs(n);
    }
    let options = Options {
        dir: args.dir,
        bin_dir: args.bin_dir,
        keep: args.keep,
    };
    let started = std::time::Instant::now();
    match vibstage_bench::run(&figures, &sizes, &options, &mut std::io::stderr()) {
        Ok(rows) => {
            if sizes.quick {
                println!("quick mode: small sizes, one run each; these numbers mean nothing\n");
            }
            print!("{}", report::table(&rows));
            eprintln!("done in {}", report::secs(started.elapsed().as_secs_f64()));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
