//! JPEG decoding through libjpeg-turbo (via the C layer in `csrc/jpeg_shim.c`).
//!
//! Pillow decodes JPEG with libjpeg-turbo (ISLOW DCT, fancy upsampling), and
//! other decoders round differently, so the same library is used here. The C
//! layer owns every `setjmp`/`longjmp`; this module only sees return codes.

use std::os::raw::{c_char, c_int};

use rayon::prelude::*;

const SPJ_OK: c_int = 0;
const SPJ_ERROR: c_int = 1;
const SPJ_SUSPENDED: c_int = 2;
const SPJ_PARTIAL: c_int = 3;

/// Bounds the scans of a progressive file (a few dozen in real files): a
/// hostile file with thousands of tiny scans would otherwise cost minutes.
pub const MAX_PROGRESSIVE_SCANS: c_int = 1000;

const MSG_LEN: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SpjInfo {
    width: u32,
    height: u32,
    components: i32,
    color_space: i32,
    progressive: i32,
    adobe: i32,
}

extern "C" {
    fn spj_read_header(
        data: *const u8,
        len: usize,
        info: *mut SpjInfo,
        msg: *mut c_char,
        msg_len: usize,
    ) -> c_int;
    fn spj_decode_rows(
        data: *const u8,
        len: usize,
        expect: *const SpjInfo,
        first_row: u32,
        end_row: u32,
        out: *mut u8,
        out_len: usize,
        max_scans: c_int,
        rows_done: *mut u32,
        msg: *mut c_char,
        msg_len: usize,
    ) -> c_int;
}

/// What the frame header says, with the mode Pillow would give the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JpegHeader {
    pub width: u32,
    pub height: u32,
    /// Samples per pixel as decoded: 1 (grey), 3 (RGB) or 4 (CMYK).
    pub components: usize,
    pub progressive: bool,
    raw: SpjInfo,
}

impl JpegHeader {
    /// Pillow's mode name for this image.
    pub fn mode(&self) -> &'static str {
        match self.components {
            1 => "L",
            3 => "RGB",
            _ => "CMYK",
        }
    }
}

/// Pixels in the file's own layout (`components` bytes per pixel).
#[derive(Debug)]
pub struct JpegPixels {
    pub data: Vec<u8>,
    /// Rows actually decoded; the rest are zero (Pillow leaves them so).
    pub rows_done: usize,
    /// False when the data ended before the image did (even if every row
    /// could still be produced, as libjpeg fills missing data with grey).
    pub complete: bool,
}

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Parses the markers up to the first scan; cheap (no pixel data is touched).
pub fn read_header(data: &[u8]) -> Result<JpegHeader, String> {
    let mut info = SpjInfo::default();
    let mut msg = [0u8; MSG_LEN];
    // SAFETY: pointers are valid for the given lengths for the whole call; the
    // C side never keeps them.
    let rc = unsafe {
        spj_read_header(
            data.as_ptr(),
            data.len(),
            &mut info,
            msg.as_mut_ptr().cast(),
            MSG_LEN,
        )
    };
    if rc != SPJ_OK {
        let text = message(&msg);
        return Err(if text.is_empty() {
            "unreadable JPEG header".to_string()
        } else {
            text
        });
    }
    let components = match info.components {
        1 | 3 | 4 => info.components as usize,
        n => return Err(format!("cannot handle {n}-layer JPEG images")),
    };
    Ok(JpegHeader {
        width: info.width,
        height: info.height,
        components,
        progressive: info.progressive != 0,
        raw: info,
    })
}

/// Baseline images at least this tall per core are decoded in bands.
const MIN_BAND_ROWS: usize = 256;

struct RowsResult {
    rc: c_int,
    rows_done: usize,
    msg: String,
}

/// Decodes rows `first..first + out.len() / stride` into `out`.
fn decode_rows(data: &[u8], header: &JpegHeader, first: usize, out: &mut [u8]) -> RowsResult {
    let stride = header.width as usize * header.components;
    let end = first + out.len() / stride;
    let mut rows_done = 0u32;
    let mut msg = [0u8; MSG_LEN];
    // SAFETY: `out` holds exactly (end - first) rows of `stride` bytes, which
    // the C side checks before writing; the pointers outlive the call.
    let rc = unsafe {
        spj_decode_rows(
            data.as_ptr(),
            data.len(),
            &header.raw,
            first as u32,
            end as u32,
            out.as_mut_ptr(),
            out.len(),
            MAX_PROGRESSIVE_SCANS,
            &mut rows_done,
            msg.as_mut_ptr().cast(),
            MSG_LEN,
        )
    };
    RowsResult {
        rc,
        rows_done: rows_done as usize,
        msg: message(&msg),
    }
}

/// How many horizontal bands to decode in parallel. Progressive files
/// entropy-decode the whole image before the first row, so they stay whole;
/// so does every image inside [`crate::fanout::on_one_core`].
fn band_count(header: &JpegHeader) -> usize {
    if header.progressive || !crate::fanout::may_fan_out() {
        return 1;
    }
    rayon::current_num_threads()
        .min(header.height as usize / MIN_BAND_ROWS)
        .max(1)
}

/// Share of a row's decoding time that skipping it costs (its entropy
/// decoding; no inverse DCT, upsampling or colour conversion). Measured on
/// 12 MP photos, 2 bands: 0.5 gave 39-40 ms a decode, even bands 42-45 ms.
const SKIP_COST: f64 = 0.5;

/// The end row of each of `bands` bands, sized so that every band costs the
/// same: a band also skips every row above it, so later bands are shorter.
/// Band k ends at `c * (1 - (1 - s)^k) / s` rows for a per-band cost `c`.
fn band_edges(height: usize, bands: usize) -> Vec<usize> {
    let s = SKIP_COST;
    let keep = 1.0 - s;
    let cost = height as f64 * s / (1.0 - keep.powi(bands as i32));
    let mut edges: Vec<usize> = (1..bands)
        .map(|k| ((cost * (1.0 - keep.powi(k as i32)) / s).round() as usize).clamp(1, height - 1))
        .collect();
    edges.push(height);
    edges.dedup();
    edges
}

/// Decodes the pixels of a file whose header was read by [`read_header`].
///
/// Like Pillow with `LOAD_TRUNCATED_IMAGES`, a file that ends early or whose
/// entropy data breaks off yields the rows decoded so far (`rows_done`).
/// Baseline images are decoded in bands on several cores (each band skips
/// the rows above it with libjpeg's `jpeg_skip_scanlines`); if any band hits
/// damaged data the whole image is decoded again in one pass, so damaged
/// files give exactly the single-pass (Pillow) result.
pub fn decode(data: &[u8], header: &JpegHeader) -> Result<JpegPixels, String> {
    let stride = header.width as usize * header.components;
    let height = header.height as usize;
    let len = stride
        .checked_mul(height)
        .ok_or_else(|| "JPEG dimensions overflow".to_string())?;
    let mut out = vec![0u8; len];
    let bands = band_count(header);
    if bands > 1 {
        let mut pieces = Vec::with_capacity(bands);
        let mut rest = &mut out[..];
        let mut first = 0;
        for end in band_edges(height, bands) {
            let (band, tail) = rest.split_at_mut((end - first) * stride);
            pieces.push((first, band));
            rest = tail;
            first = end;
        }
        let all_ok = pieces
            .into_par_iter()
            .map(|(first, band)| decode_rows(data, header, first, band).rc == SPJ_OK)
            .collect::<Vec<_>>()
            .into_iter()
            .all(|ok| ok);
        if all_ok {
            return Ok(JpegPixels {
                data: out,
                rows_done: height,
                complete: true,
            });
        }
        out.fill(0);
    }
    let result = decode_rows(data, header, 0, &mut out);
    match result.rc {
        SPJ_OK => Ok(JpegPixels {
            data: out,
            rows_done: height,
            complete: true,
        }),
        SPJ_PARTIAL => {
            let rows_done = result.rows_done.min(height);
            // A row the decoder was writing when it failed may be half done.
            out[rows_done * stride..].fill(0);
            Ok(JpegPixels {
                data: out,
                rows_done,
                complete: false,
            })
        }
        SPJ_ERROR | SPJ_SUSPENDED => Err(if result.msg.is_empty() {
            "corrupt JPEG data".to_string()
        } else {
            result.msg
        }),
        _ => Err("JPEG decoder rejected its arguments".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TALL: &[u8] = include_bytes!("../fuzz/seeds/tall_1100x24_420.jpg");

    /// Bands (each skipping the rows above it) give exactly the one-pass pixels,
    /// wherever the band edges fall relative to the 16-row iMCU rows.
    #[test]
    fn bands_equal_one_pass() {
        let header = read_header(TALL).unwrap();
        assert!(!header.progressive && header.height == 1100);
        let stride = header.width as usize * 3;
        let mut whole = vec![0u8; stride * 1100];
        assert_eq!(decode_rows(TALL, &header, 0, &mut whole).rc, SPJ_OK);
        for first in [1usize, 7, 15, 16, 17, 255, 256, 550, 1093] {
            for end in [first + 1, (first + 300).min(1100), 1100] {
                let mut band = vec![0u8; stride * (end - first)];
                let got = decode_rows(TALL, &header, first, &mut band);
                assert_eq!(got.rc, SPJ_OK, "rows {first}..{end}");
                assert_eq!(
                    &band[..],
                    &whole[first * stride..end * stride],
                    "rows {first}..{end}"
                );
            }
        }
        assert_eq!(decode(TALL, &header).unwrap().data, whole);
        // On one core the same image is one pass, with the same pixels.
        crate::fanout::on_one_core(|| {
            assert_eq!(band_count(&header), 1);
            assert_eq!(decode(TALL, &header).unwrap().data, whole);
        });
        if rayon::current_num_threads() > 1 {
            assert!(band_count(&header) > 1);
        }
    }

    /// Later bands are shorter (each skips the rows above it), every row is
    /// in exactly one band, and the bands cost the same under `SKIP_COST`.
    #[test]
    fn band_edges_balance_the_skipped_rows() {
        for (height, bands) in [(3000usize, 2usize), (3000, 3), (1100, 4), (513, 2), (2, 2)] {
            let edges = band_edges(height, bands);
            assert_eq!(*edges.last().unwrap(), height);
            assert!(edges.windows(2).all(|w| w[0] < w[1]), "{edges:?}");
            let mut first = 0;
            let mut costs = vec![];
            for &end in &edges {
                costs.push(SKIP_COST * first as f64 + (end - first) as f64);
                first = end;
            }
            let (lo, hi) = costs
                .iter()
                .fold((f64::MAX, 0f64), |(lo, hi), &c| (lo.min(c), hi.max(c)));
            assert!(
                height < 16 || hi - lo <= 2.0,
                "{height} rows, {bands} bands: {costs:?}"
            );
        }
        assert_eq!(band_edges(3000, 2), vec![2000, 3000]);
    }

    #[test]
    fn truncated_tall_file_matches_one_pass() {
        let cut = &TALL[..TALL.len() * 2 / 3];
        let header = read_header(cut).unwrap();
        let px = decode(cut, &header).unwrap();
        assert!(!px.complete);
        let mut whole = vec![0u8; px.data.len()];
        assert_eq!(decode_rows(cut, &header, 0, &mut whole).rc, SPJ_PARTIAL);
        assert_eq!(px.data, whole);
    }
}
