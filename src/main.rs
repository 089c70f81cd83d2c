//! The `mfx` command line: prep packs, run and serve them.
//!
//! Errors bubble up as `anyhow` and are printed once, here, with their causes;
//! the exit code is 1 for errors and 2 for usage errors (clap's own).

mod commands;
mod hub;

use clap::Parser;

fn main() {
    mfx_runtime::memory::tune_allocator();
    let cli = commands::Cli::parse();
    if let Err(e) = commands::dispatch(cli) {
        // A closed stdout (e.g. `mfx run ... | head`) is not an error.
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
        eprintln!("error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}
