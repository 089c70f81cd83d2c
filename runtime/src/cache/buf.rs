//! Aligned, recycled buffers for expert blobs.
//!
//! O_DIRECT needs the destination, the file offset and the length aligned to
//! the device's logical block size; 4096 covers every block device we meet.
//! Buffers are recycled because an expert miss happens every few tokens per
//! layer: allocating (and page-faulting) a fresh megabyte each time would
//! cost more than the read on a fast SSD.

use crate::weights::BlobOwner;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// Alignment of every buffer (and the read granularity with O_DIRECT).
pub const IO_ALIGN: usize = 4096;

/// A heap buffer aligned to [`IO_ALIGN`], of fixed capacity; `len` bytes are in use.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
    /// Made by [`map_huge`] (freed with `munmap`), not by the global allocator.
    mapped: bool,
}

// SAFETY: the buffer is uniquely owned heap memory, like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access is read-only (`&self` gives `&[u8]`).
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of at least `cap` bytes (rounded up to [`IO_ALIGN`]).
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1).div_ceil(IO_ALIGN) * IO_ALIGN;
        if let Some(ptr) = map_huge(cap) {
            return AlignedBuf {
                ptr,
                cap,
                len: 0,
                mapped: true,
            };
        }
        let layout = Layout::from_size_align(cap, IO_ALIGN).expect("IO_ALIGN is a power of two");
        // SAFETY: layout has non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(p) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf {
            ptr,
            cap,
            len: 0,
            mapped: false,
        }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "buffer length beyond capacity");
        self.len = len;
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialized (zeroed at alloc) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The whole capacity, for reads that round up to the block size.
    pub fn full_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap) }
    }
}

/// Buffers at least this large get their own mapping (see [`map_huge`]).
const HUGE_MIN: usize = 2 << 20;

/// A fresh anonymous mapping of `cap` bytes for a large buffer, advised to
/// use transparent huge pages on Linux (the kernel's THP mode is commonly
/// `madvise`, so nothing gets them unasked). Resident weights are streamed
/// once per token: with 4 KiB pages the lm_head alone (175 MiB at 4 bits for
/// a 152k vocabulary) spans 45k TLB entries per pass. The allocator cannot be
/// asked for this: Rust's `alloc_zeroed` with 4 KiB alignment memsets the
/// block, which faults every page in as 4 KiB before any advice could be
/// given; a mapping is zero already and untouched. `None` (small buffers,
/// non-unix, a failed mmap) falls back to the allocator.
fn map_huge(cap: usize) -> Option<NonNull<u8>> {
    #[cfg(unix)]
    if cap >= HUGE_MIN {
        // SAFETY: anonymous private mapping, no address hint; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANON,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: [p, p + cap) is the mapping just made; advice only, a
        // refusal changes nothing.
        #[cfg(target_os = "linux")]
        unsafe {
            libc::madvise(p, cap, libc::MADV_HUGEPAGE)
        };
        return NonNull::new(p as *mut u8);
    }
    let _ = (cap, HUGE_MIN);
    None
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        #[cfg(unix)]
        if self.mapped {
            // SAFETY: mapped in `map_huge` with exactly this length.
            unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.cap) };
            return;
        }
        let layout = Layout::from_size_align(self.cap, IO_ALIGN).expect("valid at alloc");
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// Free buffers waiting for reuse. Keeps at most `max_free`; a request takes
/// the smallest free buffer that fits (mixed precision gives experts of a
/// few different sizes).
pub struct BufPool {
    free: Mutex<Vec<AlignedBuf>>,
    max_free: usize,
}

impl BufPool {
    pub fn new(max_free: usize) -> Arc<Self> {
        Arc::new(BufPool {
            free: Mutex::new(Vec::new()),
            max_free,
        })
    }

    /// A buffer with `len` bytes in use (contents unspecified).
    pub fn take(self: &Arc<Self>, len: usize) -> PooledBuf {
        let mut buf = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len && b.capacity() <= len.max(IO_ALIGN) * 2)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            best.map(|i| free.swap_remove(i))
        }
        .unwrap_or_else(|| AlignedBuf::new(len));
        buf.set_len(len);
        PooledBuf {
            buf: Some(buf),
            pool: Arc::clone(self),
        }
    }

    /// Buffers currently free.
    pub fn free_count(&self) -> usize {
        self.free.lock().map(|f| f.len()).unwrap_or(0)
    }

    fn give_back(&self, buf: AlignedBuf) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.max_free {
            free.push(buf);
        }
    }
}

/// A buffer on loan from a [`BufPool`]; returns itself on drop.
pub struct PooledBuf {
    buf: Option<AlignedBuf>,
    pool: Arc<BufPool>,
}

impl PooledBuf {
    pub fn as_slice(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| b.as_slice())
    }

    pub fn full_mut(&mut self) -> &mut [u8] {
        self.buf.as_mut().map_or(&mut [], |b| b.full_mut())
    }

    /// Shortens the in-use length (after a block-rounded read).
    pub fn truncate(&mut self, len: usize) {
        if let Some(b) = self.buf.as_mut() {
            b.set_len(len.min(b.len));
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self.buf.as_mut() {
            Some(b) => {
                let len = b.len;
                &mut b.full_mut()[..len]
            }
            None => &mut [],
        }
    }
}

impl BlobOwner for PooledBuf {
    fn bytes(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.give_back(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_recycled() {
        let pool = BufPool::new(4);
        let a = pool.take(5000);
        assert_eq!(a.as_slice().as_ptr() as usize % IO_ALIGN, 0);
        assert_eq!(a.as_slice().len(), 5000);
        let p = a.as_slice().as_ptr();
        drop(a);
        assert_eq!(pool.free_count(), 1);
        let b = pool.take(6000);
        assert_eq!(b.as_slice().as_ptr(), p, "same-size-class buffer reused");
        // A much smaller request does not take a huge buffer.
        drop(b);
        let big = pool.take(100_000);
        let q = big.as_slice().as_ptr();
        drop(big);
        let c = pool.take(10);
        assert_ne!(c.as_slice().as_ptr(), q);
    }
}
