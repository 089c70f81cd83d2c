//! Temp files being written right now, so that a signal handler can remove
//! them before the process dies.
//!
//! Why: the writers (temp file + rename) clean up on error and on drop, but
//! SIGINT/SIGTERM kill the process without unwinding, which left
//! `OUT.mfx.tmp-PID` behind after Ctrl-C in `mfx prep` (issue 16). The
//! library only keeps the list; the binary installs the handler (see
//! `src/commands/prep.rs`), because what a signal should do is its decision.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records a temp file that exists until [`forget`] is called for it.
pub fn register(path: &Path) {
    live().push(path.to_path_buf());
}

/// The temp file was renamed into place or removed: nothing to clean up.
pub fn forget(path: &Path) {
    let mut v = live();
    if let Some(i) = v.iter().position(|p| p == path) {
        v.swap_remove(i);
    }
}

/// Removes every registered temp file (for a signal handler, just before
/// exiting) and returns the paths removed. The list stays locked, so no
/// writer can register or rename one meanwhile.
pub fn remove_all() -> Vec<PathBuf> {
    let mut v = live();
    let removed = v
        .drain(..)
        .filter(|p| std::fs::remove_file(p).is_ok())
        .collect();
    std::mem::forget(v); // keep the lock held: the process is about to exit
    removed
}
