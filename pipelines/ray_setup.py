"""Starting or joining Ray the same way in every job (local instance by default), and Ray's
logging: its known noise filtered in every Ray process, its INFO lines only when verbose."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os

import ray
from ray._private import ray_constants

from pipelines import console

# Set for every process Ray starts: no usage reporting, no update checks, no hub access.
OFFLINE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}

# Run by every worker Ray starts for our jobs (quiet_ray_logs).
SETUP_HOOK = "pipelines.ray_setup.quiet_ray_logs"

# Ray replaces 127.0.0.1 by the machine's routable address (`resolve_ip_for_localhost`), so
# `_node_ip_address="127.0.0.1"` alone still binds the GCS and workers to e.g. eth0. Only a
# single-node instance keeps loopback; Ray spells that switch with its Windows/macOS flag,
# read once at import, and then refuses to add nodes (a local instance never has any).
LOOPBACK_ENV = {ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}

_RAY_DIR = os.path.dirname(ray.__file__)

# (logger name, message fragment) of known Ray noise, dropped by a filter on that one logger.
KNOWN_NOISE = (
    # Ray Train's detached placement-group cleaner polls the State API, which needs the
    # dashboard; a local instance runs without one, so it warns about once a second.
    (
        "ray.train.v2._internal.execution.controller.placement_group_cleaner",
        "Failed to query Ray Train Controller actor state",
    ),
    # Ray Train logs every ray.train.report as a TrainingReport(...) dump (logger named by
    # its file); the driver prints one line per window instead.
    (os.path.join(_RAY_DIR, "train", "v2", "_internal", "execution", "context.py"), "Reporting training result"),
    # We turn Ray Data's own progress off (the jobs report their own progress).
    ("ray.data._internal.progress", "Progress bars disabled"),
)
# Ray's INFO chatter (instance started, dataset plans and "finished" lines) is shown only
# with --verbose: the `ray` logger at WARNING, and Ray Data's console handler at WARNING
# (its ray-data.log file in the session folder keeps everything). Ray Train's own INFO
# lines follow RunConfig(logging_config=...), see ray_train_log_level().


class DropMessage(logging.Filter):
    """Drops the records of one logger whose message contains `fragment`."""

    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def quiet_ray_logs(verbose: bool | None = None) -> None:
    """Install the known-noise filters, and unless verbose raise Ray's loggers to WARNING.
    Idempotent; also Ray's `worker_process_setup_hook` of every job (ray_setup.init_ray)."""
    verbose = console.is_verbose() if verbose is None else verbose
    if verbose:
        return
    for name, fragment in KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.fragment == fragment for f in logger.filters):
            logger.addFilter(DropMessage(fragment))
    logging.getLogger("ray").setLevel(logging.WARNING)
    import ray.data  # noqa: F401  (configures its loggers on import: adjust them after)

    for handler in logging.getLogger("ray.data").handlers:
        # its log file (SessionFileHandler, no FileHandler subclass) keeps every level
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.setLevel(logging.WARNING)


def ray_train_log_level() -> str:
    """Ray Train's console level (ray.train.LoggingConfig): its INFO lines only if verbose."""
    return "INFO" if console.is_verbose() else "WARNING"


def configure_logging(verbose: bool = False) -> None:
    """Our INFO lines, Ray's warnings and errors; Ray's INFO logs too when verbose."""
    os.environ[console.VERBOSE_ENV] = "1" if verbose else "0"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_ray_logs(verbose)
    if not verbose:  # the jobs report their own progress (console.Progress)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False


def keep_on_loopback() -> None:
    """Make a Ray instance started from this process use 127.0.0.1 for every address."""
    os.environ.update(LOOPBACK_ENV)  # the processes Ray starts import it afresh
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process imported it already


def init_ray(address: str | None = None, *, num_cpus: int | None = None, warm_modules: tuple[str, ...] = ()) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS); else start a local instance on
    loopback and, given `warm_modules`, start its workers at once (warm_workers).
    Idempotent."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    level = logging.INFO if console.is_verbose() else logging.WARNING
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Credentials are never put into the runtime env (it is stored by the cluster): cluster
        # pods get theirs from secrets. Every process Ray starts filters the same known noise as
        # this one (console.py).
        env = {**OFFLINE_ENV, console.VERBOSE_ENV: "1" if console.is_verbose() else "0"}
        runtime_env = {"env_vars": env, "worker_process_setup_hook": SETUP_HOOK}
        ray.init(address=address, runtime_env=runtime_env, logging_level=level)
        return
    start_local_instance(num_cpus, level)
    if warm_modules:
        warm_workers(warm_modules)


def start_local_instance(num_cpus: int | None, level: int) -> None:
    """A single-node instance on loopback, its processes children of this one. They inherit
    this process's environment, so the settings a cluster job passes in its runtime env (the
    offline variables, the verbosity, SETUP_HOOK) reach them without one: a job with a
    runtime env has every worker started through Ray's runtime-env agent and cannot use the
    workers Ray prestarts, one per CPU, as the instance starts (measured here: 2 s more before
    a job's first two tasks ran, and a small prepare job's first download ~3 s later). A
    module-path setup hook is what Ray's runtime env itself turns into
    WORKER_PROCESS_SETUP_HOOK_ENV_VAR for the worker."""
    # address="local": the embedded default never attaches to some other cluster that
    # happens to run on this machine; join one explicitly with --ray-address/RAY_ADDRESS.
    keep_on_loopback()
    hook_var = ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR
    previous = os.environ.get(hook_var)
    os.environ[hook_var] = SETUP_HOOK
    try:  # the raylet, and so every worker, takes the environment as it is now
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level=level,
            _node_ip_address="127.0.0.1",
        )
    finally:
        if previous is None:
            os.environ.pop(hook_var, None)
        else:
            os.environ[hook_var] = previous


@contextlib.contextmanager
def ray_for_job(address: str | None, *, warm_modules: tuple[str, ...] = ()):
    """init_ray for one job's duration: an instance this call started is shut down at the end,
    at once (Ray's exit hook would first sleep 0.5 s); one the caller already had (the tests'
    session instance, the demo's, a notebook's) stays up."""
    joined = ray.is_initialized()
    init_ray(address, warm_modules=warm_modules)
    try:
        yield
    finally:
        if not joined:
            ray.shutdown()


def warm_workers(modules: tuple[str, ...], n_workers: int | None = None) -> list:
    """Warm the job's workers now, one task per CPU unless `n_workers`, each importing
    `modules` (those its tasks run from; see import_modules), while the driver goes on;
    returns the tasks' refs (nothing needs to wait for them). Without it a small prepare job
    plans in one worker and its first downloads wait for the others' imports. Measured on
    2 cores: img2dataset's downloader (~0.5 s) is worth warming, a 2,000-image job's first
    request came ~1 s sooner; its whole package (~2.5 s, before img2dataset_modules) held the
    CPUs that planning needs and was slower."""
    n_workers = n_workers or cluster_cpus()
    task = ray.remote(num_cpus=1, max_retries=0)(import_modules)
    return [task.remote(modules) for _ in range(n_workers)]


def cluster_cpus() -> int:
    """CPUs of the Ray instance this process joined (1 when Ray is not running)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1))) if ray.is_initialized() else 1


def import_modules(modules: tuple[str, ...]) -> int:
    """Imports `modules` in this process; an entry `module:function` also calls that function
    (a load that an import alone does not do). Returns the process id."""
    for name in modules:
        module_name, _, function = name.partition(":")
        module = importlib.import_module(module_name)
        if function:
            getattr(module, function)()
    return os.getpid()
