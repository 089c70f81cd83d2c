//! Streaming, deterministic pack writer (docs/FORMAT.md section 11).
//!
//! Prep handles models far larger than RAM, so blobs go to disk as they come
//! and only the tables stay in memory; the manifest and the header are
//! written at the end. Callers add tensors in ascending name order, then
//! experts in ascending (layer, expert) order: the file then depends only on
//! the inputs, never on the caller's iteration order, and we can stream.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use super::header::{
    align_up, Header, DEFAULT_ALIGNMENT, FLAG_MXFP4, FORMAT_VERSION, HEADER_LEN, MAX_ALIGNMENT,
    MIN_ALIGNMENT,
};
use super::layout::{TensorLayout, PART_ALIGN};
use super::manifest::{
    expert_label, Checksum, ExpertEntry, ExpertPart, Manifest, TensorEntry, WriterInfo, MAX_PARTS,
};
use crate::codec::Codec;
use crate::error::FormatError;
use crate::quant::Scheme;

/// Everything in the manifest besides the two tables.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PackMeta {
    pub config: serde_json::Value,
    pub tokenizer_json: String,
    pub chat_template: Option<String>,
    pub generation: serde_json::Value,
    pub pin_profile: Option<serde_json::Value>,
    pub routing_summary: Option<serde_json::Value>,
    pub provenance: serde_json::Value,
}

/// One projection of an expert as the caller hands it over: `bytes` is one
/// slice for f32/f16/bf16 (the elements, little-endian) and three for affine
/// schemes (`packed`, `scales`, `biases`, as in MLX's safetensors).
#[derive(Debug, Clone)]
pub struct PartData<'a> {
    /// Canonical name: `gate_proj`, `up_proj`, `down_proj`, then the
    /// optional `gate_bias`, `up_bias`, `down_bias` (docs/FORMAT.md 6.2).
    pub name: String,
    pub scheme: Scheme,
    pub shape: Vec<u64>,
    pub bytes: Vec<&'a [u8]>,
}

/// What [`PackWriter::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PackSummary {
    pub path: PathBuf,
    pub file_length: u64,
    pub tensors: usize,
    pub experts: usize,
    pub merged_experts: usize,
    pub tensor_bytes: u64,
    pub expert_stored_bytes: u64,
    pub expert_raw_bytes: u64,
    pub manifest_length: u64,
}

/// Writes one `.mfx` pack to `PATH.tmp-<pid>` and renames it to `PATH` in
/// [`finish`](Self::finish). Dropping the writer without finishing (or any
/// error) removes the temp file.
pub struct PackWriter {
    path: PathBuf,
    tmp_path: PathBuf,
    out: Option<BufWriter<File>>,
    pos: u64,
    alignment: u32,
    meta: PackMeta,
    tensors: Vec<TensorEntry>,
    experts: Vec<ExpertEntry>,
    merged: usize,
}

fn parts_match(layout: &TensorLayout, bytes: &[&[u8]], what: &str) -> Result<(), FormatError> {
    let want = layout.parts();
    if want.len() != bytes.len() {
        return Err(FormatError::invalid(
            what,
            format!(
                "{} byte slices given, {} needs {} ({})",
                bytes.len(),
                layout.scheme,
                want.len(),
                layout.part_names().join(", ")
            ),
        ));
    }
    let names = layout.part_names();
    for (k, ((_, len), b)) in want.iter().zip(bytes).enumerate() {
        if *len != b.len() as u64 {
            return Err(FormatError::BufferSize {
                what: format!("{what} {}", names[k]),
                expected: *len,
                got: b.len() as u64,
            });
        }
    }
    Ok(())
}

impl PackWriter {
    /// Starts a pack at `path` with blobs aligned to `alignment` bytes (a power
    /// of two in 4 KiB..=1 MiB; [`DEFAULT_ALIGNMENT`] is 16 KiB).
    pub fn create(
        path: impl AsRef<Path>,
        meta: PackMeta,
        alignment: u32,
    ) -> Result<Self, FormatError> {
        let path = path.as_ref().to_path_buf();
        if !alignment.is_power_of_two() || !(MIN_ALIGNMENT..=MAX_ALIGNMENT).contains(&alignment) {
            return Err(FormatError::invalid(
                "alignment",
                format!("{alignment} is not a power of two in [{MIN_ALIGNMENT}, {MAX_ALIGNMENT}]"),
            ));
        }
        let mut tmp = path.clone().into_os_string();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp_path = PathBuf::from(tmp);
        let file = File::create(&tmp_path).map_err(|e| FormatError::Write {
            path: tmp_path.clone(),
            source: e,
        })?;
        crate::tempfiles::register(&tmp_path);
        let mut w = PackWriter {
            path,
            tmp_path,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            pos: 0,
            alignment,
            meta,
            tensors: Vec::new(),
            experts: Vec::new(),
            merged: 0,
        };
        w.write(&[0u8; HEADER_LEN])?;
        w.pad_to(alignment as u64)?;
        Ok(w)
    }

    /// [`create`](Self::create) with the default 16 KiB alignment.
    pub fn create_default(path: impl AsRef<Path>, meta: PackMeta) -> Result<Self, FormatError> {
        Self::create(path, meta, DEFAULT_ALIGNMENT)
    }

    fn write(&mut self, b: &[u8]) -> Result<(), FormatError> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| FormatError::invalid("pack writer", "already finished"))?;
        out.write_all(b).map_err(|e| FormatError::Write {
            path: self.tmp_path.clone(),
            source: e,
        })?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, target: u64) -> Result<(), FormatError> {
        const ZEROS: [u8; 4096] = [0; 4096];
        while self.pos < target {
            let n = (target - self.pos).min(ZEROS.len() as u64) as usize;
            self.write(&ZEROS[..n])?;
        }
        Ok(())
    }

    fn start_blob(&mut self) -> Result<u64, FormatError> {
        let at = align_up(self.pos, self.alignment as u64)
            .ok_or_else(|| FormatError::invalid("pack", "offset overflow"))?;
        self.pad_to(at)?;
        Ok(at)
    }

    /// Appends one dense tensor. Names must be strictly ascending (byte-wise)
    /// and all tensors must come before the first expert.
    pub fn add_tensor(
        &mut self,
        name: &str,
        scheme: Scheme,
        shape: &[u64],
        parts: &[&[u8]],
    ) -> Result<(), FormatError> {
        let what = format!("tensor {name}");
        if name.is_empty() || name.len() > super::manifest::MAX_NAME_LEN {
            return Err(FormatError::invalid(&what, "name must be 1..=1024 bytes"));
        }
        if !self.experts.is_empty() {
            return Err(FormatError::Order {
                what: "tensors (all tensors come before the experts)",
                prev: self.experts[self.experts.len() - 1].label(),
                got: what,
            });
        }
        if let Some(prev) = self.tensors.last() {
            if prev.name.as_bytes() >= name.as_bytes() {
                return Err(FormatError::Order {
                    what: "tensors",
                    prev: prev.name.clone(),
                    got: name.to_string(),
                });
            }
        }
        let layout = TensorLayout::of(scheme, shape)
            .map_err(|r| FormatError::invalid(&what, format!("{scheme} {shape:?}: {r}")))?;
        parts_match(&layout, parts, &what)?;
        let offset = self.start_blob()?;
        let mut h = Xxh3::new();
        for ((sub, _), b) in layout.parts().iter().zip(parts) {
            let pad_start = self.pos;
            self.pad_to(offset + sub)?;
            for _ in pad_start..self.pos {
                h.update(&[0]);
            }
            self.write(b)?;
            h.update(b);
        }
        self.tensors.push(TensorEntry {
            name: name.to_string(),
            scheme,
            shape: shape.to_vec(),
            offset,
            length: layout.length,
            checksum: Checksum(h.digest()),
        });
        Ok(())
    }

    fn check_expert_order(&self, layer: u32, expert: u32) -> Result<(), FormatError> {
        if let Some(p) = self.experts.last() {
            if (p.layer, p.expert) >= (layer, expert) {
                return Err(FormatError::Order {
                    what: "experts",
                    prev: p.label(),
                    got: expert_label(layer, expert),
                });
            }
        }
        Ok(())
    }

    /// Builds an expert's decoded blob (parts at 64-byte aligned offsets) from
    /// the caller's slices. Public so the cache's tests can build blobs.
    pub fn build_expert_blob(
        label: &str,
        parts: &[PartData<'_>],
    ) -> Result<(Vec<u8>, Vec<ExpertPart>), FormatError> {
        if parts.is_empty() || parts.len() as u64 > MAX_PARTS {
            return Err(FormatError::invalid(
                label,
                format!("{} parts, expected 1..={MAX_PARTS}", parts.len()),
            ));
        }
        let mut raw = Vec::new();
        let mut table = Vec::with_capacity(parts.len());
        for (k, p) in parts.iter().enumerate() {
            let pw = format!("{label} part {}", p.name);
            if p.name.is_empty()
                || p.name.len() > super::manifest::MAX_PART_NAME_LEN
                || parts[..k].iter().any(|q| q.name == p.name)
            {
                return Err(FormatError::invalid(
                    &pw,
                    "part names must be unique and 1..=64 bytes",
                ));
            }
            let layout = TensorLayout::of(p.scheme, &p.shape).map_err(|r| {
                FormatError::invalid(&pw, format!("{} {:?}: {r}", p.scheme, p.shape))
            })?;
            parts_match(&layout, &p.bytes, &pw)?;
            if k > 0 {
                raw.resize(
                    align_up(raw.len() as u64, PART_ALIGN).unwrap_or(u64::MAX) as usize,
                    0,
                );
            }
            let base = raw.len();
            raw.resize(base + layout.length as usize, 0);
            for ((sub, len), b) in layout.parts().iter().zip(&p.bytes) {
                let s = base + *sub as usize;
                raw[s..s + *len as usize].copy_from_slice(b);
            }
            table.push(ExpertPart {
                name: p.name.clone(),
                scheme: p.scheme,
                shape: p.shape.clone(),
                offset: base as u64,
            });
        }
        Ok((raw, table))
    }

    /// Appends one expert: its parts (in order: gate_proj, up_proj, down_proj)
    /// become one blob stored with `codec`. Experts must come in strictly
    /// ascending (layer, expert) order, merged ones included.
    pub fn add_expert(
        &mut self,
        layer: u32,
        expert: u32,
        codec: Codec,
        parts: &[PartData<'_>],
    ) -> Result<(), FormatError> {
        self.check_expert_order(layer, expert)?;
        let label = expert_label(layer, expert);
        let (raw, table) = Self::build_expert_blob(&label, parts)?;
        let stored = codec.encode(&raw);
        let offset = self.start_blob()?;
        self.write(&stored)?;
        self.experts.push(ExpertEntry {
            layer,
            expert,
            offset,
            length: stored.len() as u64,
            raw_length: raw.len() as u64,
            codec,
            checksum: Checksum(xxhash_rust::xxh3::xxh3_64(&stored)),
            merged_into: None,
            parts: table,
        });
        Ok(())
    }

    /// Records that `expert` of `layer` uses the weights of expert `into` of
    /// the same layer (added before or after this call). No blob is written;
    /// the entry points at the representative's blob (FORMAT.md 6.2).
    pub fn add_merged_expert(
        &mut self,
        layer: u32,
        expert: u32,
        into: u32,
    ) -> Result<(), FormatError> {
        self.check_expert_order(layer, expert)?;
        if into == expert {
            return Err(FormatError::invalid(
                expert_label(layer, expert),
                "cannot be merged into itself",
            ));
        }
        self.experts.push(ExpertEntry {
            layer,
            expert,
            offset: 0,
            length: 0,
            raw_length: 0,
            codec: Codec::None,
            checksum: Checksum(0),
            merged_into: Some(into),
            parts: Vec::new(),
        });
        self.merged += 1;
        Ok(())
    }

    fn resolve_merges(&mut self) -> Result<(), FormatError> {
        for i in 0..self.experts.len() {
            let Some(into) = self.experts[i].merged_into else {
                continue;
            };
            let (layer, expert) = (self.experts[i].layer, self.experts[i].expert);
            let rep = self
                .experts
                .binary_search_by_key(&(layer, into), |e| (e.layer, e.expert))
                .map(|j| self.experts[j].clone())
                .map_err(|_| {
                    FormatError::invalid(
                        expert_label(layer, expert),
                        format!("merged into expert {into}, which was never added"),
                    )
                })?;
            if rep.merged_into.is_some() {
                return Err(FormatError::invalid(
                    expert_label(layer, expert),
                    format!("merged into {}, which is itself merged", rep.label()),
                ));
            }
            let e = &mut self.experts[i];
            e.offset = rep.offset;
            e.length = rep.length;
            e.raw_length = rep.raw_length;
            e.codec = rep.codec;
            e.checksum = rep.checksum;
            e.parts = rep.parts;
        }
        Ok(())
    }

    /// Writes the manifest and header, fsyncs and renames the temp file to the
    /// final path.
    pub fn finish(mut self) -> Result<PackSummary, FormatError> {
        self.resolve_merges()?;
        let data_offset = self.alignment as u64;
        let data_end = self.pos.max(data_offset);
        let manifest_offset =
            align_up(data_end, 8).ok_or_else(|| FormatError::invalid("pack", "offset overflow"))?;
        self.pad_to(manifest_offset)?;
        let meta = std::mem::take(&mut self.meta);
        let uses_mxfp4 = self.tensors.iter().any(|t| t.scheme == Scheme::Mxfp4)
            || self
                .experts
                .iter()
                .any(|e| e.parts.iter().any(|p| p.scheme == Scheme::Mxfp4));
        let manifest = Manifest {
            writer: WriterInfo {
                name: "mfx".into(),
                version: env!("CARGO_PKG_VERSION").into(),
            },
            config: meta.config,
            tokenizer_json: meta.tokenizer_json,
            chat_template: meta.chat_template,
            generation: meta.generation,
            pin_profile: meta.pin_profile,
            routing_summary: meta.routing_summary,
            provenance: meta.provenance,
            tensors: std::mem::take(&mut self.tensors),
            experts: std::mem::take(&mut self.experts),
        };
        let json = serde_json::to_vec(&manifest)
            .map_err(|e| FormatError::invalid("manifest", e.to_string()))?;
        self.write(&json)?;
        let header = Header {
            format_version: FORMAT_VERSION,
            flags: if uses_mxfp4 { FLAG_MXFP4 } else { 0 },
            alignment: self.alignment,
            data_offset,
            data_length: data_end - data_offset,
            manifest_offset,
            manifest_length: json.len() as u64,
            manifest_checksum: xxhash_rust::xxh3::xxh3_64(&json),
            file_length: manifest_offset + json.len() as u64,
        };
        let tmp = self.tmp_path.clone();
        let werr = |e: std::io::Error| FormatError::Write {
            path: tmp.clone(),
            source: e,
        };
        let out = self
            .out
            .take()
            .ok_or_else(|| FormatError::invalid("pack writer", "already finished"))?;
        let mut file = out.into_inner().map_err(|e| werr(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(werr)?;
        file.write_all(&header.encode()).map_err(werr)?;
        file.sync_all().map_err(werr)?;
        drop(file);
        std::fs::rename(&self.tmp_path, &self.path).map_err(|e| FormatError::Write {
            path: self.path.clone(),
            source: e,
        })?;
        // Make the rename durable; a failure here leaves a complete file, so ignore it.
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        let n_blob_experts = manifest.experts.iter().filter(|e| e.merged_into.is_none());
        let summary = PackSummary {
            path: self.path.clone(),
            file_length: header.file_length,
            tensors: manifest.tensors.len(),
            experts: manifest.experts.len(),
            merged_experts: self.merged,
            tensor_bytes: manifest.tensors.iter().map(|t| t.length).sum(),
            expert_stored_bytes: n_blob_experts.clone().map(|e| e.length).sum(),
            expert_raw_bytes: n_blob_experts.map(|e| e.raw_length).sum(),
            manifest_length: header.manifest_length,
        };
        crate::tempfiles::forget(&self.tmp_path);
        self.tmp_path = PathBuf::new(); // renamed: nothing left to clean up
        Ok(summary)
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        if !self.tmp_path.as_os_str().is_empty() {
            self.out.take();
            let _ = std::fs::remove_file(&self.tmp_path);
            crate::tempfiles::forget(&self.tmp_path);
        }
    }
}
