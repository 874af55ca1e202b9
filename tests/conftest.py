"""Test-wide JAX settings (silent broadcasting mistakes become errors) and the fixtures that
more than one test file uses."""

import os

# Tests run on the CPU; keep XLA from grabbing every core's worth of threads per process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are compile-bound (tiny models, a few steps): XLA's CPU backend without LLVM's
# optimisation passes compiles about 40% faster here and computes the same functions (every
# tolerance is unchanged). Subprocesses get it through `xla_flags`. The benchmarks do not use it.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test's subprocess: `devices` simulated CPU devices, fast compiles."""
    return FAST_COMPILE + ("" if devices is None else
                           f" --xla_force_host_platform_device_count={devices}")

import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# The suite compiles the same tiny programs many times over: in each test process, and in the
# train.py / sample.py / example subprocesses. One persistent compilation cache per pytest run
# (made before the xdist workers start, so they and every subprocess inherit it; removed at the
# end) lets each program compile once. A cached executable is the same binary, so results are
# bit-identical; only XLA's compile step is skipped (tracing and the in-memory jit caches, which
# the compile-once tests count, are untouched).
CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
    if hasattr(config, "workerinput") or os.environ.get(CACHE_ENV):
        return  # an xdist worker (it inherited the controller's cache) or a cache chosen by hand
    path = tempfile.mkdtemp(prefix="ddpm_jax_tests_xla_cache_")
    config._ddpm_xla_cache = path
    os.environ[CACHE_ENV] = path
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def pytest_unconfigure(config):
    path = getattr(config, "_ddpm_xla_cache", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


# The digits feature net (test_features.py, test_evaluate.py): trained once per test process
# into `cache_dir`, which the evaluation tests also use for their reference statistics.
@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def digits_net(cache_dir):
    from ddpm_jax import features

    return features.digits_feature_net(16, cache_dir=cache_dir)


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
    """The digits at 8x8, prepared once per test process (read only: every run reads them)."""
    from ddpm_jax import data

    path = str(tmp_path_factory.mktemp("tfds"))
    data.prepare_dataset("digits", path, image_size=8)
    return path


def perturbed(params, key, scale: float = 0.05):
    """params plus scale * N(0, 1) noise per leaf: an untrained UNet's zero-initialised output
    layers predict eps = 0 whatever its inputs (labels included); this one does not."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype)
                                     for leaf, k in zip(leaves, keys)])


def perturbed_on_host(params, seed: int, scale: float = 0.05):
    """`perturbed` with the noise drawn by NumPy (seed `seed`) and put on the device in one
    transfer: the same kind of weights for tests that need no particular values, without
    compiling one threefry program per leaf (16 s of CPU for the tiny UNet under jit)."""
    rng = np.random.default_rng(seed)
    return jax.device_put(jax.tree.map(
            lambda leaf: np.asarray(leaf) + scale * rng.standard_normal(leaf.shape).astype(leaf.dtype),
            params))


def write_untrained_run(config, workdir: str, perturb: float = 0.0) -> None:
    """A work dir whose one checkpoint (step 0) holds `config`'s freshly initialised weights
    (with `perturb`, those plus that much noise, `perturbed_on_host`): all that the sampling,
    editing and guidance command-line tests load, without compiling a train step."""
    from ddpm_jax import checkpoint, training
    from ddpm_jax import config as config_lib

    model = config_lib.model_from_config(config)
    optimizer = config_lib.optimizer_from_config(config)
    # Under jit: seconds, not a minute, of eager UNet initialisation on a loaded CPU.
    state = jax.jit(lambda key: training.create_train_state(
            model, optimizer, key, config_lib.image_shape(config)))(jax.random.PRNGKey(0))
    if perturb:
        params = perturbed_on_host(state.params, 1, perturb)
        state = state.replace(params=params, ema_params=perturbed_on_host(state.params, 1, perturb))
    manager = checkpoint.make_manager(workdir, max_to_keep=1)
    checkpoint.save(manager, 0, state, config)
    manager.wait_until_finished()
    manager.close()
