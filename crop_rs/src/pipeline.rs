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
        return Err(CropError::OutputSize {
            expected,
            actual: out.len(),
        }
        .into());
    }
    let img = decode_for_points(data, points, crop_size, max_pixels)?;
    crop::crop_chw_f32_into(&view(&img)?, points, crop_size, out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crop::crop_hwc_into;
    use proptest::prelude::*;

    const SEEDS: [&[u8]; 5] = [
        include_bytes!("../fuzz/seeds/baseline_420.jpg"),
        include_bytes!("../fuzz/seeds/progressive_444.jpg"),
        include_bytes!("../fuzz/seeds/cmyk.jpg"),
        include_bytes!("../fuzz/seeds/grey.jpg"),
        include_bytes!("../fuzz/seeds/palette.png"),
    ];

    fn encode_png(rgb: &[u8], w: u32, h: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().unwrap();
        writer.write_image_data(rgb).unwrap();
        writer.finish().unwrap();
        out
    }

    fn summary(img: &RgbImage) -> (Vec<u8>, u64) {
        (
            img.data[..9].to_vec(),
            img.data.iter().map(|&v| v as u64).sum(),
        )
    }

    /// First pixels and pixel sums of the seeds as Pillow 13 decodes them
    /// (`np.asarray(Image.open(f).convert("RGB"))`).
    #[test]
    fn seeds_decode_to_pillows_pixels() {
        let cases: [(&[u8], [u8; 9], u64, &str); 3] = [
            (
                SEEDS[0],
                [157, 118, 103, 217, 210, 168, 62, 118, 21],
                101_670,
                "RGB",
            ),
            (
                SEEDS[2],
                [95, 148, 199, 212, 193, 254, 12, 168, 12],
                101_973,
                "CMYK",
            ),
            (
                SEEDS[3],
                [128, 128, 128, 207, 207, 207, 90, 90, 90],
                100_221,
                "L",
            ),
        ];
        for (data, first, sum, mode) in cases {
            let img = decode::decode_rgb(data, None).unwrap();
            assert_eq!(
                (img.width(), img.height(), img.header.mode, img.complete),
                (21, 13, mode, true)
            );
            assert_eq!(summary(&img), (first.to_vec(), sum));
        }
    }

    #[test]
    fn limit_and_points_are_checked_before_decoding() {
        let err = patches_hwc(SEEDS[0], &[(0, 0)], 224, Some(21 * 13 - 1)).unwrap_err();
        assert!(matches!(
            err,
            PipelineError::Decode(DecodeError::TooLarge {
                width: 21,
                height: 13,
                ..
            })
        ));
        let err = patches_hwc(SEEDS[0], &[(13, 0)], 224, None).unwrap_err();
        assert!(matches!(
            err,
            PipelineError::Crop(CropError::PointOutOfBounds { index: 0, .. })
        ));
        let mut out = vec![0f32; 5];
        let err = patches_chw_f32_into(SEEDS[0], &[(0, 0)], 224, None, &mut out).unwrap_err();
        assert!(matches!(
            err,
            PipelineError::Crop(CropError::OutputSize { .. })
        ));
    }

    fn mutate(seed: &[u8], ops: &[(usize, u8, u8)]) -> Vec<u8> {
        let mut data = seed.to_vec();
        for &(pos, kind, value) in ops {
            if data.is_empty() {
                break;
            }
            let at = pos % data.len();
            match kind % 4 {
                0 => data[at] ^= 1 << (value % 8),
                1 => data[at] = value,
                2 => data.truncate(at),
                _ => data.insert(at, value),
            }
        }
        data
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn png_roundtrip_matches_plain_crop(
            h in 1usize..30, w in 1usize..30, seed in any::<u64>(), npts in 1usize..5, cs in 1usize..40,
        ) {
            let mut state = seed | 1;
            let mut next = || { state ^= state << 13; state ^= state >> 7; state ^= state << 17; state };
            let rgb: Vec<u8> = (0..h * w * 3).map(|_| next() as u8).collect();
            let points: Vec<(i64, i64)> =
                (0..npts).map(|_| ((next() % h as u64) as i64, (next() % w as u64) as i64)).collect();
            let data = encode_png(&rgb, w as u32, h as u32);
            let got = patches_hwc(&data, &points, cs, None).unwrap();
            let mut expected = vec![0u8; got.len()];
            crop_hwc_into(&RgbView::new(&rgb, h, w).unwrap(), &points, cs, &mut expected).unwrap();
            prop_assert_eq!(got, expected);
        }

        /// Bounded fuzzing in `cargo test`: damaged files give a result of the
        /// declared size or an error, never a panic or a crash.
        #[test]
        fn damaged_files_never_panic(
            which in 0usize..SEEDS.len(),
            ops in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..6),
        ) {
            let data = mutate(SEEDS[which], &ops);
            if let Ok(img) = decode::decode_rgb(&data, Some(1 << 22)) {
                prop_assert_eq!(img.data.len(), img.width() * img.height() * 3);
                let _ = patches_hwc(&data, &[(0, 0)], 16, Some(1 << 22));
            }
        }
    }
}
