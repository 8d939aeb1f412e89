"""A scene's picture: shapes drawn supersampled and box-filtered down, the word in a
built-in font; the same scene always gives the same bytes."""

from __future__ import annotations

import functools
import io

from PIL import Image, ImageDraw, ImageFont

from companion.world.scenes import (COLORS, DEFAULT_BACKGROUND, REGIONS, SUPERSAMPLE, TEXT_COLOR,
                                    Scene)


@functools.lru_cache(maxsize=16)
def _font(pixels: int):
    try:
        return ImageFont.load_default(size=pixels)  # Pillow ≥ 10.1 with FreeType: scalable
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()  # the fixed bitmap font


def render_scene(scene: Scene, image_size: int = 64, background=None):
    """Draw ``scene`` as an RGB ``PIL.Image`` of ``image_size`` × ``image_size`` pixels.

    Shapes are filled; the word is black, centred in its cell. Drawing happens at 4× the
    size and is reduced with a box filter, so edges are smooth and bytes deterministic.
    """
    if image_size < 8:
        raise ValueError(f"image_size={image_size} is too small to draw a scene")
    canvas = image_size * SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), tuple(background or DEFAULT_BACKGROUND))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = (v * canvas for v in obj.bbox)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
        else:  # diamond
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    if scene.word:
        row, column = divmod(REGIONS.index(scene.word_region), 3)
        cell = canvas / 3
        font = _font(max(8, round(cell * 0.40)))
        draw.text(((column + 0.5) * cell, (row + 0.5) * cell), scene.word, fill=TEXT_COLOR,
                  font=font, anchor="mm", stroke_width=max(1, SUPERSAMPLE // 3),
                  stroke_fill=TEXT_COLOR)
    return image.reduce(SUPERSAMPLE)


def scene_png_bytes(scene: Scene, image_size: int = 64, background=None) -> bytes:
    """The scene's PNG file: no metadata, no timestamp, so the bytes depend on the scene only."""
    buffer = io.BytesIO()
    render_scene(scene, image_size, background).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
