//! PNG decoding with the `png` crate, converted to RGB as Pillow's
//! `Image.open(...).convert("RGB")` does.
//!
//! PNG is lossless, so only the conversions can differ from Pillow; each one
//! below was checked against Pillow 13:
//! - grey 1/2/4 bit: scaled to 0..255 (x255, x85, x17), then replicated;
//! - grey 16 bit (Pillow mode `I;16`): clipped to 255, not scaled;
//! - every other 16-bit mode keeps the high byte;
//! - alpha and tRNS are dropped; palette indices past the PLTE entries are black.
//!
//! Like Pillow with `LOAD_TRUNCATED_IMAGES`, data that ends or breaks early
//! leaves the remaining pixels as zero samples (palette index 0 for `P`). CRCs
//! and the zlib checksum are not verified, as Pillow does not verify them for
//! image data.

use std::io::Cursor;

use rayon::prelude::*;

const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];

/// The decoder may allocate this much for ancillary chunks and row buffers.
const DECODER_LIMIT_BYTES: usize = 512 * 1024 * 1024;

/// True when `data` starts with the PNG signature.
pub fn is_png(data: &[u8]) -> bool {
    data.starts_with(&SIGNATURE)
}

/// Fields of the IHDR chunk, with Pillow's mode for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PngHeader {
    pub width: u32,
    pub height: u32,
    pub bit_depth: u8,
    pub color_type: u8,
    pub interlaced: bool,
}

impl PngHeader {
    fn channels(&self) -> usize {
        match self.color_type {
            0 | 3 => 1,
            4 => 2,
            2 => 3,
            _ => 4,
        }
    }

    /// Pillow's mode name for this image.
    pub fn mode(&self) -> &'static str {
        match (self.color_type, self.bit_depth) {
            (0, 1) => "1",
            (0, 16) => "I;16",
            (0, _) => "L",
            (2, _) => "RGB",
            (3, _) => "P",
            (4, 8) => "LA",
            _ => "RGBA",
        }
    }

    fn bits_per_pixel(&self) -> usize {
        self.channels() * self.bit_depth as usize
    }

    fn raw_row_bytes(&self) -> usize {
        (self.width as usize * self.bits_per_pixel()).div_ceil(8)
    }
}

/// Reads IHDR straight from the first bytes (no allocation, no inflating).
pub fn read_header(data: &[u8]) -> Result<PngHeader, String> {
    if !is_png(data) {
        return Err("not a PNG file".into());
    }
    if data.len() < 33 {
        return Err("PNG file ends inside its header".into());
    }
    if &data[12..16] != b"IHDR" {
        return Err("PNG file does not start with an IHDR chunk".into());
    }
    let be32 = |at: usize| u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
    let header = PngHeader {
        width: be32(16),
        height: be32(20),
        bit_depth: data[24],
        color_type: data[25],
        interlaced: data[28] == 1,
    };
    if header.width == 0
        || header.height == 0
        || header.width > i32::MAX as u32
        || header.height > i32::MAX as u32
    {
        return Err(format!(
            "PNG has invalid size {}x{}",
            header.width, header.height
        ));
    }
    let valid = match header.color_type {
        0 => matches!(header.bit_depth, 1 | 2 | 4 | 8 | 16),
        3 => matches!(header.bit_depth, 1 | 2 | 4 | 8),
        2 | 4 | 6 => matches!(header.bit_depth, 8 | 16),
        _ => false,
    };
    if !valid {
        return Err(format!(
            "PNG has unsupported colour type {} with bit depth {}",
            header.color_type, header.bit_depth
        ));
    }
    if data[26] != 0 || data[27] != 0 || data[28] > 1 {
        return Err("PNG uses an unknown compression, filter or interlace method".into());
    }
    Ok(header)
}

/// Converts raw (as stored, unfiltered) rows into packed RGB8.
struct RowConverter {
    header: PngHeader,
    /// 256 RGB entries; indices past the PLTE entries stay black, as in Pillow.
    palette: Vec<u8>,
}

impl RowConverter {
    fn convert(&self, raw: &[u8], out: &mut [u8]) {
        let h = &self.header;
        let width = h.width as usize;
        let px = out.chunks_exact_mut(3).take(width);
        match (h.color_type, h.bit_depth) {
            (0, d) if d < 8 => {
                let scale = match d {
                    1 => 255,
                    2 => 85,
                    _ => 17,
                };
                for (i, p) in px.enumerate() {
                    p.fill(sample(raw, i, d) * scale);
                }
            }
            (0, 8) => px.zip(raw).for_each(|(p, &v)| p.fill(v)),
            // Pillow's I;16 -> RGB clips instead of scaling.
            (0, _) => px
                .zip(raw.chunks_exact(2))
                .for_each(|(p, v)| p.fill(if v[0] == 0 { v[1] } else { 255 })),
            (3, d) => {
                for (i, p) in px.enumerate() {
                    let idx = sample(raw, i, d) as usize * 3;
                    p.copy_from_slice(&self.palette[idx..idx + 3]);
                }
            }
            (2, 8) => out[..width * 3].copy_from_slice(&raw[..width * 3]),
            (2, _) => px
                .zip(raw.chunks_exact(6))
                .for_each(|(p, v)| p.copy_from_slice(&[v[0], v[2], v[4]])),
            (4, 8) => px.zip(raw.chunks_exact(2)).for_each(|(p, v)| p.fill(v[0])),
            (4, _) => px.zip(raw.chunks_exact(4)).for_each(|(p, v)| p.fill(v[0])),
            (_, 8) => px
                .zip(raw.chunks_exact(4))
                .for_each(|(p, v)| p.copy_from_slice(&v[..3])),
            _ => px
                .zip(raw.chunks_exact(8))
                .for_each(|(p, v)| p.copy_from_slice(&[v[0], v[2], v[4]])),
        }
    }
}

/// The `i`-th `depth`-bit sample of a packed row (depth 1, 2, 4 or 8).
#[inline]
fn sample(raw: &[u8], i: usize, depth: u8) -> u8 {
    let d = depth as usize;
    let bit = i * d;
    let shift = 8 - d - (bit % 8);
    (raw[bit / 8] >> shift) & ((1u16 << d) - 1) as u8
}

/// Decoded RGB8 pixels and whether every row was present.
#[derive(Debug)]
pub struct PngPixels {
    pub rgb: Vec<u8>,
    pub complete: bool,
}

/// Decodes the first image of a PNG (the default image of an APNG) to RGB8.
pub fn decode_rgb(data: &[u8], header: &PngHeader) -> Result<PngPixels, String> {
    let mut decoder = png::Decoder::new_with_limits(
        Cursor::new(data),
        png::Limits {
            bytes: DECODER_LIMIT_BYTES,
        },
    );
    decoder.ignore_checksums(true);
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder
        .read_info()
        .map_err(|e| format!("invalid PNG: {e}"))?;
    {
        let info = reader.info();
        if (
            info.width,
            info.height,
            info.bit_depth as u8,
            info.color_type as u8,
        ) != (
            header.width,
            header.height,
            header.bit_depth,
            header.color_type,
        ) {
            return Err("PNG header changed between reads".into());
        }
    }
    let mut palette = vec![0u8; 256 * 3];
    if let Some(plte) = reader.info().palette.as_deref() {
        let n = plte.len().min(palette.len());
        palette[..n].copy_from_slice(&plte[..n]);
    }
    let conv = RowConverter {
        header: *header,
        palette,
    };

    let width = header.width as usize;
    let height = header.height as usize;
    let rgb_row = width * 3;
    let raw_row = header.raw_row_bytes();
    let mut rgb = vec![0u8; rgb_row * height];
    let mut complete = true;

    if header.interlaced {
        // Passes scatter pixels over the whole image: collect the raw samples
        // first (zero where data is missing), then convert.
        let mut raw = vec![0u8; raw_row * height];
        let bpp = header.bits_per_pixel() as u8;
        loop {
            match reader.next_interlaced_row() {
                Ok(Some(row)) => {
                    if let png::InterlaceInfo::Adam7(info) = row.interlace() {
                        png::expand_interlaced_row(&mut raw, raw_row, row.data(), info, bpp);
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    complete = false;
                    break;
                }
            }
        }
        rgb.par_chunks_exact_mut(rgb_row)
            .zip(raw.par_chunks_exact(raw_row))
            .with_min_len(crate::fanout::min_len())
            .for_each(|(out, src)| conv.convert(src, out));
    } else {
        let mut done = 0usize;
        while done < height {
            match reader.next_row() {
                Ok(Some(row)) => {
                    conv.convert(row.data(), &mut rgb[done * rgb_row..(done + 1) * rgb_row]);
                    done += 1;
                }
                Ok(None) => break,
                Err(_) => break,
            }
        }
        if done < height {
            complete = false;
            // Missing rows are zero samples, which is not black for palettes.
            let zero_raw = vec![0u8; raw_row];
            let mut filler = vec![0u8; rgb_row];
            conv.convert(&zero_raw, &mut filler);
            if filler.iter().any(|&b| b != 0) {
                rgb[done * rgb_row..]
                    .par_chunks_exact_mut(rgb_row)
                    .with_min_len(crate::fanout::min_len())
                    .for_each(|out| out.copy_from_slice(&filler));
            }
        }
    }
    Ok(PngPixels { rgb, complete })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_unpack_msb_first() {
        assert_eq!(
            (0..8)
                .map(|i| sample(&[0b1010_0001], i, 1))
                .collect::<Vec<_>>(),
            [1, 0, 1, 0, 0, 0, 0, 1]
        );
        assert_eq!(
            (0..4)
                .map(|i| sample(&[0b1110_0100], i, 2))
                .collect::<Vec<_>>(),
            [3, 2, 1, 0]
        );
        assert_eq!(
            (0..2).map(|i| sample(&[0xA5], i, 4)).collect::<Vec<_>>(),
            [0xA, 0x5]
        );
    }

    #[test]
    fn header_rejects_bad_depths_and_short_data() {
        assert!(read_header(b"\x89PNG\r\n\x1a\n").is_err());
        let mut ihdr = SIGNATURE.to_vec();
        ihdr.extend_from_slice(&13u32.to_be_bytes());
        ihdr.extend_from_slice(b"IHDR");
        ihdr.extend_from_slice(&3u32.to_be_bytes());
        ihdr.extend_from_slice(&2u32.to_be_bytes());
        ihdr.extend_from_slice(&[4, 2, 0, 0, 0, 0, 0, 0, 0]); // RGB with 4-bit samples
        assert!(read_header(&ihdr)
            .unwrap_err()
            .contains("colour type 2 with bit depth 4"));
        ihdr[24] = 8;
        let h = read_header(&ihdr).unwrap();
        assert_eq!((h.width, h.height, h.mode()), (3, 2, "RGB"));
    }

    #[test]
    fn grey16_clips_like_pillow() {
        let header = PngHeader {
            width: 3,
            height: 1,
            bit_depth: 16,
            color_type: 0,
            interlaced: false,
        };
        let conv = RowConverter {
            header,
            palette: vec![0; 768],
        };
        let mut out = [0u8; 9];
        conv.convert(&[0, 7, 0, 255, 1, 0], &mut out);
        assert_eq!(out, [7, 7, 7, 255, 255, 255, 255, 255, 255]);
    }
}
