"""Editing with a trained model, on the one compiled reverse chain.

    chain.py    the operations: RePaint, SDEdit's start, DDIM inversion, interpolation
    inputs.py   reading the images and masks an edit takes (PNG, grid PNG, uint8 .npz)
    jobs.py     sample.py's editing commands: their flags, checks, batches and outputs
    by_class.py DiffEdit and Blended diffusion (editing a real image towards a class)
    pnp.py      Plug-and-Play feature injection through `models.seams`
    class_jobs.py  sample.py's --diffedit / --blend / --pnp

The chain operations are re-exported here (`editing.repaint`, ...); `jobs` imports absl flags
and is imported by the command line only.
"""

from ddpm_jax.editing.chain import (ddim_encode, q_interpolate, repaint, repaint_moves,
                                    sdedit_start_t, slerp)

__all__ = ["ddim_encode", "q_interpolate", "repaint", "repaint_moves", "sdedit_start_t", "slerp"]
