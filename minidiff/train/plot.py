"""A loss curve as a PNG, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def plot_loss(csv_path, png_path, width=640, height=360) -> Path | None:
    """Plot the ``loss`` column of a loss.csv against ``step`` (log-scaled y).
    Returns the PNG path, or None when there is nothing to plot yet."""
    from PIL import Image, ImageDraw

    steps, losses = [], []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            loss = float(row["loss"])
            if np.isfinite(loss) and loss > 0:
                steps.append(int(row["step"]))
                losses.append(loss)
    if not steps:
        return None
    left, right, top, bottom = 70, 20, 20, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    logs = np.log10(losses)
    y0, y1 = float(logs.min()), float(logs.max())
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def to_pixel(step, log_loss):
        px = left + (step - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - (log_loss - y0) / (y1 - y0) * (height - top - bottom)
        return px, py

    points = [to_pixel(s, v) for s, v in zip(steps, logs)]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    else:
        draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill="blue")
    draw.text((5, top), f"{10**y1:.3g}", fill="black")
    draw.text((5, height - bottom - 10), f"{10**y0:.3g}", fill="black")
    draw.text((left, height - bottom + 8), f"step {x0}", fill="black")
    draw.text((width - right - 80, height - bottom + 8), f"step {x1}", fill="black")
    draw.text((width // 2 - 40, height - 18), "training loss (log scale)", fill="black")
    png_path = Path(png_path)
    image.save(png_path)
    return png_path
