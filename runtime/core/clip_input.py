"""The CLIP input: pad to square, resize to 336, rescale and normalize, bit-identical to the reference.

`preprocess` is `expand2square`, then transformers' slow `CLIPImageProcessor` configured as
openai/clip-vit-large-patch14-336 (reference notes section 1.4; checked by tests/test_image.py).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from runtime.contract.healthgpt import IMAGE_SIZE

# openai/clip-vit-large-patch14-336 preprocessor_config.json
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESAMPLE = Image.Resampling.BICUBIC  # == 3
RESCALE = 1 / 255
# The reference pads with tuple(int(x*255) for x in image_mean): int() truncates, giving (122, 116, 104).
FILL = tuple(int(x * 255) for x in CLIP_MEAN)
_MEAN32 = np.array(CLIP_MEAN, dtype=np.float32)
_STD32 = np.array(CLIP_STD, dtype=np.float32)


def expand2square(img: Image.Image) -> Image.Image:
    """The reference `expand2square` with its fill colour: pad to max(W, H), original pasted floor-centred."""
    if img.mode != "RGB":  # the reference only ever sees RGB; an RGB fill tuple needs an RGB canvas
        img = img.convert("RGB")
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), FILL)
    result.paste(img, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return result


def preprocess(img: Image.Image) -> np.ndarray:
    """expand2square + CLIPImageProcessor (336): float32 [1, 3, 336, 336], bit-identical to transformers."""
    img = expand2square(img)
    # HF resizes the shortest edge to 336 through PIL on uint8; the image is square, so that is (336, 336) and the
    # 336 centre crop is a no-op. PIL returns an unresampled copy when the size already matches, as in HF.
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), resample=RESAMPLE)
    # HF rescale: upcast to float64, multiply by the Python float 1/255, then downcast to float32.
    x = (np.asarray(img).astype(np.float64) * RESCALE).astype(np.float32)
    # HF normalize: float32 (x - mean) / std, channels last, then transposed to CHW.
    x = (x - _MEAN32) / _STD32
    return np.ascontiguousarray(x.transpose(2, 0, 1))[None]
