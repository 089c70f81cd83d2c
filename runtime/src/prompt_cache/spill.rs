//! A prompt-cache slot on disk: one file per slot, written to a temp file
//! and renamed into place, checked whole (xxh3) before anything in it is
//! used.
//!
//! ```text
//! magic     8  b"MFXSLOT\0"
//! version   u32 (1), reserved u32 (0)
//! identity  u64  the model's (Generator: pack manifest checksum or config
//!                and weights hash, KV precision, kernel tier)
//! grid      u64  the prefill chunk the state was computed on
//! n_tokens  u64, on_grid u64, tokens u32 * n_tokens
//! n_checkpoints u64, each a `Checkpoint::save`
//! state     u64 length, then `SeqStates::save`'s bytes
//! checksum  u64  xxh3-64 of every byte before it
//! ```
//!
//! All integers little-endian. The state bytes are those of the build that
//! wrote them; the identity and [`crate::models::Model::load_state`]'s shape
//! checks refuse anything else.

use crate::models::state::{Checkpoint, StateReader};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"MFXSLOT\0";
pub const VERSION: u32 = 1;
/// File name extension of spilled slots.
pub const EXT: &str = "mfxslot";

#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    #[error("prompt-cache file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("prompt-cache file {path}: {msg}; it is ignored and the prompt is prefilled again")]
    Invalid { path: PathBuf, msg: String },
}

impl SpillError {
    fn invalid(path: &Path, msg: impl Into<String>) -> Self {
        SpillError::Invalid {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
}

/// What a spill file's header says (enough to match prompts against it).
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub identity: u64,
    pub grid: usize,
    pub tokens: Vec<u32>,
    pub on_grid: usize,
}

/// A whole spill file, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotFile {
    pub header: Header,
    pub checkpoints: Vec<Checkpoint>,
    pub state: Vec<u8>,
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Serializes a slot (`state`: `SeqStates::save`'s bytes).
pub fn encode(header: &Header, checkpoints: &[Checkpoint], state: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + header.tokens.len() * 4 + state.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    put_u64(&mut out, header.identity);
    put_u64(&mut out, header.grid as u64);
    put_u64(&mut out, header.tokens.len() as u64);
    put_u64(&mut out, header.on_grid as u64);
    for t in &header.tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    put_u64(&mut out, checkpoints.len() as u64);
    for c in checkpoints {
        c.save(&mut out);
    }
    put_u64(&mut out, state.len() as u64);
    out.extend_from_slice(state);
    let sum = xxhash_rust::xxh3::xxh3_64(&out);
    put_u64(&mut out, sum);
    out
}

/// Writes `bytes` to `path` through a temp file in the same directory and a
/// rename, so a reader never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SpillError> {
    let io = |source| SpillError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    // A name of this process's own: never another writer's temp file.
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

/// Parses the fixed header and the token ids from the start of `b`.
fn parse_header(path: &Path, b: &[u8]) -> Result<(Header, usize), SpillError> {
    let bad = |m: &str| SpillError::invalid(path, m);
    if b.len() < 48 {
        return Err(bad("shorter than a slot header (48 bytes)"));
    }
    if &b[..8] != MAGIC {
        return Err(bad("not a prompt-cache slot (bad magic bytes)"));
    }
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
    let version = u32_at(8);
    if version != VERSION {
        return Err(bad(&format!(
            "format version {version}, this build reads {VERSION}"
        )));
    }
    let identity = u64_at(16);
    let grid = u64_at(24) as usize;
    let n = u64_at(32);
    let on_grid = u64_at(40) as usize;
    let end =
        n.checked_mul(4)
            .and_then(|t| t.checked_add(48))
            .filter(|&e| e <= b.len() as u64)
            .ok_or_else(|| bad(&format!("{n} token ids do not fit in the file")))? as usize;
    let tokens: Vec<u32> = b[48..end]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
        .collect();
    if on_grid > tokens.len() {
        return Err(bad("on-grid length beyond the token ids"));
    }
    Ok((
        Header {
            identity,
            grid,
            tokens,
            on_grid,
        },
        end,
    ))
}

/// Refuses a header of another model identity or prefill grid.
pub fn check_header(path: &Path, h: &Header, identity: u64, grid: usize) -> Result<(), SpillError> {
    if h.identity != identity {
        return Err(SpillError::invalid(
            path,
            format!(
                "written for another model or build (identity {:016x}, this model {identity:016x})",
                h.identity
            ),
        ));
    }
    if h.grid != grid {
        return Err(SpillError::invalid(
            path,
            format!(
                "computed on a prefill grid of {} tokens, this generator uses {grid}",
                h.grid
            ),
        ));
    }
    Ok(())
}

/// Reads just the header and token ids (the directory index at start-up).
pub fn read_header(path: &Path) -> Result<Header, SpillError> {
    let io = |source| SpillError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut head = [0u8; 48];
    f.read_exact(&mut head)
        .map_err(|_| SpillError::invalid(path, "shorter than a slot header (48 bytes)"))?;
    let n = u64::from_le_bytes(head[32..40].try_into().expect("8"));
    let len = f.metadata().map_err(io)?.len();
    if n.saturating_mul(4).saturating_add(48) > len {
        return Err(SpillError::invalid(
            path,
            format!("{n} token ids do not fit in the file"),
        ));
    }
    let mut b = head.to_vec();
    b.resize(48 + n as usize * 4, 0);
    f.read_exact(&mut b[48..]).map_err(io)?;
    Ok(parse_header(path, &b)?.0)
}

/// Reads and checks a whole file: checksum first, then the header against
/// `identity` and `grid`, then the layout. Any failure is an error naming
/// the file and what was wrong.
pub fn read(path: &Path, identity: u64, grid: usize) -> Result<SlotFile, SpillError> {
    let b = std::fs::read(path).map_err(|source| SpillError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode(path, &b, identity, grid)
}

pub fn decode(path: &Path, b: &[u8], identity: u64, grid: usize) -> Result<SlotFile, SpillError> {
    let bad = |m: String| SpillError::invalid(path, m);
    if b.len() < 56 {
        return Err(bad("shorter than a slot file".into()));
    }
    let (body, sum) = b.split_at(b.len() - 8);
    let want = u64::from_le_bytes(sum.try_into().expect("8"));
    let got = xxhash_rust::xxh3::xxh3_64(body);
    if got != want {
        return Err(bad(format!(
            "checksum mismatch (stored {want:016x}, computed {got:016x}): the file is damaged"
        )));
    }
    let (header, at) = parse_header(path, body)?;
    check_header(path, &header, identity, grid)?;
    let mut r = StateReader::new(&body[at..]);
    let layout = |e| bad(format!("{e}"));
    let n = r.usize().map_err(layout)?;
    let mut checkpoints = Vec::new();
    for _ in 0..n {
        let c = Checkpoint::read(&mut r).map_err(layout)?;
        if c.len > header.tokens.len() {
            return Err(bad(format!(
                "a checkpoint at position {} beyond its {} tokens",
                c.len,
                header.tokens.len()
            )));
        }
        checkpoints.push(c);
    }
    let len = r.usize().map_err(layout)?;
    let state_at = at + r.position();
    if state_at + len != body.len() {
        return Err(bad(format!(
            "state of {len} bytes where {} remain",
            body.len() - state_at
        )));
    }
    Ok(SlotFile {
        header,
        checkpoints,
        state: body[state_at..].to_vec(),
    })
}

/// The file name of a slot: its identity, grid and a hash of its tokens,
/// so the same prefix spilled twice replaces one file.
pub fn file_name(identity: u64, grid: usize, tokens: &[u32]) -> String {
    let h = xxhash_rust::xxh3::xxh3_64(bytemuck::cast_slice(tokens));
    format!("{}{h:016x}.{EXT}", name_prefix(identity, grid))
}

/// The start of every file name of slots of this identity and grid.
pub fn name_prefix(identity: u64, grid: usize) -> String {
    format!("{identity:016x}-g{grid}-")
}
