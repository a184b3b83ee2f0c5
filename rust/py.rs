//! PyO3 bindings: the only file that knows about Python.
//!
//! Arrays cross as contiguous numpy arrays with their shapes checked here; fp16 and bf16 arrive as
//! `uint16` bit patterns with a dtype name (numpy has no bf16), so no element is converted twice.
//! Every heavy call releases the GIL (`py.detach`), and every `NqError` becomes
//! `nexusquant.NexusQuantError`, a `ValueError`.

use crate::codec::{E8Codec, Encoded};
use crate::element::Element;
use crate::error::NqError;
use half::{bf16, f16};
use numpy::{
    PyArray1, PyArray2, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyReadonlyArrayDyn, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

pyo3::create_exception!(
    nexusquant,
    NexusQuantError,
    PyValueError,
    "Raised for every bad input to nexusquant: a wrong shape or dtype, NaN or infinity, empty input, corrupt or foreign bytes, a file from a newer version."
);

fn to_py(e: NqError) -> PyErr {
    NexusQuantError::new_err(e.to_string())
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
        ("float32", Some(a), _) => {
            Ok(Rows::F32(a.as_slice().map_err(|_| bad("input must be C-contiguous"))?))
        }
        ("float16" | "bfloat16", _, Some(a)) => {
            let s = a.as_slice().map_err(|_| bad("input must be C-contiguous"))?;
            // SAFETY: f16 and bf16 are repr(transparent) over u16.
            Ok(if dtype == "float16" {
                Rows::F16(unsafe { std::slice::from_raw_parts(s.as_ptr() as *const f16, s.len()) })
            } else {
                Rows::BF16(unsafe { std::slice::from_raw_parts(s.as_ptr() as *const bf16, s.len()) })
            })
        }
        _ => Err(bad(format!("unsupported dtype {dtype}: use float32, float16 or bfloat16"))),
    }
}

fn extract_input<'py>(
    x: &Bound<'py, PyAny>,
    dtype: &str,
) -> PyResult<(Option<PyReadonlyArrayDyn<'py, f32>>, Option<PyReadonlyArrayDyn<'py, u16>>, Vec<usize>)> {
    if dtype == "float32" {
        let a: PyReadonlyArrayDyn<f32> =
            x.extract().map_err(|_| bad("expected a float32 numpy array"))?;
        let shape = a.shape().to_vec();
        Ok((Some(a), None, shape))
    } else {
        let a: PyReadonlyArrayDyn<u16> =
            x.extract().map_err(|_| bad("expected fp16/bf16 bits as a uint16 numpy array"))?;
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
    ) -> PyResult<(Bound<'py, PyArray2<u8>>, Bound<'py, PyArray1<u16>>)> {
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
            py.detach(|| encode_rows_par(codec, rows, cs, ss)).map_err(to_py)?;
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
        let cs = codes.as_slice().map_err(|_| bad("codes must be C-contiguous"))?;
        let ss = scales.as_slice().map_err(|_| bad("scales must be C-contiguous"))?;
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
                        let o = unsafe { std::slice::from_raw_parts_mut(os.as_mut_ptr() as *mut f16, os.len()) };
                        py.detach(|| decode_rows_par(codec, cs, ss, o));
                    } else {
                        // SAFETY: bf16 is repr(transparent) over u16.
                        let o = unsafe { std::slice::from_raw_parts_mut(os.as_mut_ptr() as *mut bf16, os.len()) };
                        py.detach(|| decode_rows_par(codec, cs, ss, o));
                    }
                }
                Ok(out.into_any())
            }
            _ => Err(bad(format!("unsupported dtype {dtype}: use float32, float16 or bfloat16"))),
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
        let cs = codes.as_slice().map_err(|_| bad("codes must be C-contiguous"))?;
        let ss = scales.as_slice().map_err(|_| bad("scales must be C-contiguous"))?;
        let out = PyArray2::<f32>::zeros(py, [n, p], false);
        {
            let mut w = out.readwrite();
            let os = w.as_slice_mut().expect("contiguous");
            let codec = &self.inner;
            py.detach(|| codec.decode_rotated_into(cs, ss, os)).map_err(to_py)?;
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
            return Err(bad(format!("expected rows of {d} values, got {}", x.shape()[1])));
        }
        let n = x.shape()[0];
        let xs = x.as_slice().map_err(|_| bad("input must be C-contiguous"))?;
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
            return Err(bad(format!("expected rows of {p} values, got {}", y.shape()[1])));
        }
        let n = y.shape()[0];
        let ys = y.as_slice().map_err(|_| bad("input must be C-contiguous"))?;
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
    fn encode_to<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>, dtype: &str) -> PyResult<PyE8Encoded> {
        let (fa, ua, shape) = extract_input(x, dtype)?;
        let n = self.check_shape(&shape)?;
        let cb = self.inner.code_bytes_per_vector();
        let mut codes = vec![0u8; n * cb];
        let mut scales = vec![0u16; n];
        let rows = as_rows(&fa, &ua, dtype)?;
        let codec = &self.inner;
        py.detach(|| encode_rows_par(codec, rows, &mut codes, &mut scales)).map_err(to_py)?;
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
    fn decode_from<'py>(&self, py: Python<'py>, enc: &PyE8Encoded) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
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
            return Err(bad(format!("expected an array of shape (..., {d}), got {shape:?}")));
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

fn encode_rows_par(codec: &E8Codec, rows: Rows<'_>, codes: &mut [u8], scales: &mut [u16]) -> crate::Result<()> {
    fn go<T: Element>(codec: &E8Codec, x: &[T], codes: &mut [u8], scales: &mut [u16]) -> crate::Result<()> {
        use rayon::prelude::*;
        let d = codec.head_dim();
        let cb = codec.code_bytes_per_vector();
        let r = PY_PARALLEL_ROWS;
        x.par_chunks(r * d)
            .zip(codes.par_chunks_mut(r * cb))
            .zip(scales.par_chunks_mut(r))
            .enumerate()
            .try_for_each(|(k, ((xc, cc), sc))| crate::simd::encode_rows_at(codec, xc, cc, sc, k * r))
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
        let cb = if n == 0 { 0 } else { self.inner.codes.len() / n };
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

    /// Parse bytes written by `to_bytes`; raises NexusQuantError on anything else.
    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<Self> {
        if data.len() < 4 {
            return Err(bad("too short to be an E8 encoding"));
        }
        let ndim = u32::from_le_bytes(data[0..4].try_into().unwrap()) as usize;
        if ndim == 0 || ndim > 16 || data.len() < 4 + 8 * ndim {
            return Err(bad("corrupt input: bad shape header in E8 encoding"));
        }
        let mut shape = Vec::with_capacity(ndim);
        for i in 0..ndim {
            let o = 4 + 8 * i;
            shape.push(u64::from_le_bytes(data[o..o + 8].try_into().unwrap()) as usize);
        }
        let inner = Encoded::from_bytes(&data[4 + 8 * ndim..]).map_err(to_py)?;
        let n: Option<usize> = shape[..ndim - 1].iter().try_fold(1usize, |a, &b| a.checked_mul(b));
        if shape[ndim - 1] != inner.head_dim || n != Some(inner.n) {
            return Err(bad("corrupt input: shape header does not match the E8 encoding"));
        }
        Ok(PyE8Encoded { inner, shape })
    }

    fn __repr__(&self) -> String {
        format!("E8Encoded(shape={:?}, bits={}, nbytes={})", self.shape, self.inner.bits, self.nbytes())
    }
}

/// Nearest E8 lattice points of float32 groups of 8, shape (..., 8) → same shape.
#[pyfunction]
fn e8_nearest<'py>(py: Python<'py>, x: PyReadonlyArrayDyn<'py, f32>) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let shape = x.shape().to_vec();
    if shape.last() != Some(&8) {
        return Err(bad(format!("e8_nearest expects shape (..., 8), got {shape:?}")));
    }
    if x.len() == 0 {
        return Err(bad("e8_nearest got an empty array"));
    }
    let xs = x.as_slice().map_err(|_| bad("input must be C-contiguous"))?;
    if let Some(i) = xs.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!("e8_nearest input holds NaN or infinity at flat index {i}")));
    }
    let out = PyArrayDyn::<f32>::zeros(py, shape.as_slice(), false);
    {
        let mut w = out.readwrite();
        let os = w.as_slice_mut().expect("contiguous");
        py.detach(|| crate::e8::nearest_e8_slice(xs, os));
    }
    Ok(out)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("NexusQuantError", m.py().get_type::<NexusQuantError>())?;
    m.add_class::<PyE8Codec>()?;
    m.add_class::<PyE8Encoded>()?;
    m.add_function(wrap_pyfunction!(e8_nearest, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
