"""Test session set-up: 8 emulated CPU devices, configured once before JAX initializes."""

import os

N_TEST_DEVICES = 8

# Must happen before the first `import jax` anywhere in the test process.
from codesign.runtime import emulate_cpu_devices

os.environ["JAX_PLATFORMS"] = "cpu"
emulate_cpu_devices(os.environ, N_TEST_DEVICES)
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax
import pytest

jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="session")
def n_devices() -> int:
    return len(jax.devices())


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_child_env(n_devices: int, drop_prefix: str | None = None) -> dict[str, str]:
    """Environment for a JAX child process on `n_devices` emulated CPU devices that imports this checkout.

    `drop_prefix` removes inherited variables (e.g. "CODESIGN_") that would change the child's behaviour.
    """
    env = {k: v for k, v in os.environ.items() if not (drop_prefix and k.startswith(drop_prefix))}
    emulate_cpu_devices(env, n_devices)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def env_asking_for_host_devices(n: int, xla_flags: str = "") -> dict[str, str]:
    """A user environment (not this process's) whose XLA_FLAGS ask for `n` host devices, after
    `xla_flags`: for tests of the checks that read such an environment."""
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n} {xla_flags}".strip()}


_HOST_STATES: dict = {}


def initial_state(prog, seed: int = 0):
    """`prog`'s initial train state, placed in its shardings. The values are initialized once per
    (model, param dtype, optimizer, seed) by a one-device program and kept on the host: init values do
    not depend on the layout, and each layout's own `prog.init` would be one more compile (about half
    of a small same-loss test's time on 2 cores)."""
    from codesign.sharding.mesh import MeshSpec
    from codesign.sharding.strategy import Strategy
    from codesign.train_step import TrainProgram

    key = (prog.cfg, prog.workload.param_dtype, prog.opt_cfg, seed)
    if key not in _HOST_STATES:
        one = Strategy.parse("data=1")
        ref = TrainProgram(
            prog.cfg,
            prog.workload,
            one,
            MeshSpec.from_strategy(one).build(jax.devices()),
            optimizer=prog.opt_cfg,
        )
        _HOST_STATES[key] = jax.device_get(ref.init(seed=seed))
    return jax.device_put(prog.pad_stack(_HOST_STATES[key]), prog.state_shardings)


def train_losses(prog, step, steps: int) -> list[float]:
    """The losses of `steps` calls of `step` (`prog`'s compiled step) from `initial_state`, on the
    same random token batches for every layout: what the same-loss tests compare."""
    import jax.numpy as jnp
    import numpy as np

    w = prog.workload
    shape = (steps, w.global_batch, w.seq_len + 1)
    tokens = np.random.RandomState(0).randint(0, prog.cfg.vocab_size, shape).astype(np.int32)
    state, out = initial_state(prog), []
    for batch in tokens:
        state, metrics = step(state, jax.device_put(jnp.asarray(batch), prog.batch_sharding))
        out.append(float(metrics["loss"]))
    return out


def require_devices(n: int) -> None:
    """Skip the calling test when fewer than n devices exist (with the reason)."""
    have = len(jax.devices())
    if have < n:
        pytest.skip(
            f"needs {n} devices, the test process has {have} (tests/conftest.py sets {N_TEST_DEVICES})"
        )
