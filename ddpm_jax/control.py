"""Control images (docs/control.md): ControlNet on a frozen run, and image conditioning by
concatenation (SR3 super-resolution), trained by the same loop and step and sampled by the
same compiled chain.

* Transforms (`make_control`): the control / condition image of a training image, [B, H, W, C]
  in [-1, 1] -> [B, H, W, C_c] in [-1, 1]: "lowres" (the mean of each k x k block, repeated
  back to k x k: the 1/k-size image at full size), "edges" (Sobel gradient magnitude, a fixed
  filter), "mask" (the top half of the image and the mask itself, 2 C_c = C + 1 channels);
  or "data": given with the data (`load_data_controls`: row n of config.control.data_file is
  the control of example n of the train split, read by the input pipeline beside its image).
* The train step's objective (`StepSpec`, `train_denoise_fn`): the control image is computed
  from the batch inside the step; a ControlNet runs the frozen base plus the trainable branch
  (`models.controlnet`), a concatenation model reads [x_t, condition] with the condition
  dropped to zeros (the null condition) with probability condition_dropout.
* The chain's per-row data (`ControlApply`, `rows`): each row's control image, control scale
  and condition-guidance weight ride through the scan like labels, in one dict; every sampler,
  classifier-free guidance, classifier guidance and SDEdit see them unchanged.
* The run (`resolve`, `create_state`, `load_merged`): a ControlNet run loads its base
  (`runs.load_base_run`), keeps it frozen outside the state and checkpoints only the branch.
"""

from __future__ import annotations

import dataclasses
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import adapters
from ddpm_jax.models import controlnet
from ddpm_jax.models.unet import UNet
from ddpm_jax.parallel import constrain

Array = jax.Array
PyTree = Any

KINDS = ("lowres", "edges", "mask", "data")
SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], np.float32)
SOBEL_MAX = 8.0  # |Sobel response| of a full -1 -> 1 step: edges map [0, SOBEL_MAX] to [-1, 1]
CONTROL_TRANSFORM = adapters.Transform("control")  # the base frozen, the branch trains


# ------------------------------------------------------------------------------ transforms

def downsample(x: Array, factor: int) -> Array:
    """The mean of each factor x factor block: [B, H, W, C] -> [B, H/f, W/f, C]."""
    b, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"control.factor={factor} does not divide the {h}x{w} images.")
    return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def upsample(x: Array, factor: int) -> Array:
    """Nearest-neighbour: [B, h, w, C] -> [B, h f, w f, C]."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def edges(x: Array) -> Array:
    """Sobel gradient magnitude per channel (edge padding), mapped [0, 8] -> [-1, 1]:
    [B, H, W, C] -> [B, H, W, C]."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1:3]

    def filtered(kernel: np.ndarray) -> Array:
        return sum(float(kernel[i, j]) * padded[:, i:i + h, j:j + w] for i in range(3)
                   for j in range(3) if kernel[i, j])
    magnitude = jnp.hypot(filtered(SOBEL_X), filtered(SOBEL_X.T))
    return 2.0 * jnp.clip(magnitude / SOBEL_MAX, 0.0, 1.0) - 1.0


def top_half_mask(height: int, width: int) -> np.ndarray:
    """[1, H, W, 1] float32: 1 on the top half's rows (the known pixels of kind "mask")."""
    return np.broadcast_to((np.arange(height) < height // 2)[None, :, None, None],
                           (1, height, width, 1)).astype(np.float32)


def control_channels(kind: str, channels: int, given: int | None = None) -> int:
    """C_c of a kind's control image for images of `channels` channels (kind "data": `given`,
    config.control.channels, or `channels` when None)."""
    if kind == "data":
        return channels if given is None else int(given)
    return channels + 1 if kind == "mask" else channels


def channels_of(config: Any) -> int:
    """C_c of a config's control images."""
    c = config.control
    return control_channels(c.kind, config.data.channels, c.get("channels"))


def make_control(kind: str, x0: Array, factor: int = 2) -> Array:
    """The control image of x0 [B, H, W, C] in [-1, 1] (see the module doc):
    [B, H, W, control_channels(kind, C)] float32 in [-1, 1]."""
    x0 = x0.astype(jnp.float32)
    if kind == "lowres":
        return upsample(downsample(x0, factor), factor)
    if kind == "edges":
        return edges(x0)
    if kind == "mask":
        mask = jnp.broadcast_to(top_half_mask(*x0.shape[1:3]), (*x0.shape[:3], 1))
        return jnp.concatenate([x0 * mask, 2.0 * mask - 1.0], axis=-1)
    if kind == "data":
        raise ValueError("control.kind='data' is given with the data (config.control.data_file), "
                         "not computed from the image.")
    raise ValueError(f"control.kind={kind!r}: use one of {KINDS}.")


def given_controls(config: Any) -> np.ndarray | None:
    """A control run of kind "data": its control images, one per example of its training split
    (`load_data_controls`), for the input pipeline; None for every other run."""
    if not (is_controlnet(config) or is_conditioned(config)) or config.control.kind != "data":
        return None
    from ddpm_jax import data  # the input pipeline (TFDS), only for a run that reads controls
    size = data.num_examples(config.data.dataset, "train", config.data.data_dir,
                             image_size=config.data.image_size)
    return load_data_controls(config, size)


def load_data_controls(config: Any, num_examples: int) -> np.ndarray:
    """uint8 [N, H, W, C_c] of config.control.data_file (kind "data"): its array 'control', row
    n the control image of example n of the train split in its stored order (N = num_examples,
    the split's size before `data.exclude_labels`); ValueError (one line) naming the problem."""
    path = config.control.data_file
    where = f"config.control.data_file={path}"
    h = w = config.data.image_size
    shape = (num_examples, h, w, channels_of(config))
    want = f"uint8 {list(shape)}"
    try:
        with np.load(path) as file:  # only 'control' is read
            names = list(file.files)
            controls = file["control"] if "control" in names else None
    except (OSError, EOFError, ValueError, AttributeError, zipfile.BadZipFile) as e:
        raise ValueError(f"{where} cannot be read ({type(e).__name__}: "
                         f"{' '.join(str(e).split())}): give an .npz with 'control' of "
                         f"{want}.") from None
    if controls is None:
        raise ValueError(f"{where} holds {sorted(names)}, no 'control': save the control "
                         f"images as np.savez(path, control=...), {want}.")
    if controls.dtype != np.uint8 or controls.shape != shape:
        raise ValueError(f"{where}: 'control' is {controls.dtype} {list(controls.shape)}, the run "
                         f"needs {want}: one control per training example (in the split's stored "
                         "order, before data.exclude_labels), at the image size, with "
                         "control.channels channels.")
    return controls


# ------------------------------------------------------------------------------ train step

@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The train step's control settings (hashable: part of `training.StepConfig`). branch: a
    ControlNet's (the step's params are then the merged tree, `controlnet.attach`); None: a
    concatenation model, whose condition is dropped to zeros with probability
    condition_dropout."""

    kind: str
    factor: int
    branch: controlnet.ControlBranch | None = None
    condition_dropout: float = 0.0


def train_denoise_fn(spec: StepSpec, model: UNet, params: PyTree, x0: Array,
                     labels: Array | None, dropout_rng: Array, given: Array | None = None) -> Any:
    """`denoise_fn(x_t, t)` of the train step with the control image of x0 (see StepSpec):
    computed from x0, or with kind "data" the batch's own `given` [B, H, W, C_c] in [-1, 1]."""
    if spec.kind == "data":
        if given is None:
            raise ValueError("control.kind='data' needs the batch's 'control' images (the input "
                             "pipeline reads them from config.control.data_file).")
        image = given.astype(jnp.float32)
    else:
        image = make_control(spec.kind, x0, spec.factor)
    rngs = {"dropout": dropout_rng}
    if spec.branch is None and spec.condition_dropout > 0.0:
        drop = jax.random.bernoulli(jax.random.fold_in(dropout_rng, 7), spec.condition_dropout,
                                    (x0.shape[0],))
        image = jnp.where(drop[:, None, None, None], 0.0, image)

    def denoise_fn(x_t: Array, t: Array) -> Array:
        if spec.branch is None:
            out = model.apply({"params": params}, x_t, t, labels, train=True, condition=image,
                              rngs=rngs)
        else:
            out = controlnet.apply(model, spec.branch, params, x_t, t, labels, control=image,
                                   train=True, rngs=rngs)
        return out.astype(jnp.float32)
    return denoise_fn


# ------------------------------------------------------------------------------ the chain

ROW_KEYS = ("label", "control", "scale", "condition_guidance")


@dataclasses.dataclass(frozen=True)
class ControlApply:
    """`(params, x_t, t, rows) -> output` of a controlled or image-conditioned UNet, for
    `sampling.make_sampler`; `rows` is the chain's per-row data, a dict of
    label [B] int (class-conditional models), control [B, H, W, C_c] float32 (the control or
    condition image; absent: the null control, i.e. the base / the null condition), scale [B]
    (ControlNet's control scale; absent: 1) and condition_guidance [B] (g, with
    condition_guidance=True). condition_guidance: each step also runs the null control and
    moves g times away from it (InstructPix2Pix's image scale s_I = 1 + g; with class guidance
    w the two-scale formula, s_T = 1 + w: `guided_model`)."""

    model: UNet
    branch: controlnet.ControlBranch | None = None
    condition_guidance: bool = False

    @property
    def null_label(self) -> int | None:
        return self.model.num_classes

    @property
    def control_channels(self) -> int:
        return self.branch.control_channels if self.branch is not None else \
            self.model.condition_channels

    def __call__(self, params: PyTree, x_t: Array, t: Array, y: dict | None = None) -> Array:
        rows = y or {}
        label = rows.get("label") if self.null_label is not None else None
        if self.branch is None:
            return self.model.apply({"params": params}, x_t, t, label, train=False,
                                    condition=rows.get("control"))
        return controlnet.apply(self.model, self.branch, params, x_t, t, label,
                                control=rows.get("control"), scale=rows.get("scale"))

    def guided_model(self, params: PyTree, rows: dict | None, guidance: Array, *, channels: int,
                     guided: bool, mesh: Any) -> Any:
        """The chain's `model_out(x_t, t)` (the hook of `guidance.guided_model`):
        eps(c_I, c_T) + w (eps(c_I, c_T) - eps(c_I, 0)) + g (eps(c_I, .) - eps(0, .)), with "."
        the null label when class-guided (InstructPix2Pix's eps(0,0) + s_I (eps(c_I,0) -
        eps(0,0)) + s_T (eps(c_I,c_T) - eps(c_I,0)) with s_I = 1 + g, s_T = 1 + w), else the
        row's label; each term only where its guidance is on."""
        rows = jax.tree.map(lambda a: constrain(a, mesh), dict(rows or {}))
        no_class = dict(rows)
        if guided:
            no_class["label"] = jnp.full_like(rows["label"], self.null_label)
        no_control = {k: v for k, v in (no_class if guided else rows).items() if k != "control"}

        def model_out(x_t: Array, t: Array) -> Array:
            cond = self(params, x_t, t, rows)
            mixed = cond[..., :channels]
            ref = cond
            if guided:
                ref = self(params, x_t, t, no_class)
                mixed = mixed + guidance * (mixed - ref[..., :channels])
            if self.condition_guidance:
                g = rows["condition_guidance"][:, None, None, None]
                null = self(params, x_t, t, no_control)
                mixed = mixed + g * (ref[..., :channels] - null[..., :channels])
            if not guided and not self.condition_guidance:
                return cond
            return jnp.concatenate([mixed, cond[..., channels:]], axis=-1)
        return model_out

    def class_targets(self, rows: dict) -> Array | None:
        """The classifier-guidance targets of the rows: their labels."""
        return rows.get("label")

    def check_rows(self, rows: Any, shape: tuple[int, ...], *, guided: bool,
                   classifier: Any) -> dict[str, Array]:
        """The rows as float32 / int32 arrays after the checks that name the problem (the hook
        of `Sampler`'s label checks); shape: the sampler's [B, H, W, C]."""
        if not isinstance(rows, dict) or "control" not in rows:
            raise ValueError("This sampler runs a controlled model: pass the rows as "
                             "control.rows(images, ...), a dict with 'control' [B, H, W, C_c].")
        unknown = sorted(set(rows) - set(ROW_KEYS))
        if unknown:
            raise ValueError(f"unknown row data {unknown}; use some of {ROW_KEYS}.")
        batch, height, width, _ = shape
        want = (batch, height, width, self.control_channels)
        if tuple(np.shape(rows["control"])) != want:
            raise ValueError(f"control images must be {list(want)} (the model's image size, "
                             f"{self.control_channels} channels); got {list(np.shape(rows['control']))}.")
        out = {"control": jnp.asarray(rows["control"], jnp.float32)}
        for key in ("scale", "condition_guidance"):
            if key in rows:
                out[key] = jnp.asarray(rows[key], jnp.float32).reshape(batch)
        if self.condition_guidance and "condition_guidance" not in out:
            raise ValueError("condition guidance is on: pass condition_guidance [B].")
        if rows.get("label") is not None:
            labels = np.asarray(rows["label"])
            top = classifier.num_classes - 1 if classifier is not None else self.null_label
            if labels.shape != (batch,) or top is None or labels.min() < 0 or labels.max() > top:
                raise ValueError(f"labels must be {batch} ints in 0..{top} (the model's or the "
                                 f"classifier's classes); got {labels.shape} "
                                 f"{labels.min() if labels.size else ''}..{labels.max() if labels.size else ''}.")
            out["label"] = jnp.asarray(labels, jnp.int32)
        elif guided or classifier is not None:
            raise ValueError("This sampler was built with guidance: pass labels [B].")
        return out


def rows(control_images: np.ndarray, *, labels: np.ndarray | None = None,
         scale: float | np.ndarray | None = None,
         condition_guidance: float | np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The chain's per-row data of N rows: control_images [N, H, W, C_c] float in [-1, 1] and,
    each broadcast to [N], labels, the control scale and the condition-guidance weight."""
    count = len(control_images)
    out = {"control": np.asarray(control_images, np.float32)}
    if labels is not None:
        out["label"] = np.broadcast_to(np.asarray(labels, np.int32), (count,)).copy()
    for key, value in (("scale", scale), ("condition_guidance", condition_guidance)):
        if value is not None:
            out[key] = np.broadcast_to(np.asarray(value, np.float32), (count,)).copy()
    return out


def draw(sampler: Any, params: PyTree, key: Array, per_row: dict[str, np.ndarray], *,
         init: np.ndarray | None = None, start: str = "noise", progress: bool = True,
         desc: str = "sampling") -> np.ndarray:
    """uint8 [N, H, W, C]: `sampler` on consecutive batches of the rows (image n depends only on
    (key, n) and its rows); init [N, H, W, C] in [-1, 1] with start "q_x0" (SDEdit) or "x_t"."""
    from ddpm_jax.images import to_uint8
    from ddpm_jax.parallel import gather_to_host, map_batches

    names = sorted(per_row)
    arrays = [per_row[n] for n in names] + ([] if init is None else [np.asarray(init, np.float32)])

    def one_batch(first: int, *chunks: np.ndarray) -> np.ndarray:
        data = dict(zip(names, chunks))
        given = None if init is None else chunks[-1]
        out = sampler(params, key, first, data, init=given, start=start)["images"]
        return to_uint8(gather_to_host(out))
    return map_batches(one_batch, arrays, sampler.batch_size, desc=desc, progress=progress,
                       to_host=lambda images: images)


# ------------------------------------------------------------------------------ the run

def is_controlnet(config: Any) -> bool:
    """Whether a config trains (or a run is) a ControlNet: config.control.base is set."""
    return "control" in config and config.control.base is not None


def is_conditioned(config: Any) -> bool:
    """Whether a config's UNet reads a condition image by concatenation."""
    return "control" in config and bool(config.control.condition)


def model_options(config: Any) -> dict[str, int]:
    """The UNet arguments config.control adds (`config.model_from_config`)."""
    if not is_conditioned(config):
        return {}
    return {"condition_channels": channels_of(config)}


def branch_from_config(config: Any, model: UNet) -> controlnet.ControlBranch:
    return controlnet.branch_for(model, channels_of(config), tuple(config.control.hint_channels))


def step_spec(config: Any, model: Any) -> StepSpec | None:
    """The train step's StepSpec of a config (None: no control)."""
    if not (is_controlnet(config) or is_conditioned(config)):
        return None
    c = config.control
    branch = branch_from_config(config, model) if is_controlnet(config) else None
    return StepSpec(c.kind, int(c.factor), branch,
                    0.0 if branch is not None else float(c.condition_dropout))


def validate(section: Any, config: Any) -> None:
    """config.control's values (`config.validate` passes its checker of the section; the base
    run itself is checked when the run starts); ValueError naming the field and the fix."""
    kind = section.choice("kind", KINDS)
    data_file = section.get("data_file")
    if kind == "data" and (not isinstance(data_file, str) or not data_file):
        raise section.fail("data_file", "kind 'data' reads the control images from an .npz "
                           "('control': uint8 [N, H, W, C_c], one per training example); name it")
    if kind != "data" and data_file is not None:
        raise section.fail("data_file", f"only kind 'data' reads it (kind is {kind!r}); set it "
                           "to None or kind to 'data'")
    section.integer("channels", 1, optional=True)
    factor = section.integer("factor", 1)
    size = config.data.image_size
    if size % factor:
        raise section.fail("factor", f"use a divisor of data.image_size={size} (2 or 4 for 8x8 "
                           "digits)")
    section.number("condition_dropout", 0.0, 1.0, high_open=True)
    section.int_tuple("hint_channels", 1, nonempty=True)
    condition = section.boolean("condition")
    section.integer("base_step", 0, optional=True)
    base = section.get("base")
    if base is not None and (not isinstance(base, str) or not base):
        raise section.fail("base", "use the base run's work dir, or None")
    if base is not None and condition:
        raise section.fail("condition", "a run is either a ControlNet on a base (control.base) "
                           "or an image-conditioned model trained from scratch (condition); set "
                           "one of them")
    if (base is not None or condition) and (config.finetune.base is not None
                                            or config.distill.teacher is not None):
        raise section.fail("base" if base is not None else "condition", "a control run cannot "
                           "also fine-tune (finetune.base) or distil (distill.teacher); set "
                           "those to None")


@dataclasses.dataclass
class Setup:
    """What the loop runs a ControlNet run on (the counterpart of `finetune.Setup`)."""

    config: Any                          # model.num_classes and control.base_step pinned
    model: UNet
    branch: controlnet.ControlBranch
    transform: adapters.Transform
    base_params: PyTree                  # the frozen base, replicated
    image_shape: tuple[int, int, int]


def resolve(config: Any, sharding: Any) -> Setup:
    """Loads the base run (config.control.base, its base_step or newest, pinned) for a
    ControlNet run; ValueError in one line naming the problem (no run, a classifier, another
    schedule, image shape or architecture: the first leaf that differs)."""
    import ml_collections

    from ddpm_jax import config as config_lib, runs, training

    c = config.control
    step, base_config, base = runs.load_base_run(c.base, config, flag="config.control.base",
                                                 step=c.base_step, sharding=sharding,
                                                 same_mean_type=True)
    if is_conditioned(base_config):
        raise ValueError(f"config.control.base={c.base} is an image-conditioned run; ControlNet "
                         "needs an unconditioned or class-conditional base.")
    config = ml_collections.ConfigDict(config.to_dict())
    with config.unlocked():
        config.control.base_step = step
        config.model.num_classes = base_config.model.num_classes
    model = config_lib.model_from_config(config)
    image_shape = config_lib.image_shape(config)
    shapes = jax.eval_shape(lambda k: training.init_params(model, k, image_shape),
                            jax.random.PRNGKey(0))
    grown = adapters.grow_base(base, shapes, new_class=False, where=f"config.control.base={c.base}")
    return Setup(config, model, branch_from_config(config, model), CONTROL_TRANSFORM,
                 jax.device_put(grown, sharding), image_shape)


def create_state(setup: Setup, optimizer: Any, rng: Array) -> Any:
    """The ControlNet run's state at step 0: params = the branch (`controlnet.init_branch`: the
    base's encoder, zero outputs), its EMA a copy."""
    from ddpm_jax import training

    init_rng, run_rng = jax.random.split(rng)
    params = controlnet.init_branch(setup.branch, setup.base_params, init_rng, setup.image_shape)
    zero = jnp.zeros((), jnp.int32)
    return training.TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                               ema_params=jax.tree.map(jnp.copy, params), rng=run_rng,
                               nonfinite_in_a_row=zero, nonfinite_total=zero)


def load_merged(config: Any, manager: Any, step: int, weights: str, sharding: Any,
                checksums: Any = None) -> PyTree:
    """The controlled model's parameters of a ControlNet run's checkpoint: its branch (`weights`
    "ema" or "raw") attached to the base run's parameters (`controlnet.attach`)."""
    from ddpm_jax import checkpoint

    setup = resolve(config, sharding)
    shapes = jax.eval_shape(lambda k: controlnet.init_branch(setup.branch, setup.base_params, k,
                                                             setup.image_shape),
                            jax.random.PRNGKey(0))
    branch = checkpoint.restore_weights(manager, step, shapes, weights, sharding, checksums)
    return controlnet.attach(setup.base_params, branch)
