//! `vibstagectl`: the controller, depot-owner and local-admin tool. All of it lives in
//! [`vibstage_ctl::cli`]; this is only the process entry point.

use std::process::ExitCode;

fn main() -> ExitCode {
    vibstage_ctl::cli::main()
}
