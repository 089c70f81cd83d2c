//! Positioned reads of expert blobs, optionally bypassing the page cache.
//!
//! Experts are read with `pread`, never through the pack's map: a pack
//! truncated while we run then gives a short read (an error naming the
//! expert) instead of SIGBUS, and with O_DIRECT (Linux) / F_NOCACHE (macOS)
//! the bytes do not linger in the page cache, so `--ram` is the real
//! footprint rather than one hidden in kernel memory.

use super::buf::{BufPool, PooledBuf, IO_ALIGN};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Reads byte ranges of one file into pooled aligned buffers.
pub struct BlobReader {
    path: PathBuf,
    buffered: File,
    direct: Option<File>,
    /// Cleared when the filesystem refuses direct reads (tmpfs: EINVAL).
    direct_ok: AtomicBool,
}

impl BlobReader {
    /// Opens `path` for reading; with `direct`, also a page-cache-bypassing handle
    /// where the OS offers one (silently buffered elsewhere; see [`Self::is_direct`]).
    pub fn open(path: &Path, direct: bool) -> io::Result<Self> {
        let buffered = File::open(path)?;
        let direct_file = if direct { open_direct(path) } else { None };
        Ok(BlobReader {
            path: path.to_path_buf(),
            direct_ok: AtomicBool::new(direct_file.is_some()),
            buffered,
            direct: direct_file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether reads currently bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct_ok.load(Ordering::Relaxed)
    }

    /// Current file length (for detecting a pack replaced or truncated under us).
    pub fn file_len(&self) -> io::Result<u64> {
        Ok(self.buffered.metadata()?.len())
    }

    /// Reads `len` bytes at `offset` into a buffer from `pool`. A file shorter
    /// than `offset + len` is an `UnexpectedEof` error stating both sizes.
    pub fn read(&self, pool: &Arc<BufPool>, offset: u64, len: usize) -> io::Result<PooledBuf> {
        if self.is_direct() && offset.is_multiple_of(IO_ALIGN as u64) {
            if let Some(f) = &self.direct {
                // Round the length up: O_DIRECT reads whole blocks.
                let padded = len.div_ceil(IO_ALIGN) * IO_ALIGN;
                let mut buf = pool.take(padded);
                match read_full(f, &mut buf.full_mut()[..padded], offset) {
                    Ok(got) if got >= len => {
                        let mut out = buf;
                        shrink(&mut out, len);
                        return Ok(out);
                    }
                    Ok(got) => return Err(short(offset, len, got)),
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        // The filesystem does not do direct I/O after all.
                        self.direct_ok.store(false, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let mut buf = pool.take(len);
        let got = read_full(&self.buffered, buf.as_mut_slice(), offset)?;
        if got < len {
            return Err(short(offset, len, got));
        }
        Ok(buf)
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn short(offset: u64, len: usize, got: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!(
            "short read: {got} of {len} bytes at offset {offset} (the file was truncated or replaced)"
        ),
    )
}

/// Makes a padded buffer report `len` bytes.
fn shrink(buf: &mut PooledBuf, len: usize) {
    buf.truncate(len);
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(target_os = "macos")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::fd::AsRawFd;
    let f = File::open(path).ok()?;
    // SAFETY: fcntl on a valid descriptor we own.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_NOCACHE, 1) };
    (rc == 0).then_some(f)
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn open_direct(_path: &Path) -> Option<File> {
    None
}
