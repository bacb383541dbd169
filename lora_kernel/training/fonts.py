"""The font for captions drawn into images (contact sheets, sample grids): one that covers
Chinese, Japanese and Korean as well as Latin text, from Debian's packages (installed by
``make setup``: ``fonts-droid-fallback``), never fetched. Without one, PIL's built-in bitmap
font is used, which draws only Latin-1 (CJK captions would come out as boxes).

Runs as: whoever runs the training library (the user: their kernel, ``lora`` commands).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from PIL import ImageFont

#: Debian's CJK-capable fonts, in order of preference (the first one present is used).
CJK_FONT_FILES = (
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",   # fonts-droid-fallback
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",      # fonts-noto-cjk
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",                # fonts-wqy-zenhei
)


def cjk_font_file() -> Path | None:
    """The first installed file of :data:`CJK_FONT_FILES`, or None."""
    return next((Path(p) for p in CJK_FONT_FILES if Path(p).is_file()), None)


@lru_cache(maxsize=8)
def caption_font(size: int = 11) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A font of ``size`` pixels for captions: the CJK-capable one when installed, else
    PIL's bitmap font (Latin-1 only)."""
    path = cjk_font_file()
    if path is not None:
        return ImageFont.truetype(str(path), size)
    return ImageFont.load_default()
