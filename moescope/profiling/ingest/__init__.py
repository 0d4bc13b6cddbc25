"""Profiles from what serving and training engines already record: `moescope ingest FORMAT FILE...`.

One parser module per engine format, found through `DUMP_FORMATS`: each has NAME, DESCRIPTION and
PER_REQUEST, and either `request(where, body, shape)` (formats of saved JSON response bodies, one
request each) or `read(path, shape, options)` (count formats, one file each); base.py holds what
they share. Per-request formats
give each request's expert ids, which become tagged prompts (a JSONL side file maps request ids to
domain and language); count formats give selections summed over many requests. Dumps carry ids or
counts but no routing weights: the profile lists those counters in `Profile.absent`, and every
metric, tier rule and criterion that needs them says so instead of guessing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from moescope.backends.hf.loading import describe_layers, model_identity, model_on_meta
from moescope.calibration import BCP47, Prompt, read_records
from moescope.errors import MoescopeError
from moescope.identity import ModelIdentity
from moescope.models.layout import text_config
from moescope.output import atomic_directory, check_output
from moescope.profiling.ingest import megatron, sglang, sglang_recorder, vllm
from moescope.profiling.ingest.base import IngestOptions, ModelShape, Request, json_bodies
from moescope.profiling.ingest.build import profile_from_counts, profile_from_requests
from moescope.profiling.store import PROFILE, Profile, merge_all

DUMP_FORMATS = {module.NAME: module for module in (sglang, sglang_recorder, vllm, megatron)}
REQUESTS_PER_CHUNK = 256  # requests whose ids are held at once; their profiles are merged as they come
TOGETHER = "prefill and generation are counted together, as prefill: the dump does not tell them apart"


def model_facts(model_dir: str | Path) -> tuple[ModelShape, object]:
    """The model's MoE shape and its meta-device model (config only, no weights read)."""
    model = model_on_meta(model_dir)
    layers = describe_layers(model)
    experts, top_k = {x["num_experts"] for x in layers}, {x["top_k"] for x in layers}
    if len(experts) > 1 or len(top_k) > 1:
        raise MoescopeError(f"the model's MoE layers differ in expert count or top-k ({sorted(experts)}, "
                            f"{sorted(top_k)}); engine dumps assume one of each")
    config = text_config(model.config)
    shape = ModelShape(int(config.num_hidden_layers), tuple(x["layer"] for x in layers), experts.pop(), top_k.pop())
    return shape, model


def request_tags(path: str | Path | None) -> dict[str, tuple[str, str]]:
    """{request id: (domain, lang)} from a JSONL side file of {"id", "domain", "lang"} objects."""
    if path is None:
        return {}
    tags: dict[str, tuple[str, str]] = {}
    path = Path(path)
    if not path.is_file():
        raise MoescopeError(f"{path}: no such tags file")
    for number, record in read_records(path):
        where = f"{path}:{number}"
        if not isinstance(record, dict) or any(not isinstance(record.get(k), str) or not record[k].strip()
                                               for k in ("domain", "lang")) or record.get("id") in (None, ""):
            raise MoescopeError(f"{where}: a tag line needs 'id', and 'domain' and 'lang' strings")
        if not BCP47.match(record["lang"]):
            raise MoescopeError(f"{where}: 'lang' {record['lang']!r} is not a BCP-47 tag such as 'en' or 'zh-Hans'")
        if str(record["id"]) in tags:
            raise MoescopeError(f"{where}: request id {record['id']!r} is tagged twice")
        tags[str(record["id"])] = (record["domain"], record["lang"])
    return tags


def request_profiles(parser, files: list[str | Path], shape: ModelShape, options: IngestOptions,
                     identity: ModelIdentity, layers: list[dict]) -> Iterator[Profile]:
    """Profiles of consecutive chunks of the requests in `files`, each request a prompt tagged from the side
    file (or with the default domain and language); the dumps are read as a stream, a chunk at a time."""
    tags, seen = request_tags(options.tags), set()
    chunk: list[Request] = []

    def chunk_profile() -> Profile:
        prompts = []
        for request in chunk:
            if request.id in seen:
                raise MoescopeError(f"request id {request.id!r} appears twice in the dumps; each request counts once")
            seen.add(request.id)
            if tags and request.id not in tags:
                raise MoescopeError(f"request {request.id!r} has no line in {options.tags}; tag every request or "
                                    "leave out --tags")
            prompts.append(Prompt(request.id, *tags.get(request.id, (options.domain, options.lang))))
        return profile_from_requests(chunk, prompts, shape, identity, layers, {"source": parser.NAME},
                                     options.coactivation)

    for path in files:
        for where, body in json_bodies(Path(path)):
            chunk.append(parser.request(where, body, shape))
            if len(chunk) == REQUESTS_PER_CHUNK:
                yield chunk_profile()
                chunk = []
    if chunk:
        yield chunk_profile()
    elif not seen:
        raise MoescopeError("the dumps hold no requests")


def ingest(fmt: str, files: list[str | Path], model_dir: str | Path, out: str | Path,
           options: IngestOptions | None = None, overwrite: bool = False) -> Profile:
    """Read engine dumps of `fmt` made on the model at `model_dir` into a profile saved at `out`."""
    options = options or IngestOptions()
    if fmt not in DUMP_FORMATS:
        raise MoescopeError(f"unknown dump format {fmt!r}; choose one of {', '.join(DUMP_FORMATS)}")
    if not files:
        raise MoescopeError("give at least one dump file")
    if not options.domain.strip():
        raise MoescopeError("--domain must not be empty")
    if not BCP47.match(options.lang):
        raise MoescopeError(f"--lang {options.lang!r} is not a BCP-47 tag such as 'en' or 'und'")
    if options.tensor_parallel < 1:
        raise MoescopeError("--tensor-parallel must be at least 1")
    check_output(out, PROFILE, overwrite=overwrite, sources=[model_dir, *files])  # before the dumps are read
    parser = DUMP_FORMATS[fmt]
    shape, model = model_facts(model_dir)
    identity, layers = model_identity(model), describe_layers(model)
    if parser.PER_REQUEST:
        profile = merge_all(request_profiles(parser, files, shape, options, identity, layers))
    else:
        if options.tags or options.coactivation:
            raise MoescopeError(f"{fmt} dumps hold counts summed over requests: --tags and --coactivation need "
                                "per-request formats")
        counts = np.sum([parser.read(Path(path), shape, options) for path in files], axis=0)
        profile = profile_from_counts(counts, options.domain, options.lang, shape, identity, layers,
                                      {"source": fmt, "phases": TOGETHER})
    profile.check()
    with atomic_directory(out, PROFILE, overwrite, sources=[model_dir, *files]) as work:
        profile.save(work)
    return profile
