"""The expert load matrix that DeepSeek's EPLB plans placements from, written from a profile.

`moescope export PROFILE --format eplb --out load.json` writes

    {"logical_count": [[selections of expert 0..E-1] for each decoder layer 0..num_hidden_layers-1],
     "moescope": {"model": ..., "moe_layers": [...], "tokens": ..., "calibration_hash": ...}}

Counts are the profile's selections (all phases and domains), integers over logical (checkpoint)
expert ids; dense layers are rows of zeros. This is the file SGLang's `--init-expert-location`
reads (the .json suffix picks its JSON reader; a `logical_count` key makes it run EPLB on the
counts; a 2-D matrix is taken as one window). DeepSeek's `eplb.rebalance_experts(weight, ...)`
takes the rows of the MoE layers (`moescope.moe_layers`) as `weight`. vLLM (checked up to 0.33)
measures load only in memory and reads no such file. No torch here: the profile is numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moescope.errors import MoescopeError
from moescope.output import write_atomic
from moescope.profiling.store import Profile

NAME = "eplb"


def load_matrix(profile: Profile, num_hidden_layers: int | None = None) -> np.ndarray:
    """int64 [num_hidden_layers, experts] selections per decoder layer; without `num_hidden_layers` the
    rows end at the last MoE layer."""
    last = max(layer["layer"] for layer in profile.layers)
    rows = last + 1 if num_hidden_layers is None else num_hidden_layers
    if rows <= last:
        raise MoescopeError(f"the model has {rows} layers but the profile routes layer {last}; is it another model?")
    matrix = np.zeros((rows, profile.num_experts), np.int64)
    selections = profile.counters["selections"].sum((0, 1))
    for row, layer in enumerate(profile.layers):
        matrix[layer["layer"]] = selections[row]
    return matrix


def write(profile: Profile, out: str | Path, num_hidden_layers: int | None = None) -> np.ndarray:
    """Write the load matrix as SGLang/EPLB JSON to `out` (must end in .json); returns the matrix."""
    if Path(out).suffix != ".json":
        raise MoescopeError(f"--out {out}: name the file *.json; SGLang chooses how to read "
                            "--init-expert-location by its suffix")
    matrix = load_matrix(profile, num_hidden_layers)
    meta = {"model": profile.model.to_dict(source=True), "moe_layers": [x["layer"] for x in profile.layers],
            "rows": "decoder layers 0..num_hidden_layers-1, dense layers all zero",
            "counts": "expert selections (tokens x top-k), all phases and domains",
            "tokens": int(profile.counters["tokens"].sum()), "prompts": len(profile.prompts),
            "calibration_hash": profile.calibration_hash}
    write_atomic(out, json.dumps({"logical_count": matrix.tolist(), "moescope": meta}) + "\n")
    return matrix
