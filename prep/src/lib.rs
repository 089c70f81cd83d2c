//! The offline mfx pipeline (`mfx prep`): routing profile, pinning, expert
//! merging, mixed precision, entropy coding and pack writing. Each stage is
//! one module with its own tests; `pipeline::run` strings them together.

pub mod calib;
pub mod entropy;
pub mod error;
pub mod eval;
pub mod gptq;
pub mod kld;
pub mod merge;
pub mod pin;
pub mod pipeline;
pub mod plan;
pub mod prune;
pub mod quantize;
pub mod ram;
pub mod report;
pub mod routing;
pub mod source;
pub mod suitability;

pub use error::{PrepError, Result};
pub use pipeline::{run, Options, Outcome};
pub use plan::{plan, Plan, PlanInput};

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` via a temp file in the same directory and a
/// rename, so a reader never sees a half-written file and a failure leaves
/// nothing behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let werr = |e: std::io::Error| PrepError::Write {
        path: path.to_path_buf(),
        source: e,
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(werr)?;
    // Removed by the CLI's signal handler if prep is interrupted here.
    let tmp_path = tmp.path().to_path_buf();
    mfx_formats::tempfiles::register(&tmp_path);
    let r = write_temp(&mut tmp, bytes, path);
    let r = r.and_then(|()| tmp.persist(path).map(drop).map_err(|e| werr(e.error)));
    mfx_formats::tempfiles::forget(&tmp_path);
    r
}

fn write_temp(tmp: &mut tempfile::NamedTempFile, bytes: &[u8], path: &Path) -> Result<()> {
    let werr = |e: std::io::Error| PrepError::Write {
        path: path.to_path_buf(),
        source: e,
    };
    tmp.write_all(bytes).map_err(werr)?;
    #[cfg(unix)]
    {
        // tempfile creates 0600; packs, profiles and cards are meant to be shared.
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(werr)?;
    }
    tmp.as_file().sync_all().map_err(werr)
}
