//! A model's whole sequence state as a value: moved out of a model and back
//! (prompt-cache slots), written to bytes and read back (disk spill), and
//! checkpointed (recurrent state, which cannot be truncated, saved at a
//! position so that a later prompt can roll back to it).
//!
//! Each layer's [`SeqState`] writes its own bytes; [`SeqStates`] is every
//! layer of one model, type-erased so the generation loop and the prompt
//! cache never see a family. The byte layout is private to this process's
//! build: a spill file carries the model identity and a checksum around it
//! (`crate::prompt_cache::spill`), and [`SeqState::load`] checks every shape
//! against the receiving state, so bytes of another shape are refused, never
//! read as garbage.

use super::family::SeqState;
use half::f16;
use std::any::Any;

/// Why state bytes were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("model state bytes end early (needed {needed} more at byte {at})")]
    Truncated { at: usize, needed: usize },
    #[error("model state does not fit this model: {0}")]
    Mismatch(String),
    #[error("model state has {extra} bytes after its last layer")]
    Trailing { extra: usize },
}

/// Appends little-endian values (the writer side of [`StateReader`]).
pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub fn put_f32s(out: &mut Vec<u8>, v: &[f32]) {
    put_u64(out, v.len() as u64);
    out.extend_from_slice(bytemuck::cast_slice(v));
}

pub fn put_f16s(out: &mut Vec<u8>, v: &[f16]) {
    put_u64(out, v.len() as u64);
    out.extend_from_slice(bytemuck::cast_slice(v));
}

pub fn put_i8s(out: &mut Vec<u8>, v: &[i8]) {
    put_u64(out, v.len() as u64);
    out.extend_from_slice(bytemuck::cast_slice(v));
}

/// Reads what the `put_*` functions wrote; every length is checked against
/// the bytes left before anything is allocated.
pub struct StateReader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> StateReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, at: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let left = self.buf.len() - self.at;
        if n > left {
            return Err(StateError::Truncated {
                at: self.at,
                needed: n - left,
            });
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.at
    }

    pub fn u64(&mut self) -> Result<u64, StateError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A length or count that must fit in memory (a `u64` on disk).
    pub fn usize(&mut self) -> Result<usize, StateError> {
        let v = self.u64()?;
        usize::try_from(v).map_err(|_| StateError::Mismatch(format!("count {v} too large")))
    }

    fn elems(&mut self, size: usize) -> Result<&'a [u8], StateError> {
        let n = self.usize()?;
        let bytes = n.checked_mul(size).ok_or(StateError::Truncated {
            at: self.at,
            needed: usize::MAX,
        })?;
        self.take(bytes)
    }

    pub fn f32s(&mut self) -> Result<Vec<f32>, StateError> {
        let b = self.elems(4)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect())
    }

    pub fn f16s(&mut self) -> Result<Vec<f16>, StateError> {
        let b = self.elems(2)?;
        Ok(b.chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
            .collect())
    }

    pub fn i8s(&mut self) -> Result<Vec<i8>, StateError> {
        Ok(self.elems(1)?.iter().map(|&b| b as i8).collect())
    }

    /// Refuses bytes left over (a state written for more layers).
    pub fn finish(&self) -> Result<(), StateError> {
        match self.buf.len() - self.at {
            0 => Ok(()),
            extra => Err(StateError::Trailing { extra }),
        }
    }
}

/// Checks a shape value read from state bytes against the receiver's.
pub fn expect_eq(what: &str, got: usize, want: usize) -> Result<(), StateError> {
    if got == want {
        Ok(())
    } else {
        Err(StateError::Mismatch(format!(
            "{what} is {got} in the saved state but {want} in this model"
        )))
    }
}

/// The recurrent part of a model's state at one position: the bytes of
/// every layer that cannot be truncated (DeltaNet's recurrent and conv
/// state), `None` for layers that can (KV caches). Rolling back to it is
/// truncating the others to [`Checkpoint::len`] and loading these.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub len: usize,
    pub layers: Vec<Option<Vec<u8>>>,
}

impl Checkpoint {
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().map(Vec::len).sum()
    }

    /// Appends the checkpoint's bytes.
    pub fn save(&self, out: &mut Vec<u8>) {
        put_u64(out, self.len as u64);
        put_u64(out, self.layers.len() as u64);
        for l in &self.layers {
            match l {
                None => put_u64(out, u64::MAX),
                Some(b) => {
                    put_u64(out, b.len() as u64);
                    out.extend_from_slice(b);
                }
            }
        }
    }

    pub fn read(r: &mut StateReader<'_>) -> Result<Self, StateError> {
        let len = r.usize()?;
        let n = r.usize()?;
        // Each layer costs at least 8 bytes: a hostile count fails here.
        let mut layers = Vec::with_capacity(n.min(r.buf.len() / 8));
        for _ in 0..n {
            let b = r.u64()?;
            layers.push(if b == u64::MAX {
                None
            } else {
                let n = usize::try_from(b)
                    .map_err(|_| StateError::Mismatch(format!("layer size {b} too large")))?;
                Some(r.take(n)?.to_vec())
            });
        }
        Ok(Self { len, layers })
    }
}

/// Every layer's state of one model, type-erased (a `Vec` of the family's
/// [`SeqState`]).
pub trait SeqStates: Send + Sync {
    /// Positions held.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Heap bytes held.
    fn bytes(&self) -> usize;
    /// Keeps the first `len` positions; false (nothing changed) if a layer
    /// cannot, which is what [`SeqStates::rollback`] is for.
    fn truncate(&mut self, len: usize) -> bool;
    /// Whether some layer cannot truncate (recurrent state): positions
    /// before [`SeqStates::len`] are then reachable only through checkpoints.
    fn needs_checkpoints(&self) -> bool;
    /// The recurrent layers' bytes at the current length.
    fn checkpoint(&self) -> Checkpoint;
    /// Back to `cp`'s position: the truncatable layers truncated, the
    /// others loaded from `cp`. False (state unspecified: reset it) when `cp`
    /// does not fit.
    fn rollback(&mut self, cp: &Checkpoint) -> bool;
    /// A copy of the first `len` positions (`cp`: the checkpoint at `len`
    /// for layers that cannot truncate); `None` when it cannot be made.
    /// Copies one layer at a time, so the copy never holds more than it keeps
    /// plus one layer.
    fn prefix_copy(&self, len: usize, cp: Option<&Checkpoint>) -> Option<Box<dyn SeqStates>>;
    /// Appends every layer's bytes.
    fn save(&self, out: &mut Vec<u8>);
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
    /// The concrete type's id (`Any::type_id` through the trait object).
    fn type_id_of(&self) -> std::any::TypeId;
}

impl<S: SeqState + 'static> SeqStates for Vec<S> {
    fn len(&self) -> usize {
        self.first().map_or(0, |s| s.len())
    }
    fn bytes(&self) -> usize {
        self.iter().map(|s| s.bytes()).sum()
    }
    fn truncate(&mut self, len: usize) -> bool {
        if len > SeqStates::len(self) {
            return false;
        }
        // All or nothing: refuse before any layer moves.
        if self.iter().any(|s| !s.rolls_back()) && len != SeqStates::len(self) {
            return false;
        }
        self.iter_mut().all(|s| s.truncate(len))
    }
    fn needs_checkpoints(&self) -> bool {
        self.iter().any(|s| !s.rolls_back())
    }
    fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            len: SeqStates::len(self),
            layers: self
                .iter()
                .map(|s| {
                    (!s.rolls_back()).then(|| {
                        let mut b = Vec::new();
                        s.save(&mut b);
                        b
                    })
                })
                .collect(),
        }
    }
    fn rollback(&mut self, cp: &Checkpoint) -> bool {
        if cp.layers.len() != self.len() || cp.len > SeqStates::len(self) {
            return false;
        }
        for (s, l) in self.iter_mut().zip(&cp.layers) {
            let ok = match l {
                Some(bytes) => {
                    let mut r = StateReader::new(bytes);
                    s.load(&mut r).is_ok() && r.finish().is_ok() && s.len() == cp.len
                }
                None => s.rolls_back() && s.truncate(cp.len),
            };
            if !ok {
                return false;
            }
        }
        true
    }
    fn prefix_copy(&self, len: usize, cp: Option<&Checkpoint>) -> Option<Box<dyn SeqStates>> {
        if len > SeqStates::len(self)
            || cp.is_some_and(|c| c.len != len || c.layers.len() != self.len())
        {
            return None;
        }
        let mut out = Vec::with_capacity(self.len());
        for (i, s) in self.iter().enumerate() {
            let mut c = s.clone();
            let ok = if s.rolls_back() {
                c.truncate(len)
            } else {
                let bytes = cp?.layers[i].as_ref()?;
                let mut r = StateReader::new(bytes);
                c.load(&mut r).is_ok() && r.finish().is_ok() && c.len() == len
            };
            if !ok {
                return None;
            }
            out.push(c);
        }
        Some(Box::new(out))
    }
    fn save(&self, out: &mut Vec<u8>) {
        put_u64(out, self.len() as u64);
        for s in self {
            s.save(out);
        }
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
    fn type_id_of(&self) -> std::any::TypeId {
        std::any::TypeId::of::<Self>()
    }
}

/// Reads what [`SeqStates::save`] wrote into `fresh` (one empty state per
/// layer of the receiving model), checking every layer's shape.
pub fn load_states<S: SeqState + 'static>(
    mut fresh: Vec<S>,
    bytes: &[u8],
) -> Result<Vec<S>, StateError> {
    let mut r = StateReader::new(bytes);
    expect_eq("the layer count", r.usize()?, fresh.len())?;
    for s in fresh.iter_mut() {
        s.load(&mut r)?;
    }
    r.finish()?;
    let len = SeqStates::len(&fresh);
    if fresh.iter().any(|s| s.len() != len) {
        return Err(StateError::Mismatch(
            "layers hold different numbers of positions".into(),
        ));
    }
    Ok(fresh)
}
