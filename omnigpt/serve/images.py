"""Image inputs: `image_url` parts must carry a data URL (`data:image/png;base64,...`) of a PNG, JPEG, GIF or WebP.

The server fetches nothing from the network (it may have none), so http(s) URLs are refused with a message
that says what to send instead. Decoding is bounded before any pixel is decoded: the encoded size
(`ImageLimits.max_bytes`), the pixel count the header declares (`max_pixels`: a 100-byte PNG may claim
100,000 x 100,000 pixels, a decompression bomb) and the images per request (`max_images`). Only the four formats
above are opened (Pillow would also try dozens of others, some through external programs); the image is then
decoded in full, so truncated or corrupt data is refused here, not in the model.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

DATA_URL = re.compile(r"data:(?P<mime>image/[a-zA-Z0-9.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)", re.DOTALL)
FORMATS = ("PNG", "JPEG", "GIF", "WEBP")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10 * 2**20  # encoded bytes of one image
    max_pixels: int = 25_000_000  # width x height of one image (a 24-megapixel photo fits)
    max_images: int = 16  # image parts in one request


class ImageError(ValueError):
    pass


def decode_data_url(url: str, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """A base64 data URL of an image -> the decoded image; ImageError saying what is wrong otherwise."""
    if url.startswith(("http://", "https://")):
        raise ImageError("image URLs are not fetched by this server: send the image inline as a data URL "
                         "(data:image/png;base64,...)")
    m = DATA_URL.fullmatch(url.strip())
    if not m or not m.group("mime"):
        raise ImageError("expected a data URL of an image: data:image/<png|jpeg|gif|webp>;base64,<data>")
    b64 = re.sub(r"\s+", "", m.group("data"))
    if len(b64) * 3 // 4 > limits.max_bytes + 2:  # refuse before decoding the base64 itself
        raise ImageError(f"the image is larger than this server's limit of {limits.max_bytes} bytes")
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"the image's base64 data is invalid ({e})") from e
    return read_image(data, limits)


def read_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Encoded bytes -> the decoded image (first frame of an animation, EXIF orientation applied), within limits."""
    if not data:
        raise ImageError("the image data is empty")
    if len(data) > limits.max_bytes:
        raise ImageError(f"the image is {len(data)} bytes, more than this server's limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit follows
            im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageError(f"the image is too large ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageError("unsupported or unreadable image: send a PNG, JPEG, GIF or WebP") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"the image data is corrupt ({type(e).__name__}: {e})") from e
    width, height = im.size
    if width * height > limits.max_pixels:
        raise ImageError(f"the image is too large: {width}x{height} pixels, more than this server's limit of "
                         f"{limits.max_pixels}")
    if width * height == 0:
        raise ImageError("the image has no pixels")
    try:
        im.load()  # decodes every pixel: truncated and corrupt files fail here
        return ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"the image data is corrupt or truncated ({type(e).__name__}: {e})") from e
