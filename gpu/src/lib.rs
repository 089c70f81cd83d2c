//! GPU kernel spike for issue 24: mfx's q4 layout (formats/src/quant.rs,
//! group-wise affine 4-bit, group 64, bf16 scale + bias) as WGSL compute
//! shaders run through wgpu.
//!
//! This crate is measurement scaffolding the GPU backend can grow from, not
//! the backend: it uploads one affine matrix, runs a matrix-vector product
//! (decode) or a matrix-matrix product (prefill), and reads the result back.
//! The shaders live in `shaders/` so that the Metal check (naga's MSL
//! backend) and the runtime read the same text.

use half::bf16;
use mfx_formats::quant::AffineMatrix;
use std::sync::mpsc;
use wgpu::util::DeviceExt;

pub const MATVEC_WGSL: &str = include_str!("../shaders/q4_matvec.wgsl");
pub const MATVEC_R1_WGSL: &str = include_str!("../shaders/q4_matvec_r1.wgsl");
pub const GEMM_WGSL: &str = include_str!("../shaders/q4_gemm.wgsl");
pub const QUANTIZE_X_WGSL: &str = include_str!("../shaders/q4_quantize_x.wgsl");
pub const MATVEC_DP4A_WGSL: &str = include_str!("../shaders/q4_matvec_dp4a.wgsl");
/// The tensor-core GEMM: needs f16 and wgpu's experimental cooperative
/// matrices (16x16x16 f16 -> f32), so it is not in `SHADERS` (which must
/// translate with no optional capability, and to Metal); `tests/metal.rs`
/// validates it on its own.
pub const GEMM_COOP_WGSL: &str = include_str!("../shaders/q4_gemm_coop.wgsl");
/// Every shader of the crate, by name, for the translation checks.
pub const SHADERS: [(&str, &str); 5] = [
    ("q4_matvec", MATVEC_WGSL),
    ("q4_matvec_r1", MATVEC_R1_WGSL),
    ("q4_gemm", GEMM_WGSL),
    ("q4_quantize_x", QUANTIZE_X_WGSL),
    ("q4_matvec_dp4a", MATVEC_DP4A_WGSL),
];

/// The mat-vec shaders: f32 activations with one row per 32 lanes or four,
/// or int8 activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matvec {
    /// `q4_matvec_r1.wgsl`: 8 rows per workgroup.
    R1,
    /// `q4_matvec.wgsl`: 32 rows per workgroup, x reused over 4 rows.
    R4,
    /// `q4_quantize_x.wgsl` then `q4_matvec_dp4a.wgsl` (8 rows per
    /// workgroup): x rounded to int8 blocks of 32, packed integer dots. Not
    /// exact to f32: about 3e-3 relative error, as the CPU's int8 tier.
    Dp4a,
}

impl Matvec {
    fn rows_per_workgroup(self) -> u32 {
        match self {
            Matvec::R1 | Matvec::Dp4a => 8,
            Matvec::R4 => 32,
        }
    }
}
/// Elements per int8 activation block (one weight chunk of 16 bytes).
pub const XBLOCK: usize = 32;
/// Blocks of x per workgroup of the quantize shader.
const QUANTIZE_BLOCKS: u32 = 8;
/// Tile edge of the GEMM shader (`BM` = `BN`).
const GEMM_TILE: u32 = 64;
/// Tokens (`BM`) and weight rows (`BN`) per tile of the cooperative GEMM.
const COOP_TILE_TOKENS: u32 = 64;
const COOP_TILE_ROWS: u32 = 128;
/// Workgroup memory of q4_gemm_coop.wgsl in bytes: xs (64 x 40 f16), ws
/// (128 x 40 f16) and the f32 staging (8 x 256).
const COOP_WORKGROUP_BYTES: u32 = 64 * 40 * 2 + 128 * 40 * 2 + 8 * 256 * 4;
/// The subgroup width the cooperative GEMM assumes (8 subgroups of 32 in a
/// workgroup of 256).
const COOP_SUBGROUP: u32 = 32;

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no GPU adapter found (Vulkan or Metal); on Debian install mesa-vulkan-drivers and libvulkan1 for lavapipe: {0}")]
    NoAdapter(String),
    #[error("the adapter refused a device: {0}")]
    Device(String),
    #[error("this kernel takes q4 with group 64, got {bits}-bit group {group_size}")]
    Layout { bits: u8, group_size: usize },
    #[error("{what}: {got} exceeds the device limit {limit}")]
    Limit {
        what: &'static str,
        got: u64,
        limit: u64,
    },
    #[error("input length {got} does not match the expected {expected}")]
    Input { expected: usize, got: usize },
    #[error(
        "int8 activations come in blocks of {XBLOCK}; {cols} columns is not a positive multiple"
    )]
    Blocks { cols: usize },
    #[error("waiting for the GPU failed: {0}")]
    Poll(String),
    #[error("reading a buffer back failed: {0}")]
    Map(String),
}

/// A device with the q4 pipelines built.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    /// Whether GPU timestamps can bracket a compute pass.
    pub timestamps: bool,
    /// What the adapter could offer beyond core WGSL (subgroups, f16,
    /// cooperative matrices), for the record; only the cooperative GEMM
    /// uses any of it.
    pub capabilities: String,
    /// Why the cooperative GEMM was not built, if it was not.
    pub coop_missing: Option<String>,
    matvec: wgpu::ComputePipeline,
    matvec_r1: wgpu::ComputePipeline,
    gemm: wgpu::ComputePipeline,
    quantize_x: wgpu::ComputePipeline,
    matvec_dp4a: wgpu::ComputePipeline,
    /// q4_gemm_coop.wgsl, where the adapter has 16x16x16 f16 -> f32
    /// cooperative matrices (see `coop_support`).
    gemm_coop: Option<wgpu::ComputePipeline>,
}

/// One q4 g64 matrix resident on the device.
pub struct Q4Matrix {
    pub rows: u32,
    pub cols: u32,
    w: wgpu::Buffer,
    scales: wgpu::Buffer,
    biases: wgpu::Buffer,
}

impl Q4Matrix {
    /// Bytes a full pass over the weights reads (codes + scales + biases),
    /// the numerator of the benchmark's GB/s (as in the CPU benchmark).
    pub fn weight_bytes(&self) -> u64 {
        let n = self.rows as u64 * self.cols as u64;
        n / 2 + n / 64 * 4
    }
}

/// x quantized on the device for `Matvec::Dp4a` (q4_quantize_x.wgsl's
/// output): per block of `XBLOCK` elements, 8 words of packed int8 codes
/// and an f32 pair (scale d, sum of x).
pub struct QuantizedX {
    pub cols: u32,
    codes: wgpu::Buffer,
    scales: wgpu::Buffer,
}

/// Bounds-checked shaders (wgpu's default) or not. Unchecked is what a
/// backend that validates its shapes on the host would ship; both are measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checks {
    Checked,
    Unchecked,
}

impl Gpu {
    /// The first high-performance adapter (Vulkan or Metal), with the
    /// adapter's own limits so that lm_head-sized buffers fit.
    pub fn new(checks: Checks) -> Result<Self, GpuError> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        desc.backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL;
        let instance = wgpu::Instance::new(desc);
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
            apply_limit_buckets: false,
        }))
        .map_err(|e| GpuError::NoAdapter(e.to_string()))?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let timestamps = adapter.features().contains(wgpu::Features::TIMESTAMP_QUERY);
        let f = adapter.features();
        let capabilities = format!(
            "subgroup {} shader-f16 {} cooperative-matrix {} shapes {:?}",
            f.contains(wgpu::Features::SUBGROUP),
            f.contains(wgpu::Features::SHADER_F16),
            f.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
            adapter
                .cooperative_matrix_properties()
                .iter()
                .map(|p| format!(
                    "{}x{}x{} {:?}->{:?}",
                    p.m_size, p.n_size, p.k_size, p.ab_type, p.cr_type
                ))
                .collect::<Vec<_>>()
        );
        let mut required_features = if timestamps {
            wgpu::Features::TIMESTAMP_QUERY
        } else {
            wgpu::Features::empty()
        };
        let coop_missing = coop_support(&adapter, &info, &limits).err();
        if coop_missing.is_none() {
            required_features |= COOP_FEATURES;
        }
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("mfx-gpu"),
            required_features,
            required_limits: limits.clone(),
            // SAFETY: wgpu's condition for experimental features is the
            // acknowledgement that they may have bugs; only the cooperative
            // GEMM uses one, and its results are checked against the f64
            // reference (q4bench, tests/parity.rs) before anything is timed.
            experimental_features: if coop_missing.is_none() {
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            ..Default::default()
        }))
        .map_err(|e| GpuError::Device(e.to_string()))?;
        let pipeline = |name: &str, src: &str| {
            let desc = wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(src.into()),
            };
            let module = match checks {
                Checks::Checked => device.create_shader_module(desc),
                // SAFETY: every dispatch below is sized from the buffers'
                // own shapes, validated on the host (AffineMatrix::new and
                // the length checks in `matvec`/`gemm`), so the shader's
                // indices stay in bounds without naga's clamps.
                Checks::Unchecked => unsafe {
                    device
                        .create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
                },
            };
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let matvec = pipeline("q4_matvec", MATVEC_WGSL);
        let matvec_r1 = pipeline("q4_matvec_r1", MATVEC_R1_WGSL);
        let gemm = pipeline("q4_gemm", GEMM_WGSL);
        let quantize_x = pipeline("q4_quantize_x", QUANTIZE_X_WGSL);
        let matvec_dp4a = pipeline("q4_matvec_dp4a", MATVEC_DP4A_WGSL);
        // The experimental path must not take the rest down: a shader or
        // pipeline the driver refuses is caught here (error scopes) and
        // reported through `coop_missing` instead of wgpu's default panic.
        let mut coop_missing = coop_missing;
        let gemm_coop = if coop_missing.is_none() {
            let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
            let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
            let p = pipeline("q4_gemm_coop", GEMM_COOP_WGSL);
            let internal = pollster::block_on(internal.pop());
            let validation = pollster::block_on(validation.pop());
            match internal.or(validation) {
                None => Some(p),
                Some(e) => {
                    coop_missing = Some(format!("the coop pipeline failed: {e}"));
                    None
                }
            }
        } else {
            None
        };
        Ok(Self {
            device,
            queue,
            info,
            limits,
            timestamps,
            capabilities,
            matvec,
            matvec_r1,
            gemm,
            quantize_x,
            matvec_dp4a,
            gemm_coop,
            coop_missing,
        })
    }

    /// Whether `gemm_coop_job` and `gemm_coop` can run here.
    pub fn has_coop(&self) -> bool {
        self.gemm_coop.is_some()
    }

    fn check_size(&self, what: &'static str, bytes: u64) -> Result<(), GpuError> {
        let limit = self
            .limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size);
        if bytes > limit {
            return Err(GpuError::Limit {
                what,
                got: bytes,
                limit,
            });
        }
        Ok(())
    }

    /// Uploads a q4 g64 matrix: the packed codes as they are, scales and
    /// biases as their bf16 bit patterns (padded to whole u32 words).
    pub fn upload(&self, m: &AffineMatrix<'_>) -> Result<Q4Matrix, GpuError> {
        if m.bits != 4 || m.group_size != 64 {
            return Err(GpuError::Layout {
                bits: m.bits,
                group_size: m.group_size,
            });
        }
        self.check_size("packed weights", m.packed.len() as u64)?;
        let buf = |label: &str, bytes: &[u8]| {
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: bytes,
                    usage: wgpu::BufferUsages::STORAGE,
                })
        };
        let halves = |v: &[bf16]| {
            let mut b: Vec<u8> = bytemuck::cast_slice(v).to_vec();
            b.resize(b.len().div_ceil(4) * 4, 0);
            b
        };
        Ok(Q4Matrix {
            rows: m.rows as u32,
            cols: m.cols as u32,
            w: buf("q4 codes", m.packed),
            scales: buf("q4 scales", &halves(m.scales)),
            biases: buf("q4 biases", &halves(m.biases)),
        })
    }

    /// A read-write f32 storage buffer holding `data`.
    pub fn f32_buffer(&self, data: &[f32]) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("f32"),
                contents: bytemuck::cast_slice(data),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            })
    }

    fn uniform(&self, words: [u32; 4]) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytemuck::cast_slice(&words),
                usage: wgpu::BufferUsages::UNIFORM,
            })
    }

    /// A bind group with `buffers` at bindings 0, 1, ... in order.
    fn bind(&self, pipeline: &wgpu::ComputePipeline, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry<'_>> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        })
    }

    /// A ready-to-dispatch y = W x: the caller owns the x and y buffers
    /// (x holds `cols` f32, y `rows` f32). `Matvec::Dp4a` is two dispatches
    /// (quantize x into a scratch buffer the job owns, then the mat-vec);
    /// to time them apart use `quantize_job` and `dp4a_job`.
    pub fn matvec_job(
        &self,
        kind: Matvec,
        m: &Q4Matrix,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> Job {
        let pipeline = match kind {
            Matvec::R1 => &self.matvec_r1,
            Matvec::R4 => &self.matvec,
            Matvec::Dp4a => {
                // A matrix's cols are whole groups of 64, so whole blocks.
                let q = self.alloc_quantized(m.cols);
                let mut job = self.quantize_job(x, &q);
                job.append(self.dp4a_dispatch(m, &q, y));
                job.keep(&[&q.codes, &q.scales]);
                return job;
            }
        };
        let params = self.uniform([m.rows, m.cols, 0, 0]);
        let bind = self.bind(pipeline, &[&m.w, &m.scales, &m.biases, x, y, &params]);
        let groups = m.rows.div_ceil(kind.rows_per_workgroup());
        Job::single(pipeline, bind, self.grid(groups), params)
    }

    /// Device buffers for x quantized to int8 blocks (`cols` a positive
    /// multiple of `XBLOCK`), filled by a `quantize_job`.
    pub fn quantized_x(&self, cols: u32) -> Result<QuantizedX, GpuError> {
        if cols == 0 || !(cols as usize).is_multiple_of(XBLOCK) {
            return Err(GpuError::Blocks {
                cols: cols as usize,
            });
        }
        self.check_size("int8 activations", cols as u64)?;
        Ok(self.alloc_quantized(cols))
    }

    fn alloc_quantized(&self, cols: u32) -> QuantizedX {
        let blocks = (cols as u64).div_ceil(XBLOCK as u64);
        let buf = |label: &str, size: u64| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        };
        QuantizedX {
            cols,
            codes: buf("int8 x codes", blocks * XBLOCK as u64),
            scales: buf("int8 x (d, sum)", blocks * 8),
        }
    }

    /// A ready-to-dispatch quantization of x (`q.cols` f32) into `q`.
    pub fn quantize_job(&self, x: &wgpu::Buffer, q: &QuantizedX) -> Job {
        let blocks = q.cols / XBLOCK as u32;
        let params = self.uniform([blocks, 0, 0, 0]);
        let bind = self.bind(&self.quantize_x, &[x, &q.codes, &q.scales, &params]);
        let groups = self.grid(blocks.div_ceil(QUANTIZE_BLOCKS));
        Job::single(&self.quantize_x, bind, groups, params)
    }

    /// A ready-to-dispatch int8-activation y = W x from an x already
    /// quantized into `q` (by a `quantize_job` earlier in the same or an
    /// earlier submission); y holds `rows` f32.
    pub fn dp4a_job(
        &self,
        m: &Q4Matrix,
        q: &QuantizedX,
        y: &wgpu::Buffer,
    ) -> Result<Job, GpuError> {
        if q.cols != m.cols {
            return Err(GpuError::Input {
                expected: m.cols as usize,
                got: q.cols as usize,
            });
        }
        Ok(self.dp4a_dispatch(m, q, y))
    }

    fn dp4a_dispatch(&self, m: &Q4Matrix, q: &QuantizedX, y: &wgpu::Buffer) -> Job {
        let params = self.uniform([m.rows, m.cols, 0, 0]);
        let buffers = [&m.w, &m.scales, &m.biases, &q.codes, &q.scales, y, &params];
        let bind = self.bind(&self.matvec_dp4a, &buffers);
        let groups = m.rows.div_ceil(Matvec::Dp4a.rows_per_workgroup());
        Job::single(&self.matvec_dp4a, bind, self.grid(groups), params)
    }

    /// A ready-to-dispatch Y = X W^T for `n` tokens (X is `[n, cols]`, Y `[n, rows]`).
    pub fn gemm_job(&self, m: &Q4Matrix, n: u32, x: &wgpu::Buffer, y: &wgpu::Buffer) -> Job {
        let params = self.uniform([n, m.rows, m.cols, 0]);
        let bind = self.bind(&self.gemm, &[&m.w, &m.scales, &m.biases, x, y, &params]);
        let groups = (m.rows.div_ceil(GEMM_TILE), n.div_ceil(GEMM_TILE), 1);
        Job::single(&self.gemm, bind, groups, params)
    }

    /// A ready-to-dispatch Y = X W^T on cooperative matrices (f16 inputs,
    /// f32 accumulation), as `gemm_job`; `None` where the adapter lacks them
    /// (`coop_missing` says why).
    pub fn gemm_coop_job(
        &self,
        m: &Q4Matrix,
        n: u32,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
    ) -> Option<Job> {
        let pipeline = self.gemm_coop.as_ref()?;
        let params = self.uniform([n, m.rows, m.cols, 0]);
        let bind = self.bind(pipeline, &[&m.w, &m.scales, &m.biases, x, y, &params]);
        let groups = (
            m.rows.div_ceil(COOP_TILE_ROWS),
            n.div_ceil(COOP_TILE_TOKENS),
            1,
        );
        Some(Job::single(pipeline, bind, groups, params))
    }

    /// Spreads `groups` workgroups over x and y so that no dimension passes the limit.
    fn grid(&self, groups: u32) -> (u32, u32, u32) {
        let max = self.limits.max_compute_workgroups_per_dimension.max(1);
        let gx = groups.min(max);
        (gx, groups.div_ceil(gx), 1)
    }

    /// y = W x, blocking; `x.len()` must be `cols`.
    pub fn matvec(&self, kind: Matvec, m: &Q4Matrix, x: &[f32]) -> Result<Vec<f32>, GpuError> {
        if x.len() != m.cols as usize {
            return Err(GpuError::Input {
                expected: m.cols as usize,
                got: x.len(),
            });
        }
        let xb = self.f32_buffer(x);
        let yb = self.f32_buffer(&vec![f32::NAN; m.rows as usize]);
        let job = self.matvec_job(kind, m, &xb, &yb);
        self.run(&[&job])?;
        self.read_f32(&yb, m.rows as usize)
    }

    /// x quantized by q4_quantize_x.wgsl, read back in element order,
    /// blocking; `x.len()` must be a positive multiple of `XBLOCK`.
    pub fn quantize_x(&self, x: &[f32]) -> Result<Int8X, GpuError> {
        let q = self.quantized_x(x.len() as u32)?;
        let xb = self.f32_buffer(x);
        self.run(&[&self.quantize_job(&xb, &q)])?;
        let words: Vec<u32> =
            bytemuck::cast_slice(&self.read_bytes(&q.codes, x.len() as u64)?).to_vec();
        let pairs = self.read_f32(&q.scales, 2 * x.len() / XBLOCK)?;
        Ok(Int8X {
            codes: unpack_codes(&words),
            d: pairs.iter().step_by(2).copied().collect(),
            sums: pairs.iter().skip(1).step_by(2).copied().collect(),
        })
    }

    /// Y = X W^T for `n` tokens, blocking; `x.len()` must be `n * cols`.
    pub fn gemm(&self, m: &Q4Matrix, x: &[f32], n: usize) -> Result<Vec<f32>, GpuError> {
        if x.len() != n * m.cols as usize {
            return Err(GpuError::Input {
                expected: n * m.cols as usize,
                got: x.len(),
            });
        }
        let xb = self.f32_buffer(x);
        let yb = self.f32_buffer(&vec![f32::NAN; n * m.rows as usize]);
        let job = self.gemm_job(m, n as u32, &xb, &yb);
        self.run(&[&job])?;
        self.read_f32(&yb, n * m.rows as usize)
    }

    /// Y = X W^T on cooperative matrices, blocking, as `gemm`; `Ok(None)`
    /// where the adapter lacks them.
    pub fn gemm_coop(
        &self,
        m: &Q4Matrix,
        x: &[f32],
        n: usize,
    ) -> Result<Option<Vec<f32>>, GpuError> {
        if x.len() != n * m.cols as usize {
            return Err(GpuError::Input {
                expected: n * m.cols as usize,
                got: x.len(),
            });
        }
        if !self.has_coop() {
            return Ok(None);
        }
        let xb = self.f32_buffer(x);
        let yb = self.f32_buffer(&vec![f32::NAN; n * m.rows as usize]);
        let job = self
            .gemm_coop_job(m, n as u32, &xb, &yb)
            .expect("pipeline checked above");
        self.run(&[&job])?;
        self.read_f32(&yb, n * m.rows as usize).map(Some)
    }

    /// Runs the jobs in order in one compute pass and waits.
    pub fn run(&self, jobs: &[&Job]) -> Result<(), GpuError> {
        let mut enc = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            for j in jobs {
                j.encode(&mut pass);
            }
        }
        self.queue.submit([enc.finish()]);
        self.wait()
    }

    pub fn wait(&self) -> Result<(), GpuError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| GpuError::Poll(e.to_string()))
    }

    /// GPU time of each job, in seconds: one compute pass per job, bracketed
    /// by timestamps (needs `self.timestamps`). Jobs run in order, one submit.
    pub fn time_jobs(&self, jobs: &[&Job]) -> Result<Vec<f64>, GpuError> {
        self.time_batches(jobs, 1)
    }

    /// GPU time per job when `per_pass` jobs share one timestamped compute
    /// pass (as a layer's independent expert products would), in seconds.
    /// Jobs whose outputs differ need no barrier between them, so the driver
    /// may overlap them.
    pub fn time_batches(&self, jobs: &[&Job], per_pass: usize) -> Result<Vec<f64>, GpuError> {
        let per_pass = per_pass.max(1);
        let passes: Vec<&[&Job]> = jobs.chunks(per_pass).collect();
        let n = passes.len() as u32;
        let qs = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2 * n,
        });
        let bytes = 16 * n as u64;
        let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("resolve"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        for (i, batch) in passes.iter().enumerate() {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &qs,
                    beginning_of_pass_write_index: Some(2 * i as u32),
                    end_of_pass_write_index: Some(2 * i as u32 + 1),
                }),
            });
            for j in batch.iter() {
                j.encode(&mut pass);
            }
        }
        enc.resolve_query_set(&qs, 0..2 * n, &resolve, 0);
        self.queue.submit([enc.finish()]);
        let ticks: Vec<u64> = bytemuck::cast_slice(&self.read_bytes(&resolve, bytes)?).to_vec();
        let period = self.queue.get_timestamp_period() as f64 * 1e-9;
        Ok(ticks
            .chunks_exact(2)
            .zip(&passes)
            .map(|(t, b)| t[1].wrapping_sub(t[0]) as f64 * period / b.len() as f64)
            .collect())
    }

    pub fn read_f32(&self, buf: &wgpu::Buffer, len: usize) -> Result<Vec<f32>, GpuError> {
        let bytes = self.read_bytes(buf, len as u64 * 4)?;
        Ok(bytemuck::cast_slice(&bytes).to_vec())
    }

    fn read_bytes(&self, buf: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>, GpuError> {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("staging"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buf, 0, &staging, 0, bytes);
        self.queue.submit([enc.finish()]);
        let (tx, rx) = mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|e| GpuError::Map(e.to_string()))?
            .map_err(|e| GpuError::Map(e.to_string()))?;
        let out = staging
            .get_mapped_range(..)
            .map_err(|e| GpuError::Map(e.to_string()))?
            .to_vec();
        staging.unmap();
        Ok(out)
    }
}

/// One or more bound dispatches, encoded in order into one compute pass
/// (wgpu puts a barrier between dispatches that write and read a buffer).
pub struct Job {
    steps: Vec<Step>,
    /// Uniforms and scratch buffers the bind groups point at, kept with the job.
    _buffers: Vec<wgpu::Buffer>,
}

struct Step {
    pipeline: wgpu::ComputePipeline,
    bind: wgpu::BindGroup,
    groups: (u32, u32, u32),
}

impl Job {
    fn single(
        pipeline: &wgpu::ComputePipeline,
        bind: wgpu::BindGroup,
        groups: (u32, u32, u32),
        params: wgpu::Buffer,
    ) -> Self {
        Job {
            steps: vec![Step {
                pipeline: pipeline.clone(),
                bind,
                groups,
            }],
            _buffers: vec![params],
        }
    }

    /// Runs `next` after this job's dispatches.
    fn append(&mut self, next: Job) {
        self.steps.extend(next.steps);
        self._buffers.extend(next._buffers);
    }

    fn keep(&mut self, buffers: &[&wgpu::Buffer]) {
        self._buffers.extend(buffers.iter().map(|&b| b.clone()));
    }

    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>) {
        for s in &self.steps {
            pass.set_pipeline(&s.pipeline);
            pass.set_bind_group(0, &s.bind, &[]);
            pass.dispatch_workgroups(s.groups.0, s.groups.1, s.groups.2);
        }
    }
}

/// Device features the cooperative GEMM needs.
const COOP_FEATURES: wgpu::Features =
    wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX.union(wgpu::Features::SHADER_F16);

/// `Ok` where q4_gemm_coop.wgsl can run on `adapter`: the experimental
/// cooperative-matrix feature with a 16x16x16 f16 x f16 -> f32
/// configuration (the shader's `coop_mat16x16<f16, A/B>` and
/// `coop_mat16x16<f32, C>`), f16 in shaders, subgroups of exactly 32 (the
/// shader maps 32 consecutive invocations to one subgroup-scoped fragment)
/// and room for its workgroup memory. Otherwise the reason.
fn coop_support(
    adapter: &wgpu::Adapter,
    info: &wgpu::AdapterInfo,
    limits: &wgpu::Limits,
) -> Result<(), String> {
    let f = adapter.features();
    if !f.contains(COOP_FEATURES) {
        return Err(format!(
            "the adapter lacks {:?}",
            COOP_FEATURES.difference(f)
        ));
    }
    let shape = adapter.cooperative_matrix_properties().iter().any(|p| {
        (p.m_size, p.n_size, p.k_size) == (16, 16, 16)
            && p.ab_type == wgpu::CooperativeScalarType::F16
            && p.cr_type == wgpu::CooperativeScalarType::F32
    });
    if !shape {
        return Err("no 16x16x16 f16 -> f32 cooperative-matrix configuration".into());
    }
    if (info.subgroup_min_size, info.subgroup_max_size) != (COOP_SUBGROUP, COOP_SUBGROUP) {
        return Err(format!(
            "subgroups of {}..{} invocations, the shader needs exactly {COOP_SUBGROUP}",
            info.subgroup_min_size, info.subgroup_max_size
        ));
    }
    if limits.max_compute_workgroup_storage_size < COOP_WORKGROUP_BYTES
        || limits.max_compute_invocations_per_workgroup < 256
        || limits.max_compute_workgroup_size_x < 256
    {
        return Err(format!(
            "workgroup limits too small ({} bytes, {} invocations; needs {COOP_WORKGROUP_BYTES} and 256)",
            limits.max_compute_workgroup_storage_size, limits.max_compute_invocations_per_workgroup
        ));
    }
    Ok(())
}

/// Translates a WGSL shader to Metal Shading Language with naga (what wgpu
/// does on macOS), so CI without a Mac still proves the Metal path compiles
/// as far as naga's validator and MSL writer go.
pub fn wgsl_to_msl(src: &str) -> Result<String, String> {
    let module = naga::front::wgsl::parse_str(src).map_err(|e| e.emit_to_string(src))?;
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::all(),
    )
    .validate(&module)
    .map_err(|e| e.emit_to_string(src))?;
    let options = naga::back::msl::Options {
        lang_version: (2, 4),
        ..Default::default()
    };
    let pipeline_options = naga::back::msl::PipelineOptions::default();
    let (msl, _) = naga::back::msl::write_string(&module, &info, &options, &pipeline_options)
        .map_err(|e| format!("{e:?}"))?;
    Ok(msl)
}

/// Random but valid q4 g64 data: any nibble is a valid code; scales and
/// biases are drawn so that weights land in about [-0.1, 0.1] as in real
/// checkpoints. Deterministic in `seed`.
pub fn random_q4(rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<bf16>, Vec<bf16>) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut packed = vec![0u8; rows * cols / 2];
    rng.fill(&mut packed[..]);
    let groups = rows * cols / 64;
    let scales = (0..groups)
        .map(|_| {
            bf16::from_f32(rng.gen_range(0.002f32..0.015) * if rng.gen() { 1.0 } else { -1.0 })
        })
        .collect();
    let biases = (0..groups)
        .map(|_| bf16::from_f32(rng.gen_range(-0.1f32..0.1)))
        .collect();
    (packed, scales, biases)
}

/// Reference row dot products in f64 over the formats dequantizer.
pub fn reference_rows(m: &AffineMatrix<'_>, x: &[f32], rows: &[usize]) -> Vec<f64> {
    let mut buf = vec![0f32; m.cols];
    rows.iter()
        .map(|&r| {
            m.dequantize_row(r, &mut buf);
            buf.iter().zip(x).map(|(&w, &v)| w as f64 * v as f64).sum()
        })
        .collect()
}

/// int8 activations in element order: `codes[i]` is x[i]'s code, `d[b]` and
/// `sums[b]` block b's scale and f32 sum (blocks of `XBLOCK`).
#[derive(Debug, Clone, PartialEq)]
pub struct Int8X {
    pub codes: Vec<i8>,
    pub d: Vec<f32>,
    pub sums: Vec<f32>,
}

/// The host twin of q4_quantize_x.wgsl: the same f32 operations in the same
/// order (max, the 16-8-4-2-1 tree sum, d = max/127, round-half-even of
/// x * (1/d)), so that on a device with correctly rounded f32 division
/// (lavapipe) it agrees bit for bit.
pub fn quantize_x_host(x: &[f32]) -> Result<Int8X, GpuError> {
    if x.is_empty() || !x.len().is_multiple_of(XBLOCK) {
        return Err(GpuError::Blocks { cols: x.len() });
    }
    let mut out = Int8X {
        codes: Vec::with_capacity(x.len()),
        d: Vec::new(),
        sums: Vec::new(),
    };
    for block in x.chunks_exact(XBLOCK) {
        let mut amax: Vec<f32> = block.iter().map(|v| v.abs()).collect();
        let mut total = block.to_vec();
        let mut step = XBLOCK / 2;
        while step > 0 {
            for i in 0..step {
                amax[i] = amax[i].max(amax[i + step]);
                total[i] += total[i + step];
            }
            step /= 2;
        }
        let d = amax[0] / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.codes
            .extend(block.iter().map(|&v| (v * id).round_ties_even() as i8));
        out.d.push(d);
        out.sums.push(total[0]);
    }
    Ok(out)
}

/// Element order from the shader's packing: word k of a block holds, byte t
/// (bits [8t, 8t+8)), the code of element 8(k/2) + (k%2) + 2t. Written from
/// the layout's definition, independently of the shader, so a packing bug
/// shows up as codes that disagree with `quantize_x_host`.
fn unpack_codes(words: &[u32]) -> Vec<i8> {
    let mut codes = vec![0i8; words.len() * 4];
    for (w, &word) in words.iter().enumerate() {
        let (block, k) = (w / 8, w % 8);
        for t in 0..4 {
            let e = block * XBLOCK + 8 * (k / 2) + k % 2 + 2 * t;
            codes[e] = (word >> (8 * t)) as u8 as i8;
        }
    }
    codes
}

/// The dp4a mat-vec's arithmetic on the host: per row and block c of 32,
/// the exact integer dot of the nibbles with the codes, then the f32
/// combination `scale * d * dot + bias * sum` as the shader writes it;
/// the block terms are summed in f64 (the shader's f32 lane sums and tree
/// differ from that by rounding only).
pub fn dp4a_reference_rows(m: &AffineMatrix<'_>, q: &Int8X, rows: &[usize]) -> Vec<f64> {
    assert_eq!(
        q.codes.len(),
        m.cols,
        "quantized x has the matrix's columns"
    );
    rows.iter()
        .map(|&r| {
            (0..m.cols / XBLOCK)
                .map(|c| {
                    let dot: i32 = (c * XBLOCK..(c + 1) * XBLOCK)
                        .map(|i| {
                            let e = r * m.cols + i;
                            let nibble = (m.packed[e / 2] >> (4 * (e % 2))) & 15;
                            nibble as i32 * q.codes[i] as i32
                        })
                        .sum();
                    let g = (r * m.cols + c * XBLOCK) / 64;
                    let (s, b) = (m.scales[g].to_f32(), m.biases[g].to_f32());
                    (s * q.d[c] * dot as f32 + b * q.sums[c]) as f64
                })
                .sum()
        })
        .collect()
}

/// The cooperative GEMM's arithmetic on the host: x and the dequantized
/// weights (`scale * q + bias` in f32, as formats and the shader compute
/// it) each rounded to f16, products exact (two 11-bit significands fit
/// f32's 24), summed in f64 (the tensor cores sum in f32: rounding only).
/// A layout or staging error is O(1) against this, f16 rounding is not.
pub fn f16_reference_rows(m: &AffineMatrix<'_>, x: &[f32], rows: &[usize]) -> Vec<f64> {
    let h = |v: f32| half::f16::from_f32(v).to_f64();
    let xh: Vec<f64> = x.iter().map(|&v| h(v)).collect();
    let mut buf = vec![0f32; m.cols];
    rows.iter()
        .map(|&r| {
            m.dequantize_row(r, &mut buf);
            buf.iter().zip(&xh).map(|(&w, &v)| h(w) * v).sum()
        })
        .collect()
}
