//! Encoded bytes -> packed RGB8, pixel-identical to Pillow's
//! `Image.open(...).convert("RGB")` for JPEG and PNG.
//!
//! The header is read (and the pixel limit checked) before anything the size
//! of the image is allocated, so a tiny file claiming a huge image costs
//! nothing. Other formats are reported as [`DecodeError::UnsupportedFormat`]
//! so the caller can fall back to another decoder.

use std::fmt;

use rayon::prelude::*;

use crate::jpeg;
use crate::png_decode;

/// Container formats decoded here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
}

impl Format {
    /// Pillow's format name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Jpeg => "JPEG",
            Format::Png => "PNG",
        }
    }
}

/// Size and mode of an image, read from its header only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageHeader {
    pub format: Format,
    pub width: u32,
    pub height: u32,
    /// The mode Pillow opens the file in ("L", "RGB", "CMYK", "P", "I;16", ...).
    pub mode: &'static str,
    kind: HeaderKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HeaderKind {
    Jpeg(jpeg::JpegHeader),
    Png(png_decode::PngHeader),
}

impl ImageHeader {
    pub fn pixels(&self) -> u64 {
        self.width as u64 * self.height as u64
    }
}

/// A decoded image as packed RGB8 rows.
#[derive(Debug)]
pub struct RgbImage {
    pub header: ImageHeader,
    pub data: Vec<u8>,
    /// False when the data ended or broke off before the last row; missing
    /// pixels are then what Pillow leaves there (zero samples).
    pub complete: bool,
}

impl RgbImage {
    pub fn height(&self) -> usize {
        self.header.height as usize
    }

    pub fn width(&self) -> usize {
        self.header.width as usize
    }
}

/// Why bytes could not be turned into pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Neither JPEG nor PNG (by signature).
    UnsupportedFormat,
    /// The header claims more pixels than allowed.
    TooLarge { width: u32, height: u32, limit: u64 },
    /// The data is not a readable image of its format.
    Corrupt { format: Format, reason: String },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::UnsupportedFormat => write!(f, "not a JPEG or PNG file"),
            DecodeError::TooLarge { width, height, limit } => write!(
                f,
                "image has {width} x {height} = {} total pixels, which is larger than the max allowed of {limit}.",
                *width as u64 * *height as u64
            ),
            DecodeError::Corrupt { format, reason } => {
                write!(f, "cannot decode {} image: {reason}", format.name())
            }
        }
    }
}

impl std::error::Error for DecodeError {}

/// Identifies the format by its signature, as Pillow does.
pub fn sniff(data: &[u8]) -> Option<Format> {
    if data.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(Format::Jpeg)
    } else if png_decode::is_png(data) {
        Some(Format::Png)
    } else {
        None
    }
}

/// Reads width, height and mode without decoding pixels.
pub fn read_header(data: &[u8]) -> Result<ImageHeader, DecodeError> {
    match sniff(data) {
        Some(Format::Jpeg) => {
            let h = jpeg::read_header(data).map_err(|reason| DecodeError::Corrupt {
                format: Format::Jpeg,
                reason,
            })?;
            Ok(ImageHeader {
                format: Format::Jpeg,
                width: h.width,
                height: h.height,
                mode: h.mode(),
                kind: HeaderKind::Jpeg(h),
            })
        }
        Some(Format::Png) => {
            let h = png_decode::read_header(data).map_err(|reason| DecodeError::Corrupt {
                format: Format::Png,
                reason,
            })?;
            Ok(ImageHeader {
                format: Format::Png,
                width: h.width,
                height: h.height,
                mode: h.mode(),
                kind: HeaderKind::Png(h),
            })
        }
        None => Err(DecodeError::UnsupportedFormat),
    }
}

/// Refuses headers over `max_pixels` (None: no limit).
pub fn check_limit(header: &ImageHeader, max_pixels: Option<u64>) -> Result<(), DecodeError> {
    match max_pixels {
        Some(limit) if header.pixels() > limit => Err(DecodeError::TooLarge {
            width: header.width,
            height: header.height,
            limit,
        }),
        _ => Ok(()),
    }
}

/// Decodes to RGB8 after checking the header against `max_pixels`.
pub fn decode_rgb(data: &[u8], max_pixels: Option<u64>) -> Result<RgbImage, DecodeError> {
    let header = read_header(data)?;
    check_limit(&header, max_pixels)?;
    decode_with_header(data, header)
}

/// Decodes pixels of a file whose header (and limit) was already checked.
pub fn decode_with_header(data: &[u8], header: ImageHeader) -> Result<RgbImage, DecodeError> {
    match header.kind {
        HeaderKind::Jpeg(h) => {
            let px = jpeg::decode(data, &h).map_err(|reason| DecodeError::Corrupt {
                format: Format::Jpeg,
                reason,
            })?;
            let complete = px.complete;
            let rgb = match h.components {
                3 => px.data,
                1 => expand_grey(&px.data),
                _ => cmyk_to_rgb(&px.data, h.width as usize, px.rows_done),
            };
            Ok(RgbImage {
                header,
                data: rgb,
                complete,
            })
        }
        HeaderKind::Png(h) => {
            let px = png_decode::decode_rgb(data, &h).map_err(|reason| DecodeError::Corrupt {
                format: Format::Png,
                reason,
            })?;
            Ok(RgbImage {
                header,
                data: px.rgb,
                complete: px.complete,
            })
        }
    }
}

const CHUNK: usize = 64 * 1024;

fn expand_grey(grey: &[u8]) -> Vec<u8> {
    let mut rgb = vec![0u8; grey.len() * 3];
    rgb.par_chunks_mut(CHUNK * 3)
        .zip(grey.par_chunks(CHUNK))
        .with_min_len(crate::fanout::min_len())
        .for_each(|(out, src)| {
            for (p, &v) in out.chunks_exact_mut(3).zip(src) {
                p.fill(v);
            }
        });
    rgb
}

/// Pillow's CMYK -> RGB for one pixel (its rounding of x*y/255 included).
#[inline]
pub fn pillow_cmyk_to_rgb(c: u8, m: u8, y: u8, k: u8) -> [u8; 3] {
    let nk = 255 - k as i32;
    let f = |v: u8| {
        let t = v as i32 * nk + 128;
        (nk - (((t >> 8) + t) >> 8)).clamp(0, 255) as u8
    };
    [f(c), f(m), f(y)]
}

/// libjpeg returns Adobe-style inverted CMYK; Pillow reads it as `CMYK;I`
/// (undoing the inversion) and converts to RGB. Rows past `rows_done` are
/// Pillow's zero CMYK, which is white.
fn cmyk_to_rgb(stored: &[u8], width: usize, rows_done: usize) -> Vec<u8> {
    let pixels = stored.len() / 4;
    let mut rgb = vec![0u8; pixels * 3];
    let split = (rows_done * width).min(pixels);
    let (done, missing) = rgb.split_at_mut(split * 3);
    done.par_chunks_mut(CHUNK * 3)
        .zip(stored[..split * 4].par_chunks(CHUNK * 4))
        .with_min_len(crate::fanout::min_len())
        .for_each(|(out, src)| {
            for (p, s) in out.chunks_exact_mut(3).zip(src.chunks_exact(4)) {
                p.copy_from_slice(&pillow_cmyk_to_rgb(
                    255 - s[0],
                    255 - s[1],
                    255 - s[2],
                    255 - s[3],
                ));
            }
        });
    missing.fill(255);
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_by_signature() {
        assert_eq!(sniff(b"\xFF\xD8\xFF\xE0rest"), Some(Format::Jpeg));
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n...."), Some(Format::Png));
        assert_eq!(sniff(b"GIF89a"), None);
        assert_eq!(sniff(b""), None);
        assert_eq!(
            decode_rgb(b"BM....", None).unwrap_err(),
            DecodeError::UnsupportedFormat
        );
    }

    #[test]
    fn cmyk_formula_edges() {
        assert_eq!(pillow_cmyk_to_rgb(0, 0, 0, 0), [255, 255, 255]);
        assert_eq!(pillow_cmyk_to_rgb(255, 255, 255, 0), [0, 0, 0]);
        assert_eq!(pillow_cmyk_to_rgb(0, 0, 0, 255), [0, 0, 0]);
        assert_eq!(pillow_cmyk_to_rgb(128, 0, 64, 0), [127, 255, 191]);
    }

    #[test]
    fn truncated_and_garbage_inputs_error_without_panicking() {
        for data in [
            &b"\xFF\xD8\xFF"[..],
            b"\xFF\xD8\xFF\xE0\x00\x10JFIF",
            b"\x89PNG\r\n\x1a\n\x00\x00",
        ] {
            assert!(
                matches!(decode_rgb(data, None), Err(DecodeError::Corrupt { .. })),
                "{data:?}"
            );
        }
    }

    #[test]
    fn limit_is_checked_on_the_header() {
        // A PNG header claiming 100000 x 100000 pixels with no data at all.
        let mut data = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
        data.extend_from_slice(&100_000u32.to_be_bytes());
        data.extend_from_slice(&100_000u32.to_be_bytes());
        data.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
        let err = decode_rgb(&data, Some(10_000 * 10_000)).unwrap_err();
        assert_eq!(
            err,
            DecodeError::TooLarge {
                width: 100_000,
                height: 100_000,
                limit: 100_000_000
            }
        );
        assert!(err
            .to_string()
            .contains("100000 x 100000 = 10000000000 total pixels"));
    }
}
