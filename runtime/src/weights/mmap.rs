//! The one place the runtime maps checkpoint files.

use crate::error::RuntimeError;
use memmap2::Mmap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

/// Maps `path` read-only.
///
/// # Safety (why this is sound enough)
/// A mapping is only valid while the file does not change underneath it: if
/// another process truncates or rewrites a checkpoint we have mapped, reads
/// may see the new bytes or fault with SIGBUS. Checkpoints and packs are
/// written once and then only read (packs are written to a temporary file and
/// renamed into place), which is the contract we document for users; every
/// length and offset read from the mapped bytes is still validated, so a
/// file that is merely corrupt yields an error, not undefined behaviour.
pub fn map_file(path: &Path) -> Result<Arc<Mmap>, RuntimeError> {
    let file = File::open(path).map_err(|e| RuntimeError::io(path, e))?;
    // SAFETY: see the function docs; the file is opened read-only and the
    // mapping is never written through.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| RuntimeError::io(path, e))?;
    Ok(Arc::new(map))
}
