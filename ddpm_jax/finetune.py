"""Fine-tuning a trained run (config.finetune, docs/finetuning.md): the base run's parameters,
the few images, the prior-preservation samples and their batches, the fine-tuning state.

The loop (`loop.py`) calls `setup` once at start; the train step (`training.py`) merges the
frozen base and the trainable tree (`adapters.merge`); `load_merged` gives the sampler plain
parameters. Class ids: a base with N classes (null label N) and new_class gives a model of N+1
classes: the few images are class N, the null label is N+1 (`adapters.grow_base`).

The objective with prior preservation (DreamBooth, Ruiz et al. 2023) is
mean over instance rows + prior_weight * mean over prior rows of the usual loss, each batch
half instance images (drawn with replacement), half samples the base drew of its own classes
(`prior_samples`, drawn once with the run's sampler and stored in the run as PRIOR_FILE).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from ddpm_jax import adapters, checkpoint, parallel, runs, sampling, training
from ddpm_jax import config as config_lib
from ddpm_jax.spec import SamplerSpec

PyTree = Any
PRIOR_FILE = "finetune_prior.npz"  # in the fine-tuning run's work dir: images uint8, labels


def where(config: Any) -> str:
    return f"config.finetune.base={config.finetune.base}"


def fine_tune_num_classes(base_classes: int | None, new_class: bool) -> int | None:
    """The fine-tuning model's num_classes: the base's, plus one with new_class (an
    unconditional base then gets one class)."""
    if not new_class:
        return base_classes
    return 1 if base_classes is None else base_classes + 1


def instance_label(config: Any, base_classes: int | None) -> int:
    """The class id of the few images in the fine-tuning model: the new class N, the chosen
    existing class, or the null label (0 for an unconditional model, unused)."""
    f = config.finetune
    if f.new_class:
        return 0 if base_classes is None else base_classes
    if f.label is not None:
        if base_classes is None or not 0 <= f.label < base_classes:
            have = "no classes" if base_classes is None else f"classes 0..{base_classes - 1}"
            raise ValueError(f"config.finetune.label={f.label}: the base run has {have}; use one "
                             "of them, None (the null label), or new_class=True.")
        return f.label
    return 0 if base_classes is None else base_classes  # the null label


def transform_from_config(config: Any, shapes: PyTree, base_classes: int | None
                          ) -> adapters.Transform:
    """The `adapters.Transform` of config.finetune / config.lora for a model of parameter
    `shapes`: lora and embedding also train the taught class's embedding row (a class-
    conditional model; with lora only when a class id is taught; with full the row is named
    for finetune.row_lr_scale and row_ema_warmup only, the whole table training)."""
    f, lo = config.finetune, config.lora
    conditional = config.model.num_classes is not None
    label = instance_label(config, base_classes)
    taught = conditional and (f.new_class or f.label is not None)
    rows = (label,) if taught else ()
    rates = dict(row_lr_scale=float(f.get("row_lr_scale", 1.0)),
                 row_ema_warmup=bool(f.get("row_ema_warmup", False)))
    if f.method == "full":
        return adapters.Transform("full", rows=rows, **rates)
    paths = adapters.lora_paths(shapes, tuple(lo.targets)) if f.method == "lora" else ()
    return adapters.Transform(f.method, paths, int(lo.rank), float(lo.alpha), rows, **rates)


@dataclasses.dataclass
class Setup:
    """What the loop runs a fine-tuning run on."""

    config: ml_collections.ConfigDict  # num_classes and base_step pinned
    model: Any
    transform: adapters.Transform
    base_params: PyTree                 # grown to the fine-tuning model, replicated
    base_config: ml_collections.ConfigDict
    label: int                          # the few images' class id


def resolve(config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding) -> Setup:
    """Loads the base run (config.finetune.base, its base_step or newest, pinned) and lays its
    EMA parameters out for the fine-tuning model; ValueError with one line naming the problem
    (no run, another architecture or schedule, a leaf of another shape, a label out of range)."""
    f = config.finetune
    step, base_config, base = runs.load_base_run(f.base, config, flag="config.finetune.base",
                                                 step=f.base_step, sharding=sharding,
                                                 same_mean_type=True)
    config = ml_collections.ConfigDict(config.to_dict())
    base_classes = base_config.model.num_classes
    with config.unlocked():
        config.finetune.base_step = step
        config.model.num_classes = fine_tune_num_classes(base_classes, f.new_class)
        if config.model.num_classes is None:  # an unconditional result has no classes to show
            config.eval.labels, config.eval.guidance = "none", None
    label = instance_label(config, base_classes)
    model = config_lib.model_from_config(config)
    shapes = jax.eval_shape(lambda k: training.init_params(model, k, config_lib.image_shape(config)),
                            jax.random.PRNGKey(0))
    grown = adapters.grow_base(base, shapes, new_class=f.new_class, where=where(config))
    grown = jax.device_put(grown, sharding)
    transform = transform_from_config(config, shapes, base_classes)
    return Setup(config, model, transform, grown, base_config, label)


def create_state(setup: Setup, optimizer: Any, rng: jax.Array) -> training.TrainState:
    """The fine-tuning state at step 0: params = the trainable tree (`adapters.init_trainable`),
    its EMA a copy; rng as in `training.create_train_state`."""
    init_rng, run_rng = jax.random.split(rng)
    params = adapters.init_trainable(setup.base_params, setup.transform, init_rng)
    zero = jax.numpy.zeros((), jax.numpy.int32)
    return training.TrainState(step=zero, params=params, opt_state=optimizer.init(params),
                               ema_params=jax.tree.map(lambda p: p.copy(), params), rng=run_rng,
                               nonfinite_in_a_row=zero, nonfinite_total=zero)


def load_instances(config: Any) -> np.ndarray:
    """uint8 [n, H, W, C] the few images (`editing.inputs.load_images`); ValueError in one line."""
    from ddpm_jax.editing import inputs

    return inputs.load_images(config.finetune.images, image_shape=config_lib.image_shape(config),
                              grid_cells=config.finetune.grid_cells, flag="config.finetune.images")


def prior_data(setup: Setup, workdir: str, mesh: jax.sharding.Mesh
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """(images uint8 [P, H, W, C], labels [P]) of prior preservation, or None when off
    (prior_weight 0 or prior_samples 0): read from workdir/PRIOR_FILE, or drawn once from the
    base (class n mod N for a class-conditional base, else the null label; the run's sampler,
    key seed + 2) and written there before the first checkpoint."""
    f, config = setup.config.finetune, setup.config
    count = f.prior_samples
    if f.prior_weight == 0 or count == 0:
        return None
    path = os.path.join(workdir, PRIOR_FILE)
    base_classes = setup.base_config.model.num_classes
    if os.path.exists(path):
        with np.load(path) as stored:
            pixels, labels = stored["images"], stored["labels"]
        if len(pixels) == count:
            return pixels, labels
        logging.warning("%s holds %d samples, not prior_samples=%d: drawing them again.", path,
                        len(pixels), count)
    # The grown parameters give the base's outputs for its classes and its null label.
    apply_fn = sampling.ModelApply(setup.model)
    base_labels = None if base_classes is None else np.arange(count) % base_classes
    batch = parallel.round_up_to_devices(min(count, config.sampling.batch_size), mesh.size)
    sampler = sampling.make_sampler(apply_fn, config_lib.schedule_from_config(config),
                                    (batch, *config_lib.image_shape(config)),
                                    SamplerSpec.from_config(config), mesh=mesh)
    logging.info("Drawing %d prior-preservation samples from the base run.", count)
    pixels = sampling.draw_images(sampler, setup.base_params, jax.random.PRNGKey(config.training.seed + 2),
                                  count, labels=base_labels, progress=False)
    null = config.model.num_classes or 0
    labels = (np.full(count, null, np.int32) if base_labels is None
              else base_labels.astype(np.int32))
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, images=pixels, labels=labels)
        os.replace(tmp, path)
    return pixels, labels


@dataclasses.dataclass(frozen=True)
class FewShotBatches:
    """Global batch index b -> this host's rows: the instance rows (the few images, drawn with
    replacement by default_rng([seed, b])) and, with prior data, as many prior rows, each with
    its loss weight (B / n_instance and prior_weight * B / n_prior: `training.weighted_mean`
    then gives mean_instance + prior_weight * mean_prior)."""

    instances: np.ndarray          # uint8 [n, H, W, C]
    label: int
    prior_images: np.ndarray | None
    prior_labels: np.ndarray | None
    prior_weight: float
    global_batch: int
    first_row: int
    local_batch: int
    seed: int

    def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, batch_index])
        b = self.global_batch
        with_prior = self.prior_images is not None
        n_inst = b // 2 if with_prior else b
        pick = rng.integers(0, len(self.instances), n_inst)
        pixels, labels = self.instances[pick], np.full(n_inst, self.label, np.int32)
        out = {}
        if with_prior:
            pick = rng.integers(0, len(self.prior_images), b - n_inst)
            pixels = np.concatenate([pixels, self.prior_images[pick]])
            labels = np.concatenate([labels, self.prior_labels[pick].astype(np.int32)])
            out["weight"] = np.concatenate([np.full(n_inst, b / n_inst, np.float32),
                                            np.full(b - n_inst, self.prior_weight * b / (b - n_inst),
                                                    np.float32)])
        out.update(image=pixels, label=labels)
        rows = slice(self.first_row, self.first_row + self.local_batch)
        return {k: v[rows] for k, v in out.items()}


def make_iterator(setup: Setup, instances: np.ndarray,
                  prior: tuple[np.ndarray, np.ndarray] | None, mesh: jax.sharding.Mesh) -> Any:
    """The fine-tuning run's input iterator (`data.pipeline.iterator_from_batches`)."""
    from ddpm_jax.data.pipeline import iterator_from_batches

    t, f = setup.config.training, setup.config.finetune
    if prior is not None and t.batch_size < 2:
        raise ValueError(f"training.batch_size={t.batch_size}: prior preservation needs >= 2 rows "
                         "(half instances, half prior samples); raise it or set prior_weight=0.")
    first_row, local_batch = parallel.local_rows(mesh, t.batch_size)
    batches = FewShotBatches(instances, setup.label, None if prior is None else prior[0],
                             None if prior is None else prior[1], float(f.prior_weight),
                             t.batch_size, first_row, local_batch, t.seed)
    settings = dict(finetune_images=len(instances), prior=0 if prior is None else len(prior[0]),
                    seed=t.seed, global_batch_size=t.batch_size, label=setup.label,
                    prior_weight=float(f.prior_weight))
    return iterator_from_batches(batches, mesh, settings)


def summary(setup: Setup, trainable: PyTree) -> str:
    """One log line: what trains, its share of the model's parameters and its size."""
    values, size = adapters.count(trainable)
    total, _ = adapters.count(setup.base_params)
    return (f"Fine-tuning {setup.config.finetune.base} (step {setup.config.finetune.base_step}) "
            f"with method={setup.transform.method}: {values:,} trainable values "
            f"({100 * values / total:.2f}% of {total:,}), {size / 1024:.1f} KiB per copy; the few "
            f"images are class {setup.label}.")


def load_merged(config: ml_collections.ConfigDict, manager: Any, step: int, weights: str,
                sharding: jax.sharding.Sharding, checksums: Any = None) -> PyTree:
    """Plain parameters of a fine-tuning run's checkpoint: its trainable tree (`weights`: "ema"
    or "raw") merged into the base run's parameters, so that sampling costs what the base
    costs. Reads only that tree of the checkpoint."""
    setup = resolve(config, sharding)
    shapes = jax.eval_shape(lambda k: adapters.init_trainable(setup.base_params, setup.transform,
                                                              k), jax.random.PRNGKey(0))
    trainable = checkpoint.restore_weights(manager, step, shapes, weights, sharding, checksums)
    return jax.jit(adapters.merge, static_argnums=2)(setup.base_params, trainable,
                                                     setup.transform)

