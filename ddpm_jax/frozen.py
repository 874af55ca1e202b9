"""What a run holds frozen beside what it trains: a fine-tuning run's or a ControlNet's base
run, a distillation's teacher. Resolved once at start (`resolve`), with the frozen run's step
pinned in the config so that a resume reads the same weights even after that run trained on.

The frozen parameters are replicated over the mesh and passed to the train step as its
`teacher_params` (never donated, never checkpointed); the trainable state is created by the
method's own `create_state` (`create_fn`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from jax.sharding import Mesh, NamedSharding

from ddpm_jax import checkpoint, control, finetune, parallel, runs, training
from ddpm_jax import config as config_lib


@dataclasses.dataclass
class Frozen:
    """The run's config and model after resolution, and what it holds frozen."""

    config: ml_collections.ConfigDict  # the frozen run's step pinned (base_step, teacher_step)
    model: Any                         # the network the step trains or adapts
    params: Any = None                 # the frozen parameters, replicated; None: nothing frozen
    teacher_mean_type: str = "eps"     # a distillation teacher's output parameterisation
    tuning: Any = None                 # a finetune.Setup or control.Setup; None otherwise
    instances: Any = None              # a fine-tuning run's few images (finetune.load_instances)

    @property
    def transform(self) -> Any:
        """The parameter transform of the step (LoRA, rows, ControlNet branch) or None."""
        return self.tuning.transform if self.tuning is not None else None


def resolve(config: ml_collections.ConfigDict, model: Any, manager: Any,
            last_checkpoint: int | None, replicated: NamedSharding) -> Frozen:
    """The frozen run of `config` (fine-tuning base, ControlNet base, distillation teacher), if
    any, loaded and checked. A bad one raises config.ConfigError in one line."""
    frozen = Frozen(config, model)
    try:
        if config.finetune.base is not None:
            config = pin_step(config, manager, last_checkpoint, "finetune", "base_step")
            tuning = finetune.resolve(config, replicated)
            if config.training.ema_warmup:
                logging.warning("config.training.ema_warmup=True on a fine-tuning run: the EMA "
                                "starts at the base's weights and the warm-up's decay "
                                "(1+n)/(10+n) forgets them (docs/finetuning.md); set "
                                "training.ema_warmup=False to keep them.")
            frozen = Frozen(tuning.config, tuning.model, tuning.base_params, tuning=tuning,
                            instances=finetune.load_instances(config))
        if control.is_controlnet(frozen.config):  # as fine-tuning: the base frozen
            config = pin_step(frozen.config, manager, last_checkpoint, "control", "base_step")
            tuning = control.resolve(config, replicated)
            frozen = Frozen(tuning.config, tuning.model, tuning.base_params, tuning=tuning)
        if frozen.config.distill.teacher is not None:
            config = pin_step(frozen.config, manager, last_checkpoint, "distill", "teacher_step")
            teacher_step, mean_type, teacher = runs.load_teacher(
                    config.distill.teacher, config, step=config.distill.teacher_step,
                    sharding=replicated)
            with config.unlocked():
                config.distill.teacher_step = teacher_step
            logging.info("Distilling the %s-parameterised teacher %s (step %d) from %d DDIM "
                         "steps to %d.", mean_type, config.distill.teacher, teacher_step,
                         config.distill.teacher_steps, config.distill.teacher_steps // 2)
            frozen = dataclasses.replace(frozen, config=config, params=teacher,
                                         teacher_mean_type=mean_type)
    except ValueError as e:
        if isinstance(e, config_lib.ConfigError):
            raise
        raise config_lib.ConfigError(str(e)) from None
    return frozen


def create_fn(frozen: Frozen, optimizer: Any, replicated: NamedSharding
              ) -> Callable[[jax.Array], training.TrainState] | None:
    """key -> the trainable state of a fine-tuning or ControlNet run (jitted, replicated);
    None for a run that trains the whole model (the loop's own create)."""
    if frozen.tuning is None:
        return None
    create = (control.create_state if isinstance(frozen.tuning, control.Setup)
              else finetune.create_state)
    return jax.jit(functools.partial(create, frozen.tuning, optimizer), out_shardings=replicated)


def pin_step(config: ml_collections.ConfigDict, manager: Any, last_checkpoint: int | None,
             section: str, field: str) -> ml_collections.ConfigDict:
    """A copy of `config` whose section.field (distill.teacher_step, finetune.base_step,
    control.base_step) None is the step the run started with (saved with its checkpoints), so
    that a resume reads the same teacher or base even after that run trained on; a fresh run's
    None stays None (the newest, pinned once loaded)."""
    config = copy.deepcopy(config)
    if config[section][field] is None and last_checkpoint is not None:
        saved = checkpoint.restore_config(manager, last_checkpoint)
        with config.unlocked():
            config[section][field] = saved.get(section, {}).get(field)
    return config


@functools.cache
def start_from_teacher(mesh: Mesh) -> Callable[..., training.TrainState]:
    """(fresh state, teacher params) -> the state with params and EMA copies of the teacher's
    (own buffers: the step donates the state, never the teacher): a distillation student
    starts as its teacher."""
    def start(state: training.TrainState, teacher: Any) -> training.TrainState:
        return state.replace(params=jax.tree.map(jnp.copy, teacher),
                             ema_params=jax.tree.map(jnp.copy, teacher))
    return jax.jit(start, out_shardings=parallel.replicated(mesh))
