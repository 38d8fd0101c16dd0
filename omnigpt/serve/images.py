"""Image inputs: `image_url` parts must carry a data URL (`data:image/png;base64,...`) of a real image.

The server fetches nothing from the network (it may have none), so http(s) URLs are refused with a message
that says what to send instead.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

DATA_URL = re.compile(r"data:(?P<mime>image/[a-zA-Z0-9.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.DOTALL)
MAX_PIXELS = 64_000_000  # refuse decompression bombs before decoding them


class ImageError(ValueError):
    pass


@dataclass
class DecodedImage:
    mime: str
    width: int
    height: int
    data: bytes


def decode_data_url(url: str) -> DecodedImage:
    """Check that url is a base64 data URL of an image Pillow can read; raise ImageError saying what is wrong."""
    if url.startswith(("http://", "https://")):
        raise ImageError("image URLs are not fetched by this server: send the image inline as a data URL "
                         "(data:image/png;base64,...)")
    m = DATA_URL.fullmatch(url.strip())
    if not m or not m.group("mime"):
        raise ImageError("expected a data URL of an image: data:image/<png|jpeg|gif|webp>;base64,<data>")
    try:
        data = base64.b64decode(re.sub(r"\s+", "", m.group("data")), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"the image's base64 data is invalid ({e})") from e
    if not data:
        raise ImageError("the image's base64 data is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height <= MAX_PIXELS:
                im.verify()  # reads the data through, catching truncated and corrupt files
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"the data URL does not hold a readable image ({type(e).__name__})") from e
    if width * height > MAX_PIXELS:
        raise ImageError(f"the image is too large ({width}x{height} pixels)")
    return DecodedImage(m.group("mime"), width, height, data)
