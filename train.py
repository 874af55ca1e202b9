"""Trains a DDPM: `python train.py --config configs/digits.py --workdir runs/digits`.

Override any config field on the command line, e.g. `--config.training.batch_size=64`;
`--config configs/cifar10.py:tiny` picks a variant. Rerunning with the same --workdir resumes
from its latest checkpoint. Multi-host: run the same command on every host with
--coordinator_address=HOST0:PORT --num_processes=N --process_id=I (or let a launcher's
environment, e.g. Slurm or Cloud TPU, provide them).

Progressive distillation (docs/distillation.md): `--config configs/digits.py:distill
--config.distill.teacher=runs/digits` trains config.distill.rounds halvings, round k in
WORKDIR/round_k, each an ordinary run (its own checkpoints; rerunning resumes the chain).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))

_CONFIG = config_flags.DEFINE_config_file(
        "config", os.path.join(_HERE, "configs", "digits.py"),
        "Experiment config file (ml_collections), optionally with a variant: path.py:tiny.",
        lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples; "
                               "an existing one is resumed.", required=True)
_COORDINATOR = flags.DEFINE_string(
        "coordinator_address", None, "HOST:PORT of process 0's coordinator (multi-host). The "
        "coordinator binds to this address only.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
_PREEMPTION = flags.DEFINE_boolean(
        "preemption_service", True, "In a single-process run, start jax.distributed on "
        "127.0.0.1 so that SIGTERM saves a checkpoint and exits 0 (multi-process runs always "
        "have it).")
_PROGRESS = flags.DEFINE_boolean("progress_bar", True, "Show a progress bar (process 0).")
_LIBRARY_LOGS = flags.DEFINE_boolean(
        "library_logs", False, "Also show the INFO logs of libraries (orbax, jax, tfds); by "
        "default only their warnings and errors are shown.")


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with an unknown `--config.a.b=...` field, and a --config file that is
    missing, not Python or without the variant, as one line instead of ml_collections'
    tracebacks."""
    from ddpm_jax.cli import check_config_file
    named = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    named += [b for a, b in zip(argv[1:], argv[2:]) if a == "--config"]
    try:
        for spec in named:
            check_config_file(spec)
    except ValueError as e:
        sys.exit(f"FATAL Flags parsing error: {e}")
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError) as e:
        key = str(e).strip("\"'")
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        named = [a for a in overrides if f".{key}" in a] or overrides or ["--config"]
        sys.exit(f"FATAL Flags parsing error: {named[0]}: the config has no field `{key}` there "
                 "(an unknown field: check the spelling; every field is listed in "
                 "configs/base.py).")


def _check_workdir(workdir: str) -> None:
    """The work dir, before anything touches it: not empty, not a file, writable."""
    from ddpm_jax.cli import check_output_path
    if not workdir.strip():
        raise app.UsageError("--workdir is empty: name the run's directory, e.g. "
                             "--workdir=runs/digits.")
    try:
        check_output_path(workdir, "--workdir", directory=True)
    except ValueError as e:
        raise app.UsageError(str(e)) from None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments {argv[1:]}; overrides look like "
                             "--config.training.lr=1e-4.")
    _check_workdir(_WORKDIR.value)
    from ddpm_jax.cli import OwnInfoOnly, drop_closed_event_loop_noise
    drop_closed_event_loop_noise()
    if not _LIBRARY_LOGS.value:
        logging.get_absl_handler().addFilter(OwnInfoOnly(os.path.abspath(__file__)))
    # jax.distributed must start before any other JAX call.
    from ddpm_jax import checkpoint, parallel
    distributed = parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                                  _PROCESS_ID.value)
    if not distributed and _PREEMPTION.value:
        checkpoint.start_single_process_preemption_service()

    from ddpm_jax import config as config_lib
    from ddpm_jax import loop

    config = _CONFIG.value
    try:
        config_lib.validate(config)  # a wrong value: its one-line message, no traceback
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    logging.info("Config:\n%s", config)
    if config.distill.teacher is None:
        runs = [(_WORKDIR.value, config)]
    else:  # a chain of distillation rounds, each an ordinary run in WORKDIR/round_k
        runs = loop.distillation_rounds(config, _WORKDIR.value)
    for workdir, run_config in runs:
        if workdir != _WORKDIR.value:
            logging.info("Distillation round in %s: %d -> %d steps.", workdir,
                         run_config.distill.teacher_steps, run_config.distill.teacher_steps // 2)
        _train(run_config, workdir)


def _train(config, workdir: str) -> None:
    """One run of the loop, with the expected mistakes as one line."""
    import jax

    from ddpm_jax import checkpoint, data, lock, loop
    from ddpm_jax import config as config_lib
    from ddpm_jax.cli import ProgressBar
    progress = None
    if _PROGRESS.value and jax.process_index() == 0:
        progress = ProgressBar(config.training.num_steps)
    try:
        loop.train_and_evaluate(config, workdir, progress=progress)
    except (lock.WorkdirLockedError, checkpoint.CheckpointError, data.DataNotPreparedError,
            data.DataShapeError, config_lib.ConfigError, loop.NonFiniteError) as e:
        # Expected mistakes (another trainer's work dir, a checkpoint of another config or a
        # corrupt one, a refused non-finite save or a non-finite stop, data not prepared, a
        # batch that does not split over the devices): one line, no traceback. Tracebacks
        # stay for bugs.
        raise app.UsageError(" ".join(str(e).split("\n"))) from None
    finally:
        if progress is not None:
            progress.close()


if __name__ == "__main__":
    sys.path.insert(0, _HERE)  # configs/*.py import `configs.base`
    app.run(main, flags_parser=_parse_flags)
