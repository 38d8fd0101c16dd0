"""Real image-caption pairs from installed Debian packages (both optional: empty lists when absent).

- `fonts-noto-color-emoji`: every emoji glyph of Noto Color Emoji rendered with Pillow, captioned with its Unicode
  name (`unicodedata.name`, lower-cased: "grinning face").
- `openclipart-png`: clip-art PNGs, captioned with the title in the file name and the category folders
  ("armadillo architetto fra, animals"; the Debian file names carry the author's name truncated, kept as is).

Install them with `apt-get install -y fonts-noto-color-emoji openclipart-png`.
"""

from __future__ import annotations

import functools
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFont

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_PX = 109  # the one bitmap size Noto Color Emoji (CBDT) has
OPENCLIPART_DIR = "/usr/share/openclipart/png"
EMOJI_RANGES = [(0x2600, 0x27C0), (0x1F300, 0x1FB00)]  # scanned when fontTools is not installed


@dataclass(frozen=True)
class ImageCaption:
    source: str  # "emoji" | "openclipart"
    key: str  # the character or the file path
    caption: str


def emoji_available(font_path: str = EMOJI_FONT) -> bool:
    return os.path.isfile(font_path)


@functools.lru_cache(maxsize=2)
def _emoji_font(font_path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_path, EMOJI_PX)


def _font_codepoints(font_path: str) -> list[int]:
    try:
        from fontTools.ttLib import TTFont

        return sorted(TTFont(font_path, lazy=True).getBestCmap())
    except ImportError:  # no fontTools: keep code points that draw something
        font = _emoji_font(font_path)
        return [c for lo, hi in EMOJI_RANGES for c in range(lo, hi) if (b := font.getbbox(chr(c))) and b[3] > b[1]]


def emoji_pairs(font_path: str = EMOJI_FONT) -> list[ImageCaption]:
    """One pair per single-code-point emoji that has a Unicode name and is a symbol (category So)."""
    if not emoji_available(font_path):
        return []
    out = []
    for c in _font_codepoints(font_path):
        ch = chr(c)
        name = unicodedata.name(ch, "")
        if name and unicodedata.category(ch) == "So":
            out.append(ImageCaption("emoji", ch, name.lower()))
    return out


def render_emoji(ch: str, size: int = 128, font_path: str = EMOJI_FONT, background=(255, 255, 255)) -> Image.Image:
    """The glyph centred on a square canvas, resized to size x size."""
    font = _emoji_font(font_path)
    canvas = Image.new("RGB", (EMOJI_PX + 40, EMOJI_PX + 40), background)
    ImageDraw.Draw(canvas).text((canvas.width // 2, canvas.height // 2), ch, font=font, embedded_color=True, anchor="mm")
    return _square(canvas.crop(_content_box(canvas, background)), size, background)


def _content_box(im: Image.Image, background) -> tuple[int, int, int, int]:
    diff = ImageChops.difference(im, Image.new(im.mode, im.size, background))
    return diff.getbbox() or (0, 0, im.width, im.height)


def _square(im: Image.Image, size: int, background) -> Image.Image:
    """Fit inside size x size keeping the aspect ratio, padded with the background."""
    scale = size / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    out = Image.new("RGB", (size, size), background)
    out.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return out


def clipart_title(path: Path, root: Path) -> str:
    stem = re.sub(r"_(\d\d)?$", "", path.stem)  # "armadillo_architetto_fra_01" -> "armadillo_architetto_fra"
    title = re.sub(r"[_\-]+", " ", stem).strip()
    category = ", ".join(p.replace("_", " ") for p in path.parent.relative_to(root).parts)
    return f"{title}, {category}" if category else title


def openclipart_pairs(root: str = OPENCLIPART_DIR) -> list[ImageCaption]:
    root_p = Path(root)
    if not root_p.is_dir():
        return []
    return [ImageCaption("openclipart", str(p), clipart_title(p, root_p)) for p in sorted(root_p.rglob("*.png"))]


def load_clipart(path: str, size: int = 128, background=(255, 255, 255), max_pixels: int = 40_000_000) -> Image.Image:
    """A clip-art PNG flattened onto the background and fitted to size x size."""
    with Image.open(path) as im:
        if im.width * im.height > max_pixels:
            raise ValueError(f"{path}: {im.width}x{im.height} is over {max_pixels} pixels")
        im = im.convert("RGBA")
        flat = Image.new("RGBA", im.size, background + (255,))
        flat.alpha_composite(im)
        return _square(flat.convert("RGB"), size, background)


def image_caption_pairs(sources: tuple[str, ...] = ("emoji", "openclipart")) -> list[ImageCaption]:
    return (emoji_pairs() if "emoji" in sources else []) + (openclipart_pairs() if "openclipart" in sources else [])


def load_pair_image(pair: ImageCaption, size: int = 128) -> Image.Image:
    return render_emoji(pair.key, size) if pair.source == "emoji" else load_clipart(pair.key, size)
