"""`moescope profile MODEL_DIR --calibration FILE --out PROFILE_DIR`: count which experts fire.

Runs the model over a tagged calibration set (prefill, then optionally greedy decoding) with
`capture_routing` hooks, and folds every forward call's routing into the counters of a `Profile`
with a handful of vectorised tensor ops: memory stays O(layers x experts^2), whatever the token
count. `--trace` also streams every (token, layer, rank) record to Parquet in bounded row groups.

The run writes into `PROFILE_DIR.partial/` and renames it when done, so a crash never leaves a
profile that looks complete. Every `--checkpoint-every` batches the counters (and closed trace
parts) are saved there; `--resume` continues from the last checkpoint and, since batches are cut in
file order and each batch's computation is deterministic, ends with exactly the uninterrupted result.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moescope.calibration import Prompt, batches, encode, load_calibration, set_hash
from moescope.errors import MoescopeError
from moescope.loading import prompt_room
from moescope.stats import AXES, FIXED_SCALE, HIST_BINS, HIST_EDGES, PHASES, Profile, config_hash

PROGRESS = "progress.json"


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_DIR", help="local Hugging Face checkpoint directory")
    parser.add_argument("--calibration", required=True, metavar="FILE", help="calibration set (JSONL)")
    parser.add_argument("--out", required=True, metavar="PROFILE_DIR", help="directory to write the profile to")
    parser.add_argument("--generate", type=int, default=0, metavar="N",
                        help="greedy-decode N new tokens per prompt and profile them as the generation phase")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=2048,
                        help="cap on tokens per prompt (default 2048; 0: none); never more than the model's context "
                        "minus --generate")
    parser.add_argument("--domains", help="comma-separated domains to profile (default: all)")
    parser.add_argument("--dtype", help="e.g. bfloat16, float32 (default: the checkpoint's)")
    parser.add_argument("--device", help="e.g. cpu, cuda, auto (default: cpu)")
    parser.add_argument("--coactivation", action="store_true", help="count expert pairs chosen together")
    parser.add_argument("--saliency", action="store_true",
                        help="sum routing weight x expert output norm (REAP); costs k extra expert passes")
    parser.add_argument("--no-prompt-counts", action="store_true",
                        help="do not keep per-prompt selection counts (4 bytes per prompt x layer x expert); "
                             "`stats` then gives no intervals for entropy ratio, Gini and top-n share")
    parser.add_argument("--trace", metavar="FILE.parquet", help="also write every routing record to Parquet")
    parser.add_argument("--checkpoint-every", type=int, default=20, metavar="BATCHES",
                        help="save the counters every this many batches, for --resume")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run into PROFILE_DIR")
    parser.add_argument("--overwrite", action="store_true", help="replace PROFILE_DIR if it exists")


def run(args: argparse.Namespace) -> int:
    from moescope.loading import load_model, load_tokenizer

    if args.batch_size < 1 or args.generate < 0 or args.checkpoint_every < 1:
        raise MoescopeError("--batch-size and --checkpoint-every must be positive, --generate not negative")
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    prompts = load_calibration(args.calibration, domains)
    out = Path(args.out)
    if out.exists() and not args.overwrite and not args.resume:
        raise MoescopeError(f"{out} already exists; pass --overwrite to replace it or --resume to continue it")
    model = load_model(args.model, dtype=args.dtype, device_map=args.device)
    options = ProfileOptions(args.generate, args.batch_size, args.max_tokens or None, args.coactivation,
                             args.saliency, not args.no_prompt_counts, args.trace, args.checkpoint_every,
                             args.resume, args.overwrite)
    try:
        profile = profile_model(model, load_tokenizer(args.model), prompts, out, options)
    except KeyboardInterrupt:
        raise MoescopeError("interrupted; rerun with --resume to continue from the last checkpoint") from None
    tokens = profile.summary()["tokens"]
    print(f"profiled {len(profile.prompts)} prompts ({tokens['prefill']} prefill and {tokens['generation']} "
          f"generation tokens, {len(profile.layers)} MoE layers) into {out}")
    return 0


class Accumulator:
    """Torch counters for one run, fed one forward call at a time.

    The loop says which phase and which live rows a forward call covers (`begin_call`); the capture
    hook hands over events (`on_event`); `end_call` folds the call's events into the counters with
    one bincount / index_add per counter, for all layers at once.
    """

    def __init__(self, base: Profile, device, trace: TraceWriter | None = None):
        import torch

        self.torch, self.device, self.trace = torch, device, trace
        self.base = base
        self.dense = {name: torch.from_numpy(array.copy()).to(device) for name, array in base.counters.items()
                      if AXES[name][0] != "prompt"}
        self.prompts: list[dict] = list(base.prompts)
        self.per_prompt: dict[str, list[np.ndarray]] = {name: [array] for name, array in base.counters.items()
                                                        if AXES[name][0] == "prompt"}
        self.L, self.E = len(base.layers), base.num_experts
        self.layer_row = {layer["layer"]: i for i, layer in enumerate(base.layers)}
        self.layer_index = [layer["layer"] for layer in base.layers]
        self.edges = torch.tensor(HIST_EDGES, dtype=torch.float32, device=device)
        self.events: list = []

    def begin_batch(self, batch: list[Prompt]) -> None:
        torch = self.torch
        self.batch = batch
        self.row_domain = torch.tensor([self.base.domains.index(p.domain) for p in batch], device=self.device)
        self.row_lang = torch.tensor([self.base.langs.index(p.lang) for p in batch], device=self.device)
        self.presence = torch.zeros(len(PHASES), len(batch), self.L, self.E, dtype=torch.bool, device=self.device)
        self.prompt_tokens = torch.zeros(len(batch), len(PHASES), dtype=torch.long, device=self.device)
        self.prompt_counts = torch.zeros(len(batch), self.L, self.E, dtype=torch.long, device=self.device)

    def begin_call(self, phase: int, offsets, alive=None) -> None:
        """Next forward call: its phase, each row's position offset, and the rows still counted."""
        self.phase, self.offsets, self.alive = phase, offsets, alive

    def on_event(self, event) -> None:
        self.events.append(event)

    def end_call(self, tokens_per_row) -> None:
        """Fold the call's events into the counters; `tokens_per_row` is what the loop fed (no padding)."""
        torch, p, E, L = self.torch, self.phase, self.E, self.L
        events, self.events = self.events, []
        self._count_tokens(tokens_per_row)
        if not events:
            return

        def cat(field):
            return torch.cat([getattr(e, field).to(self.device) for e in events])

        ids, weights, rows, positions = cat("expert_ids"), cat("weights"), cat("rows"), cat("positions")
        layer = torch.cat([torch.full((len(e.rows),), self.layer_row[e.layer], device=self.device) for e in events])
        norms = None
        if "saliency_sum" in self.dense:
            if any(e.output_norms is None for e in events):
                raise MoescopeError(f"--saliency is not available for {self.base.model['model_type']}: capture "
                                    "cannot measure its experts' outputs per token; profile without it")
            norms = cat("output_norms")
        if self.alive is not None:
            keep = self.alive[rows]
            ids, weights, rows, positions, layer = ids[keep], weights[keep], rows[keep], positions[keep], layer[keep]
            norms = norms[keep] if norms is not None else None
        k = ids.shape[1]
        slot = (layer[:, None] * E + ids).reshape(-1)  # (layer, expert) per selection
        d = self.dense

        def count(group, name, size):  # selections by domain or language
            index = ((group[rows][:, None] * L + layer[:, None]) * E + ids).reshape(-1)
            d[name][p] += torch.bincount(index, minlength=size * L * E).view(size, L, E)

        count(self.row_domain, "selections", len(self.base.domains))
        count(self.row_lang, "lang_selections", len(self.base.langs))
        w = weights.double().reshape(-1)
        d["weight_sum"][p].view(-1).index_add_(0, slot, fixed(w))
        d["weight_sq"][p].view(-1).index_add_(0, slot, fixed(w * w))
        bins = torch.bucketize(weights.float().reshape(-1), self.edges, right=True)
        d["weight_hist"][p] += torch.bincount(slot * HIST_BINS + bins, minlength=L * E * HIST_BINS).view(
            L, E, HIST_BINS)
        share = weights.double() / weights.double().sum(-1, keepdim=True).clamp_min(1e-30)
        d["entropy_sum"][p].index_add_(0, layer, fixed(-torch.special.xlogy(share, share).sum(-1)))
        per_row = (rows[:, None] * L * E + slot.view(-1, k)).reshape(-1)
        self.presence[p].view(-1)[per_row] = True
        if "prompt_counts" in self.per_prompt:
            self.prompt_counts.view(-1).index_add_(0, per_row, torch.ones_like(per_row))
        if "coactivation" in d:
            pairs = ((layer[:, None, None] * E + ids[:, :, None]) * E + ids[:, None, :]).reshape(-1)
            d["coactivation"][p] += torch.bincount(pairs, minlength=L * E * E).view(L, E, E)
        if norms is not None:
            d["saliency_sum"][p].view(-1).index_add_(0, slot, fixed(w * norms.double().reshape(-1)))
        if self.trace is not None:
            self.trace.add(self.batch, PHASES[p], rows, positions + self.offsets[rows], layer, ids, weights,
                           self.layer_index)

    def _count_tokens(self, tokens_per_row) -> None:
        p, d = self.phase, self.dense
        d["tokens"][p].index_add_(0, self.row_domain, tokens_per_row)
        d["lang_tokens"][p].index_add_(0, self.row_lang, tokens_per_row)
        self.prompt_tokens[:, p] += tokens_per_row

    def end_batch(self, truncated: list[bool]) -> None:
        presence = self.presence.transpose(0, 1).cpu().numpy()
        self.per_prompt["presence"].append(np.packbits(presence, axis=-1, bitorder="little"))
        self.per_prompt["prompt_tokens"].append(self.prompt_tokens.cpu().numpy())
        if "prompt_counts" in self.per_prompt:  # a prompt picks an expert at most once per token: fits uint32
            self.per_prompt["prompt_counts"].append(self.prompt_counts.cpu().numpy().astype(np.uint32))
        self.prompts += [{"id": p.id, "domain": p.domain, "lang": p.lang, "hash": p.hash, "truncated": t}
                         for p, t in zip(self.batch, truncated, strict=True)]

    def export(self) -> Profile:
        """The counters so far as a (numpy) Profile."""
        profile = Profile(self.base.model, self.base.layers, self.base.settings, self.base.domains,
                          self.base.langs, list(self.prompts))
        profile.counters = {name: t.cpu().numpy().copy() for name, t in self.dense.items()}
        profile.counters.update({name: np.concatenate(parts) for name, parts in self.per_prompt.items()})
        return profile


def fixed(values):
    """Float64 tensor -> int64 in units of 1/FIXED_SCALE (see stats.py: exact, mergeable sums)."""
    return (values * FIXED_SCALE).round().long()


class TraceWriter:
    """Streams routing records to Parquet parts, one row group per `group_rows` rows at most.

    Each checkpoint closes the current part; `finish` concatenates the parts, row group by row group.
    """

    def __init__(self, directory: Path, group_rows: int = 1 << 18):
        import pyarrow as pa

        self.pa, self.directory, self.group_rows = pa, directory, group_rows
        self.schema = pa.schema([("prompt_id", pa.string()), ("domain", pa.string()), ("phase", pa.string()),
                                 ("position", pa.int32()), ("layer", pa.int16()), ("rank", pa.int8()),
                                 ("expert", pa.int16()), ("weight", pa.float32())])
        self.writer = None
        self.buffer: list = []
        self.buffered = 0

    def open_part(self, name: str) -> None:
        import pyarrow.parquet as pq

        self.writer = pq.ParquetWriter(self.directory / name, self.schema)

    def add(self, batch, phase, rows, positions, layer, ids, weights, layer_index) -> None:
        pa = self.pa
        k = ids.shape[1]
        rows = rows.cpu().numpy().astype(np.int32).repeat(k)

        def strings(index, names):
            return pa.DictionaryArray.from_arrays(pa.array(index), pa.array(names)).dictionary_decode()

        domains = sorted({p.domain for p in batch})
        columns = [
            strings(rows, [p.id for p in batch]),
            strings(np.array([domains.index(p.domain) for p in batch], np.int32)[rows], domains),
            strings(np.zeros(len(rows), np.int32), [phase]),
            pa.array(positions.cpu().numpy().astype(np.int32).repeat(k)),
            pa.array(np.asarray(layer_index, np.int16)[layer.cpu().numpy()].repeat(k)),
            pa.array(np.tile(np.arange(k, dtype=np.int8), len(positions))),
            pa.array(ids.cpu().numpy().astype(np.int16).reshape(-1)),
            pa.array(weights.float().cpu().numpy().reshape(-1)),
        ]
        self.buffer.append(pa.RecordBatch.from_arrays(columns, schema=self.schema))
        self.buffered += len(rows)
        if self.buffered >= self.group_rows:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.writer.write_table(self.pa.Table.from_batches(self.buffer), row_group_size=self.group_rows)
        self.buffer, self.buffered = [], 0

    def close_part(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
        self.writer = None

    def finish(self, parts: list[str], path: Path) -> None:
        import pyarrow.parquet as pq

        self.close_part()
        tmp = path.with_name(path.name + ".partial")
        with pq.ParquetWriter(tmp, self.schema) as writer:
            for part in parts:
                source = pq.ParquetFile(self.directory / part)
                for group in range(source.num_row_groups):
                    writer.write_table(source.read_row_group(group))
        os.replace(tmp, path)


def model_identity(model) -> tuple[dict, list[dict]]:
    """(model dict, layer list) that a profile is tied to."""
    from moescope.models import find_moe_layers, text_config

    config = text_config(model.config)
    model_info = {"model_type": config.model_type, "config_hash": config_hash(model.config.to_dict()),
                  "source": str(getattr(model.config, "_name_or_path", "") or "")}
    return model_info, [layer.describe() for layer in find_moe_layers(model)]


def profile_model(model, tokenizer, prompts: list[Prompt], out: str | Path,
                  options: ProfileOptions | None = None) -> Profile:
    """Profile `model` over `prompts` into the directory `out`; returns the profile written."""
    import torch
    from tqdm import tqdm

    from moescope.capture import capture_routing

    options = options or ProfileOptions()
    room = prompt_room(model.config, options.generate, "--generate")
    if room is not None and (options.max_tokens is None or options.max_tokens > room):
        options = dataclasses.replace(options, max_tokens=room)  # positions past the context were never trained
    out = Path(out)
    work = out.with_name(out.name + ".partial")
    if out.exists() and not options.overwrite:
        if options.resume:
            print(f"{out} is complete; nothing to resume")
            return Profile.load(out)
        raise MoescopeError(f"{out} already exists; pass --overwrite to replace it or --resume to continue it")
    device = model.device
    model_info, layers = model_identity(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    settings = {"dtype": dtype, "generate": options.generate, "max_tokens": options.max_tokens}
    base = Profile.empty(model_info, layers, settings, sorted({p.domain for p in prompts}),
                         sorted({p.lang for p in prompts}), options.coactivation, options.saliency,
                         options.prompt_counts)
    run_key = {"settings": settings, "batch_size": options.batch_size, "trace": bool(options.trace),
               "coactivation": options.coactivation, "saliency": options.saliency,
               "prompt_counts": options.prompt_counts,
               "calibration_hash": set_hash([p.hash for p in prompts])}
    done, parts, base = _open_work_dir(work, options, run_key, base)
    trace = TraceWriter(work) if options.trace else None
    acc = Accumulator(base, device, trace)
    groups = batches(prompts, options.batch_size)
    eos = _eos_ids(model, tokenizer, device)
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    bar = tqdm(total=len(prompts), initial=done * options.batch_size, unit="prompt", disable=not options.progress,
               dynamic_ncols=True)
    tokens, start = 0, time.perf_counter()
    with capture_routing(model, saliency=options.saliency, on_event=acc.on_event), torch.inference_mode():
        for number in range(done, len(groups)):
            if trace is not None and trace.writer is None:
                parts.append(f"trace-{number:06d}.parquet")
                trace.open_part(parts[-1])
            tokens += _run_batch(model, tokenizer, groups[number], acc, options, eos, keep_logits)
            bar.update(len(groups[number]))
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):,.0f} tok/s")
            if (number + 1) % options.checkpoint_every == 0 and number + 1 < len(groups):
                _checkpoint(acc, work, number + 1, parts, run_key)
    bar.close()
    profile = acc.export()
    profile.check()
    if trace is not None:
        trace.finish(parts, Path(options.trace))
    for stale in os.listdir(work):
        _remove(work / stale)
    profile.save(work)
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    return profile


def _open_work_dir(work: Path, options: ProfileOptions, run_key: dict, base: Profile):
    """(batches done, trace parts, counters) to start from: the last checkpoint in `work` when
    resuming a run with the same options, else nothing (after clearing `work`)."""
    if work.exists() and options.resume and (work / PROGRESS).is_file():
        progress = json.loads((work / PROGRESS).read_text())
        for key, value in run_key.items():
            if progress["run"].get(key) != value:
                raise MoescopeError(f"{work} was started with a different {key} ({progress['run'].get(key)} vs "
                                    f"{value}); rerun with the same options, or with --overwrite to start over")
        for stale in set(os.listdir(work)) - {PROGRESS, progress["checkpoint"], *progress["trace_parts"]}:
            _remove(work / stale)
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


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _eos_ids(model, tokenizer, device):
    import torch

    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else getattr(tokenizer, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return torch.tensor(eos, dtype=torch.long, device=device)


def _run_batch(model, tokenizer, batch: list[Prompt], acc: Accumulator, options: ProfileOptions, eos,
               keep_logits: bool) -> int:
    """Prefill one batch (left-padded), then greedy-decode; returns the tokens routed."""
    import torch

    encoded = encode(batch, tokenizer, options.max_tokens)
    lengths = torch.tensor([len(e.ids) for e in encoded])
    width = int(lengths.max())
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, width - len(e.ids):] = torch.tensor(e.ids)
        mask[row, width - len(e.ids):] = 1
    ids, mask, lengths = ids.to(acc.device), mask.to(acc.device), lengths.to(acc.device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"logits_to_keep": 1} if keep_logits else {}
    acc.begin_batch(batch)
    acc.begin_call(0, lengths - width)
    output = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=options.generate > 0,
                   **extra)
    acc.end_call(lengths)
    alive = torch.ones(len(batch), dtype=torch.bool, device=acc.device)
    routed = int(lengths.sum())
    for step in range(options.generate):
        token = output.logits[:, -1].argmax(-1)
        mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)
        position = position[:, -1:] + 1
        acc.begin_call(1, lengths + step, alive)
        output = model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                       cache=output.cache, use_cache=True, **extra)
        acc.end_call(alive.long())
        routed += int(alive.sum())
        alive = alive & ~torch.isin(token, eos)
        if not alive.any():
            break
    acc.end_batch([e.truncated for e in encoded])
    return routed
