"""Bounded host memory in model actors (issue 8 item 3).

A batch of 24 twelve-megapixel JPEGs (4000x3000) goes through the clip operator in a child
process that reports its peak RSS (``resource.getrusage``) before and after the call. Decoded at
full size they would need 24 x 36 MB = 864 MB of RGB; the draft decode and the in-flight byte
budget keep the growth a small fraction of that. The draft path must still give the same pixels
as a full decode + resize (colours, EXIF orientation) within resampling noise.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from operators.image.pixels import decode_rgb
from tests.helpers import suite_temp_env

REPO = Path(__file__).resolve().parents[2]
PHOTO = (4000, 3000)
PHOTOS = 24
FULL_DECODE_MB = PHOTOS * PHOTO[0] * PHOTO[1] * 3 / 2**20

CHILD = r"""
import json, resource, sys
import pyarrow as pa
from ground.schema import IMAGE_TYPE
from operators.models.clip import ClipConfig, ClipEmbedder
blob = open(sys.argv[2], "rb").read()
op = ClipEmbedder(ClipConfig(model=sys.argv[1], max_inflight_pixels_mb=int(sys.argv[3]),
                             resources={"num_cpus": 2, "batch_size": 256}))
n = int(sys.argv[4])
batch = pa.table({"key": [f"k{i}" for i in range(n)],
                  "image": pa.array([{"bytes": blob, "path": None}] * n, type=IMAGE_TYPE),
                  "text": ["a photo"] * n, "reject_reason": pa.array([None] * n, type=pa.string())})
op(batch.slice(0, 1))  # warm-up: allocator, kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = op(batch)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_mb": before / 1024, "after_mb": after / 1024, "embedded": n - out["clip_image_embedding"].null_count,
                  "peak_inflight_mb": op.prefetcher.peak_inflight_bytes / 2**20}))
"""


def photo_jpeg(size=PHOTO, orientation: int | None = None) -> bytes:
    """A smooth photo-like JPEG (gradients + a few shapes); optional EXIF orientation tag."""
    rng = np.random.default_rng(3)
    small = (rng.random((size[1] // 100, size[0] // 100, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(small).resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    kw = {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    img.save(buf, format="JPEG", quality=85, **kw)
    return buf.getvalue()


def test_a_batch_of_twelve_megapixel_photos_stays_far_below_a_full_decode(tmp_path, tiny_models):
    model = tiny_models["clip"]
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(photo_jpeg())
    # A bare environment, but for where the child's temporary files go (the suite's folders):
    # importing transformers makes torch's cache folder, /tmp/torchinductor_USER otherwise.
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", **suite_temp_env()}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(photo), "64", str(PHOTOS)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = rec["after_mb"] - rec["before_mb"]
    print(f"\npeak RSS {rec['before_mb']:.0f} MB before, {rec['after_mb']:.0f} MB after {PHOTOS} photos of "
          f"{PHOTO[0]}x{PHOTO[1]} (full decode would hold {FULL_DECODE_MB:.0f} MB); "
          f"in-flight budget peak {rec['peak_inflight_mb']:.1f} MB")
    assert rec["embedded"] == PHOTOS
    assert growth < FULL_DECODE_MB / 4
    assert rec["peak_inflight_mb"] <= 64 + 1


@pytest.mark.parametrize("orientation", [None, 6])
def test_draft_decode_matches_a_full_decode_and_resize(orientation):
    data = photo_jpeg((2000, 1500), orientation)
    target = {"shortest_edge": 224}
    drafted = decode_rgb(data, target)
    full = decode_rgb(data)
    # the draft image is smaller but still at least twice the processor's side, and upright
    assert min(drafted.size) >= 2 * 224 and min(drafted.size) < min(full.size)
    assert (drafted.size[0] > drafted.size[1]) == (full.size[0] > full.size[1])
    side = (300, 225) if full.size[0] > full.size[1] else (225, 300)
    a = np.asarray(drafted.resize(side, Image.BICUBIC), dtype=np.float32)
    b = np.asarray(full.resize(side, Image.BICUBIC), dtype=np.float32)
    assert np.abs(a - b).mean() < 3.0  # of 255: DCT scaling vs full decode + resample
    assert np.allclose(a.mean(axis=(0, 1)), b.mean(axis=(0, 1)), atol=1.5)  # same colours


def test_plain_recipe_gives_the_processor_pixels():
    import torch

    from jobs.tiny_models import image_processor_class
    from operators.models.clip import PlainRecipe

    processor = image_processor_class("CLIPImageProcessor")()
    recipe = PlainRecipe.of(processor)
    assert recipe is not None
    img = decode_rgb(photo_jpeg((640, 480)))
    ref = processor(images=[img], return_tensors="np")["pixel_values"][0]
    mine = recipe.normalize(torch.from_numpy(recipe.pixels(img)[None]), torch.float32)[0].numpy()
    assert mine.shape == ref.shape and np.abs(mine - ref).max() < 1e-3
