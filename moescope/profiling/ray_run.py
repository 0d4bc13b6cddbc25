"""Profile on a Ray cluster: the calibration set cut into shards, one Ray task each, merged on the driver.

Ray is an executor over the local profiler, not a backend. Shards are cut in file order at batch
boundaries, so each shard runs exactly the batches an uninterrupted local run would; each task
loads the model from a path every node sees (with the same loading options as a local run) and
runs `profile_model` over its shard; the driver adds the shard profiles with `Profile.merge` in
shard order, so per-prompt counters come out in file order and the result equals the local profile
counter for counter (given the same kernels and thread counts: the routing weights are floats).

A task that fails (an exception, a worker process that dies) is retried by Ray; a retry recomputes
the whole shard, and only a finished shard's profile is ever kept, so nothing is counted twice.
Finished shards are saved under `PROFILE_DIR.partial/shards/`; `--resume` runs only the missing ones.
Bad input inside a task (a MoescopeError) is returned, not raised, so Ray does not retry it.

Nothing here imports Ray at module level: without --workers, moescope never imports it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from moescope.backends.hf.loading import Placement
from moescope.calibration import Prompt, set_hash
from moescope.checkpoints import check_checkpoint_dir
from moescope.errors import MoescopeError
from moescope.output import atomic_directory, check_output, locked
from moescope.profiling.run import ProfileOptions, finished_profile, profile_model, publish, work_dir
from moescope.profiling.store import PROFILE, Profile, merge_all

RAY_EXTRA = "pip install 'moescope[ray]'"
CLUSTER_STATE, SHARDS = "cluster.json", "shards"


@dataclass
class ClusterOptions:
    workers: int  # shards in flight at once
    address: str | None = None  # head node host:port, "auto", or None to start Ray on this machine
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    retries: int = 3  # times Ray reruns a failed shard
    fail_once: FailOnce | None = None  # test hook


@dataclass
class FailOnce:
    """Test hook: shard `shard` fails once, after its first batch, by raising or by its worker process exiting
    (as when a node or process is killed); `marker` is a file every worker sees, made by the first failure."""

    shard: int
    marker: str
    exit: bool = False


@dataclass
class ShardError:
    """Bad input met inside a task: returned instead of raised, so that Ray does not retry it."""

    message: str


def import_ray():
    """The ray module, or a one-line error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise MoescopeError(f"--workers runs on Ray, which is not installed: {RAY_EXTRA}") from None
    return ray


def check_address(address: str | None) -> None:
    """Fail fast, in one line, when a given head node does not answer (Ray itself would retry for a minute)."""
    if address in (None, "", "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as error:
        raise MoescopeError(f"cannot reach the Ray cluster at {address} ({error}); give --ray-address as HOST:PORT of "
                            "a running head node (`ray start --head`), or leave it out to run Ray on this machine") \
            from None


def shard_prompts(prompts: list[Prompt], batch_size: int, workers: int, checkpoint_every: int) -> list[list[Prompt]]:
    """Consecutive shards of whole batches, in file order: enough for every worker, none longer than
    `checkpoint_every` batches (a shard is also what --resume keeps)."""
    batches = math.ceil(len(prompts) / batch_size)
    size = max(1, min(checkpoint_every, math.ceil(batches / workers))) * batch_size
    return [prompts[i : i + size] for i in range(0, len(prompts), size)]


@functools.lru_cache(maxsize=1)
def _loaded(model_dir: str, placement: Placement):
    """The model and tokenizer, loaded once per worker process (Ray reuses workers across tasks)."""
    from moescope.backends.hf.loading import load_model, load_tokenizer

    return load_model(model_dir, placement), load_tokenizer(model_dir)


class _Progress:
    """A Ray actor the tasks report to: prompts done per shard (a retry reports from zero again)."""

    def __init__(self):
        self.done: dict[int, int] = {}

    def reset(self) -> None:
        self.done = {}

    def report(self, shard: int, prompts: int) -> None:
        self.done[shard] = max(self.done.get(shard, 0), prompts)

    def total(self) -> int:
        return sum(self.done.values())


# The progress actor of this driver's Ray session, kept for its later runs: starting an actor starts a
# process. Keyed by the driver's node and job, which change when Ray is shut down and started again.
_progress_actors: dict[tuple[str, str], object] = {}


def _progress_actor(ray):
    """This session's progress actor, emptied for a new run."""
    context = ray.get_runtime_context()
    key = (context.get_node_id(), context.get_job_id())
    if key not in _progress_actors:
        _progress_actors.clear()
        _progress_actors[key] = ray.remote(_Progress).options(num_cpus=0).remote()
    ray.get(_progress_actors[key].reset.remote())
    return _progress_actors[key]


def _fail_once(hook: FailOnce) -> None:
    """The test hook: the first caller creates the marker and fails; later callers (a retry) go on."""
    try:
        os.close(os.open(hook.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    if hook.exit:
        os._exit(1)  # the worker process dies without a word, as a killed one does
    raise RuntimeError("test hook: this shard fails once, after its first batch")


def run_shard(model_dir: str, placement: Placement, prompts: list[Prompt], options: ProfileOptions, shard: int,
              progress, threads: int, fail_once: FailOnce | None) -> Profile | ShardError:
    """One Ray task: profile one shard on this worker (with `threads` torch threads: a reused worker keeps
    the thread count it started with otherwise) and return its profile."""
    import torch

    torch.set_num_threads(threads)
    done = 0

    def on_batch(count: int) -> None:
        nonlocal done
        done += count
        progress.report.remote(shard, done)
        if fail_once and fail_once.shard == shard:
            _fail_once(fail_once)

    options = dataclasses.replace(options, on_batch=on_batch, progress=False, resume=False, overwrite=True,
                                  checkpoint_every=len(prompts) + 1)
    try:
        model, tokenizer = _loaded(model_dir, placement)
        with tempfile.TemporaryDirectory(prefix="moescope-shard-") as tmp:
            return profile_model(model, tokenizer, prompts, Path(tmp) / "shard", options)
    except MoescopeError as error:
        return ShardError(str(error))


def _open_cluster_dir(work: Path, resume: bool, overwrite: bool, run_key: dict) -> dict[int, Profile]:
    """The shard profiles a resumed run already finished (none for a fresh run, after clearing `work`)."""
    state = work / CLUSTER_STATE
    if work.exists() and resume and state.is_file():
        recorded = json.loads(state.read_text())
        for key, value in run_key.items():
            if recorded.get(key) != value:
                raise MoescopeError(f"{work} was started with a different {key} ({recorded.get(key)} vs {value}); "
                                    "rerun with the same options, or with --overwrite to start over")
        return {int(d.name.split("-")[1]): Profile.load(d) for d in sorted((work / SHARDS).glob("shard-*"))
                if (d / "profile.json").is_file()}
    if work.exists():
        if resume and (work / "progress.json").is_file():
            raise MoescopeError(f"{work} holds an interrupted local run; resume it without --workers, or pass "
                                "--overwrite to start over")
        if not (resume or overwrite):
            raise MoescopeError(f"{work} holds an interrupted run; pass --resume to continue it or --overwrite to "
                                "start over")
        shutil.rmtree(work)
    (work / SHARDS).mkdir(parents=True)
    state.write_text(json.dumps(run_key))
    return {}


def profile_on_ray(model_dir: str | Path, prompts: list[Prompt], out: str | Path, options: ProfileOptions,
                   cluster: ClusterOptions, placement: Placement | None = None) -> Profile:
    """Profile `prompts` on Ray (see the module docstring); each task loads the model as `placement` says."""
    if cluster.workers < 1:
        raise MoescopeError("--workers must be at least 1")
    if options.trace:
        raise MoescopeError("--trace is not available with --workers; profile without it, or trace on one machine")
    out, model_dir = Path(out), str(check_checkpoint_dir(model_dir).resolve())
    finished = finished_profile(out, options)
    if finished is not None:
        return finished
    check_output(out, PROFILE, overwrite=True, sources=[model_dir])
    placement = placement or Placement()
    shards = shard_prompts(prompts, options.batch_size, cluster.workers, options.checkpoint_every)
    task_options = dataclasses.replace(options, trace=None)
    run_key = {"model_dir": model_dir, "placement": repr(placement),
               "calibration_hash": set_hash([p.hash for p in prompts]), "shard_sizes": [len(s) for s in shards],
               "options": {k: v for k, v in dataclasses.asdict(task_options).items()
                           if k not in ("resume", "overwrite", "progress", "on_batch", "checkpoint_every")}}
    ray = _start_ray(cluster.address)  # before anything is written: an unreachable cluster leaves no trace
    work = work_dir(out)
    done = _open_cluster_dir(work, options.resume, options.overwrite, run_key)
    task = ray.remote(run_shard).options(num_cpus=cluster.cpus_per_worker, num_gpus=cluster.gpus_per_worker,
                                         max_retries=cluster.retries, retry_exceptions=True)
    progress = _progress_actor(ray)
    todo = [i for i in range(len(shards)) if i not in done]
    initial = sum(len(shards[i]) for i in done)
    bar = tqdm(total=len(prompts), initial=initial, unit="prompt", disable=not options.progress, dynamic_ncols=True)
    pending: dict = {}
    start = time.perf_counter()
    try:
        while todo or pending:
            while todo and len(pending) < cluster.workers:
                shard = todo.pop(0)
                pending[task.remote(model_dir, placement, shards[shard], task_options, shard, progress,
                                    max(1, int(cluster.cpus_per_worker)), cluster.fail_once)] = shard
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # returns as soon as one is done
            for ref in ready:
                shard = pending.pop(ref)
                done[shard] = _shard_result(ray, ref, shard, cluster.retries)
                with atomic_directory(work / SHARDS / f"shard-{shard:05d}", PROFILE, overwrite=True) as directory:
                    done[shard].save(directory)
            bar.n = initial + ray.get(progress.total.remote())
            bar.set_postfix_str(f"{len(done)}/{len(shards)} shards, {time.perf_counter() - start:,.0f} s")
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        bar.close()
    profile = merge_all(done[i] for i in range(len(shards)))
    profile.check()
    with locked(out):  # checked before any shard ran; held while the finished profile takes its name
        check_output(out, PROFILE, overwrite=True, sources=[model_dir])
        publish(profile, work, out)
    return profile


def _start_ray(address: str | None):
    """Ray, connected: the session already open in this process, a given cluster, or a new one on this machine."""
    ray = import_ray()
    check_address(address)
    if not ray.is_initialized():
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
        except ConnectionError as error:
            raise MoescopeError(f"cannot connect to the Ray cluster at {address}: {str(error).splitlines()[0]}") \
                from None
    return ray


def _shard_result(ray, ref, shard: int, retries: int) -> Profile:
    """The profile a finished task returned; its error as one line when it failed for good."""
    try:
        result = ray.get(ref)
    except ray.exceptions.RayError as error:
        cause = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise MoescopeError(f"shard {shard} failed {retries + 1} times ({cause}); the shards already done are "
                            "kept: rerun with --resume to continue") from None
    if isinstance(result, ShardError):
        raise MoescopeError(result.message)
    return result
