//! Any bytes into the decoder and the crop: a result of the declared size or
//! an error, never a panic, a crash or an out-of-bounds access.
#![no_main]

use crop_rs::{decode, pipeline};
use libfuzzer_sys::fuzz_target;

/// Keeps size fields from turning into multi-gigabyte allocations.
const MAX_PIXELS: u64 = 1 << 22;

fuzz_target!(|data: &[u8]| {
    let Ok(img) = decode::decode_rgb(data, Some(MAX_PIXELS)) else {
        return;
    };
    assert_eq!(img.data.len(), img.width() * img.height() * 3);
    let corner = ((img.height() - 1) as i64, (img.width() - 1) as i64);
    let patches = pipeline::patches_hwc(data, &[(0, 0), corner], 16, Some(MAX_PIXELS))
        .expect("an image that decodes can be cropped at its corners");
    assert_eq!(patches.len(), 2 * 16 * 16 * 3);
});
