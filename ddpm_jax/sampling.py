"""Sampling the reverse process as one XLA program: ancestral (DDPM), DDIM, DPM-Solver++
(multistep, orders 1-3), SDE-DPM-Solver++ (orders 1-2), Heun and Euler-ancestral on EDM's sigmas,
each optionally with a Langevin corrector (docs/continuous_time.md), on all T steps or on a respaced
sub-sequence of S <= T steps, each a single `lax.scan` over the steps (`reverse.py`). What a
chain runs is a `spec.SamplerSpec`; `make_sampler` builds its plan once and compiles the chain
on first use; `Sampler` calls it; `draw_images` draws N images batch by batch.

Everything that varies per step (the original timestep fed to the model, the DDIM
coefficients, the respaced schedule) is a `plans.SamplingPlan` pytree passed to the compiled
function as data, so a new schedule or a new `eta` is not a retrace; the chain compiles once
per (model, batch shape, number of steps, static options). DPM-Solver++'s per-step weights are
plan data too (the first-order warm-up and lower-order final steps included); its history, the
x0 predictions of the previous order - 1 steps, rides in the scan carry.

Indexing: `i` is the 0-based index into the (respaced) chain's schedule, run from S-1 down to
0; `plan.timesteps[i]` is the original 0-based t the model is called with (with no respacing,
i == t).

Randomness (a contract: reference samplers and the multi-device tests rely on it). For the
example at global index n (`example_offset + row`):
    init_key, step_key = split(fold_in(key, n))
    x_T[row]               = normal(init_key, [H, W, C])
    z at chain index i     = normal(fold_in(step_key, i), [H, W, C])     (unused at i = 0)
    corrector step j after the step from i = normal(fold_in(fold_in(step_key, i), 1 + j), [H, W, C])
    known region's q(x | x0) draw after the step from i = normal(fold_in(fold_in(step_key, i), 0))
so a sample depends only on (key, n), never on the batch size or on how the batch is split
over devices and hosts.

Class-conditional models: `Sampler(params, key, offset, labels=y)` passes y [B] to the model as
data (one program for every choice of labels); with `make_sampler(..., guidance=w)` each step
also runs the null label and uses classifier-free guidance (Ho & Salimans 2022, eq. 6),
    out = (1 + w) * model(x_t, t, y) - w * model(x_t, t, null)
on the first C output channels (eps, x0 or mean; a learned variance is the conditional one).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ddpm_jax.diffusion import DenoiseFn
from ddpm_jax.guidance import ApplyFn
from ddpm_jax.images import to_uint8
from ddpm_jax.labels import balanced, check_labels_and_guidance
from ddpm_jax.parallel import DATA_AXIS, gather_to_host, map_batches, replicate
from ddpm_jax.plans import SamplingPlan, progressive_indices
from ddpm_jax.reverse import BLENDS, STARTS, ChainOptions, chain_jit
from ddpm_jax.schedule import Schedule
from ddpm_jax.spec import SamplerSpec, finite_scale, spec_and_options

Array = jax.Array

PROGRESSIVE = ("pred_x0", "x_t")


def _check_options(shape: Sequence[int], return_every: int | None, progressive: Sequence[str],
                   unroll: int, mesh: Mesh | None) -> None:
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"shape must be [B, H, W, C] with positive sizes; got {tuple(shape)!r}.")
    if return_every is not None and return_every < 1:
        raise ValueError(f"return_every must be None or an int >= 1; got {return_every!r}.")
    bad = [name for name in progressive if name not in PROGRESSIVE]
    if bad or not progressive:
        raise ValueError(f"progressive must name some of {', '.join(PROGRESSIVE)}; got "
                         f"{tuple(progressive)!r}.")
    if unroll < 1:
        raise ValueError(f"unroll must be an int >= 1; got {unroll!r}.")
    if mesh is not None:
        if DATA_AXIS not in mesh.shape:
            raise ValueError(f"The mesh needs a {DATA_AXIS!r} axis; it has {tuple(mesh.shape)}.")
        if shape[0] % mesh.shape[DATA_AXIS]:
            raise ValueError(f"Batch size {shape[0]} is not divisible by the {mesh.shape[DATA_AXIS]} "
                             f"devices of the mesh's {DATA_AXIS!r} axis; pick a multiple.")


# ------------------------------------------------------------------------------ public API

@dataclasses.dataclass(frozen=True)
class _DenoiseOnly:
    """Adapts `denoise_fn(x_t, t)` to the (params, x_t, t) contract; hashed by the function."""

    denoise_fn: DenoiseFn

    def __call__(self, params: Any, x_t: Array, t: Array) -> Array:
        del params
        return self.denoise_fn(x_t, t)


@dataclasses.dataclass(frozen=True)
class ModelApply:
    """`(params, x_t, t, y=None) -> model.apply({"params": params}, x_t, t, y, train=False)` for
    a Flax model with the UNet's call signature (y: [B] class labels; None: the null label of a
    class-conditional model). Equal models give equal, cache-sharing functions."""

    model: Any

    def __call__(self, params: Any, x_t: Array, t: Array, y: Array | None = None) -> Array:
        return self.model.apply({"params": params}, x_t, t, y, train=False)

    @property
    def null_label(self) -> int | None:
        """The label that means "no class" (= model.num_classes); None: unconditional model."""
        return getattr(self.model, "num_classes", None)

    @property
    def decodes(self) -> bool:
        """Whether the chain's last state is a latent that `decode` maps to images (a latent
        run's `latent.LatentUNet`): the chain applies it at its end, in the same program."""
        return hasattr(self.model, "decode_latents")

    def decode(self, params: Any, z: Array) -> Array:
        """Latents [B, h, w, c] -> images [B, H, W, C] in [-1, 1] (`latent.LatentUNet`)."""
        return self.model.apply({"params": params}, z, method="decode_latents")


def model_denoise_fn(model: Any, params: Any, y: Array | None = None) -> DenoiseFn:
    """`denoise_fn(x_t, t)` of a Flax model with bound `params` (and class labels y: [B])."""
    return lambda x_t, t: model.apply({"params": params}, x_t, t, y, train=False)


class Sampler:
    """A compiled-once sampler: `sampler(params, key, example_offset=0) -> dict`.

    Built by `make_sampler`. Calls with the same plan shapes reuse one executable; with a
    mesh, params are replicated and every output is sharded over the batch ("data" axis).
    """

    def __init__(self, apply_fn: ApplyFn, plan: SamplingPlan, spec: SamplerSpec,
                 static: ChainOptions, guidance: float = 0.0, classifier_scale: float = 0.0):
        self.apply_fn, self.plan, self.spec, self.static = apply_fn, plan, spec, static
        self.guidance = float(guidance)
        self.classifier_scale = float(classifier_scale)
        self.timesteps = (None if static.return_every is None else np.asarray(
                plan.timesteps)[progressive_indices(plan.num_steps, static.return_every)])

    @property
    def batch_size(self) -> int:
        return self.static.shape[0]

    def with_plan(self, plan: SamplingPlan) -> Sampler:
        """This sampler on another plan (a custom spacing, per-step eta, hand-made weights) of
        the same fields and array shapes: the same compiled chain runs it, with the same model
        call, spec, options and guidance. Another structure is refused (its update rule reads
        other arrays, or its length would compile another chain)."""
        if not isinstance(plan, SamplingPlan):
            raise TypeError(f"plan must be a SamplingPlan; got {type(plan).__name__}.")
        mine, theirs = jax.tree.structure(self.plan), jax.tree.structure(plan)
        shapes = [(jnp.shape(a), jnp.result_type(a)) for a in jax.tree.leaves(self.plan)]
        if mine != theirs or shapes != [(jnp.shape(a), jnp.result_type(a))
                                        for a in jax.tree.leaves(plan)]:
            raise ValueError(
                f"with_plan needs a plan with the fields and shapes of this sampler's "
                f"({self.spec.describe(self.plan.num_steps)}: {self.plan.num_steps} steps); "
                f"got {plan.num_steps} steps or other fields. Build it like "
                f"spec.plan(schedule) does, or make a sampler for its spec.")
        return Sampler(self.apply_fn, plan, self.spec, self.static, self.guidance,
                       self.classifier_scale)

    def __call__(self, params: Any, key: Array, example_offset: int | Array = 0,
                 labels: Array | np.ndarray | None = None, *, init: Array | None = None,
                 start: str = "noise", rows: Array | np.ndarray | None = None,
                 classifier_params: Any = None, known: Array | None = None,
                 known_mask: Array | None = None) -> dict[str, Array]:
        """params: the model's; key: PRNG key; example_offset: global index of row 0; labels:
        [B] int class labels of the rows (a class-conditional apply_fn such as `ModelApply` of
        a UNet with num_classes; None: the unconditional call, the null label).

        The chain's first state (at the plan's first timestep t_S-1): start="noise" draws it
        N(0, I); "x_t" takes `init` [B, H, W, C] as it is (decoding latents); "q_x0" draws it from
        q(x_t | x0 = init) with init in [-1, 1] (SDEdit; see `make_sampler`'s start_t). rows: [B]
        int, the global index n of each row's randomness (default example_offset + 0..B-1);
        rows that share n share their noise. classifier_params: the guiding classifier's, for a
        sampler made with `classifier=` (then labels [B] are the classes to guide towards).
        known, known_mask: a sampler made with `blend=` (see `make_sampler`): the source,
        x0 [B, H, W, C] ("q_x0") or the states X_{i-1} after each chain index i [S, B, H, W, C]
        ("trajectory"), and known_mask [B, H, W, 1 or C], 1 = known pixel.

        Returns images [B, H, W, C] (the final mean; in [-1, 1] when clip_denoised) and, with
        return_every, `pred_x0` / `x_t` [K, B, H, W, C] in chain order plus
        `progressive_timesteps` [K] (the original t of each record; the last is 0).
        """
        labels = self._check_labels(labels)
        shape = self.static.shape
        if start not in STARTS:
            raise ValueError(f"Unknown start {start!r}; choose one of {', '.join(STARTS)}.")
        if init is None and start != "noise":
            raise ValueError(f"start={start!r} needs init [B, H, W, C].")
        if init is not None and start == "noise":
            raise ValueError("start='noise' takes no init; pass start='x_t' (init is the first "
                             "state) or 'q_x0' (init is x0, noised to the first timestep).")
        if init is not None and tuple(init.shape) != shape:
            raise ValueError(f"init must have the sampler's shape {list(shape)}; got "
                             f"{list(init.shape)}.")
        if rows is not None:
            if tuple(np.shape(rows)) != shape[:1]:
                raise ValueError(f"rows must be [{shape[0]}] ints; got shape {np.shape(rows)}.")
            rows = jnp.asarray(rows, dtype=jnp.int32)
        if (classifier_params is None) != (self.static.classifier is None):
            raise ValueError("Pass classifier_params exactly when the sampler was made with a "
                             "classifier (make_sampler(..., classifier=ClassifierApply(model))).")
        blend = self._check_blend(known, known_mask)
        plan, offset = self.plan, jnp.asarray(example_offset, dtype=jnp.int32)
        guidance, scale = jnp.float32(self.guidance), jnp.float32(self.classifier_scale)
        if self.static.mesh is not None:
            params, plan, key, offset, labels, guidance, classifier_params, scale = replicate(
                    (params, plan, key, offset, labels, guidance, classifier_params, scale),
                    self.static.mesh)
        args = (self.apply_fn, params, plan, key, offset, labels, guidance, init, rows,
                classifier_params, scale, blend)
        traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args[1:]))
        static = dataclasses.replace(self.static, start=start)
        try:
            result = chain_jit(not traced)(*args, static=static)
        except ValueError as error:  # inside the caller's jit with only concrete inputs
            if "compiler_options" not in str(error):
                raise
            result = chain_jit(False)(*args, static=static)
        if self.timesteps is not None:
            result["progressive_timesteps"] = self.timesteps
        return result

    def _check_blend(self, known: Any, known_mask: Any) -> dict[str, Array] | None:
        """The known region's data for the chain, after the checks that name the problem."""
        how, shape = self.static.blend, self.static.shape
        if how is None:
            if known is not None or known_mask is not None:
                raise ValueError("known / known_mask need a sampler made with blend='q_x0' or "
                                 "'trajectory'.")
            return None
        if known is None or known_mask is None:
            raise ValueError(f"This sampler keeps a known region (blend={how!r}): pass known "
                             "and known_mask.")
        want = shape if how == "q_x0" else (self.plan.num_steps,) + shape
        if tuple(np.shape(known)) != want:
            raise ValueError(f"known must be {list(want)} for blend={how!r}; got "
                             f"{list(np.shape(known))}.")
        mask_shape = tuple(np.shape(known_mask))
        if len(mask_shape) != 4 or mask_shape[:3] != shape[:3] or mask_shape[3] not in (
                1, shape[3]):
            raise ValueError(f"known_mask must be [{shape[0]}, {shape[1]}, {shape[2]}, 1] (1 = "
                             f"known pixel); got {list(mask_shape)}.")
        return dict(known=jnp.asarray(known, jnp.float32),
                    mask=jnp.asarray(known_mask, jnp.float32))

    def _check_labels(self, labels: Any) -> Array | None:
        """labels as int32 [B], after the checks that can name the problem."""
        null = getattr(self.apply_fn, "null_label", None)
        classifier = self.static.classifier
        if hasattr(self.apply_fn, "check_rows"):  # per-row data beyond labels (control.ControlApply)
            return self.apply_fn.check_rows(labels, self.static.shape, guided=self.static.guided,
                                            classifier=classifier)
        if labels is None:
            if self.static.guided or classifier is not None:
                raise ValueError("This sampler was built with guidance: pass labels [B], the "
                                 "classes to guide towards.")
            return None
        batch = self.batch_size
        if isinstance(labels, jax.core.Tracer):
            if labels.shape != (batch,):
                raise ValueError(f"labels must have shape [{batch}] (one per row); got {labels.shape}.")
            return labels.astype(jnp.int32)
        values = np.asarray(labels)
        if values.shape != (batch,) or not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"labels must be {batch} integers (one per row); got "
                             f"{values.dtype} {values.shape}.")
        if classifier is not None:
            classes = getattr(classifier, "num_classes", None)
            if classes is not None and (values.min() < 0 or values.max() >= classes):
                raise ValueError(f"labels must lie in 0..{classes - 1}, the classifier's classes; "
                                 f"got {values.min()}..{values.max()}.")
        elif isinstance(self.apply_fn, ModelApply) and null is None:
            raise ValueError("Got labels, but the model is unconditional (num_classes=None); sample "
                             "without labels, or train with model.num_classes set.")
        if null is not None and (values.min() < 0 or values.max() > null):
            raise ValueError(f"labels must lie in 0..{null - 1} (or {null}, the null label); got "
                             f"{values.min()}..{values.max()}.")
        return jnp.asarray(values, dtype=jnp.int32)


def balanced_labels(apply_fn: ApplyFn, num_samples: int) -> np.ndarray:
    """[num_samples] int32 classes n mod N of a class-conditional apply_fn (N classes, the
    null label N excluded); ValueError for an unconditional one."""
    num_classes = getattr(apply_fn, "null_label", None)
    check_labels_and_guidance("balanced", None, num_classes)
    return balanced(num_classes, num_samples)


def draw_images(sampler: Sampler, params: Any, key: Array, num_samples: int, *,
                labels: Sequence[int] | np.ndarray | None = None, progress: bool = True,
                desc: str = "sampling", classifier_params: Any = None) -> np.ndarray:
    """num_samples images as uint8 [N, H, W, C] on every process, by calling `sampler` on
    consecutive batches (image n depends only on (key, n) and labels[n], whatever the batch size
    or device count); labels: [N] class of each image (class-conditional or classifier-guided
    samplers; every process passes the same); classifier_params: a classifier-guided
    sampler's. A tqdm bar counts batches on process 0 when progress is set."""
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (num_samples,):
            raise ValueError(f"labels must hold one class per image, shape [{num_samples}]; got "
                             f"{labels.shape}.")

    def one_batch(start: int, rows: np.ndarray) -> np.ndarray:
        # The last batch's spare rows repeat the last label; their images are dropped.
        return to_uint8(gather_to_host(sampler(params, key, start,
                                               None if labels is None else rows,
                                               classifier_params=classifier_params)["images"]))

    rows = np.zeros(num_samples, np.int32) if labels is None else labels
    return map_batches(one_batch, [rows], sampler.batch_size, desc=desc, progress=progress,
                       to_host=lambda images: images)


def make_sampler(apply_fn: ApplyFn, schedule: Schedule, shape: Sequence[int],
                 spec: SamplerSpec = SamplerSpec(), *, return_every: int | None = None,
                 progressive: Sequence[str] = ("pred_x0",), unroll: int = 1,
                 guidance: float | None = None, start_t: int | None = None,
                 classifier: ApplyFn | None = None, classifier_scale: float | None = None,
                 mesh: Mesh | None = None, blend: str | None = None) -> Sampler:
    """Builds a sampler compiled once per (apply_fn, shape, number of steps, options).

    apply_fn(params, x_t [B,H,W,C], t [B] int) -> model output (`ModelApply(model)` for a Flax
    UNet); it must be hashable and stable, since it keys the compilation cache.
    shape: [B, H, W, C]. spec: the sampler and its settings (`spec.SamplerSpec`; the default is
    the paper's ancestral sampler on all T steps). return_every=k also records `progressive`
    ("pred_x0" and/or "x_t") at chain indices ..., 2k, k, 0. unroll: lax.scan's.
    guidance: classifier-free guidance weight w >= 0 for a class-conditional apply_fn with a
    `null_label` (`ModelApply` of a UNet with num_classes); every call then needs labels and
    runs the model twice per step. None: no guidance (labels, if given, condition directly).
    start_t: the chain starts at this original timestep (0-based) instead of T-1: the steps'
    timesteps below it plus start_t itself (SDEdit, interpolation at a step; the plan's
    coefficients are computed for the shortened chain). mesh: a Mesh with a "data" axis to shard
    the batch over (B divisible by its size). classifier: a noise-conditional classifier
    `(params, x_t, t) -> logits` (`guidance.ClassifierApply(NoisyClassifier)`) for classifier
    guidance of scale `classifier_scale` >= 0 (None: 1) towards the call's labels
    (`guidance.classifier_guidance`); its params come with each call, like the model's.
    blend: keep a known region (each call's known_mask) after every step: "q_x0" draws it from
    q(x_{t-1} | x0 = known) (Blended diffusion; exactly x0 at the end), "trajectory" takes it from
    the given states (DiffEdit's DDIM encoding); None: no known region.
    """
    if not isinstance(spec, SamplerSpec):
        raise TypeError(f"spec must be a SamplerSpec; got {type(spec).__name__}.")
    progressive = tuple(progressive)
    finite_scale("guidance", guidance)
    if guidance is not None and getattr(apply_fn, "null_label", None) is None:
        raise ValueError("guidance needs a class-conditional model: an apply_fn with a "
                         "null_label, e.g. ModelApply of a UNet with num_classes set.")
    _check_options(shape, return_every, progressive, unroll, mesh)
    if classifier_scale is None:  # 1 with a classifier, else unused
        classifier_scale = 0.0 if classifier is None else 1.0
    finite_scale("classifier_scale", classifier_scale)
    if classifier_scale and classifier is None:
        raise ValueError("classifier_scale needs a classifier (make_sampler(..., classifier=...)).")
    if blend is not None and blend not in BLENDS:
        raise ValueError(f"blend={blend!r}: choose one of {BLENDS} (or None).")
    static = ChainOptions.of(spec, shape, return_every=return_every, progressive=progressive,
                             unroll=int(unroll), guided=guidance is not None, mesh=mesh,
                             classifier=classifier, blend=blend)
    return Sampler(apply_fn, spec.plan(schedule, start_t=start_t), spec, static,
                   guidance or 0.0, classifier_scale)


def sample(denoise_fn: DenoiseFn, schedule: Schedule, shape: Sequence[int], key: Array, *,
           example_offset: int = 0, **options: Any) -> dict[str, Array]:
    """Samples a batch from `denoise_fn(x_t, t) -> model output` (any test double or closure).

    options: `SamplerSpec`'s fields (sampler, steps, eta, ...) and `make_sampler`'s keyword
    options, in one flat list for brevity; outputs as `Sampler.__call__`. The compiled chain is
    cached on the denoise_fn object, so reuse one function object to avoid retracing; for a
    Flax model prefer `make_sampler(ModelApply(model), ...)`, which passes params as data.
    """
    return make_sampler(_DenoiseOnly(denoise_fn), schedule, shape, **spec_and_options(**options))(
            None, key, example_offset)
