//! Decode survey images and cut point patches, pixel-identical to pyspacer.
//!
//! The Rust core (`crop`) has no Python dependency; the `python` feature adds
//! the thin PyO3 layer below, exposed as `spacer_core._crop_rs`.

pub mod crop;

#[cfg(feature = "python")]
mod python {
    use numpy::{PyArray4, PyArrayMethods, PyReadonlyArray3, PyReadwriteArray4, PyUntypedArrayMethods};
    use pyo3::create_exception;
    use pyo3::exceptions::PyValueError;
    use pyo3::prelude::*;

    use crate::crop::{self, CropError, RgbView};

    create_exception!(
        _crop_rs,
        PatchError,
        PyValueError,
        "A crop request that cannot be served (bad buffer, point outside the image, ...)."
    );

    fn to_py(err: CropError) -> PyErr {
        PatchError::new_err(err.to_string())
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

    /// crop_rgb(image, rowcols, crop_size=224) -> uint8 array (N, crop_size, crop_size, 3)
    #[pyfunction]
    #[pyo3(signature = (image, rowcols, crop_size = 224))]
    fn crop_rgb<'py>(
        py: Python<'py>,
        image: PyReadonlyArray3<'py, u8>,
        rowcols: Vec<(i64, i64)>,
        crop_size: usize,
    ) -> PyResult<Bound<'py, PyArray4<u8>>> {
        let (h, w) = rgb_dims(&image)?;
        let data = contiguous(&image)?;
        let img = RgbView::new(data, h, w).map_err(to_py)?;
        let mut out = vec![0u8; rowcols.len() * crop_size * crop_size * 3];
        py.allow_threads(|| crop::crop_hwc_into(&img, &rowcols, crop_size, &mut out))
            .map_err(to_py)?;
        let flat = numpy::PyArray1::from_vec(py, out);
        flat.reshape([rowcols.len(), crop_size, crop_size, 3])
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
        let expected = [rowcols.len(), 3, crop_size, crop_size];
        if out.shape() != expected {
            return Err(PatchError::new_err(format!(
                "out must have shape {:?}, got {:?}",
                expected,
                out.shape()
            )));
        }
        let data = contiguous(&image)?;
        let img = RgbView::new(data, h, w).map_err(to_py)?;
        let out_slice = out
            .as_slice_mut()
            .map_err(|_| PatchError::new_err("out array must be C-contiguous"))?;
        py.allow_threads(|| crop::crop_chw_f32_into(&img, &rowcols, crop_size, out_slice))
            .map_err(to_py)
    }

    #[pymodule]
    fn _crop_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("PatchError", m.py().get_type::<PatchError>())?;
        m.add_function(wrap_pyfunction!(crop_rgb, m)?)?;
        m.add_function(wrap_pyfunction!(crop_rgb_into_chw, m)?)?;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        Ok(())
    }
}
