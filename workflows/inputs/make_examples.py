"""Draws the example input images the img2img and inpainting workflows load (run it to remake them).

example.png: a 512x512 landscape (sky gradient, sun, two hills, a lake); example_masked.png: the same
picture with a transparent ellipse where inpainting repaints (LoadImage's mask is 1 there).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 512
HERE = Path(__file__).resolve().parent


def landscape() -> Image.Image:
    y = np.linspace(0.0, 1.0, SIZE)[:, None, None]
    top, horizon = np.array([40, 90, 170]), np.array([250, 190, 140])
    sky = (top * (1 - y) + horizon * y).repeat(SIZE, axis=1).astype(np.uint8)
    img = Image.fromarray(sky, "RGB")
    draw = ImageDraw.Draw(img)
    draw.ellipse((330, 90, 420, 180), fill=(255, 230, 150))                          # the sun
    draw.polygon([(0, 330), (140, 220), (300, 340), (0, 400)], fill=(70, 110, 80))  # far hill
    draw.polygon([(180, 360), (380, 240), (512, 320), (512, 400), (180, 400)], fill=(50, 90, 60))
    draw.rectangle((0, 390, SIZE, SIZE), fill=(40, 80, 120))                          # the lake
    for i in range(6):                                                                 # reflections
        draw.line((330 + i * 6, 400 + i * 16, 420 - i * 6, 400 + i * 16), fill=(200, 180, 130), width=3)
    return img


def main() -> None:
    img = landscape()
    img.save(HERE / "example.png", optimize=True)
    rgba = img.convert("RGBA")
    alpha = Image.new("L", img.size, 255)
    ImageDraw.Draw(alpha).ellipse((150, 200, 360, 380), fill=0)                      # the area to repaint
    rgba.putalpha(alpha)
    rgba.save(HERE / "example_masked.png", optimize=True)


if __name__ == "__main__":
    main()
