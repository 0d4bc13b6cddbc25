"""Profile a model: run it over a tagged calibration set and count which experts fire.

Runs the model (either backend: backends.select) over the prompts (prefill, then optionally greedy
decoding) with routing capture, and folds every forward call's routing into the counters of a
`Profile` (profiling.accumulator): memory stays O(layers x experts^2), whatever the token count. A
trace (profiling.trace) can also stream every (token, layer, rank) record to Parquet.

The run holds the lock on PROFILE_DIR (moescope.output), writes into `PROFILE_DIR.partial/` and
renames it when done, so a crash never leaves a profile that looks complete. Every
`checkpoint_every` batches the counters (and closed trace parts) are saved there; `resume` continues
from the last checkpoint and, since batches are cut in file order and each batch's computation is
deterministic, ends with exactly the uninterrupted result. A run resumes only with the same model
(its config hash), calibration set and options; a run that fails before its first checkpoint leaves
nothing behind.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from moescope.backends.hf.loading import eos_ids, input_device, model_identity
from moescope.backends.select import model_layers, routing_capture
from moescope.calibration import Prompt, batches, encode, padded, set_hash
from moescope.errors import MoescopeError
from moescope.identity import ModelIdentity
from moescope.models.layout import prompt_room
from moescope.output import FILE, check_output, locked, read_json, remove
from moescope.profiling.accumulator import Accumulator
from moescope.profiling.store import PROFILE, Profile
from moescope.profiling.trace import TraceWriter
from moescope.schema import Count, check

PROGRESS = "progress.json"
STOP_CHECK = 8  # decode steps between looks at whether every row has ended (each look waits for the device)
PROGRESS_SHAPE = {"batches_done": Count(0), "checkpoint": str, "trace_parts": [str], "run": dict}


@dataclass
class ProfileOptions:
    generate: int = 0  # greedy-decode this many new tokens per prompt (the generation phase)
    batch_size: int = 8
    max_tokens: int | None = 2048  # keep the first max_tokens tokens of each prompt
    coactivation: bool = False
    saliency: bool = False
    prompt_counts: bool = True  # per-prompt selection counts (bootstrap intervals of the balance metrics)
    trace: str | None = None  # Parquet file with one row per token x layer x rank
    checkpoint_every: int = 20  # batches between checkpoints
    resume: bool = False
    overwrite: bool = False
    progress: bool = True  # tqdm bar on stderr
    on_batch: Callable[[int], None] | None = None  # called with each finished batch's prompt count


def profile_model(model, tokenizer, prompts: list[Prompt], out: str | Path,
                  options: ProfileOptions | None = None) -> Profile:
    """Profile `model` over `prompts` into the directory `out`; returns the profile written."""
    options = options or ProfileOptions()
    room = prompt_room(model.config, options.generate, "--generate")
    if room is not None and (options.max_tokens is None or options.max_tokens > room):
        options = dataclasses.replace(options, max_tokens=room)  # positions past the context were never trained
    out, identity = Path(out), model_identity(model)
    finished = finished_profile(out, options)
    if finished is not None:
        return finished
    sources = [identity.source] if identity.source else []
    check_output(out, PROFILE, overwrite=True, sources=sources)
    if options.trace:
        check_output(options.trace, FILE, overwrite=True, sources=sources)
    with locked(out):
        return _profile(model, tokenizer, prompts, out, options, identity)


def _profile(model, tokenizer, prompts: list[Prompt], out: Path, options: ProfileOptions,
             identity: ModelIdentity) -> Profile:
    """`profile_model` once the output is checked and locked."""
    work, layers = work_dir(out), [layer.describe() for layer in model_layers(model)]
    dtype = str(model.dtype).removeprefix("torch.")
    settings = {"dtype": dtype, "generate": options.generate, "max_tokens": options.max_tokens}
    base = Profile.empty(identity, layers, settings, sorted({p.domain for p in prompts}),
                         sorted({p.lang for p in prompts}), options.coactivation, options.saliency,
                         options.prompt_counts)
    run_key = {"settings": settings, "batch_size": options.batch_size, "trace": bool(options.trace),
               "coactivation": options.coactivation, "saliency": options.saliency,
               "prompt_counts": options.prompt_counts,
               "calibration_hash": set_hash([p.hash for p in prompts]), "model": identity.to_dict()}
    done, parts, base = _open_work_dir(work, options, run_key, base)
    try:
        profile = _run(model, tokenizer, prompts, work, options, run_key, done, parts, base)
    except BaseException:
        if not (work / PROGRESS).is_file():  # nothing to resume from: leave nothing behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    publish(profile, work, out)
    return profile


def _run(model, tokenizer, prompts: list[Prompt], work: Path, options: ProfileOptions, run_key: dict, done: int,
         parts: list[str], base: Profile) -> Profile:
    """Run the batches from number `done` on, then save the profile (and the trace) into `work`."""
    device = input_device(model)
    trace = TraceWriter(work) if options.trace else None
    acc = Accumulator(base, device, trace)
    groups = batches(prompts, options.batch_size)
    eos = torch.tensor(eos_ids(model, tokenizer), dtype=torch.long, device=device)
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    bar = tqdm(total=len(prompts), initial=done * options.batch_size, unit="prompt", disable=not options.progress,
               dynamic_ncols=True)
    tokens, start = 0, time.perf_counter()
    with bar, routing_capture(model, saliency=options.saliency, on_event=acc.on_event), torch.inference_mode():
        for number in range(done, len(groups)):
            if trace is not None and trace.writer is None:
                parts.append(f"trace-{number:06d}.parquet")
                trace.open_part(parts[-1])
            tokens += _run_batch(model, tokenizer, groups[number], acc, options, eos, keep_logits)
            bar.update(len(groups[number]))
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):,.0f} tok/s")
            if options.on_batch is not None:
                options.on_batch(len(groups[number]))
            if (number + 1) % options.checkpoint_every == 0 and number + 1 < len(groups):
                _checkpoint(acc, work, number + 1, parts, run_key)
    profile = acc.export()
    profile.check()
    if trace is not None:
        trace.finish(parts, Path(options.trace))
    return profile


def work_dir(out: Path) -> Path:
    """Where a run into `out` keeps its checkpoints until it is complete."""
    return out.with_name(out.name + ".partial")


def finished_profile(out: Path, options: ProfileOptions) -> Profile | None:
    """The complete profile at `out` when resuming a run that already finished; None when there is none
    (or --overwrite replaces it); an error when it exists and neither --resume nor --overwrite was given."""
    if not out.exists() or options.overwrite:
        return None
    if options.resume:
        print(f"{out} is complete; nothing to resume")
        return Profile.load(out)
    raise MoescopeError(f"{out} already exists; pass --overwrite to replace it or --resume to continue it")


def publish(profile: Profile, work: Path, out: Path) -> None:
    """Save `profile` as the only content of the work directory, then rename it to `out` (replacing it)."""
    for stale in os.listdir(work):
        remove(work / stale)
    profile.save(work)
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)


def _open_work_dir(work: Path, options: ProfileOptions, run_key: dict, base: Profile):
    """(batches done, trace parts, counters) to start from: the last checkpoint in `work` when
    resuming a run with the same options, else nothing (after clearing `work`)."""
    if work.exists() and options.resume and (work / PROGRESS).is_file():
        progress = check(read_json(work / PROGRESS, "progress file"), PROGRESS_SHAPE, str(work / PROGRESS),
                         "rerun with --overwrite to start over")
        if any(Path(name).name != name or name in ("", ".", "..") for name in (progress["checkpoint"],
                                                                               *progress["trace_parts"])):
            raise MoescopeError(f"{work / PROGRESS} names files outside {work}; rerun with --overwrite to start over")
        recorded = ModelIdentity.from_dict(progress["run"].get("model"), str(work / PROGRESS))
        recorded.require(ModelIdentity.from_dict(run_key["model"]), f"interrupted run in {work}")
        for key, value in run_key.items():
            if progress["run"].get(key) != value:
                raise MoescopeError(f"{work} was started with a different {key} ({progress['run'].get(key)} vs "
                                    f"{value}); rerun with the same options, or with --overwrite to start over")
        for stale in set(os.listdir(work)) - {PROGRESS, progress["checkpoint"], *progress["trace_parts"]}:
            remove(work / stale)
        return progress["batches_done"], progress["trace_parts"], Profile.load(work / progress["checkpoint"])
    if work.exists():
        if not (options.resume or options.overwrite):
            raise MoescopeError(f"{work} holds an interrupted run; pass --resume to continue it or --overwrite "
                                "to start over")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return 0, [], base


def _checkpoint(acc: Accumulator, work: Path, batches_done: int, parts: list[str], run_key: dict) -> None:
    """Save the counters so far; progress.json is replaced last, so a checkpoint is whole or absent."""
    if acc.trace is not None:
        acc.trace.close_part()
    profile = acc.export()
    profile.check()
    name = f"checkpoint-{batches_done:06d}"
    profile.save(work / name)
    tmp = work / f"{PROGRESS}.tmp"
    tmp.write_text(json.dumps({"batches_done": batches_done, "checkpoint": name, "trace_parts": parts,
                               "run": run_key}))
    os.replace(tmp, work / PROGRESS)
    for old in work.glob("checkpoint-*"):
        if old.name != name:
            shutil.rmtree(old)


def _run_batch(model, tokenizer, batch: list[Prompt], acc: Accumulator, options: ProfileOptions, eos,
               keep_logits: bool) -> int:
    """Prefill one batch (left-padded), then greedy-decode; returns the tokens routed.

    The decode loop never waits for the device per step: rows that ended are dropped from the counts
    on the device (`alive`), and whether all have ended is read every `STOP_CHECK` steps only."""
    encoded = encode(batch, tokenizer, options.max_tokens)
    lengths = torch.tensor([len(e.ids) for e in encoded])
    width = int(lengths.max())
    routed = int(lengths.sum())
    ids, mask = padded([e.ids for e in encoded], left=True)
    ids, mask, lengths = (t.to(acc.device, non_blocking=True) for t in (ids, mask, lengths))
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"logits_to_keep": 1} if keep_logits else {}
    acc.begin_batch(batch)
    acc.begin_call(0, lengths - width)
    output = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=options.generate > 0,
                   **extra)
    acc.end_call(lengths)
    alive = torch.ones(len(batch), dtype=torch.bool, device=acc.device)
    generated = torch.zeros((), dtype=torch.long, device=acc.device)
    for step in range(options.generate):
        token = output.logits[:, -1].argmax(-1).to(acc.device)
        mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)
        position = position[:, -1:] + 1
        acc.begin_call(1, lengths + step, alive)
        output = model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                       cache=output.cache, use_cache=True, **extra)
        acc.end_call(alive.long())
        generated += alive.sum()
        alive = alive & ~(token[:, None] == eos).any(-1)
        if (step + 1) % STOP_CHECK == 0 and not alive.any():
            break
    acc.end_batch([e.truncated for e in encoded])
    return routed + int(generated)
