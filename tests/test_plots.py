"""ddpm_jax.plots: the line plots written beside evaluation reports."""

import numpy as np
from PIL import Image

from ddpm_jax import plots


def test_per_t_curve_plot_is_written(tmp_path):
    path = tmp_path / "curve.png"
    plots.save_line_plot(path, np.geomspace(3.0, 1e-4, 50), title="L_t", xlabel="t",
                         ylabel="bits/dim")
    with Image.open(path) as img:
        assert img.size == (720, 420)
        assert len(img.convert("RGB").getcolors(1 << 16)) > 2      # axes, text and the curve
