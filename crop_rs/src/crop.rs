//! Patch cropping with NumPy-style `reflect` padding.
//!
//! pyspacer pads the RGB image by `crop_size` pixels on every side with
//! `np.pad(..., mode="reflect")` and slices a `crop_size` square whose top-left
//! corner sits at `row - ceil(crop_size / 2)` (for even sizes, `row - size/2`).
//! Padding is never materialised here: every patch pixel is mapped straight back
//! to its source pixel, which gives the same bytes without the padded copy.

use std::fmt;
use std::sync::OnceLock;

use rayon::prelude::*;

/// A decoded, tightly packed RGB8 image (row-major, 3 bytes per pixel).
#[derive(Clone, Copy, Debug)]
pub struct RgbView<'a> {
    pub data: &'a [u8],
    pub height: usize,
    pub width: usize,
}

/// Why a crop request cannot be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CropError {
    /// The pixel buffer does not hold `height * width * 3` bytes.
    BufferSize { expected: usize, actual: usize },
    /// The image has no pixels.
    EmptyImage,
    /// `crop_size` is zero.
    ZeroCropSize,
    /// A point lies outside the image; `index` is its position in the list.
    PointOutOfBounds {
        index: usize,
        row: i64,
        col: i64,
        height: usize,
        width: usize,
    },
    /// The output buffer has the wrong length for the number of points.
    OutputSize { expected: usize, actual: usize },
}

impl fmt::Display for CropError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CropError::BufferSize { expected, actual } => {
                write!(f, "pixel buffer holds {actual} bytes, expected {expected}")
            }
            CropError::EmptyImage => write!(f, "image has no pixels"),
            CropError::ZeroCropSize => write!(f, "crop_size must be positive"),
            CropError::PointOutOfBounds {
                index,
                row,
                col,
                height,
                width,
            } => write!(
                f,
                "point {index} (row={row}, col={col}) is outside the {height}x{width} image"
            ),
            CropError::OutputSize { expected, actual } => {
                write!(
                    f,
                    "output buffer holds {actual} elements, expected {expected}"
                )
            }
        }
    }
}

impl std::error::Error for CropError {}

impl<'a> RgbView<'a> {
    /// Wraps a packed RGB8 buffer, checking its length.
    pub fn new(data: &'a [u8], height: usize, width: usize) -> Result<Self, CropError> {
        if height == 0 || width == 0 {
            return Err(CropError::EmptyImage);
        }
        let expected = height * width * 3;
        if data.len() != expected {
            return Err(CropError::BufferSize {
                expected,
                actual: data.len(),
            });
        }
        Ok(RgbView {
            data,
            height,
            width,
        })
    }
}

/// Maps an index of the conceptually padded axis (in original coordinates, so
/// it may be negative or >= `len`) to the source index under `reflect`
/// padding, i.e. mirroring about the edge pixels without repeating them.
#[inline]
pub fn reflect_index(i: i64, len: usize) -> usize {
    if len == 1 {
        return 0;
    }
    let period = 2 * (len as i64 - 1);
    let m = i.rem_euclid(period);
    let r = if m >= len as i64 { period - m } else { m };
    r as usize
}

/// Offset from a point to the first row/column of its patch.
#[inline]
pub fn patch_origin(center: i64, crop_size: usize) -> i64 {
    // pyspacer computes int(center + pad - crop_size / 2) - pad with pad == crop_size.
    let cs = crop_size as i64;
    (2 * center + cs).div_euclid(2) - cs
}

/// Checks every point lies inside a `height` x `width` image (usable before
/// decoding, from the header's size).
pub fn check_points(height: usize, width: usize, points: &[(i64, i64)]) -> Result<(), CropError> {
    for (index, &(row, col)) in points.iter().enumerate() {
        if row < 0 || col < 0 || row as usize >= height || col as usize >= width {
            return Err(CropError::PointOutOfBounds {
                index,
                row,
                col,
                height,
                width,
            });
        }
    }
    Ok(())
}

fn validate_points(img: &RgbView<'_>, points: &[(i64, i64)]) -> Result<(), CropError> {
    check_points(img.height, img.width, points)
}

/// Source column offsets (in bytes) for one patch row, shared by both layouts.
fn column_offsets(img: &RgbView<'_>, col: i64, crop_size: usize) -> Vec<usize> {
    let left = patch_origin(col, crop_size);
    (0..crop_size)
        .map(|x| reflect_index(left + x as i64, img.width) * 3)
        .collect()
}

fn crop_one_hwc(img: &RgbView<'_>, (row, col): (i64, i64), crop_size: usize, out: &mut [u8]) {
    let cols = column_offsets(img, col, crop_size);
    let top = patch_origin(row, crop_size);
    let row_bytes = img.width * 3;
    for (y, out_row) in out.chunks_exact_mut(crop_size * 3).enumerate() {
        let src_row = reflect_index(top + y as i64, img.height) * row_bytes;
        let src = &img.data[src_row..src_row + row_bytes];
        // Fast path: the whole patch row lies inside the image.
        let first = cols[0];
        if cols[crop_size - 1] == first + (crop_size - 1) * 3 {
            out_row.copy_from_slice(&src[first..first + crop_size * 3]);
        } else {
            for (px, &c) in out_row.chunks_exact_mut(3).zip(cols.iter()) {
                px.copy_from_slice(&src[c..c + 3]);
            }
        }
    }
}

/// `v as f32 / 255.0` for every byte: division (not multiplication by 1/255)
/// matches torchvision's ToTensor bit for bit, and a table makes it a load.
fn to_unit_table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|v| v as f32 / 255.0))
}

fn crop_one_chw_f32(img: &RgbView<'_>, (row, col): (i64, i64), crop_size: usize, out: &mut [f32]) {
    let unit = to_unit_table();
    let cols = column_offsets(img, col, crop_size);
    let top = patch_origin(row, crop_size);
    let row_bytes = img.width * 3;
    let plane = crop_size * crop_size;
    let (r_plane, rest) = out.split_at_mut(plane);
    let (g_plane, b_plane) = rest.split_at_mut(plane);
    for y in 0..crop_size {
        let src_row = reflect_index(top + y as i64, img.height) * row_bytes;
        let src = &img.data[src_row..src_row + row_bytes];
        let range = y * crop_size..(y + 1) * crop_size;
        let rows = r_plane[range.clone()]
            .iter_mut()
            .zip(&mut g_plane[range.clone()])
            .zip(&mut b_plane[range]);
        for (((r, g), b), &c) in rows.zip(cols.iter()) {
            *r = unit[src[c] as usize];
            *g = unit[src[c + 1] as usize];
            *b = unit[src[c + 2] as usize];
        }
    }
}

/// Checks a request and cuts one patch per point into its slice of `out`, in
/// parallel over points; `cut` writes one patch of `3 * crop_size^2` values.
fn crop_each_into<T: Send>(
    img: &RgbView<'_>,
    points: &[(i64, i64)],
    crop_size: usize,
    out: &mut [T],
    cut: impl Fn(&RgbView<'_>, (i64, i64), usize, &mut [T]) + Sync,
) -> Result<(), CropError> {
    if crop_size == 0 {
        return Err(CropError::ZeroCropSize);
    }
    validate_points(img, points)?;
    let per = crop_size * crop_size * 3;
    if out.len() != per * points.len() {
        return Err(CropError::OutputSize {
            expected: per * points.len(),
            actual: out.len(),
        });
    }
    out.par_chunks_exact_mut(per)
        .zip(points.par_iter())
        .with_min_len(crate::fanout::min_len())
        .for_each(|(patch, &p)| cut(img, p, crop_size, patch));
    Ok(())
}

/// Cuts one `crop_size` x `crop_size` x 3 patch per point into `out`
/// (length `points.len() * crop_size^2 * 3`), in parallel over points.
pub fn crop_hwc_into(
    img: &RgbView<'_>,
    points: &[(i64, i64)],
    crop_size: usize,
    out: &mut [u8],
) -> Result<(), CropError> {
    crop_each_into(img, points, crop_size, out, crop_one_hwc)
}

/// Like [`crop_hwc_into`], but writes float32 CHW patches scaled to [0, 1]
/// (torchvision `ToTensor` layout) into `out` of length `N * 3 * crop_size^2`.
pub fn crop_chw_f32_into(
    img: &RgbView<'_>,
    points: &[(i64, i64)],
    crop_size: usize,
    out: &mut [f32],
) -> Result<(), CropError> {
    crop_each_into(img, points, crop_size, out, crop_one_chw_f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reference: materialise the padded image exactly as NumPy would, then slice.
    fn reference_crop(img: &RgbView<'_>, (row, col): (i64, i64), cs: usize) -> Vec<u8> {
        let pad = cs as i64;
        let ph = img.height as i64 + 2 * pad;
        let pw = img.width as i64 + 2 * pad;
        let mut padded = vec![0u8; (ph * pw * 3) as usize];
        for y in 0..ph {
            for x in 0..pw {
                let sy = reflect_index(y - pad, img.height);
                let sx = reflect_index(x - pad, img.width);
                let d = ((y * pw + x) * 3) as usize;
                let s = (sy * img.width + sx) * 3;
                padded[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
            }
        }
        let upper = ((row + pad) as f64 - cs as f64 / 2.0) as i64;
        let left = ((col + pad) as f64 - cs as f64 / 2.0) as i64;
        let mut out = Vec::with_capacity(cs * cs * 3);
        for y in upper..upper + cs as i64 {
            let start = ((y * pw + left) * 3) as usize;
            out.extend_from_slice(&padded[start..start + cs * 3]);
        }
        out
    }

    #[test]
    fn reflect_matches_numpy_examples() {
        // np.pad([0,1,2], 5, mode="reflect") -> [1 0 1 2 1 0 1 2 1 0 1 2 1]
        let got: Vec<usize> = (-5..8).map(|i| reflect_index(i, 3)).collect();
        assert_eq!(got, vec![1, 0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1]);
        assert_eq!(reflect_index(-7, 1), 0);
        assert_eq!(reflect_index(-1, 2), 1);
        assert_eq!(reflect_index(2, 2), 0);
    }

    #[test]
    fn origin_matches_python_truncation() {
        assert_eq!(patch_origin(0, 224), -112);
        assert_eq!(patch_origin(500, 224), 388);
        assert_eq!(patch_origin(10, 5), 7);
        // int(0 + 1 - 0.5) - 1: odd sizes round the window up-left.
        assert_eq!(patch_origin(0, 1), -1);
    }

    #[test]
    fn rejects_out_of_bounds_point() {
        let data = vec![0u8; 4 * 5 * 3];
        let img = RgbView::new(&data, 4, 5).unwrap();
        let mut out = vec![0u8; 224 * 224 * 3];
        let err = crop_hwc_into(&img, &[(4, 0)], 224, &mut out).unwrap_err();
        assert!(matches!(
            err,
            CropError::PointOutOfBounds {
                index: 0,
                row: 4,
                ..
            }
        ));
        assert!(err.to_string().contains("outside the 4x5 image"));
    }

    #[test]
    fn rejects_bad_buffers() {
        assert_eq!(
            RgbView::new(&[0u8; 5], 1, 2).unwrap_err(),
            CropError::BufferSize {
                expected: 6,
                actual: 5
            }
        );
        assert_eq!(RgbView::new(&[], 0, 2).unwrap_err(), CropError::EmptyImage);
    }

    #[test]
    fn unit_table_is_division_by_255() {
        for v in 0..=255u8 {
            assert_eq!(
                to_unit_table()[v as usize].to_bits(),
                (v as f32 / 255.0).to_bits()
            );
        }
    }

    #[test]
    fn float_layout_is_chw_scaled() {
        let data: Vec<u8> = (0..2 * 2 * 3).map(|v| (v * 20) as u8).collect();
        let img = RgbView::new(&data, 2, 2).unwrap();
        let mut hwc = vec![0u8; 3 * 3 * 3];
        let mut chw = vec![0f32; 3 * 3 * 3];
        crop_hwc_into(&img, &[(1, 1)], 3, &mut hwc).unwrap();
        crop_chw_f32_into(&img, &[(1, 1)], 3, &mut chw).unwrap();
        for y in 0..3 {
            for x in 0..3 {
                for c in 0..3 {
                    assert_eq!(
                        chw[c * 9 + y * 3 + x],
                        hwc[(y * 3 + x) * 3 + c] as f32 / 255.0
                    );
                }
            }
        }
    }

    proptest! {
        #[test]
        fn crops_equal_padded_reference(
            h in 1usize..40, w in 1usize..40, cs in 1usize..30,
            seed in any::<u64>(), npts in 1usize..6,
        ) {
            let mut state = seed | 1;
            let mut next = || { state ^= state << 13; state ^= state >> 7; state ^= state << 17; state };
            let data: Vec<u8> = (0..h * w * 3).map(|_| next() as u8).collect();
            let img = RgbView::new(&data, h, w).unwrap();
            let points: Vec<(i64, i64)> = (0..npts)
                .map(|_| ((next() % h as u64) as i64, (next() % w as u64) as i64))
                .collect();
            let mut out = vec![0u8; npts * cs * cs * 3];
            crop_hwc_into(&img, &points, cs, &mut out).unwrap();
            for (i, &p) in points.iter().enumerate() {
                let per = cs * cs * 3;
                prop_assert_eq!(&out[i * per..(i + 1) * per], &reference_crop(&img, p, cs)[..]);
            }
        }
    }
}
