"""Bounded mutation fuzzing of the decoder entry point (spacer_core._crop_rs).

Usage (from the repository root, after the extension is built):

    python crop_rs/fuzz/fuzz_decode.py --seconds 60

Seeds are small JPEG/PNG files made with Pillow in every layout the decoder
handles. A worker process mutates them (bit flips, magic values, cuts,
splices, size fields) and feeds each input to `decode_image` and
`crop_patches`. Anything other than a result or one of the typed errors
counts as a failure: a Python exception of another type, a crash (signal)
or a hang. The offending input is written to tests/fixtures/crop_regressions/
(replayed by tests/test_decode_parity.py) and the exit status is 1.

No nightly toolchain or extra package is needed, so CI can run it as is.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "crop_regressions"
MAX_PIXELS = 4_000_000  # keeps mutated size fields from costing big allocations
HANG_SECONDS = 20.0
EXIT_BAD_EXCEPTION = 3


def make_seeds() -> list[bytes]:
    """A few tiny files covering the JPEG and PNG layouts the decoder supports."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (19, 27, 3), dtype=np.uint8))
    seeds = []

    def save(image: Image.Image, fmt: str, **params: object) -> None:
        buf = io.BytesIO()
        image.save(buf, fmt, **params)
        seeds.append(buf.getvalue())

    for sub in (0, 1, 2):
        save(rgb, "JPEG", quality=70, subsampling=sub)
        save(rgb, "JPEG", quality=70, subsampling=sub, progressive=True)
    save(rgb, "JPEG", quality=70, restart_marker_blocks=1)
    # Tall enough to be decoded in parallel bands.
    save(Image.fromarray(rng.integers(0, 256, (600, 8, 3), dtype=np.uint8)), "JPEG", quality=30)
    save(rgb.convert("L"), "JPEG")
    save(rgb.convert("CMYK"), "JPEG")
    for mode in ("RGB", "RGBA", "L", "LA", "P", "I;16", "1"):
        save(rgb.convert(mode) if mode != "I;16" else rgb.convert("L").convert("I;16"), "PNG")
    return seeds


INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF]


def mutate(data: bytes, seeds: list[bytes], rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not buf:
            break
        op = rng.randrange(8)
        at = rng.randrange(len(buf))
        if op == 0:
            buf[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[at] = rng.choice(INTERESTING)
        elif op == 2:
            del buf[rng.randrange(len(buf)) :]
        elif op == 3:
            n = rng.randint(1, 16)
            buf[at:at] = bytes(rng.randrange(256) for _ in range(n))
        elif op == 4:
            del buf[at : at + rng.randint(1, 64)]
        elif op == 5:
            other = rng.choice(seeds)
            cut = rng.randrange(len(other))
            buf = buf[:at] + bytearray(other[cut:])
        elif op == 6:
            # 16/32-bit fields (sizes, lengths) set to extreme values
            width = rng.choice([2, 4])
            value = rng.choice([0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]) & ((1 << (8 * width)) - 1)
            buf[at : at + width] = value.to_bytes(width, "big")
        else:
            n = rng.randint(1, 32)
            buf[at:at] = buf[at : at + n]  # duplicate a run
    return bytes(buf)


def worker(seed: int, current: Path, heartbeat: Path, deadline: float) -> int:
    from spacer_core import _crop_rs

    expected = (_crop_rs.ImageDecodeError, _crop_rs.PatchError)
    rng = random.Random(seed)
    seeds = make_seeds()
    runs = 0
    while time.monotonic() < deadline:
        data = mutate(rng.choice(seeds), seeds, rng)
        current.write_bytes(data)
        try:
            rgb, info, _ = _crop_rs.decode_image(data, MAX_PIXELS)
            assert rgb.shape == (info.height, info.width, 3)
            row, col = rng.randrange(info.height), rng.randrange(info.width)
            _crop_rs.crop_patches(data, [(row, col), (0, 0)], 224, MAX_PIXELS)
        except expected:
            pass
        except Exception as e:  # any other type is a bug in the decoder's error mapping
            print(f"unexpected {type(e).__name__}: {e}", file=sys.stderr)
            return EXIT_BAD_EXCEPTION
        runs += 1
        if runs % 200 == 0:
            heartbeat.write_text(str(runs))
    heartbeat.write_text(str(runs))
    return 0


def keep(data: bytes, out: Path, kind: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    return path


def run(seconds: float, seed: int, out: Path) -> int:
    failures = 0
    total = 0
    end = time.monotonic() + seconds
    with tempfile.TemporaryDirectory() as tmp:
        current = Path(tmp) / "current.bin"
        heartbeat = Path(tmp) / "heartbeat"
        while time.monotonic() < end:
            heartbeat.write_text("0")
            cmd = [sys.executable, __file__, "--worker", "--seed", str(seed), "--seconds", str(end - time.monotonic())]
            cmd += ["--current", str(current), "--heartbeat", str(heartbeat)]
            proc = subprocess.Popen(cmd, cwd=ROOT)
            last_beat, last_change = heartbeat.read_text(), time.monotonic()
            while proc.poll() is None:
                time.sleep(0.5)
                beat = heartbeat.read_text()
                if beat != last_beat:
                    last_beat, last_change = beat, time.monotonic()
                elif time.monotonic() - last_change > HANG_SECONDS:
                    proc.kill()
                    proc.wait()
                    break
            total += int(heartbeat.read_text() or 0)
            if proc.returncode == 0:
                break
            kind = {EXIT_BAD_EXCEPTION: "exception"}.get(proc.returncode, "crash")
            if proc.returncode == -9:
                kind = "hang"
            path = keep(current.read_bytes(), out, kind)
            print(f"{kind} (exit {proc.returncode}): input kept as {path}", file=sys.stderr)
            failures += 1
            seed += 1  # go on from a fresh stream
    print(f"fuzz_decode: ~{total} inputs in {seconds:.0f} s, {failures} failure(s)")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=int(os.environ.get("FUZZ_SEED", "0")))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--current", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--heartbeat", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.seed, args.current, args.heartbeat, time.monotonic() + args.seconds)
    return run(args.seconds, args.seed, args.out)


if __name__ == "__main__":
    sys.exit(main())
