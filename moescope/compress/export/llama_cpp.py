"""llama.cpp: a `--tensor-type-file` for `llama-quantize`.

Lines `REGEX=TYPE` over GGUF tensor names such as `blk.3.ffn_down_exps.weight`, first match wins, the
last line `.*` for the other tensors. llama-quantize reads every word as a rule, so the notes and the
commands from checkpoint to measured model (convert with `gguf_convert.py`, quantise, perplexity) go
to FILE.notes.txt beside it. llama.cpp types have fixed block sizes, not the plan's. Checked with
llama.cpp's own tools (docs/quantization.md; `make check-exports` runs the commands).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from torch import nn

from moescope.checkpoints import read_config
from moescope.compress.quant.apply import non_expert_linears
from moescope.compress.quant.memory import format_bytes, memory_estimate
from moescope.models.layout import expert_matrices
from moescope.models.registry import find_moe_layers
from moescope.output import write_atomic
from moescope.plans import UNQUANTISED, BitPlan

NAME = "llama-cpp"
GGML_TYPES = {2: "q2_K", 3: "q3_K", 4: "q4_K", 8: "q8_0", UNQUANTISED: "bf16"}
GGML_BLOCK = {"q2_K": 256, "q3_K": 256, "q4_K": 256, "q8_0": 32}  # weights per block along a row
# What llama-quantize stores instead when a row is not a whole number of blocks (tensor_type_fallback
# in llama.cpp's src/llama-quant.cpp, 2026; older builds chose iq4_nl for q2_K and q3_K).
GGML_FALLBACK = {"q2_K": "q4_0", "q3_K": "q4_0", "q4_K": "q5_0", "q8_0": "f16"}
# Bits per weight of each ggml type, block scales included (gguf-py's GGML_QUANT_SIZES).
GGML_BITS = {"q2_K": 2.625, "q3_K": 3.4375, "q4_K": 4.5, "q8_0": 8.5, "q4_0": 4.5, "q5_0": 5.5, "f16": 16.0,
             "bf16": 16.0}
FALLBACK_NOTE = "llama.cpp fallback:"  # notes the CLI prints too
SIZE_NOTE = "llama.cpp packed size:"
# The converter's --outtype that keeps a checkpoint's weights as they are (bf16 for any other dtype).
OUTTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
# Repacking (llama.cpp's CPU "extra buffer types") runs q4_0/q8_0 matmuls on kernels built for the build
# host's instruction set; --no-repack keeps the plain ones, so the numbers do not depend on the host.
NO_REPACK = "--no-repack"
CONVERTER = Path(__file__).with_name("gguf_convert.py")  # run by path, with llama.cpp's Python


def adjust(plan: BitPlan) -> tuple[BitPlan, list[str]]:
    """What llama.cpp's quantiser does differently from the plan, in plain words (the plan itself stays)."""
    return plan, ["llama.cpp types use fixed blocks (256 weights for k-quants, 32 for q8_0); the plan's "
                  f"group size {plan.group_size} and {plan.scales} scales do not apply (llama-quantize fits each "
                  "block's scales itself), and it gives tensors whose rows are not a multiple of 256 a fallback "
                  "type instead of a k-quant"]


def tensor_types(plan: BitPlan) -> str:
    """A `llama-quantize --tensor-type-file`: one `REGEX=TYPE` per line. llama-quantize gives a tensor
    the type of the first rule whose regex it contains (so the names are anchored: an unanchored
    `output\\.weight` also catches `blk.0.attn_output.weight`), each layer's expert tensors first,
    then the embeddings and the output, then `.*` for every other quantisable tensor (attention,
    shared experts, dense layers) at the plan's `non_expert_bits`: every tensor is named, and
    llama.cpp's own mixture rules (which raise attn_v and ffn_down) change nothing. Converters that fuse
    gate and up (`--fuse-gate-up-exps`, some architectures by default) write `ffn_gate_up_exps`, which
    the expert rules name too. Norms and routers are never quantised by llama-quantize. The file is
    split on whitespace and every word is a rule, so it holds no comments."""
    lines = [f"^blk\\.{index}\\.ffn_(gate_up|gate|up|down)_exps\\.weight$={GGML_TYPES[bits[0]]}"
             for index, bits in sorted(plan.layers.items())]
    lines += [f"^token_embd\\.weight$={GGML_TYPES[UNQUANTISED]}", f"^output\\.weight$={GGML_TYPES[UNQUANTISED]}",
              f".*={GGML_TYPES[plan.non_expert_bits]}"]
    return "\n".join(lines) + "\n"


def ggml_served(ggml: str, inputs: int) -> str:
    """The type llama-quantize stores a tensor as when asked for `ggml`, given its rows' length."""
    if ggml not in GGML_BLOCK or inputs % GGML_BLOCK[ggml] == 0:
        return ggml
    return GGML_FALLBACK[ggml] if inputs % 32 == 0 else "f16"  # the fallbacks have blocks of 32


def model_notes(plan: BitPlan, model: nn.Module) -> list[str]:
    """What llama-quantize will really store: a note per layer whose expert tensors get a fallback type
    (rows that are not a whole number of the type's blocks), one for the other linear layers, and the
    packed size at ggml's own bits per weight (block scales included, fallbacks counted)."""
    notes, expert_bytes, other_bytes = [], 0.0, 0.0
    for layer in find_moe_layers(model):
        ggml = GGML_TYPES[plan.layers[layer.index][0]]
        served = [(w, ggml_served(ggml, w.shape[1])) for w in expert_matrices(layer)]
        expert_bytes += sum(w.view.numel() * GGML_BITS[kind] / 8 for w, kind in served)
        odd = [f"{w.name} (rows of {w.shape[1]})" for w, kind in served if kind != ggml]
        if odd:
            notes.append(f"{FALLBACK_NOTE} layer {layer.index}: {', '.join(odd)} not a multiple of "
                         f"{GGML_BLOCK[ggml]}: llama-quantize stores them as "
                         f"{'/'.join(sorted({k for _, k in served if k != ggml}))}, not {ggml}")
    ggml = GGML_TYPES[plan.non_expert_bits]
    fallen: dict[str, list[str]] = {}  # fallback type -> names of the linear layers stored at it
    for name, linear in non_expert_linears(model):
        kind = ggml_served(ggml, linear.in_features)
        other_bytes += linear.weight.numel() * GGML_BITS[kind] / 8
        if kind != ggml:
            fallen.setdefault(kind, []).append(name)
    for kind, names in sorted(fallen.items()):
        notes.append(f"{FALLBACK_NOTE} {len(names)} other linear layers ({names[0]}, ...) have rows that are not "
                     f"a multiple of {GGML_BLOCK[ggml]}: llama-quantize stores them as {kind}, not {ggml}")
    rest = memory_estimate(model, plan).other_bytes
    notes.append(f"{SIZE_NOTE} {format_bytes(expert_bytes + other_bytes + rest)} at ggml's bits per weight "
                 f"(experts {format_bytes(expert_bytes)}, other linear {format_bytes(other_bytes)}, "
                 f"rest {format_bytes(rest)})")
    return notes


def notes_path(out: Path) -> Path:
    """Where the llama-cpp export's notes go: beside the type file, which cannot hold comments."""
    return out.with_name(out.name + ".notes.txt")


def base_type(plan: BitPlan) -> str:
    """llama-quantize's positional type: it applies the file's rules only when that type is a quantised
    one, and the rules name every tensor, so it only labels the file."""
    return "Q8_0" if plan.non_expert_bits == UNQUANTISED else GGML_TYPES[plan.non_expert_bits].upper()


def gguf_commands(plan: BitPlan, types_file: Path, model_dir: str | Path = "MODEL_DIR",
                  llama_cpp: str | Path = "LLAMA_CPP_DIR", outtype: str = "bf16", bin_dir: str | Path | None = None,
                  work: str | Path = ".", text: str | Path = "TEXT.txt") -> dict[str, list[str]]:
    """The commands from checkpoint to measured GGUF, as argument lists: `convert` (llama.cpp's converter
    through moescope's gguf_convert.py, which also takes tokenizers llama.cpp does not recognise),
    `quantize` (llama-quantize with the type file) and `perplexity` (llama-perplexity on `text`)."""
    tool = (lambda name: str(Path(bin_dir) / name)) if bin_dir else (lambda name: name)
    source, quantised = str(Path(work) / f"model-{outtype}.gguf"), str(Path(work) / "model-moescope.gguf")
    return {"convert": ["python", str(CONVERTER), "--llama-cpp", str(llama_cpp), str(model_dir),
                        "--outtype", outtype, "--outfile", source],
            "quantize": [tool("llama-quantize"), "--tensor-type-file", str(types_file), source, quantised,
                         base_type(plan)],
            "perplexity": [tool("llama-perplexity"), "-m", quantised, "-f", str(text), NO_REPACK]}


def usage(plan: BitPlan, out: Path, model_dir=None) -> list[str]:
    """The notes' commands, for the checkpoint's own dtype when it is known."""
    config = read_config(Path(model_dir)) if model_dir is not None else {}
    dtype = config.get("dtype", config.get("torch_dtype"))
    steps = gguf_commands(plan, out, model_dir or "MODEL_DIR", outtype=OUTTYPES.get(dtype, "bf16"))
    return ["commands, from checkpoint to measured model (LLAMA_CPP_DIR: llama.cpp's sources, built; "
            "llama-quantize and llama-perplexity are in its build/bin):",
            "1. convert with llama.cpp's converter, in a Python with its requirements (torch, transformers, numpy, "
            "sentencepiece); moescope's gguf_convert.py runs it and names an unrecognised BPE pre-tokenizer gpt-2 "
            "(--tokenizer-pre NAME for another); --outtype keeps the checkpoint's dtype",
            "   " + shlex.join(steps["convert"]),
            f"2. quantise; the positional {base_type(plan)} must be a quantised type, or llama-quantize ignores the "
            f"rules; builds without --tensor-type-file take them as $(sed 's/^/--tensor-type /' {out.name})",
            "   " + shlex.join(steps["quantize"]),
            f"3. measure on any held-out TEXT.txt; {NO_REPACK} keeps llama.cpp's plain CPU kernels instead of "
            "repacking q4_0/q8_0 weights for the build host's instruction set (a GGML_NATIVE binary run on another "
            "CPU can die there with 'Illegal instruction'); the figure depends on the build and its flags",
            "   " + shlex.join(steps["perplexity"])]


def write(plan: BitPlan, notes: list[str], out: Path, model_dir=None) -> str:
    """The type file's text; the notes, with the commands to run, go beside it."""
    notes += usage(plan, out, model_dir)
    write_atomic(notes_path(out), "".join(f"{line}\n" for line in notes))
    return tensor_types(plan)
