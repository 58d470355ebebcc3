//! `vibstagectl generate-docs --out DIR` (hidden): man pages and shell completions of both
//! programs, generated from the clap definitions the binaries parse, so that they never drift.
//!
//! `packaging/build-deb` runs it; operators have no reason to. The tree it writes mirrors where
//! the files go on a Debian system:
//!
//! ```text
//! DIR/man/man1/vibstagectl.1, vibstagectl-<subcommand>.1, ...   (section 1: user commands)
//! DIR/man/man8/vibstaged.8                                     (section 8: daemons)
//! DIR/completions/bash/{vibstagectl,vibstaged}
//! DIR/completions/zsh/{_vibstagectl,_vibstaged}
//! DIR/completions/fish/{vibstagectl,vibstaged}.fish
//! ```
//!
//! Pages carry no date, so building twice gives the same bytes.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory as _;
use clap_complete::Shell;

use super::{CliError, Existing, emit, ensure_dir, write_file};

/// Arguments of `generate-docs` (parsed apart from the `vibstagectl` grammar, see `cli::main`).
#[derive(Debug, clap::Parser)]
#[command(
    name = "vibstagectl generate-docs",
    about = "Write the man pages and shell completions of vibstagectl and vibstaged (packaging)"
)]
pub struct Args {
    /// Directory to write `man/` and `completions/` into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Name of the manual the pages belong to (the centre of the page header).
const MANUAL: &str = "vibstage manual";

/// The two programs' command definitions, with their man section.
fn programs() -> [(clap::Command, &'static str); 2] {
    [
        (super::Cli::command(), "1"),
        (vibstage::daemon_args::Args::command(), "8"),
    ]
}

fn render(man: &clap_mangen::Man, what: &Path) -> Result<Vec<u8>, CliError> {
    let mut page = Vec::new();
    man.render(&mut page)
        .map_err(|e| CliError::io("render man page", what, e))?;
    Ok(page)
}

/// Writes every man page (one per non-hidden subcommand for `vibstagectl`); returns their paths.
fn man_pages(out: &Path) -> Result<Vec<PathBuf>, CliError> {
    let mut written = Vec::new();
    for (cmd, section) in programs() {
        let dir = out.join("man").join(format!("man{section}"));
        ensure_dir(&dir, 0o755)?;
        let source = format!("vibstage {}", env!("CARGO_PKG_VERSION"));
        let mut pending = vec![cmd.disable_help_subcommand(true)];
        pending[0].build();
        while let Some(cmd) = pending.pop() {
            pending.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
            let man = clap_mangen::Man::new(cmd)
                .section(section)
                .manual(MANUAL)
                .source(source.clone());
            let path = dir.join(man.get_filename());
            write_file(&path, &render(&man, &path)?, 0o644, Existing::Replace)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// Writes bash, zsh and fish completions of both programs; returns their paths.
fn completions(out: &Path) -> Result<Vec<PathBuf>, CliError> {
    let mut written = Vec::new();
    for (mut cmd, _) in programs() {
        let name = cmd.get_name().to_owned();
        for (shell, dir, file) in [
            (Shell::Bash, "bash", name.clone()),
            (Shell::Zsh, "zsh", format!("_{name}")),
            (Shell::Fish, "fish", format!("{name}.fish")),
        ] {
            let dir = out.join("completions").join(dir);
            ensure_dir(&dir, 0o755)?;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, &name, &mut script);
            let path = dir.join(file);
            write_file(&path, &script, 0o644, Existing::Replace)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// Runs `generate-docs`: prints one line per file written.
pub fn run(args: Args, out: &mut dyn Write) -> Result<(), CliError> {
    ensure_dir(&args.out, 0o755)?;
    let mut files = man_pages(&args.out)?;
    files.extend(completions(&args.out)?);
    for f in files {
        emit(out, f.display())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_pages_for_every_visible_subcommand_and_completions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = {
            let mut f = man_pages(dir.path()).expect("man");
            f.extend(completions(dir.path()).expect("completions"));
            f
        };
        let names: Vec<String> = files
            .iter()
            .map(|p| {
                p.strip_prefix(dir.path())
                    .expect("inside")
                    .display()
                    .to_string()
            })
            .collect();
        for want in [
            "man/man1/vibstagectl.1",
            "man/man1/vibstagectl-demo.1",
            "man/man1/vibstagectl-certs-init.1",
            "man/man8/vibstaged.8",
            "completions/bash/vibstagectl",
            "completions/zsh/_vibstaged",
            "completions/fish/vibstagectl.fish",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        assert!(
            !names.iter().any(|n| n.contains("generate-docs")),
            "hidden subcommand documented: {names:?}"
        );
        let daemon =
            std::fs::read_to_string(dir.path().join("man/man8/vibstaged.8")).expect("vibstaged.8");
        assert!(daemon.contains("check\\-config"), "{daemon}");
        let bash =
            std::fs::read_to_string(dir.path().join("completions/bash/vibstagectl")).expect("bash");
        assert!(bash.contains("remediate"), "{bash}");
        for shell in [
            "bash/vibstagectl",
            "zsh/_vibstagectl",
            "fish/vibstagectl.fish",
        ] {
            let script = std::fs::read_to_string(dir.path().join("completions").join(shell))
                .expect("completion");
            assert!(
                !script.contains("generate-docs"),
                "{shell} offers a hidden subcommand"
            );
        }
    }
}
