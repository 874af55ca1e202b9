"""Latent diffusion (Rombach et al. 2022): the DDPM on the latents of a frozen first stage.

A first stage is an ordinary run of `model.kind='autoencoder'` (`models/autoencoder.py`, trained
by the same loop with the train step's "autoencoder" objective; its grids show test images over
their reconstructions, `write_reconstruction_grid`). A latent run names a finished one with
`config.latent.autoencoder`; then

* the model's input is the latent, [image_size / f, image_size / f, c] (`latent_shape`, which
  `config.image_shape` returns for a latent run);
* at start (`setup`) the autoencoder's EMA weights are loaded, checked against the run (image
  size, f, c, finished) and, for a fresh run, LDM's scale factor is measured: 1 / std of the
  latents z ~ q(z | x) of the first training batch, over every element (`latent_scale`). The
  scale and the autoencoder's step are pinned into the run's config, saved with every
  checkpoint, so a resume and every later load use the same ones;
* each training batch is encoded on device before the step (`FirstStage.encode`): x -> scale z
  with z ~ q(z | x) drawn from fold_in(key, step), so a resumed run draws the same latents;
* sampling runs `LatentUNet`, whose parameters are {"unet", "autoencoder"}: the chain runs on
  latents with the UNet, and `decode_latents` (z / scale through the decoder) is applied to the
  chain's last state at the end of the same compiled program (`sampling.ModelApply.decode`).
  Every sampler and guidance runs unchanged; the images come out in pixels. sample.py's edits
  take their input images to scaled latent means (`to_latents`) and their masks to the latent
  grid (`downsample_mask`); the generation jobs (--views, --style_ref) are refused
  (`check_edit`).

Bits/dim is refused on a latent run (`check_metrics`): the chain's likelihood is one of scaled
latents, not of the pixels.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.models.autoencoder import RECONSTRUCTIONS, Autoencoder

Array = jax.Array
PyTree = Any

KIND = "autoencoder"  # config.model.kind of a first-stage run
PIXEL_METRICS = ("bpd", "ode_bpd")  # likelihoods of pixels: refused on a latent run


def is_latent(config: Any) -> bool:
    """Whether `config` is a latent run (config.latent.autoencoder names a first stage)."""
    return "latent" in config and config.latent.autoencoder is not None


def latent_shape(config: Any) -> tuple[int, int, int]:
    """(image_size / f, image_size / f, c): the diffusion model's input on a latent run."""
    side = config.data.image_size // config.latent.factor
    return (side, side, config.latent.channels)


def autoencoder(config: Any, dtype: Any = jnp.float32) -> Autoencoder:
    """The first stage of a `model.kind='autoencoder'` config: model.ch, ch_mult (f = 2^(levels
    - 1)), num_res_blocks, num_groups; latent.channels; data.channels."""
    m = config.model
    return Autoencoder(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                       latent_channels=config.latent.channels,
                       image_channels=config.data.channels, num_groups=m.num_groups, dtype=dtype)


# --------------------------------------------------------------------------- validation

def validate(config: Any) -> None:
    """config.latent's values, and what an autoencoder or a latent run needs of the other
    sections; ValueError with one line naming the field and the fix (`config.validate`)."""
    lat = config.latent

    def fail(field: str, fix: str) -> ValueError:
        return ValueError(f"config.latent.{field}={lat[field]!r}: {fix}.")

    if lat.autoencoder is not None and (not isinstance(lat.autoencoder, str) or not lat.autoencoder):
        raise fail("autoencoder", "use the autoencoder run's work dir, or None for a pixel run")
    for field in ("autoencoder_step", "factor", "channels"):
        value, low = lat[field], 0 if field == "autoencoder_step" else 1
        if not (value is None and field == "autoencoder_step") and (
                not isinstance(value, int) or isinstance(value, bool) or value < low):
            raise fail(field, f"use an integer >= {low}")
    if lat.factor & (lat.factor - 1):
        raise fail("factor", "the autoencoder halves the image per level: use a power of 2")
    if lat.scale is not None and (isinstance(lat.scale, bool) or not isinstance(lat.scale, (int, float))
                                  or not math.isfinite(lat.scale) or lat.scale <= 0):
        raise fail("scale", "use a positive number, or None to measure it at start")
    if isinstance(lat.kl_weight, bool) or not isinstance(lat.kl_weight, (int, float)):
        raise fail("kl_weight", "use a number (LDM: 1e-6)")
    if not 0 <= lat.kl_weight < float("inf"):  # NaN fails this too
        raise fail("kl_weight", "use a finite value in [0.0, inf) (LDM: 1e-6)")
    if lat.reconstruction not in RECONSTRUCTIONS:
        raise fail("reconstruction", f"use one of {RECONSTRUCTIONS}")
    if config.data.image_size % lat.factor:
        raise fail("factor", f"data.image_size={config.data.image_size} must be a multiple of it")
    if config.model.kind == KIND:
        _validate_autoencoder_run(config, fail)
    elif is_latent(config):
        _validate_latent_run(config)


def _validate_autoencoder_run(config: Any, fail: Any) -> None:
    factor = 2 ** (len(config.model.ch_mult) - 1)
    if config.latent.factor != factor:
        raise fail("factor", f"model.ch_mult={tuple(config.model.ch_mult)} halves the image "
                   f"{factor}x: set latent.factor={factor} or change model.ch_mult")
    for field, value, fix in (
            ("latent.autoencoder", config.latent.autoencoder, "an autoencoder trains on pixels"),
            ("model.num_classes", config.model.num_classes, "the autoencoder takes no labels"),
            ("distill.teacher", config.distill.teacher, "distillation trains a denoiser"),
            ("finetune.base", config.finetune.base, "fine-tuning trains a denoiser")):
        if value is not None:
            raise ValueError(f"config.{field}={value!r}: {fix}; set it to None for "
                             "model.kind='autoencoder'.")
    if config.eval.every_steps:
        raise ValueError(f"config.eval.every_steps={config.eval.every_steps}: an autoencoder "
                         "draws no samples to score; set it to 0 (bench/latent_digits.py scores "
                         "its reconstructions).")


def _validate_latent_run(config: Any) -> None:
    if config.sampling.clip_denoised:
        raise ValueError("config.sampling.clip_denoised=True: latents are not bounded to "
                         "[-1, 1], so clipping x0 would distort them; set it to False on a latent "
                         "run.")
    for field, value in (("distill.teacher", config.distill.teacher),
                         ("finetune.base", config.finetune.base)):
        if value is not None:
            raise ValueError(f"config.{field}={value!r}: a latent run does not "
                             f"{field.split('.')[0]}; set config.latent.autoencoder=None or "
                             f"config.{field}=None.")
    if config.eval.every_steps:
        check_metrics(config, [m.strip() for m in config.eval.metrics.split(",")],
                      flag="config.eval.metrics")


def check_metrics(config: Any, metrics: Sequence[str], flag: str = "--metrics") -> None:
    """ValueError (one line) when a latent run is asked for bits/dim."""
    asked = [m for m in metrics if m in PIXEL_METRICS]
    if is_latent(config) and asked:
        raise ValueError(f"{flag}: {','.join(asked)} is refused on a latent run: its chain's "
                         "likelihood is that of the autoencoder's scaled latents, not of the "
                         "pixels, so bits/dim would not be comparable; use fid/is/kid.")


# --------------------------------------------------------------------------- the model

class LatentUNet(nn.Module):
    """The denoiser of a latent run with its first stage: parameters {"unet", "autoencoder"}.

    __call__(z_t [B, h, w, c], t [B], y) is the UNet's on latents; `decode_latents` maps the
    chain's final latents (scaled) to images [B, H, W, C] in [-1, 1]; `encode_images` maps
    images to scaled latent means."""

    unet: nn.Module
    autoencoder: Autoencoder
    scale: float

    @property
    def num_classes(self) -> int | None:
        return self.unet.num_classes

    def __call__(self, x: Array, t: Array, y: Array | None = None, train: bool = False) -> Array:
        return self.unet(x, t, y, train=train)

    def decode_latents(self, z: Array) -> Array:
        """z: [B, h, w, c] scaled latents -> images [B, h f, w f, C] clipped to [-1, 1]."""
        return jnp.clip(self.autoencoder.decode(z / self.scale), -1.0, 1.0)

    def encode_images(self, x: Array) -> Array:
        """x: [B, H, W, C] in [-1, 1] -> the scaled latent means [B, H/f, W/f, c]."""
        return self.autoencoder.encode(x)[0] * self.scale


def latent_scale(latents: Array | np.ndarray) -> float:
    """LDM's scale factor: 1 / std of `latents` over all their elements (float64)."""
    std = float(np.std(np.asarray(latents, np.float64)))
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"The latents' standard deviation is {std}: the autoencoder is broken "
                         "(retrain it), or set config.latent.scale by hand.")
    return 1.0 / std


def encode_latents(model: Autoencoder, params: PyTree, images: Array, key: Array,
                   scale: float | Array) -> Array:
    """scale * z with z ~ q(z | images): images [B, H, W, C] in [-1, 1] -> [B, H/f, W/f, c]."""
    mean, log_variance = model.apply({"params": params}, images, method="encode")
    z = mean + jnp.exp(0.5 * log_variance) * jax.random.normal(key, mean.shape, mean.dtype)
    return z * scale


def reconstruct(model: Autoencoder, params: PyTree, images: Array) -> Array:
    """The decoded encoder means, clipped to [-1, 1]: [B, H, W, C] -> [B, H, W, C]."""
    mean, _ = model.apply({"params": params}, images, method="encode")
    return jnp.clip(model.apply({"params": params}, mean, method="decode"), -1.0, 1.0)


def downsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """A pixel mask [N, H, W, 1] (True / nonzero = known) on the latent grid [N, H/f, W/f, 1]:
    a latent position is known only when every pixel of its f x f block is (the decoder's
    receptive field reaches beyond the block, so a partly known block is regenerated)."""
    n, h, w, c = mask.shape
    blocks = np.asarray(mask, bool).reshape(n, h // factor, factor, w // factor, factor, c)
    return blocks.all(axis=(2, 4))


# sample.py's jobs that run on a latent run: their input images are encoded to scaled latent
# means (`to_latents`), their masks taken to the latent grid (`downsample_mask`), and the chain's
# end decoded. The generation jobs are refused (`NOT_ON_LATENTS` says why).
LATENT_EDITS = ("sample", "progressive", "sdedit", "inpaint", "encode", "interpolate",
                "diffedit", "blend", "pnp")
NOT_ON_LATENTS = {
    "views": "a view of the latents (a flip, a rotation, a transpose) is not that view of the "
             "decoded image, since the decoder is not equivariant to it",
    "style": "StyleAligned's shared attention is implemented for pixel runs only",
}


def check_edit(model: Any, mode: str) -> None:
    """ValueError (one line) for a sample.py job `mode` that does not run on a latent run
    (model: the run's network, a LatentUNet on a latent run; None or another: a pixel run)."""
    if not isinstance(model, LatentUNet) or mode in LATENT_EDITS:
        return
    flag = "--style_ref" if mode == "style" else f"--{mode}"
    why = NOT_ON_LATENTS.get(mode, "it has no latent form")
    raise ValueError(f"{flag} is not available on a latent run: {why}; use a pixel run.")


def upsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """A latent-grid mask [N, h, w, 1] shown on the pixels [N, h f, w f, 1]: each position
    covers its f x f block (what the grids and the .npz of a latent run's edits hold)."""
    return np.repeat(np.repeat(np.asarray(mask), factor, axis=1), factor, axis=2)


@functools.partial(jax.jit, static_argnums=0)
def to_latents(model: LatentUNet, params: PyTree, images: Array) -> Array:
    """uint8 images [B, H, W, C] -> the scaled latent means [B, H/f, W/f, c] (edit inputs)."""
    x = (images.astype(jnp.float32) - 127.5) / 127.5
    return model.apply({"params": params}, x, method="encode_images")


@functools.partial(jax.jit, static_argnums=0)
def to_images(model: LatentUNet, params: PyTree, z: Array) -> Array:
    """Scaled latents [B, h, w, c] -> images [B, H, W, C] in [-1, 1] (a chain outside
    `sampling`, such as RePaint's, ends on latents)."""
    return model.apply({"params": params}, z, method="decode_latents")


# --------------------------------------------------------------------------- runs

@dataclasses.dataclass(frozen=True)
class FirstStage:
    """A latent run's frozen autoencoder: its network, EMA params, the step loaded and the
    scale; `encode(batch, step)` is the on-device batch transform of the training loop."""

    model: Autoencoder
    params: PyTree
    step: int
    scale: float
    seed: int

    def encode(self, batch: dict[str, Array], step: int) -> dict[str, Array]:
        """batch with "image" replaced by scale z, z ~ q(z | x) from fold_in(key(seed), step)."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), step)
        return dict(batch, image=_encode_jit(self.model, self.params, batch["image"], key,
                                             jnp.float32(self.scale)))

    def unet_and_decoder(self, unet: nn.Module) -> LatentUNet:
        return LatentUNet(unet=unet, autoencoder=self.model, scale=self.scale)

    def join(self, unet_params: PyTree) -> PyTree:
        return {"unet": unet_params, "autoencoder": self.params}


@functools.partial(jax.jit, static_argnums=0)
def _encode_jit(model: Autoencoder, params: PyTree, images: Array, key: Array, scale: Array) -> Array:
    return encode_latents(model, params, images, key, scale)


def load_autoencoder(config: Any, *, step: int | None, sharding: Any = None
                     ) -> tuple[int, Autoencoder, PyTree]:
    """(step, network, EMA params) of the autoencoder run config.latent.autoencoder, checked
    against the latent run `config`; ValueError with one line naming the field otherwise (no
    run, not an autoencoder, not finished, another image size or latent shape)."""
    from ddpm_jax import checkpoint, runs

    path = config.latent.autoencoder
    where = f"config.latent.autoencoder={path}"
    train = ("train one with train.py --config configs/digits.py:autoencoder (autoencoder16 for "
             "16px)")
    if not os.path.isdir(path):
        raise ValueError(f"{where} does not exist: {train}.")
    try:
        chosen, ae_config, model, params = runs.load_step_for_sampling(path, "ema", step=step,
                                                                       sharding=sharding)
    except (FileNotFoundError, checkpoint.CheckpointError) as e:
        raise ValueError(f"{where}: {' '.join(str(e).split())}") from None
    if ae_config.model.kind != KIND:
        raise ValueError(f"{where} is a model.kind={ae_config.model.kind!r} run, not an "
                         f"autoencoder: {train}.")
    if step is None and chosen < ae_config.training.num_steps:
        raise ValueError(f"{where} is not a finished run (its newest checkpoint is step {chosen} "
                         f"of {ae_config.training.num_steps}): let it finish, or pin a step with "
                         "--config.latent.autoencoder_step.")
    diffs = (runs.field_differences(ae_config, config, "data",
                                    ("dataset", "image_size", "channels"), "autoencoder")
             + runs.field_differences(ae_config, config, "latent", ("factor", "channels"),
                                      "autoencoder"))
    if diffs:
        raise ValueError(f"{where} was trained for other images or latents than this run "
                         f"({'; '.join(diffs)}): name an autoencoder of this run's data, or "
                         "set this run's data and latent fields to the autoencoder's.")
    return chosen, model, params


def setup(config: Any, saved: dict[str, Any] | None, first_batch: Any, mesh: Any
          ) -> tuple[Any, FirstStage]:
    """A latent run's start: (config with latent.autoencoder_step and latent.scale pinned, its
    FirstStage). saved: the config of the checkpoint resumed from (its pinned values are
    kept), or None for a fresh run; first_batch() -> the first training batch (read only when
    the scale is measured)."""
    from ddpm_jax import parallel

    config = copy.deepcopy(config)
    if saved is not None:
        with config.unlocked():
            for field in ("autoencoder_step", "scale"):
                if config.latent[field] is None:
                    config.latent[field] = saved.get("latent", {}).get(field)
    step, model, params = load_autoencoder(config, step=config.latent.autoencoder_step,
                                           sharding=parallel.replicated(mesh))
    scale = config.latent.scale
    if scale is None:
        z = _encode_jit(model, params, first_batch()["image"],  # the training transform's program
                        jax.random.PRNGKey(config.training.seed), jnp.float32(1.0))
        scale = latent_scale(jax.device_get(z))
    with config.unlocked():
        config.latent.autoencoder_step, config.latent.scale = step, float(scale)
    return config, FirstStage(model, params, step, float(scale), config.training.seed)


def start(config: Any, manager: Any, last_checkpoint: int | None, iterator: Any, mesh: Any
          ) -> tuple[Any, FirstStage]:
    """The training loop's hook: `setup` with the resumed checkpoint's config and the first
    batch of `iterator` (read, then the iterator set back). A refusal closes `manager` and
    raises config.ConfigError (one line)."""
    from ddpm_jax import checkpoint
    from ddpm_jax.config import ConfigError

    def first_batch() -> Any:
        state = iterator.get_state()
        batch = next(iterator)
        iterator.set_state(state)
        return batch

    try:
        saved = None if last_checkpoint is None else checkpoint.restore_config(manager,
                                                                              last_checkpoint)
        return setup(config, saved, first_batch, mesh)
    except ValueError as e:
        manager.close()
        raise ConfigError(str(e)) from None


def with_first_stage(config: Any, unet: nn.Module, params: PyTree, sharding: Any = None
                     ) -> tuple[LatentUNet, PyTree]:
    """A loaded latent run's (LatentUNet, {"unet", "autoencoder"} params): the autoencoder of
    its stored config (its pinned step and scale)."""
    step, model, ae_params = load_autoencoder(config, step=config.latent.autoencoder_step,
                                              sharding=sharding)
    stage = FirstStage(model, ae_params, step, float(config.latent.scale), config.training.seed)
    return stage.unet_and_decoder(unet), stage.join(params)


def write_reconstruction_grid(config: Any, model: Autoencoder, params: PyTree, path: str) -> None:
    """An autoencoder run's grid: the first training.num_sample_images test images, each row
    of originals over the row of their reconstructions (decoded encoder means)."""
    from ddpm_jax import data, images

    count = config.training.num_sample_images
    if count <= 0:
        return
    d = config.data
    pixels = data.load_split_uint8(d.dataset, "test", d.data_dir, image_size=d.image_size,
                                   channels=d.channels, max_examples=count)
    rebuilt = images.to_uint8(np.asarray(jax.jit(reconstruct, static_argnums=0)(
            model, params, images.to_model_range(pixels))))
    nrow = max(1, math.isqrt(count))
    rows = [part[i:i + nrow] for i in range(0, len(pixels), nrow) for part in (pixels, rebuilt)]
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        grid = np.concatenate([np.pad(r, ((0, nrow - len(r)), (0, 0), (0, 0), (0, 0)))
                               for r in rows])
        images.save_image_grid(grid, path, nrow=nrow, tile_px=config.training.grid_tile_px)
