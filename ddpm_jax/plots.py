"""A line plot drawn with PIL alone (matplotlib is not a dependency): the per-t bits/dim
curve of the variational bound."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_WIDTH, _HEIGHT = 720, 420
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 36, 50


def save_line_plot(path: str | os.PathLike, y: np.ndarray, *, title: str, xlabel: str,
                   ylabel: str, log_y: bool = True) -> None:
    """Writes a PNG plot of y [N] against its index 0..N-1. With log_y, non-positive values
    are left out and the axis spans whole decades."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    x = np.arange(len(y))
    keep = np.isfinite(y) & ((y > 0) if log_y else True)
    if not keep.any():
        raise ValueError(f"Nothing to plot in {path}: no finite{' positive' if log_y else ''} "
                         "values.")
    values = np.log10(y[keep]) if log_y else y[keep]
    lo, hi = float(values.min()), float(values.max())
    if log_y:
        lo, hi = math.floor(lo), max(math.ceil(hi), math.floor(lo) + 1)
    elif hi == lo:
        lo, hi = lo - 1.0, hi + 1.0
    img = Image.new("RGB", (_WIDTH, _HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, x1, y0, y1 = _LEFT, _WIDTH - _RIGHT, _HEIGHT - _BOTTOM, _TOP
    span_x = max(len(y) - 1, 1)

    def px(i: float, v: float) -> tuple[float, float]:
        return (x0 + (x1 - x0) * i / span_x, y0 + (y1 - y0) * (v - lo) / (hi - lo))

    ticks = range(int(lo), int(hi) + 1) if log_y else np.linspace(lo, hi, 5)
    for v in ticks:
        _, yy = px(0, v)
        draw.line([x0, yy, x1, yy], fill=(225, 225, 225))
        draw.text((4, yy - 6), f"1e{int(v)}" if log_y else f"{v:.3g}", fill="black", font=font)
    for i in np.linspace(0, span_x, 5):
        xx, _ = px(i, lo)
        draw.text((xx - 10, y0 + 6), str(round(i)), fill="black", font=font)
    draw.rectangle([x0, y1, x1, y0], outline="black")
    draw.line([px(i, v) for i, v in zip(x[keep], values)], fill=(31, 119, 180), width=2)
    draw.text((x0, 10), title, fill="black", font=font)
    draw.text(((x0 + x1) // 2 - 20, _HEIGHT - 20), xlabel, fill="black", font=font)
    draw.text((4, 10), ylabel, fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


def save_matrix_plot(path: str | os.PathLike, matrix: np.ndarray, *, title: str,
                     xlabel: str = "predicted", ylabel: str = "true", cell_px: int = 40) -> None:
    """Writes a PNG of a [K, K] count matrix (a confusion matrix): each cell shaded by its share
    of its row and labelled with its count; rows and columns numbered 0..K-1."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"Nothing to plot in {path}: a square matrix is needed, got "
                         f"{matrix.shape}.")
    k = matrix.shape[0]
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    left, top = 40, 40
    img = Image.new("RGB", (left + k * cell_px + 10, top + k * cell_px + 30), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for i in range(k):
        middle = i * cell_px + cell_px // 2
        draw.text((left - 16, top + middle - 6), str(i), fill="black", font=font)
        draw.text((left + middle - 3, top - 14), str(i), fill="black", font=font)
        for j in range(k):
            shade = int(255 * (1 - share[i, j]))
            x, y = left + j * cell_px, top + i * cell_px
            draw.rectangle([x, y, x + cell_px, y + cell_px], fill=(shade, shade, 255),
                           outline=(200, 200, 200))
            draw.text((x + 4, y + cell_px // 2 - 6), str(int(matrix[i, j])),
                      fill="white" if shade < 128 else "black", font=font)
    draw.text((4, 4), title, fill="black", font=font)
    draw.text((left, top + k * cell_px + 8), f"columns: {xlabel}; rows: {ylabel}", fill="black",
              font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
