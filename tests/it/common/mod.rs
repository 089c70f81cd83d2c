//! Helpers the integration tests of the `mfx` binary share: where the
//! shared test material is, running the binary, reading its outputs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The read-only test material beside the checkout (../shared).
pub fn shared() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared")).to_path_buf()
}

/// Runs the built `mfx` with `args`.
pub fn mfx(args: &[&str]) -> Output {
    mfx_env(args, &[])
}

/// Runs the built `mfx` with `args` and extra environment variables.
pub fn mfx_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mfx"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run mfx")
}

/// The stdout of a run that must have succeeded (else both streams in the panic).
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "mfx failed: {}\n{}",
        stderr(o),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A float32 `.npy` file (format 1.x or 2.x): shape and data.
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[..6], b"\x93NUMPY", "{}", path.display());
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        _ => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
    };
    assert_eq!(
        (start + hlen) % 16,
        0,
        "header padded to a multiple of 16 bytes"
    );
    let header = std::str::from_utf8(&b[start..start + hlen]).unwrap();
    assert!(header.contains("'descr': '<f4'"), "{header}");
    let shape: Vec<usize> = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap()
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data = b[start + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (shape, data)
}

/// Relative L2 error of `a` against the reference `b`.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}
