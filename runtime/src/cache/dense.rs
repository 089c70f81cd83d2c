//! A pack's dense tensors read into owned memory, so that nothing the model
//! touches after load lives in the pack's mapping.
//!
//! Why: a mapped page whose file offset is past the end of the file raises
//! SIGBUS when touched. If a pack is truncated (or replaced by a shorter
//! file through an in-place write) while mfx runs, mapped dense weights
//! (attention, embeddings, lm_head: touched every token) would kill the
//! process on the next token. Read with `pread` instead, the bytes are ours:
//! the cache's identity check (size and inode at each forward pass) then
//! reports the change as an error, and expert reads (also `pread`) report a
//! short read naming the expert. The dense set is resident anyway (it is
//! touched every token), so the copy costs load time, not memory: the budget
//! already counts it.

use super::buf::{AlignedBuf, IO_ALIGN};
use crate::error::RuntimeError;
use crate::weights::{Blob, BlobOwner};
use mfx_formats::pack::Pack;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

struct Owned(AlignedBuf);

impl BlobOwner for Owned {
    fn bytes(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// Bytes `[offset, offset+len)` of `pack`'s file, read into a fresh aligned
/// buffer; `what` (a tensor name) labels the errors. Used by
/// [`crate::weights::pack::PackSource::reading`].
pub fn read_blob(pack: &Pack, what: &str, offset: u64, len: u64) -> Result<Blob, RuntimeError> {
    let err = |msg: String| RuntimeError::Pack {
        path: pack.path().to_path_buf(),
        msg,
    };
    let len = usize::try_from(len).map_err(|_| err(format!("tensor `{what}`: too large")))?;
    let mut buf = AlignedBuf::new(len.max(1).div_ceil(IO_ALIGN) * IO_ALIGN);
    buf.set_len(len);
    let dst = &mut buf.full_mut()[..len];
    let mut done = 0;
    while done < len {
        match pack.file().read_at(&mut dst[done..], offset + done as u64) {
            Ok(0) => {
                return Err(err(format!(
                    "tensor `{what}`: short read, {done} of {len} bytes at offset {offset} (the file was truncated or replaced)"
                )))
            }
            Ok(n) => done += n,
            Err(x) if x.kind() == std::io::ErrorKind::Interrupted => {}
            Err(x) => return Err(err(format!("tensor `{what}`: {x}"))),
        }
    }
    // The copy is ours now: drop the file's pages from the page cache, which
    // a memory cgroup charges to this process (up to the whole dense set,
    // 189 MiB of a 1391 MiB limit on the 8-layer Qwen3-30B-A3B-shaped pack).
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on an open descriptor; advice only.
        unsafe {
            libc::posix_fadvise(
                pack.file().as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            )
        };
    }
    Blob::owned(Arc::new(Owned(buf)), 0, len)
        .ok_or_else(|| err(format!("tensor `{what}`: buffer too small")))
}
