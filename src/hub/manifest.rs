//! `manifest.json`, the one file that makes a hub repo an mfx repo: which
//! packs it holds, the RAM budget each was prepared for, and how to check a
//! download. The schema is specified in docs/PUBLISHING.md; keep the two in
//! step. The file is written deterministically (fixed key order, packs sorted
//! by budget, no timestamps) so re-publishing identical packs gives an
//! identical manifest and the hub records no change.

use super::digest::FileDigest;
use anyhow::{bail, Context, Result};
use mfx_formats::pack::{Manifest as PackManifest, Pack, FORMAT_VERSION};
use mfx_runtime::cache::parse_size;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// File name of the manifest at the root of a published repo.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Value of the `format` key: tells an mfx manifest from any other `manifest.json`.
pub const MANIFEST_FORMAT: &str = "mfx-hub-manifest";
/// Bumped when a reader of the previous version would misread the file;
/// new optional keys do not bump it (readers ignore unknown keys).
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HubManifest {
    pub format: String,
    pub schema_version: u32,
    /// `{"name": "mfx", "version": ...}` of the mfx that pushed.
    pub writer: Writer,
    /// Sorted by `ram_bytes`, ascending; budgets unique.
    pub packs: Vec<PackRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Writer {
    pub name: String,
    pub version: String,
}

/// One published pack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackRecord {
    /// Path in the repo (a plain file name, no directories).
    pub file: String,
    /// The budget as the preparer wrote it (`16G`).
    pub ram_label: String,
    /// The budget in bytes (binary units: `16G` = 16 * 2^30).
    pub ram_bytes: u64,
    pub size_bytes: u64,
    /// Stored bits per logical weight, see [`bits_per_weight`].
    pub bits_per_weight: f64,
    /// 64 lowercase hex digits of the whole file.
    pub sha256: String,
    /// 16 lowercase hex digits (xxh3-64, seed 0) of the whole file.
    pub xxh3: String,
    /// The `.mfx` format version in the pack's header.
    pub format_version: u32,
    /// Measured quality, if the preparer measured it (docs/PUBLISHING.md).
    pub quality: Option<serde_json::Value>,
}

impl HubManifest {
    pub fn new(mut packs: Vec<PackRecord>) -> Result<HubManifest> {
        packs.sort_by(|a, b| {
            a.ram_bytes
                .cmp(&b.ram_bytes)
                .then_with(|| a.file.cmp(&b.file))
        });
        let m = HubManifest {
            format: MANIFEST_FORMAT.to_owned(),
            schema_version: SCHEMA_VERSION,
            writer: Writer {
                name: "mfx".to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
            },
            packs,
        };
        m.validate("the manifest being written")?;
        Ok(m)
    }

    /// Pretty JSON with a trailing newline (it is read by people on the hub too).
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string_pretty(self)? + "\n")
    }

    /// Parses and validates a downloaded manifest; `origin` names it in errors.
    pub fn parse(bytes: &[u8], origin: &str) -> Result<HubManifest> {
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .with_context(|| format!("{origin}: not JSON, so not an mfx manifest"))?;
        match v.get("format").and_then(|f| f.as_str()) {
            Some(MANIFEST_FORMAT) => {}
            other => bail!(
                "{origin}: not an mfx manifest (`format` is {}, expected {MANIFEST_FORMAT:?}); \
                 this repo was not published with `mfx push`",
                other.map_or("missing".to_owned(), |s| format!("{s:?}"))
            ),
        }
        match v.get("schema_version").and_then(|x| x.as_u64()) {
            Some(n) if n == u64::from(SCHEMA_VERSION) => {}
            Some(n) => bail!(
                "{origin}: manifest schema_version {n}, this mfx reads version {SCHEMA_VERSION}: upgrade mfx"
            ),
            None => bail!("{origin}: `schema_version` missing or not an integer"),
        }
        let m: HubManifest = serde_path_to_error::deserialize(v)
            .map_err(|e| anyhow::anyhow!("{origin}: field `{}`: {}", e.path(), e.inner()))?;
        m.validate(origin)?;
        Ok(m)
    }

    fn validate(&self, origin: &str) -> Result<()> {
        if self.packs.is_empty() {
            bail!("{origin}: lists no packs");
        }
        for (i, p) in self.packs.iter().enumerate() {
            let at = format!("{origin}: packs[{i}] ({})", p.file);
            if let Err(why) = check_pack_file_name(&p.file) {
                bail!(
                    "{origin}: packs[{i}] ({:?}): `file` must be a plain `.mfx` file name in the repo root: {why}",
                    p.file
                );
            }
            if p.ram_label.is_empty()
                || p.ram_label.len() > 32
                || p.ram_label.chars().any(char::is_control)
            {
                bail!("{at}: `ram_label` must be 1 to 32 printable characters");
            }
            if p.sha256.len() != 64 || !is_lower_hex(&p.sha256) {
                bail!("{at}: `sha256` must be 64 lowercase hex digits");
            }
            if p.xxh3.len() != 16 || !is_lower_hex(&p.xxh3) {
                bail!("{at}: `xxh3` must be 16 lowercase hex digits");
            }
            if p.ram_bytes == 0 {
                bail!("{at}: `ram_bytes` must be positive");
            }
            if !(p.bits_per_weight.is_finite() && p.bits_per_weight > 0.0) {
                bail!("{at}: `bits_per_weight` must be a positive number");
            }
            if let Some(q) = &p.quality {
                if !q.is_object() {
                    bail!("{at}: `quality` must be an object or null");
                }
            }
        }
        for w in self.packs.windows(2) {
            if w[0].ram_bytes == w[1].ram_bytes {
                bail!(
                    "{origin}: packs {} and {} have the same RAM budget ({}): pull could not choose",
                    w[0].file,
                    w[1].file,
                    w[0].ram_label
                );
            }
            if w[0].ram_bytes > w[1].ram_bytes {
                bail!("{origin}: packs must be sorted by `ram_bytes`");
            }
        }
        let mut names: Vec<&str> = self.packs.iter().map(|p| p.file.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            bail!("{origin}: pack file {} is listed twice", w[0]);
        }
        Ok(())
    }
}

/// Longest pack file name accepted (most file systems' limit).
const MAX_FILE_NAME: usize = 255;

/// Why `name` is not safe to hand to `hf download` and to join under the
/// hub cache, or `Ok` when it is. A manifest comes from whoever controls
/// the repo, so its names are hostile input: one starting with `-` would be
/// read by `hf` as an option (`--local-dir=...`), a control character can
/// forge lines in our output or break the cache path, and a separator or
/// `..` could leave the repo root. The rules are stricter than the hub's on
/// purpose: `mfx push` only ever writes `NAME.mfx` names.
pub fn check_pack_file_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > MAX_FILE_NAME {
        return Err("it is longer than 255 bytes");
    }
    if name.starts_with('-') {
        return Err("it starts with `-` (it would be read as an option)");
    }
    if name.starts_with('.') {
        return Err("it starts with `.`");
    }
    if name.chars().any(char::is_control) {
        return Err("it contains a control character (newline, NUL, ...)");
    }
    if name.contains(['/', '\\', ':']) {
        return Err("it contains a path separator (`/`, `\\` or `:`)");
    }
    if name.contains("..") {
        return Err("it contains `..`");
    }
    if !name.ends_with(".mfx") || name.len() == ".mfx".len() {
        return Err("it does not end in `.mfx`");
    }
    Ok(())
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Builds the record of a local pack: opens it (full structural validation
/// of header and manifest), reads its budget and quality, and takes the
/// checksums from `digest` (computed by the caller over the same file).
pub fn describe_pack(path: &Path, digest: &FileDigest) -> Result<PackRecord> {
    let file = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{}: pack path has no UTF-8 file name", path.display()))?
        .to_owned();
    if !file.ends_with(".mfx") {
        bail!(
            "{}: expected a .mfx pack (written by `mfx prep`)",
            path.display()
        );
    }
    let pack =
        Pack::open(path).with_context(|| format!("{}: not a valid .mfx pack", path.display()))?;
    let format_version = pack.header().format_version;
    if format_version != FORMAT_VERSION {
        bail!(
            "{}: format version {format_version}, this mfx writes {FORMAT_VERSION}",
            path.display()
        );
    }
    let m = pack.manifest();
    let (ram_label, ram_bytes) = budget_of(path, &file, &m.provenance)?;
    let quality = quality_of(path, &m.provenance)?;
    Ok(PackRecord {
        file,
        ram_label,
        ram_bytes,
        size_bytes: digest.size,
        bits_per_weight: bits_per_weight(m),
        sha256: digest.sha256.clone(),
        xxh3: digest.xxh3.clone(),
        format_version,
        quality,
    })
}

/// Stored bits per logical weight: `8 * blob bytes / weights`. Blob bytes
/// are every tensor's and every distinct expert blob's stored length (scales,
/// biases and entropy coding included; header, manifest and page padding
/// not, since padding is a property of the alignment, not of the precision,
/// and dominates tiny packs). Weights count every tensor element and every
/// routed expert's parts, merged experts included (each router id is a
/// weight the model uses). The same figure prep's report and model card show.
/// Rounded to 1e-4 so the JSON carries no float noise.
pub fn bits_per_weight(m: &PackManifest) -> f64 {
    let numel = |shape: &[u64]| shape.iter().map(|&d| d as f64).product::<f64>();
    let weights: f64 = m.tensors.iter().map(|t| numel(&t.shape)).sum::<f64>()
        + m.experts
            .iter()
            .flat_map(|e| &e.parts)
            .map(|p| numel(&p.shape))
            .sum::<f64>();
    let stored: f64 = m.tensors.iter().map(|t| t.length as f64).sum::<f64>()
        + m.experts
            .iter()
            .filter(|e| e.merged_into.is_none())
            .map(|e| e.length as f64)
            .sum::<f64>();
    if weights == 0.0 {
        return 0.0;
    }
    (stored * 8.0 / weights * 1e4).round() / 1e4
}

/// The RAM budget a pack was prepared for: from its provenance (`mfx prep`
/// writes `options.ram` = label and `options.ram_bytes`; top-level `ram`,
/// `ram_label`, `ram_bytes` are read too), else from the `{ram}` suffix of
/// `mfx prep -o model-{ram}.mfx` (`model-16G.mfx`).
fn budget_of(path: &Path, file: &str, prov: &serde_json::Value) -> Result<(String, u64)> {
    let parse_ram = |s: &str| parse_size(s).map_err(anyhow::Error::from);
    let opts = prov.get("options").filter(|o| o.is_object());
    let prov = match opts {
        Some(o) if o.get("ram").is_some() || o.get("ram_bytes").is_some() => o,
        _ => prov,
    };
    let label = prov
        .get("ram_label")
        .or_else(|| prov.get("ram"))
        .and_then(|v| v.as_str());
    let bytes = prov.get("ram_bytes").and_then(|v| v.as_u64());
    match (label, bytes, prov.get("ram")) {
        (Some(l), Some(b), _) => return Ok((l.to_owned(), b)),
        (None, Some(b), _) => return Ok((human_label(b), b)),
        (Some(l), None, _) => return Ok((l.to_owned(), parse_ram(l)?)),
        (None, None, Some(serde_json::Value::String(l))) => {
            let b = parse_ram(l).with_context(|| format!("{}: provenance.ram", path.display()))?;
            return Ok((l.clone(), b));
        }
        (None, None, Some(serde_json::Value::Number(n))) if n.as_u64().is_some_and(|b| b > 0) => {
            let b = n.as_u64().unwrap_or_default();
            return Ok((human_label(b), b));
        }
        _ => {}
    }
    let stem = file.trim_end_matches(".mfx");
    if let Some((_, suffix)) = stem.rsplit_once('-') {
        if let Ok(b) = parse_ram(suffix) {
            return Ok((suffix.to_owned(), b));
        }
    }
    bail!(
        "{}: cannot tell which RAM budget this pack was prepared for: its provenance has no \
         `ram`/`ram_bytes` and its name has no budget suffix (name it like model-32G.mfx, \
         as `mfx prep --ram 32G -o model-{{ram}}.mfx` does)",
        path.display()
    )
}

/// `17179869184` -> `16G` when exact, else the byte count.
fn human_label(b: u64) -> String {
    for (unit, sh) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if b.is_multiple_of(1u64 << sh) {
            return format!("{}{unit}", b >> sh);
        }
    }
    b.to_string()
}

/// Quality measured for a pack: the sidecar `NAME.quality.json` next to
/// `NAME.mfx` (written by scripts/publish_variants.sh from `mfx eval ppl`),
/// else `provenance.quality` if prep recorded one, else none.
fn quality_of(path: &Path, prov: &serde_json::Value) -> Result<Option<serde_json::Value>> {
    let side = path.with_extension("quality.json");
    if side.is_file() {
        let text = std::fs::read(&side).with_context(|| format!("reading {}", side.display()))?;
        let v: serde_json::Value = serde_json::from_slice(&text)
            .with_context(|| format!("{}: not valid JSON", side.display()))?;
        if !v.is_object() {
            bail!(
                "{}: expected a JSON object (docs/PUBLISHING.md, `quality`)",
                side.display()
            );
        }
        return Ok(Some(v));
    }
    match prov.get("quality") {
        Some(q) if q.is_object() => Ok(Some(q.clone())),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(file: &str, ram: u64) -> PackRecord {
        PackRecord {
            file: file.into(),
            ram_label: human_label(ram),
            ram_bytes: ram,
            size_bytes: 10,
            bits_per_weight: 4.5,
            sha256: "a".repeat(64),
            xxh3: "0".repeat(16),
            format_version: 1,
            quality: None,
        }
    }

    #[test]
    fn roundtrips_sorted_and_rejects_bad_manifests() {
        let m =
            HubManifest::new(vec![rec("b-32G.mfx", 32 << 30), rec("a-16G.mfx", 16 << 30)]).unwrap();
        assert_eq!(m.packs[0].file, "a-16G.mfx");
        assert_eq!(m.packs[0].ram_label, "16G");
        let json = m.to_json().unwrap();
        assert_eq!(HubManifest::parse(json.as_bytes(), "x").unwrap(), m);

        let err = HubManifest::new(vec![rec("a.mfx", 1 << 30), rec("b.mfx", 1 << 30)]).unwrap_err();
        assert!(err.to_string().contains("same RAM budget"), "{err}");
        let err = HubManifest::parse(br#"{"files": []}"#, "ORG/NAME manifest.json").unwrap_err();
        assert!(err.to_string().contains("not an mfx manifest"), "{err}");
        let bad = json.replace(&"a".repeat(64), "xyz");
        let err = HubManifest::parse(bad.as_bytes(), "m").unwrap_err();
        assert!(err.to_string().contains("sha256"), "{err}");
        let newer = json.replace("\"schema_version\": 1", "\"schema_version\": 9");
        let err = HubManifest::parse(newer.as_bytes(), "m").unwrap_err();
        assert!(err.to_string().contains("upgrade mfx"), "{err}");
    }
}
