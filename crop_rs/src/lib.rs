//! Decode survey images and cut point patches, pixel-identical to pyspacer.
//!
//! The Rust core (`decode`, `crop`, `pipeline`) has no Python dependency; the
//! `python` feature adds the thin PyO3 layer below, exposed as
//! `spacer_core._crop_rs`.

// Linked for its libjpeg-turbo build; the C layer calls into it.
use turbojpeg_sys as _;

pub mod crop;
pub mod decode;
pub mod fanout;
mod jpeg;
pub mod pipeline;
mod png_decode;

#[cfg(feature = "python")]
mod python {
    use std::panic::{catch_unwind, AssertUnwindSafe};

    use numpy::{
        PyArray1, PyArray3, PyArray4, PyArrayMethods, PyReadonlyArray3, PyReadwriteArray4,
        PyUntypedArrayMethods,
    };
    use pyo3::create_exception;
    use pyo3::exceptions::{PyRuntimeError, PyValueError};
    use pyo3::prelude::*;
    use pyo3::pybacked::PyBackedBytes;
    use rayon::prelude::*;

    use crate::crop::{self, CropError, RgbView};
    use crate::decode::{self, DecodeError, ImageHeader};
    use crate::pipeline::{self, PipelineError};

    create_exception!(
        _crop_rs,
        PatchError,
        PyValueError,
        "A crop request that cannot be served (bad buffer, point outside the image, ...)."
    );
    create_exception!(
        _crop_rs,
        ImageDecodeError,
        PyValueError,
        "The bytes are not a decodable image (corrupt, truncated header, unsupported layout)."
    );
    create_exception!(
        _crop_rs,
        InternalCropError,
        PyRuntimeError,
        "A bug in crop_rs (a caught panic): not the caller's fault."
    );
    create_exception!(
        _crop_rs,
        UnsupportedFormatError,
        ImageDecodeError,
        "Neither JPEG nor PNG: decode such files with Pillow instead."
    );
    create_exception!(
        _crop_rs,
        ImageTooLargeError,
        ImageDecodeError,
        "The header claims more pixels than allowed; args are (message, width, height, limit[, batch index])."
    );

    fn crop_err(err: CropError) -> PyErr {
        PatchError::new_err(err.to_string())
    }

    fn decode_err(err: DecodeError) -> PyErr {
        match err {
            DecodeError::UnsupportedFormat => UnsupportedFormatError::new_err(err.to_string()),
            DecodeError::TooLarge {
                width,
                height,
                limit,
            } => ImageTooLargeError::new_err((err.to_string(), width, height, limit)),
            DecodeError::Corrupt { .. } => ImageDecodeError::new_err(err.to_string()),
        }
    }

    fn pipeline_err(err: PipelineError) -> PyErr {
        match err {
            PipelineError::Decode(e) => decode_err(e),
            PipelineError::Crop(e) => crop_err(e),
        }
    }

    /// Runs `f` without the GIL; a panic (a bug, never expected) becomes an
    /// InternalCropError instead of unwinding into Python. PyErr values made
    /// with `new_err` are lazy, so building them without the GIL is fine.
    fn guarded<T: Send>(py: Python<'_>, f: impl FnOnce() -> PyResult<T> + Send) -> PyResult<T> {
        py.allow_threads(|| catch_unwind(AssertUnwindSafe(f)))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(InternalCropError::new_err(format!(
                    "internal error in crop_rs: {what}"
                )))
            })
    }

    /// [`guarded`], with the work kept to one core unless `parallel`.
    fn guarded_on<T: Send>(
        py: Python<'_>,
        parallel: bool,
        f: impl FnOnce() -> PyResult<T> + Send,
    ) -> PyResult<T> {
        guarded(py, || {
            if parallel {
                f()
            } else {
                crate::fanout::on_one_core(f)
            }
        })
    }

    /// Header facts of an image, as Pillow reports them after `Image.open`.
    #[pyclass(frozen, get_all, module = "spacer_core._crop_rs")]
    #[derive(Clone)]
    struct ImageInfo {
        /// "JPEG" or "PNG".
        format: &'static str,
        /// Pillow's mode before conversion ("L", "RGB", "CMYK", "P", "I;16", ...).
        mode: &'static str,
        width: u32,
        height: u32,
    }

    #[pymethods]
    impl ImageInfo {
        /// (width, height), like Pillow's `Image.size`.
        #[getter]
        fn size(&self) -> (u32, u32) {
            (self.width, self.height)
        }

        fn __repr__(&self) -> String {
            format!(
                "ImageInfo(format={:?}, mode={:?}, width={}, height={})",
                self.format, self.mode, self.width, self.height
            )
        }
    }

    impl From<&ImageHeader> for ImageInfo {
        fn from(h: &ImageHeader) -> Self {
            ImageInfo {
                format: h.format.name(),
                mode: h.mode,
                width: h.width,
                height: h.height,
            }
        }
    }

    /// read_header(data) -> ImageInfo | None: size and mode from the header
    /// alone; None for formats other than JPEG and PNG.
    #[pyfunction]
    fn read_header(py: Python<'_>, data: PyBackedBytes) -> PyResult<Option<ImageInfo>> {
        guarded(py, || match decode::read_header(&data) {
            Ok(h) => Ok(Some(ImageInfo::from(&h))),
            Err(DecodeError::UnsupportedFormat) => Ok(None),
            Err(e) => Err(decode_err(e)),
        })
    }

    /// decode_image(data, max_pixels=None, *, parallel=True) -> (uint8 HxWx3, ImageInfo, complete)
    ///
    /// `complete` is False when the data ended or broke off early (the missing
    /// pixels are what Pillow with LOAD_TRUNCATED_IMAGES gives). `parallel`
    /// False keeps the work on one core (for callers that keep every core busy).
    #[pyfunction]
    #[pyo3(signature = (data, max_pixels = None, *, parallel = true))]
    fn decode_image<'py>(
        py: Python<'py>,
        data: PyBackedBytes,
        max_pixels: Option<u64>,
        parallel: bool,
    ) -> PyResult<(Bound<'py, PyArray3<u8>>, ImageInfo, bool)> {
        let img = guarded_on(py, parallel, || {
            decode::decode_rgb(&data, max_pixels).map_err(decode_err)
        })?;
        let info = ImageInfo::from(&img.header);
        let (h, w, complete) = (img.height(), img.width(), img.complete);
        let array = PyArray1::from_vec(py, img.data).reshape([h, w, 3])?;
        Ok((array, info, complete))
    }

    /// crop_patches(data, rowcols, crop_size=224, max_pixels=None, *, parallel=True) -> uint8 (N, s, s, 3)
    #[pyfunction]
    #[pyo3(signature = (data, rowcols, crop_size = 224, max_pixels = None, *, parallel = true))]
    fn crop_patches<'py>(
        py: Python<'py>,
        data: PyBackedBytes,
        rowcols: Vec<(i64, i64)>,
        crop_size: usize,
        max_pixels: Option<u64>,
        parallel: bool,
    ) -> PyResult<Bound<'py, PyArray4<u8>>> {
        let n = rowcols.len();
        let out = guarded_on(py, parallel, || {
            pipeline::patches_hwc(&data, &rowcols, crop_size, max_pixels).map_err(pipeline_err)
        })?;
        PyArray1::from_vec(py, out).reshape([n, crop_size, crop_size, 3])
    }

    /// crop_patches_into_chw(data, rowcols, out, crop_size=224, max_pixels=None) -> None
    ///
    /// Writes float32 patches in [0, 1] (ToTensor layout) into `out` of shape
    /// (N, 3, s, s), which the caller owns (a pinned host buffer, for instance).
    #[pyfunction]
    #[pyo3(signature = (data, rowcols, out, crop_size = 224, max_pixels = None))]
    fn crop_patches_into_chw(
        py: Python<'_>,
        data: PyBackedBytes,
        rowcols: Vec<(i64, i64)>,
        mut out: PyReadwriteArray4<'_, f32>,
        crop_size: usize,
        max_pixels: Option<u64>,
    ) -> PyResult<()> {
        check_chw_shape(out.shape(), rowcols.len(), crop_size)?;
        let out_slice = out
            .as_slice_mut()
            .map_err(|_| PatchError::new_err("out array must be C-contiguous"))?;
        guarded(py, || {
            pipeline::patches_chw_f32_into(&data, &rowcols, crop_size, max_pixels, out_slice)
                .map_err(pipeline_err)
        })
    }

    /// crop_patches_batch(images, rowcols, crop_size=224, max_pixels=None) -> list of uint8 (N_i, s, s, 3) or None
    ///
    /// Decodes several images at once (in parallel). Entries for data that is
    /// neither JPEG nor PNG are None (decode those elsewhere); any other error
    /// is raised with the index of the image that caused it.
    #[pyfunction]
    #[pyo3(signature = (images, rowcols, crop_size = 224, max_pixels = None))]
    fn crop_patches_batch<'py>(
        py: Python<'py>,
        images: Vec<PyBackedBytes>,
        rowcols: Vec<Vec<(i64, i64)>>,
        crop_size: usize,
        max_pixels: Option<u64>,
    ) -> PyResult<Vec<Option<Bound<'py, PyArray4<u8>>>>> {
        if images.len() != rowcols.len() {
            return Err(PatchError::new_err(format!(
                "got {} images but {} rowcol lists",
                images.len(),
                rowcols.len()
            )));
        }
        let results = guarded(py, || {
            Ok(images
                .par_iter()
                .zip(rowcols.par_iter())
                .map(|(data, points)| pipeline::patches_hwc(data, points, crop_size, max_pixels))
                .collect::<Vec<_>>())
        })?;
        let mut arrays = Vec::with_capacity(results.len());
        for (index, (result, points)) in results.into_iter().zip(&rowcols).enumerate() {
            match result {
                Ok(out) => arrays.push(Some(PyArray1::from_vec(py, out).reshape([
                    points.len(),
                    crop_size,
                    crop_size,
                    3,
                ])?)),
                Err(PipelineError::Decode(DecodeError::UnsupportedFormat)) => arrays.push(None),
                Err(PipelineError::Decode(DecodeError::TooLarge {
                    width,
                    height,
                    limit,
                })) => {
                    let err = DecodeError::TooLarge {
                        width,
                        height,
                        limit,
                    };
                    return Err(ImageTooLargeError::new_err((
                        format!("image {index}: {err}"),
                        width,
                        height,
                        limit,
                        index,
                    )));
                }
                Err(e) => {
                    let err = pipeline_err(e);
                    let msg = format!("image {index}: {}", err.value(py));
                    return Err(PyErr::from_type(err.get_type(py), msg));
                }
            }
        }
        Ok(arrays)
    }

    fn check_chw_shape(shape: &[usize], n: usize, crop_size: usize) -> PyResult<()> {
        let expected = [n, 3, crop_size, crop_size];
        if shape != expected {
            return Err(PatchError::new_err(format!(
                "out must have shape {expected:?}, got {shape:?}"
            )));
        }
        Ok(())
    }

    fn rgb_dims(image: &PyReadonlyArray3<'_, u8>) -> PyResult<(usize, usize)> {
        let shape = image.shape();
        if shape[2] != 3 {
            return Err(PatchError::new_err(format!(
                "image must be HxWx3 RGB, got shape {:?}",
                shape
            )));
        }
        Ok((shape[0], shape[1]))
    }

    fn contiguous<'a>(image: &'a PyReadonlyArray3<'_, u8>) -> PyResult<&'a [u8]> {
        image
            .as_slice()
            .map_err(|_| PatchError::new_err("image array must be C-contiguous"))
    }

    /// crop_rgb(image, rowcols, crop_size=224, *, parallel=True) -> uint8 array (N, crop_size, crop_size, 3)
    #[pyfunction]
    #[pyo3(signature = (image, rowcols, crop_size = 224, *, parallel = true))]
    fn crop_rgb<'py>(
        py: Python<'py>,
        image: PyReadonlyArray3<'py, u8>,
        rowcols: Vec<(i64, i64)>,
        crop_size: usize,
        parallel: bool,
    ) -> PyResult<Bound<'py, PyArray4<u8>>> {
        let (h, w) = rgb_dims(&image)?;
        let data = contiguous(&image)?;
        let img = RgbView::new(data, h, w).map_err(crop_err)?;
        let out = guarded_on(py, parallel, || {
            let mut out = vec![0u8; rowcols.len() * crop_size * crop_size * 3];
            crop::crop_hwc_into(&img, &rowcols, crop_size, &mut out).map_err(crop_err)?;
            Ok(out)
        })?;
        PyArray1::from_vec(py, out).reshape([rowcols.len(), crop_size, crop_size, 3])
    }

    /// crop_rgb_into_chw(image, rowcols, out, crop_size=224) -> None
    ///
    /// Writes float32 patches scaled to [0, 1] into `out` of shape
    /// (N, 3, crop_size, crop_size), which the caller owns (e.g. a pinned buffer).
    #[pyfunction]
    #[pyo3(signature = (image, rowcols, out, crop_size = 224))]
    fn crop_rgb_into_chw(
        py: Python<'_>,
        image: PyReadonlyArray3<'_, u8>,
        rowcols: Vec<(i64, i64)>,
        mut out: PyReadwriteArray4<'_, f32>,
        crop_size: usize,
    ) -> PyResult<()> {
        let (h, w) = rgb_dims(&image)?;
        check_chw_shape(out.shape(), rowcols.len(), crop_size)?;
        let data = contiguous(&image)?;
        let img = RgbView::new(data, h, w).map_err(crop_err)?;
        let out_slice = out
            .as_slice_mut()
            .map_err(|_| PatchError::new_err("out array must be C-contiguous"))?;
        guarded(py, || {
            crop::crop_chw_f32_into(&img, &rowcols, crop_size, out_slice).map_err(crop_err)
        })
    }

    #[pymodule]
    fn _crop_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
        let py = m.py();
        m.add("PatchError", py.get_type::<PatchError>())?;
        m.add("ImageDecodeError", py.get_type::<ImageDecodeError>())?;
        m.add("InternalCropError", py.get_type::<InternalCropError>())?;
        m.add(
            "UnsupportedFormatError",
            py.get_type::<UnsupportedFormatError>(),
        )?;
        m.add("ImageTooLargeError", py.get_type::<ImageTooLargeError>())?;
        m.add_class::<ImageInfo>()?;
        m.add_function(wrap_pyfunction!(read_header, m)?)?;
        m.add_function(wrap_pyfunction!(decode_image, m)?)?;
        m.add_function(wrap_pyfunction!(crop_patches, m)?)?;
        m.add_function(wrap_pyfunction!(crop_patches_into_chw, m)?)?;
        m.add_function(wrap_pyfunction!(crop_patches_batch, m)?)?;
        m.add_function(wrap_pyfunction!(crop_rgb, m)?)?;
        m.add_function(wrap_pyfunction!(crop_rgb_into_chw, m)?)?;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        Ok(())
    }
}
