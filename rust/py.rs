//! PyO3 bindings: the only file that knows about Python.
//!
//! Arrays cross as contiguous numpy arrays with their shapes checked here; fp16 and bf16 arrive as
//! `uint16` bit patterns with a dtype name (numpy has no bf16), so no element is converted twice.
//! Every heavy call releases the GIL (`py.detach`), and every `NqError` becomes
//! `nexusquant.NexusQuantError`, a `ValueError` (corrupt bytes and newer versions as its subclasses
//! `CorruptFileError` and `UnsupportedVersionError`), except an OS failure, which becomes the
//! matching `OSError`.

use crate::codec::{E8Codec, Encoded};
use crate::element::Element;
use crate::error::NqError;
use half::{bf16, f16};
use numpy::{
    PyArray1, PyArray2, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyReadonlyArrayDyn, PyUntypedArrayMethods,
};
use pyo3::exceptions::{
    PyFileExistsError, PyFileNotFoundError, PyInterruptedError, PyOSError, PyPermissionError,
    PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

pyo3::create_exception!(
    nexusquant,
    NexusQuantError,
    PyValueError,
    "Raised for every bad input to nexusquant: a wrong shape or dtype, NaN or infinity, empty input, corrupt or foreign bytes, a file from a newer version."
);

/// Codes uint8 `(n, bytes per row)` and fp16 scales as uint16 bits `(n,)`.
type CodesAndScales<'py> = (Bound<'py, PyArray2<u8>>, Bound<'py, PyArray1<u16>>);

pyo3::create_exception!(
    nexusquant,
    CorruptFileError,
    NexusQuantError,
    "Bytes that should hold an encoding or a cache file are truncated, corrupted or not nexusquant's (a NexusQuantError)."
);

pyo3::create_exception!(
    nexusquant,
    UnsupportedVersionError,
    NexusQuantError,
    "An encoding or a cache file written by a newer format version than this build reads (a NexusQuantError)."
);

/// The Python exception of each error: an OS failure is the `OSError` subclass its kind names
/// (what `open()` would raise: `FileNotFoundError`, `PermissionError`, ...), not a
/// `NexusQuantError`, so that callers handle it like any other I/O error.
fn to_py(e: NqError) -> PyErr {
    use std::io::ErrorKind;
    let msg = e.to_string();
    match e {
        NqError::Corrupt(_) => CorruptFileError::new_err(msg),
        NqError::UnsupportedVersion(_) => UnsupportedVersionError::new_err(msg),
        NqError::Io(kind, _) => match kind {
            ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
            ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
            ErrorKind::AlreadyExists => PyFileExistsError::new_err(msg),
            ErrorKind::Interrupted => PyInterruptedError::new_err(msg),
            _ => PyOSError::new_err(msg),
        },
        NqError::InvalidArgument(_) | NqError::InvalidData(_) => NexusQuantError::new_err(msg),
    }
}

fn bad(msg: impl Into<String>) -> PyErr {
    NexusQuantError::new_err(msg.into())
}

/// Input rows: f32, or fp16/bf16 bit patterns, borrowed from numpy.
enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

fn as_rows<'a>(
    f32_arr: &'a Option<PyReadonlyArrayDyn<'a, f32>>,
    u16_arr: &'a Option<PyReadonlyArrayDyn<'a, u16>>,
    dtype: &str,
) -> PyResult<Rows<'a>> {
    match (dtype, f32_arr, u16_arr) {
        ("float32", Some(a), _) => Ok(Rows::F32(
            a.as_slice()
                .map_err(|_| bad("input must be C-contiguous"))?,
        )),
        ("float16" | "bfloat16", _, Some(a)) => {
            let s = a
                .as_slice()
                .map_err(|_| bad("input must be C-contiguous"))?;
            // SAFETY: f16 and bf16 are repr(transparent) over u16.
            Ok(if dtype == "float16" {
                Rows::F16(unsafe { std::slice::from_raw_parts(s.as_ptr() as *const f16, s.len()) })
            } else {
                Rows::BF16(unsafe {
                    std::slice::from_raw_parts(s.as_ptr() as *const bf16, s.len())
                })
            })
        }
        _ => Err(bad(format!(
            "unsupported dtype {dtype}: use float32, float16 or bfloat16"
        ))),
    }
}

/// The input borrowed as float32 or as uint16 bits (one of the two is `Some`), and its shape.
type InputArray<'py> = (
    Option<PyReadonlyArrayDyn<'py, f32>>,
    Option<PyReadonlyArrayDyn<'py, u16>>,
    Vec<usize>,
);

fn extract_input<'py>(x: &Bound<'py, PyAny>, dtype: &str) -> PyResult<InputArray<'py>> {
    if dtype == "float32" {
        let a: PyReadonlyArrayDyn<f32> = x
            .extract()
            .map_err(|_| bad("expected a float32 numpy array"))?;
        let shape = a.shape().to_vec();
        Ok((Some(a), None, shape))
    } else {
        let a: PyReadonlyArrayDyn<u16> = x
            .extract()
            .map_err(|_| bad("expected fp16/bf16 bits as a uint16 numpy array"))?;
        let shape = a.shape().to_vec();
        Ok((None, Some(a), shape))
    }
}

/// The E8 quantizer of one head dimension and bit width (see `nexusquant.E8Codec`).
#[pyclass(name = "E8Codec", module = "nexusquant._core", subclass, frozen)]
pub struct PyE8Codec {
    inner: E8Codec,
}

/// Codes and scales of a batch of vectors, with their shape.
#[pyclass(name = "E8Encoded", module = "nexusquant._core", frozen)]
pub struct PyE8Encoded {
    inner: Encoded,
    shape: Vec<usize>,
}

#[pymethods]
impl PyE8Codec {
    #[new]
    #[pyo3(signature = (head_dim, bits=2, seed=0, scale_factor=None, residual_ratio=None))]
    fn new(
        head_dim: i64,
        bits: i64,
        seed: u64,
        scale_factor: Option<f32>,
        residual_ratio: Option<f32>,
    ) -> PyResult<Self> {
        if head_dim <= 0 {
            return Err(bad(format!("head_dim must be positive, got {head_dim}")));
        }
        if !(1..=4).contains(&bits) {
            return Err(bad(format!("bits must be 1, 2, 3 or 4, got {bits}")));
        }
        let b = bits as u8;
        let sf = scale_factor.unwrap_or(crate::codec::SCALE_FACTOR[b as usize]);
        let rr = residual_ratio.unwrap_or(crate::codec::RESIDUAL_RATIO[b as usize]);
        let inner = E8Codec::with_factors(head_dim as usize, b, seed, sf, rr).map_err(to_py)?;
        Ok(PyE8Codec { inner })
    }

    /// Vector length.
    #[getter]
    fn head_dim(&self) -> usize {
        self.inner.head_dim()
    }

    /// Bits per dimension of the codes (1–4).
    #[getter]
    fn bits(&self) -> u8 {
        self.inner.bits()
    }

    /// Seed of the rotation's random signs.
    #[getter]
    fn seed(&self) -> u64 {
        self.inner.seed()
    }

    /// Rotated length: head_dim rounded up to a multiple of 8.
    #[getter]
    fn padded_dim(&self) -> usize {
        self.inner.rotation().padded_dim()
    }

    /// Code bytes per vector (the fp16 scale is separate).
    #[getter]
    fn code_bytes_per_vector(&self) -> usize {
        self.inner.code_bytes_per_vector()
    }

    /// Exact bits per dimension held, codes and scale.
    #[getter]
    fn bits_per_dim(&self) -> f64 {
        self.inner.bits_per_dim()
    }

    /// Scale factor: scale = RMS of the rotated vector × this.
    #[getter]
    fn scale_factor(&self) -> f32 {
        self.inner.scale_factor()
    }

    /// Ratio of the residual stage (0 for one-stage codes).
    #[getter]
    fn residual_ratio(&self) -> f32 {
        self.inner.residual_ratio()
    }

    /// The rotation's random signs, float32 of length padded_dim.
    #[getter]
    fn signs<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        PyArray1::from_slice(py, self.inner.rotation().signs())
    }

    /// The rotation's block structure: one or two passes of (offset, length) blocks.
    #[getter]
    fn blocks(&self) -> Vec<Vec<(usize, usize)>> {
        self.inner.rotation().passes().to_vec()
    }

    /// Encode rows to (codes uint8 [n, code_bytes_per_vector], scales uint16 [n]).
    ///
    /// `x` is a C-contiguous array (..., head_dim): float32, or uint16 bit patterns with
    /// dtype "float16"/"bfloat16".
    #[pyo3(signature = (x, dtype="float32"))]
    fn encode_arrays<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        dtype: &str,
    ) -> PyResult<CodesAndScales<'py>> {
        let (fa, ua, shape) = extract_input(x, dtype)?;
        let n = self.check_shape(&shape)?;
        let cb = self.inner.code_bytes_per_vector();
        let codes = PyArray2::<u8>::zeros(py, [n, cb], false);
        let scales = PyArray1::<u16>::zeros(py, [n], false);
        {
            let rows = as_rows(&fa, &ua, dtype)?;
            let mut cw = codes.readwrite();
            let mut sw = scales.readwrite();
            let cs = cw.as_slice_mut().expect("fresh array is contiguous");
            let ss = sw.as_slice_mut().expect("fresh array is contiguous");
            let codec = &self.inner;
            py.detach(|| encode_rows_par(codec, rows, cs, ss))
                .map_err(to_py)?;
        }
        Ok((codes, scales))
    }

    /// Decode (codes, scales) into an array (n, head_dim): float32, or uint16 bit patterns for
    /// dtype "float16"/"bfloat16".
    #[pyo3(signature = (codes, scales, dtype="float32"))]
    fn decode_arrays<'py>(
        &self,
        py: Python<'py>,
        codes: PyReadonlyArray2<'py, u8>,
        scales: PyReadonlyArray1<'py, u16>,
        dtype: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let n = scales.len();
        let cb = self.inner.code_bytes_per_vector();
        if codes.shape() != [n, cb] {
            return Err(bad(format!(
                "codes have shape {:?}, expected [{n}, {cb}] for {n} scales",
                codes.shape()
            )));
        }
        let cs = codes
            .as_slice()
            .map_err(|_| bad("codes must be C-contiguous"))?;
        let ss = scales
            .as_slice()
            .map_err(|_| bad("scales must be C-contiguous"))?;
        let d = self.inner.head_dim();
        let codec = &self.inner;
        match dtype {
            "float32" => {
                let out = PyArray2::<f32>::zeros(py, [n, d], false);
                {
                    let mut w = out.readwrite();
                    let os = w.as_slice_mut().expect("contiguous");
                    py.detach(|| decode_rows_par(codec, cs, ss, os));
                }
                Ok(out.into_any())
            }
            "float16" | "bfloat16" => {
                let out = PyArray2::<u16>::zeros(py, [n, d], false);
                {
                    let mut w = out.readwrite();
                    let os = w.as_slice_mut().expect("contiguous");
                    if dtype == "float16" {
                        // SAFETY: f16 is repr(transparent) over u16.
                        let o = unsafe {
                            std::slice::from_raw_parts_mut(os.as_mut_ptr() as *mut f16, os.len())
                        };
                        py.detach(|| decode_rows_par(codec, cs, ss, o));
                    } else {
                        // SAFETY: bf16 is repr(transparent) over u16.
                        let o = unsafe {
                            std::slice::from_raw_parts_mut(os.as_mut_ptr() as *mut bf16, os.len())
                        };
                        py.detach(|| decode_rows_par(codec, cs, ss, o));
                    }
                }
                Ok(out.into_any())
            }
            _ => Err(bad(format!(
                "unsupported dtype {dtype}: use float32, float16 or bfloat16"
            ))),
        }
    }

    /// Decode (codes, scales) into the rotated domain: float32 (n, padded_dim), the scaled
    /// codewords before the inverse rotation.
    fn decode_rotated<'py>(
        &self,
        py: Python<'py>,
        codes: PyReadonlyArray2<'py, u8>,
        scales: PyReadonlyArray1<'py, u16>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let n = scales.len();
        let p = self.inner.rotation().padded_dim();
        let cs = codes
            .as_slice()
            .map_err(|_| bad("codes must be C-contiguous"))?;
        let ss = scales
            .as_slice()
            .map_err(|_| bad("scales must be C-contiguous"))?;
        let out = PyArray2::<f32>::zeros(py, [n, p], false);
        {
            let mut w = out.readwrite();
            let os = w.as_slice_mut().expect("contiguous");
            let codec = &self.inner;
            py.detach(|| codec.decode_rotated_into(cs, ss, os))
                .map_err(to_py)?;
        }
        Ok(out)
    }

    /// Apply the randomized Hadamard rotation to float32 rows (n, head_dim) → (n, padded_dim).
    fn rotate<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let d = self.inner.head_dim();
        let p = self.inner.rotation().padded_dim();
        if x.shape()[1] != d {
            return Err(bad(format!(
                "expected rows of {d} values, got {}",
                x.shape()[1]
            )));
        }
        let n = x.shape()[0];
        let xs = x
            .as_slice()
            .map_err(|_| bad("input must be C-contiguous"))?;
        let out = PyArray2::<f32>::zeros(py, [n, p], false);
        {
            let mut w = out.readwrite();
            let os = w.as_slice_mut().expect("contiguous");
            let rot = self.inner.rotation();
            py.detach(|| {
                for (xr, orow) in xs.chunks_exact(d).zip(os.chunks_exact_mut(p)) {
                    rot.forward(xr, orow);
                }
            });
        }
        Ok(out)
    }

    /// Undo `rotate`: float32 rows (n, padded_dim) → (n, head_dim).
    fn unrotate<'py>(
        &self,
        py: Python<'py>,
        y: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let d = self.inner.head_dim();
        let p = self.inner.rotation().padded_dim();
        if y.shape()[1] != p {
            return Err(bad(format!(
                "expected rows of {p} values, got {}",
                y.shape()[1]
            )));
        }
        let n = y.shape()[0];
        let ys = y
            .as_slice()
            .map_err(|_| bad("input must be C-contiguous"))?;
        let out = PyArray2::<f32>::zeros(py, [n, d], false);
        {
            let mut w = out.readwrite();
            let os = w.as_slice_mut().expect("contiguous");
            let rot = self.inner.rotation();
            py.detach(|| {
                let mut scratch = vec![0f32; p];
                for (yr, orow) in ys.chunks_exact(p).zip(os.chunks_exact_mut(d)) {
                    scratch.copy_from_slice(yr);
                    rot.inverse(&mut scratch, orow);
                }
            });
        }
        Ok(out)
    }

    /// Encode an array (..., head_dim) into an `E8Encoded` that remembers the shape.
    #[pyo3(signature = (x, dtype="float32"))]
    fn encode_to<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        dtype: &str,
    ) -> PyResult<PyE8Encoded> {
        let (fa, ua, shape) = extract_input(x, dtype)?;
        let n = self.check_shape(&shape)?;
        let cb = self.inner.code_bytes_per_vector();
        let mut codes = vec![0u8; n * cb];
        let mut scales = vec![0u16; n];
        let rows = as_rows(&fa, &ua, dtype)?;
        let codec = &self.inner;
        py.detach(|| encode_rows_par(codec, rows, &mut codes, &mut scales))
            .map_err(to_py)?;
        let inner = Encoded {
            head_dim: self.inner.head_dim(),
            bits: self.inner.bits(),
            seed: self.inner.seed(),
            n,
            codes,
            scales,
        };
        Ok(PyE8Encoded { inner, shape })
    }

    /// Decode an `E8Encoded` to float32 with its original shape.
    fn decode_from<'py>(
        &self,
        py: Python<'py>,
        enc: &PyE8Encoded,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let e = &enc.inner;
        let codec = &self.inner;
        if e.head_dim != codec.head_dim() || e.bits != codec.bits() || e.seed != codec.seed() {
            return Err(bad(format!(
                "encoding has head_dim={}, bits={}, seed={} but the codec has head_dim={}, bits={}, seed={}",
                e.head_dim, e.bits, e.seed, codec.head_dim(), codec.bits(), codec.seed()
            )));
        }
        let out = PyArrayDyn::<f32>::zeros(py, enc.shape.as_slice(), false);
        {
            let mut w = out.readwrite();
            let os = w.as_slice_mut().expect("contiguous");
            py.detach(|| decode_rows_par(codec, &e.codes, &e.scales, os));
        }
        Ok(out)
    }

    fn __repr__(&self) -> String {
        format!(
            "E8Codec(head_dim={}, bits={}, seed={}, bits_per_dim={:.4})",
            self.inner.head_dim(),
            self.inner.bits(),
            self.inner.seed(),
            self.inner.bits_per_dim()
        )
    }
}

impl PyE8Codec {
    fn check_shape(&self, shape: &[usize]) -> PyResult<usize> {
        let d = self.inner.head_dim();
        if shape.is_empty() || *shape.last().unwrap() != d {
            return Err(bad(format!(
                "expected an array of shape (..., {d}), got {shape:?}"
            )));
        }
        let n: usize = shape[..shape.len() - 1].iter().product();
        if n == 0 {
            return Err(bad(format!("input of shape {shape:?} is empty")));
        }
        Ok(n)
    }
}

/// Rows per parallel task when encoding or decoding from Python.
const PY_PARALLEL_ROWS: usize = 2048;

fn encode_rows_par(
    codec: &E8Codec,
    rows: Rows<'_>,
    codes: &mut [u8],
    scales: &mut [u16],
) -> crate::Result<()> {
    fn go<T: Element>(
        codec: &E8Codec,
        x: &[T],
        codes: &mut [u8],
        scales: &mut [u16],
    ) -> crate::Result<()> {
        use rayon::prelude::*;
        let d = codec.head_dim();
        let cb = codec.code_bytes_per_vector();
        let r = PY_PARALLEL_ROWS;
        x.par_chunks(r * d)
            .zip(codes.par_chunks_mut(r * cb))
            .zip(scales.par_chunks_mut(r))
            .enumerate()
            .try_for_each(|(k, ((xc, cc), sc))| {
                crate::simd::encode_rows_at(codec, xc, cc, sc, k * r)
            })
    }
    match rows {
        Rows::F32(x) => go(codec, x, codes, scales),
        Rows::F16(x) => go(codec, x, codes, scales),
        Rows::BF16(x) => go(codec, x, codes, scales),
    }
}

fn decode_rows_par<T: Element>(codec: &E8Codec, codes: &[u8], scales: &[u16], out: &mut [T]) {
    use rayon::prelude::*;
    let d = codec.head_dim();
    let cb = codec.code_bytes_per_vector();
    let r = PY_PARALLEL_ROWS;
    out.par_chunks_mut(r * d)
        .zip(codes.par_chunks(r * cb))
        .zip(scales.par_chunks(r))
        .for_each(|((oc, cc), sc)| crate::simd::decode_rows(codec, cc, sc, oc));
}

#[pymethods]
impl PyE8Encoded {
    /// Shape of the encoded array, (..., head_dim).
    #[getter]
    fn shape(&self) -> Vec<usize> {
        self.shape.clone()
    }

    /// Every byte held: codes, scales and header fields.
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.nbytes() + 8 * self.shape.len()
    }

    /// Bits per dimension of the codes.
    #[getter]
    fn bits(&self) -> u8 {
        self.inner.bits
    }

    /// Vector length.
    #[getter]
    fn head_dim(&self) -> usize {
        self.inner.head_dim
    }

    /// Seed of the rotation.
    #[getter]
    fn seed(&self) -> u64 {
        self.inner.seed
    }

    /// The codes, uint8 (n, code_bytes_per_vector).
    #[getter]
    fn codes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<u8>>> {
        let n = self.inner.n;
        let cb = self.inner.codes.len().checked_div(n).unwrap_or(0);
        PyArray1::from_slice(py, &self.inner.codes).reshape([n, cb])
    }

    /// The fp16 scales as uint16 bits, (n,).
    #[getter]
    fn scales<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u16>> {
        PyArray1::from_slice(py, &self.inner.scales)
    }

    /// Serialize to bytes (with the shape and a checksum).
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.shape.len() as u32).to_le_bytes());
        for &s in &self.shape {
            out.extend_from_slice(&(s as u64).to_le_bytes());
        }
        out.extend_from_slice(&self.inner.to_bytes());
        PyBytes::new(py, &out)
    }

    /// Parse bytes written by `to_bytes`; raises CorruptFileError (or UnsupportedVersionError) on
    /// anything else.
    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<Self> {
        if data.len() < 4 {
            return Err(CorruptFileError::new_err("too short to be an E8 encoding"));
        }
        let ndim = u32::from_le_bytes(data[0..4].try_into().unwrap()) as usize;
        if ndim == 0 || ndim > 16 || data.len() < 4 + 8 * ndim {
            return Err(CorruptFileError::new_err(
                "corrupt input: bad shape header in E8 encoding",
            ));
        }
        let mut shape = Vec::with_capacity(ndim);
        for i in 0..ndim {
            let o = 4 + 8 * i;
            shape.push(u64::from_le_bytes(data[o..o + 8].try_into().unwrap()) as usize);
        }
        let inner = Encoded::from_bytes(&data[4 + 8 * ndim..]).map_err(to_py)?;
        let n: Option<usize> = shape[..ndim - 1]
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b));
        if shape[ndim - 1] != inner.head_dim || n != Some(inner.n) {
            return Err(CorruptFileError::new_err(
                "corrupt input: shape header does not match the E8 encoding",
            ));
        }
        Ok(PyE8Encoded { inner, shape })
    }

    fn __repr__(&self) -> String {
        format!(
            "E8Encoded(shape={:?}, bits={}, nbytes={})",
            self.shape,
            self.inner.bits,
            self.nbytes()
        )
    }
}

/// Nearest E8 lattice points of float32 groups of 8, shape (..., 8) → same shape.
#[pyfunction]
fn e8_nearest<'py>(
    py: Python<'py>,
    x: PyReadonlyArrayDyn<'py, f32>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let shape = x.shape().to_vec();
    if shape.last() != Some(&8) {
        return Err(bad(format!(
            "e8_nearest expects shape (..., 8), got {shape:?}"
        )));
    }
    if x.len() == 0 {
        return Err(bad("e8_nearest got an empty array"));
    }
    let xs = x
        .as_slice()
        .map_err(|_| bad("input must be C-contiguous"))?;
    if let Some(i) = xs.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!(
            "e8_nearest input holds NaN or infinity at flat index {i}"
        )));
    }
    let out = PyArrayDyn::<f32>::zeros(py, shape.as_slice(), false);
    {
        let mut w = out.readwrite();
        let os = w.as_slice_mut().expect("contiguous");
        py.detach(|| crate::e8::nearest_e8_slice(xs, os));
    }
    Ok(out)
}

// =============================================================================================
// Entropy coding, the at-rest packer and the .nqkv container (delta.rs, entropy.rs, format.rs).
// Registered by `register_format` from `_core`.
// =============================================================================================

use crate::entropy::{self as nq_entropy, Choice, Coder, Layout, PackOptions, PlaneCoding};
use crate::format::{self as nq_format, ArrayRef, DType, NqkvReader, NqkvWriter};

/// An optional transform from Python: True, False or "auto" (None: the default).
fn choice_arg(v: Option<&Bound<'_, PyAny>>, default: Choice) -> PyResult<Choice> {
    let Some(v) = v else { return Ok(default) };
    if let Ok(b) = v.extract::<bool>() {
        return Ok(if b { Choice::On } else { Choice::Off });
    }
    match v.extract::<String>().as_deref() {
        Ok("auto") => Ok(Choice::Auto),
        _ => Err(bad(
            "token_delta, scale_delta and dedup_rows take True, False or \"auto\"",
        )),
    }
}

/// Pack one stream (the codes and scales of one (layer, KV head), one row per token) losslessly
/// for storage. Omitted options take the measured default (byte planes, per-plane choice of
/// raw / rANS / rANS per column, with or without a delta along tokens).
///
/// codes: uint8 (n, row_bytes); scales: uint16 (n,) fp16 bits; bits: 1–4;
/// layout: "raw" | "planes" | "lattice"; coder: "auto" | "best" | "raw" | "zstd" | "rans",
/// the last three optionally with the suffix "-columns" (one block per column);
/// token_delta, scale_delta, dedup_rows: True, False or "auto". Returns bytes.
#[pyfunction]
#[pyo3(signature = (codes, scales, bits, layout=None, coder=None, token_delta=None, scale_delta=None, dedup_rows=None, zstd_level=None))]
#[allow(clippy::too_many_arguments)]
fn pack_codes<'py>(
    py: Python<'py>,
    codes: PyReadonlyArray2<'py, u8>,
    scales: PyReadonlyArray1<'py, u16>,
    bits: i64,
    layout: Option<&str>,
    coder: Option<&str>,
    token_delta: Option<&Bound<'py, PyAny>>,
    scale_delta: Option<&Bound<'py, PyAny>>,
    dedup_rows: Option<&Bound<'py, PyAny>>,
    zstd_level: Option<i32>,
) -> PyResult<Bound<'py, PyBytes>> {
    let d = PackOptions::default();
    let opts = PackOptions {
        layout: layout
            .map(Layout::from_name)
            .transpose()
            .map_err(to_py)?
            .unwrap_or(d.layout),
        coding: coder
            .map(PlaneCoding::from_name)
            .transpose()
            .map_err(to_py)?
            .unwrap_or(d.coding),
        token_delta: choice_arg(token_delta, d.token_delta)?,
        scale_delta: choice_arg(scale_delta, d.scale_delta)?,
        dedup_rows: choice_arg(dedup_rows, d.dedup_rows)?,
        zstd_level: zstd_level.unwrap_or(d.zstd_level),
    };
    if !(1..=4).contains(&bits) {
        return Err(bad(format!("bits must be 1, 2, 3 or 4, got {bits}")));
    }
    let [n, row_bytes] = [codes.shape()[0], codes.shape()[1]];
    if scales.len() != n {
        return Err(bad(format!("{n} code rows but {} scales", scales.len())));
    }
    let cs = codes
        .as_slice()
        .map_err(|_| bad("codes must be C-contiguous"))?;
    let ss = scales
        .as_slice()
        .map_err(|_| bad("scales must be C-contiguous"))?;
    let out = py
        .detach(|| nq_entropy::pack_codes(cs, row_bytes, ss, bits as u8, &opts))
        .map_err(to_py)?;
    Ok(PyBytes::new(py, &out))
}

/// Unpack bytes written by `pack_codes` → (codes uint8 (n, row_bytes), scales uint16 (n,)).
/// max_bytes bounds the decoded codes + scales (default 4 GiB).
#[pyfunction]
#[pyo3(signature = (data, max_bytes=None))]
fn unpack_codes<'py>(
    py: Python<'py>,
    data: &[u8],
    max_bytes: Option<usize>,
) -> PyResult<CodesAndScales<'py>> {
    let cap = max_bytes.unwrap_or(nq_entropy::DEFAULT_MAX_UNPACKED);
    let u = py
        .detach(|| nq_entropy::unpack_codes(data, cap))
        .map_err(to_py)?;
    let n = u.scales.len();
    let codes = PyArray1::from_vec(py, u.codes).reshape([n, u.row_bytes])?;
    Ok((codes, PyArray1::from_vec(py, u.scales)))
}

/// Header fields of a packed stream (checksum verified, nothing decoded):
/// {"bits", "rows", "row_bytes", "layout"}.
#[pyfunction]
fn packed_info<'py>(py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
    let i = nq_entropy::packed_info(data).map_err(to_py)?;
    let d = pyo3::types::PyDict::new(py);
    d.set_item("bits", i.bits)?;
    d.set_item("rows", i.rows)?;
    d.set_item("row_bytes", i.row_bytes)?;
    d.set_item("layout", i.layout.name())?;
    Ok(d)
}

/// Code a block of bytes with one coder: "raw", "zstd" or "rans". Returns bytes.
#[pyfunction]
#[pyo3(signature = (data, coder="rans", zstd_level=3))]
fn entropy_encode<'py>(
    py: Python<'py>,
    data: &[u8],
    coder: &str,
    zstd_level: i32,
) -> PyResult<Bound<'py, PyBytes>> {
    let c = Coder::from_name(coder).map_err(to_py)?;
    let out = py
        .detach(|| nq_entropy::encode(c, data, zstd_level))
        .map_err(to_py)?;
    Ok(PyBytes::new(py, &out))
}

/// Decode a block made by `entropy_encode`; `length` is the decoded length (stored by the
/// caller), `max_bytes` the most it will allocate (default: `length`).
#[pyfunction]
#[pyo3(signature = (data, coder, length, max_bytes=None))]
fn entropy_decode<'py>(
    py: Python<'py>,
    data: &[u8],
    coder: &str,
    length: usize,
    max_bytes: Option<usize>,
) -> PyResult<Bound<'py, PyBytes>> {
    let c = Coder::from_name(coder).map_err(to_py)?;
    let cap = max_bytes.unwrap_or(length);
    let out = py
        .detach(|| nq_entropy::decode(c, data, length, cap))
        .map_err(to_py)?;
    Ok(PyBytes::new(py, &out))
}

fn kind_bytes(kind: &str) -> PyResult<[u8; 4]> {
    let k: [u8; 4] = kind.as_bytes().try_into().map_err(|_| {
        bad(format!(
            "section kind {kind:?} must be 4 ASCII capitals or digits"
        ))
    })?;
    if !nq_format::is_valid_kind(&k) {
        return Err(bad(format!(
            "section kind {kind:?} must be 4 ASCII capitals or digits"
        )));
    }
    Ok(k)
}

/// A section's payload as borrowed from Python: bytes, or named arrays (a directory).
enum PayloadIn<'py> {
    Bytes(Bound<'py, PyBytes>),
    Arrays(Vec<(String, DType, Vec<u64>, ArrayBytes<'py>)>),
}

enum ArrayBytes<'py> {
    Numpy(PyReadonlyArray1<'py, u8>),
    Bytes(Bound<'py, PyBytes>),
}

impl ArrayBytes<'_> {
    fn slice(&self) -> PyResult<&[u8]> {
        match self {
            ArrayBytes::Numpy(a) => a.as_slice().map_err(|_| bad("array is not contiguous")),
            ArrayBytes::Bytes(b) => Ok(b.as_bytes()),
        }
    }
}

/// A numpy array (or bytes) as (dtype, shape, its bytes viewed as a flat uint8 array, no copy
/// when it is already C-contiguous and little-endian).
fn array_in<'py>(
    name: &str,
    v: &Bound<'py, PyAny>,
) -> PyResult<(DType, Vec<u64>, ArrayBytes<'py>)> {
    let py = v.py();
    if let Ok(b) = v.cast::<PyBytes>() {
        return Ok((
            DType::Bytes,
            vec![b.as_bytes().len() as u64],
            ArrayBytes::Bytes(b.clone()),
        ));
    }
    let np = py.import("numpy")?;
    if !v.is_instance(&np.getattr("ndarray")?)? {
        return Err(bad(format!(
            "array {name:?} must be a numpy array or bytes"
        )));
    }
    let dt = v.getattr("dtype")?;
    let dname: String = dt.getattr("name")?.extract()?;
    let order: String = dt.getattr("byteorder")?.extract()?;
    if order == ">" || (order == "=" && cfg!(target_endian = "big")) {
        return Err(bad(format!(
            "array {name:?} is big-endian; convert it with .astype('<...')"
        )));
    }
    let dtype = DType::from_name(&dname).map_err(to_py)?;
    if dtype == DType::Bytes || dtype == DType::BF16 {
        return Err(bad(format!("array {name:?} has unsupported dtype {dname}")));
    }
    let shape: Vec<u64> = v.getattr("shape")?.extract::<Vec<u64>>()?;
    let flat = np
        .call_method1("ascontiguousarray", (v,))?
        .call_method1("reshape", (-1,))?
        .call_method1("view", ("uint8",))?;
    let arr: PyReadonlyArray1<u8> = flat
        .extract()
        .map_err(|_| bad(format!("array {name:?} cannot be viewed as bytes")))?;
    Ok((dtype, shape, ArrayBytes::Numpy(arr)))
}

/// Write an .nqkv file atomically (temporary file in the same directory, fsync, rename, fsync of
/// the directory). `sections`: a sequence of (kind, payload) or (kind, payload, coder) where kind
/// is 4 ASCII capitals/digits ("META" first: UTF-8 JSON bytes; "TOKN": uint32 LE ids; "LAYR":
/// per-layer arrays), payload is bytes or a dict {name: numpy array or bytes}, coder is "raw",
/// "zstd" (the default) or "rans". Returns the file's size in bytes.
#[pyfunction]
#[pyo3(signature = (path, sections, coder="zstd", zstd_level=3))]
fn write_nqkv<'py>(
    py: Python<'py>,
    path: std::path::PathBuf,
    sections: Vec<Bound<'py, PyAny>>,
    coder: &str,
    zstd_level: i32,
) -> PyResult<u64> {
    let default_coder = Coder::from_name(coder).map_err(to_py)?;
    let mut inputs: Vec<([u8; 4], Coder, PayloadIn<'py>)> = Vec::with_capacity(sections.len());
    for s in &sections {
        let t = s
            .cast::<pyo3::types::PyTuple>()
            .map_err(|_| bad("each section must be a tuple (kind, payload[, coder])"))?;
        if !(2..=3).contains(&t.len()) {
            return Err(bad("each section must be a tuple (kind, payload[, coder])"));
        }
        let kind = kind_bytes(&t.get_item(0)?.extract::<String>()?)?;
        let c = if t.len() == 3 {
            Coder::from_name(&t.get_item(2)?.extract::<String>()?).map_err(to_py)?
        } else {
            default_coder
        };
        let p = t.get_item(1)?;
        let payload = if let Ok(b) = p.cast::<PyBytes>() {
            PayloadIn::Bytes(b.clone())
        } else if let Ok(d) = p.cast::<pyo3::types::PyDict>() {
            let mut arrays = Vec::with_capacity(d.len());
            for (k, v) in d.iter() {
                let name: String = k.extract().map_err(|_| bad("array names must be str"))?;
                let (dtype, shape, bytes) = array_in(&name, &v)?;
                arrays.push((name, dtype, shape, bytes));
            }
            PayloadIn::Arrays(arrays)
        } else {
            return Err(bad(format!(
                "section {} payload must be bytes or a dict of arrays",
                String::from_utf8_lossy(&kind)
            )));
        };
        inputs.push((kind, c, payload));
    }
    // Borrow every payload as plain slices, then do the coding and I/O without the GIL.
    // A payload is raw bytes or the arrays of a dict.
    type Payload<'a> = Result<&'a [u8], Vec<ArrayRef<'a>>>;
    let mut plan: Vec<([u8; 4], Coder, Payload<'_>)> = Vec::with_capacity(inputs.len());
    for (kind, c, p) in &inputs {
        let item = match p {
            PayloadIn::Bytes(b) => Ok(b.as_bytes()),
            PayloadIn::Arrays(a) => Err(a
                .iter()
                .map(|(name, dtype, shape, bytes)| {
                    Ok(ArrayRef {
                        name: name.clone(),
                        dtype: *dtype,
                        shape: shape.clone(),
                        data: bytes.slice()?,
                    })
                })
                .collect::<PyResult<Vec<_>>>()?),
        };
        plan.push((*kind, *c, item));
    }
    py.detach(|| {
        let mut w = NqkvWriter::create(&path, zstd_level)?;
        for (kind, c, item) in &plan {
            match item {
                Ok(b) => w.add_section(*kind, *c, b)?,
                Err(arrays) => w.add_section(*kind, *c, &nq_format::encode_arrays(arrays)?)?,
            }
        }
        w.finish()
    })
    .map_err(to_py)
}

type FileReader = NqkvReader<std::io::BufReader<std::fs::File>>;

/// Reads an .nqkv file section by section, verifying each checksum before the payload is used;
/// only one section is held at a time. Iterating yields (kind, payload): payload is bytes, or for
/// "LAYR" sections a dict {name: numpy array (bfloat16 as uint16) or bytes}. Usable as a context
/// manager.
#[pyclass(name = "NqkvReader", module = "nexusquant._core", frozen)]
pub struct PyNqkvReader {
    inner: std::sync::Mutex<Option<FileReader>>,
    version: u16,
    section_count: u32,
}

fn section_to_py<'py>(
    py: Python<'py>,
    s: nq_format::Section,
) -> PyResult<(String, Bound<'py, PyAny>)> {
    let kind = s.kind();
    if s.header.kind != nq_format::KIND_LAYER {
        return Ok((kind, PyBytes::new(py, &s.payload).into_any()));
    }
    let arrays = nq_format::decode_arrays(&s.payload).map_err(to_py)?;
    let d = pyo3::types::PyDict::new(py);
    for a in arrays {
        let v = if a.dtype == DType::Bytes {
            PyBytes::new(py, a.data).into_any()
        } else {
            let np_dtype = if a.dtype == DType::BF16 {
                "uint16"
            } else {
                a.dtype.name()
            };
            let shape = pyo3::types::PyTuple::new(py, a.shape.iter().map(|&x| x as usize))?;
            PyArray1::from_slice(py, a.data)
                .call_method1("view", (np_dtype,))?
                .call_method1("reshape", (shape,))?
        };
        d.set_item(a.name, v)?;
    }
    Ok((kind, d.into_any()))
}

impl PyNqkvReader {
    fn with_reader<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut FileReader) -> crate::Result<T> + Send,
    ) -> PyResult<Option<T>> {
        // try_lock: blocking here while holding the GIL could deadlock with a thread that holds
        // the lock and waits for the GIL.
        let mut guard = self
            .inner
            .try_lock()
            .map_err(|_| bad("this NqkvReader is in use by another thread"))?;
        let Some(r) = guard.as_mut() else {
            return Err(bad("this NqkvReader is closed"));
        };
        py.detach(|| f(r)).map(Some).map_err(to_py)
    }
}

#[pymethods]
impl PyNqkvReader {
    #[new]
    #[pyo3(signature = (path, max_section_bytes=None))]
    fn new(
        py: Python<'_>,
        path: std::path::PathBuf,
        max_section_bytes: Option<u64>,
    ) -> PyResult<Self> {
        let cap = max_section_bytes.unwrap_or(nq_format::DEFAULT_MAX_SECTION_BYTES);
        let r = py.detach(|| NqkvReader::open(&path, cap)).map_err(to_py)?;
        let (version, section_count) = (r.header().version, r.header().section_count);
        Ok(PyNqkvReader {
            inner: std::sync::Mutex::new(Some(r)),
            version,
            section_count,
        })
    }

    /// Format version of the file.
    #[getter]
    fn version(&self) -> u16 {
        self.version
    }

    /// Number of sections in the file.
    #[getter]
    fn section_count(&self) -> u32 {
        self.section_count
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<(String, Bound<'py, PyAny>)>> {
        match self.with_reader(py, |r| r.next_section())?.flatten() {
            Some(s) => Ok(Some(section_to_py(py, s)?)),
            None => Ok(None),
        }
    }

    /// Skip the next section (its checksum is still verified); returns its kind, or None at the end.
    fn skip(&self, py: Python<'_>) -> PyResult<Option<String>> {
        Ok(self
            .with_reader(py, |r| r.skip_section())?
            .flatten()
            .map(|h| String::from_utf8_lossy(&h.kind).into_owned()))
    }

    /// Close the file.
    fn close(&self) -> PyResult<()> {
        let mut g = self
            .inner
            .try_lock()
            .map_err(|_| bad("this NqkvReader is in use by another thread"))?;
        *g = None;
        Ok(())
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close()?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "NqkvReader(version={}, sections={})",
            self.version, self.section_count
        )
    }
}

/// Read a whole .nqkv file: a list of (kind, payload) as `NqkvReader` yields them.
#[pyfunction]
#[pyo3(signature = (path, max_section_bytes=None))]
fn read_nqkv<'py>(
    py: Python<'py>,
    path: std::path::PathBuf,
    max_section_bytes: Option<u64>,
) -> PyResult<Vec<(String, Bound<'py, PyAny>)>> {
    let r = PyNqkvReader::new(py, path, max_section_bytes)?;
    let mut out = Vec::new();
    while let Some(s) = r.__next__(py)? {
        out.push(s);
    }
    Ok(out)
}

fn register_format(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(pack_codes, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_codes, m)?)?;
    m.add_function(wrap_pyfunction!(packed_info, m)?)?;
    m.add_function(wrap_pyfunction!(entropy_encode, m)?)?;
    m.add_function(wrap_pyfunction!(entropy_decode, m)?)?;
    m.add_function(wrap_pyfunction!(write_nqkv, m)?)?;
    m.add_function(wrap_pyfunction!(read_nqkv, m)?)?;
    m.add_class::<PyNqkvReader>()?;
    m.add("NQKV_FORMAT_VERSION", nq_format::VERSION)?;
    Ok(())
}
// ============================ end of the entropy / packer / .nqkv section ====================

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("NexusQuantError", m.py().get_type::<NexusQuantError>())?;
    m.add("CorruptFileError", m.py().get_type::<CorruptFileError>())?;
    m.add(
        "UnsupportedVersionError",
        m.py().get_type::<UnsupportedVersionError>(),
    )?;
    m.add_class::<PyE8Codec>()?;
    m.add_class::<PyE8Encoded>()?;
    m.add_function(wrap_pyfunction!(e8_nearest, m)?)?;
    register_format(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
