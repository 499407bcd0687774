//! Bytes in, patches out: the checks in the order that keeps hostile input
//! cheap (header, pixel limit, points) before the decode and the crop.

use std::fmt;

use crate::crop::{self, CropError, RgbView};
use crate::decode::{self, DecodeError, RgbImage};

/// A failure of either stage, kept apart so callers can map them to
/// different exception types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipelineError {
    Decode(DecodeError),
    Crop(CropError),
}

impl fmt::Display for PipelineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PipelineError::Decode(e) => e.fmt(f),
            PipelineError::Crop(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for PipelineError {}

impl From<DecodeError> for PipelineError {
    fn from(e: DecodeError) -> Self {
        PipelineError::Decode(e)
    }
}

impl From<CropError> for PipelineError {
    fn from(e: CropError) -> Self {
        PipelineError::Crop(e)
    }
}

/// Reads the header, checks the limit and the points, then decodes.
pub fn decode_for_points(
    data: &[u8],
    points: &[(i64, i64)],
    crop_size: usize,
    max_pixels: Option<u64>,
) -> Result<RgbImage, PipelineError> {
    if crop_size == 0 {
        return Err(CropError::ZeroCropSize.into());
    }
    let header = decode::read_header(data)?;
    decode::check_limit(&header, max_pixels)?;
    crop::check_points(header.height as usize, header.width as usize, points)?;
    Ok(decode::decode_with_header(data, header)?)
}

fn view(img: &RgbImage) -> Result<RgbView<'_>, CropError> {
    RgbView::new(&img.data, img.height(), img.width())
}

/// Decodes `data` and returns uint8 HWC patches, `points.len() * crop_size^2 * 3` bytes.
pub fn patches_hwc(
    data: &[u8],
    points: &[(i64, i64)],
    crop_size: usize,
    max_pixels: Option<u64>,
) -> Result<Vec<u8>, PipelineError> {
    let img = decode_for_points(data, points, crop_size, max_pixels)?;
    let mut out = vec![0u8; points.len() * crop_size * crop_size * 3];
    crop::crop_hwc_into(&view(&img)?, points, crop_size, &mut out)?;
    Ok(out)
}

/// Decodes `data` and writes float32 CHW patches in [0, 1] into `out`.
pub fn patches_chw_f32_into(
    data: &[u8],
    points: &[(i64, i64)],
    crop_size: usize,
    max_pixels: Option<u64>,
    out: &mut [f32],
) -> Result<(), PipelineError> {
    let expected = points.len() * 3 * crop_size * crop_size;
    if out.len() != expected {
        return Err(CropError::OutputSize { expected, actual: out.len() }.into());
    }
    let img = decode_for_points(data, points, crop_size, max_pixels)?;
    crop::crop_chw_f32_into(&view(&img)?, points, crop_size, out)?;
    Ok(())
}
