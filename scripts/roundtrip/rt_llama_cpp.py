"""llama.cpp: the commands the export's notes give (moescope's gguf_convert.py with llama.cpp's converter,
llama-quantize with the type file, llama-perplexity with --no-repack), then the GGUF read back.

llama.cpp rounds its own way (fixed blocks of 32 or 256 weights, fitted scales), so its weights cannot
equal moescope's; what is checked instead:
- types: every expert and attention tensor has the type the plan asks for, fallbacks included (exact);
- bytes: every tensor of a type gguf-py can quantise (q4_0, q4_1, q5_0, q5_1, q8_0, bf16) equals gguf-py's
  quantisation of the f32 source, byte for byte (exact);
- weights: dequantised, each quantised tensor's squared error against the original is at most
  MAX_ERROR_RATIO times the plan's; norms and routers identical;
- logits (llama-cpp-python's bindings on the same build, f32 KV cache, no repacking) against transformers
  running the GGUF's own dequantised weights: KL at most MAX_KL (llama.cpp's dot products round the
  activations to 8 bits for quantised weights); against the fake-quantised model: printed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from common import ASSETS, Served, logits_of, parameters, transformers_model

from moescope.compress.export.llama_cpp import GGML_TYPES, ggml_served, gguf_commands
from moescope.plans import UNQUANTISED

NAME = "llama-cpp"
EXPORT_ARGS = ["--format", "llama-cpp"]
EXPORT_FILE = "types.txt"
LOGIT_BOUND: dict = {}  # against the fake-quantised model: another rounding, so printed, not bounded
MAX_ERROR_RATIO = 1.0
MAX_KL = 0.01
GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}
PER_LAYER = {"attn_norm": "input_layernorm.weight", "attn_q": "self_attn.q_proj.weight",
             "attn_k": "self_attn.k_proj.weight", "attn_v": "self_attn.v_proj.weight",
             "attn_output": "self_attn.o_proj.weight", "attn_q_norm": "self_attn.q_norm.weight",
             "attn_k_norm": "self_attn.k_norm.weight", "ffn_norm": "post_attention_layernorm.weight",
             "ffn_gate_inp": "mlp.gate.weight", "ffn_down_exps": "mlp.experts.down_proj",
             "ffn_gate_up_exps": "mlp.experts.gate_up_proj"}
GGUF_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def sources(options) -> tuple[Path, Path]:
    """llama.cpp's sources and its build's binaries, inside llama-cpp-python's unpacked sdist; puts gguf-py
    and the Python bindings on the path."""
    if options.llama_cpp_python is None:
        raise SystemExit("llama-cpp needs --llama-cpp-python SDIST (make check-exports-llama-cpp builds it)")
    sdist = options.llama_cpp_python.resolve()
    llama_cpp, bins = sdist / "vendor" / "llama.cpp", sdist / "vendor" / "llama.cpp" / "build" / "bin"
    sys.path[:0] = [str(llama_cpp / "gguf-py"), str(sdist)]
    os.environ["LLAMA_CPP_LIB_PATH"] = str(bins)
    return llama_cpp, bins


def versions(options) -> str:
    return f"llama.cpp from {options.llama_cpp_python.name if options.llama_cpp_python else '?'} (its vendored sources)"


def run(command: list[str], log: Path) -> str:
    print("$ " + " ".join(command), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode:
        raise SystemExit(f"{Path(command[0]).name} failed ({done.returncode}); see {log}")
    return done.stdout + done.stderr


def expected_type(name: str, row: int, plan) -> str | None:
    """The type the plan asks llama-quantize for (fallback included); None for tensors it does not name."""
    if name in ("token_embd.weight", "output.weight"):
        return GGML_TYPES[UNQUANTISED]
    match = GGUF_NAME.match(name)
    if not match:
        return None
    if match[2].endswith("_exps"):
        return ggml_served(GGML_TYPES[plan.layers[int(match[1])][0]], row)
    if match[2] in ("attn_q", "attn_k", "attn_v", "attn_output"):
        return ggml_served(GGML_TYPES[plan.non_expert_bits], row)
    return None


def hf_weights(reader) -> dict[str, torch.Tensor]:
    """The GGUF's tensors dequantised (gguf-py), under transformers' parameter names."""
    from gguf.quants import dequantize

    tensors = {t.name: torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
               for t in reader.tensors}
    found = {GLOBAL[name]: w for name, w in tensors.items() if name in GLOBAL}
    for name, w in tensors.items():
        match = GGUF_NAME.match(name)
        if match and match[2] in PER_LAYER:
            found[f"model.layers.{match[1]}.{PER_LAYER[match[2]]}"] = w
        if match and match[2] == "ffn_gate_exps":
            found[f"model.layers.{match[1]}.mlp.experts.gate_up_proj"] = torch.cat(
                [w, tensors[f"blk.{match[1]}.ffn_up_exps.weight"]], dim=1)
    return found


def byte_problems(reader, source) -> tuple[list[str], str]:
    """Tensors whose bytes differ from gguf-py's own quantisation of the f32 source."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    checkable = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.BF16}
    originals = {t.name: t for t in source.tensors}
    problems, same, other = [], 0, 0
    for t in reader.tensors:
        if t.tensor_type == originals[t.name].tensor_type:
            continue  # not quantised
        if t.tensor_type not in checkable:
            other += 1
            continue
        ours = quantize(np.asarray(originals[t.name].data, dtype=np.float32), t.tensor_type)
        if ours.tobytes() == np.asarray(t.data).tobytes():
            same += 1
        else:
            problems.append(f"{t.name}: llama-quantize's {t.tensor_type.name} bytes differ from gguf-py's")
    return problems, (f"{same} quantised tensors byte-identical to gguf-py's quantisation of the f32 source, "
                      f"{len(problems)} differ, {other} of types gguf-py cannot quantise (k-quants)")


def llama_model(path: Path, context: int):
    """The GGUF in llama.cpp through its Python bindings on the same build: f32 KV cache (the default f16
    one alone moves the logits by KL 6e-4), no repacking (llama-cli's --no-repack: use_extra_bufts off)."""
    import llama_cpp
    import llama_cpp.llama as bindings

    defaults = llama_cpp.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    bindings.llama_cpp.llama_model_default_params = no_repack
    return llama_cpp.Llama(str(path), n_ctx=context, n_batch=context, logits_all=True, verbose=False, n_threads=2,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def tokenizer_problems(llm, model_dir: Path) -> tuple[list[str], str]:
    """Every held-out text tokenised by llama.cpp (with the pre-tokenizer gguf_convert.py named) and by
    transformers: they must agree, or the converted tokenizer is not the model's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, model_max_length=1 << 30)  # whole texts, no warning
    texts = [row["text"] for path in sorted((ASSETS / "heldout").glob("*.jsonl"))
             for row in map(json.loads, path.read_text().splitlines()) if "text" in row]
    differ = [i for i, text in enumerate(texts) if llm.tokenize(text.encode(), add_bos=False, special=False)
              != tokenizer(text, add_special_tokens=False)["input_ids"]]
    line = f"tokenizer: {len(texts) - len(differ)} of {len(texts)} held-out texts tokenised as transformers does"
    return [f"tokenizer: held-out text {i} tokenised differently by llama.cpp" for i in differ[:5]], line


def llama_logits(llm, windows: torch.Tensor) -> torch.Tensor:
    """llama.cpp's logits for each window."""
    rows = []
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        rows.append(np.array(llm.scores[: len(window)], dtype=np.float32))
    return torch.from_numpy(np.stack(rows))


def serve(case, work, export_file, coarse, windows, texts, options) -> Served:
    llama_cpp, bins = sources(options)
    from gguf import GGUFReader

    (work / "TEXT.txt").write_text("\n\n".join(texts))
    steps = gguf_commands(coarse, export_file, case.model_dir, llama_cpp, "f32", bins, work, work / "TEXT.txt")
    run([sys.executable, *steps["convert"][1:]], work / "convert.log")
    run(steps["quantize"], work / "quantize.log")
    extra = ["-c", str(windows.shape[1]), "-b", str(windows.shape[1]), "--chunks", str(len(windows)), "-t", "2"]
    ppl = re.search(r"Final estimate: PPL = ([\d.]+)", run(steps["perplexity"] + extra, work / "perplexity.log"))
    quantised, source = GGUFReader(steps["quantize"][4]), GGUFReader(steps["quantize"][3])
    problems, bytes_line = byte_problems(quantised, source)
    weights = hf_weights(quantised)
    rows = {t.name: (int(t.shape[0]), t.tensor_type.name) for t in quantised.tensors}

    def structure(plan) -> list[str]:
        wanted = {name: expected_type(name, row, plan) for name, (row, _) in rows.items()}
        return [f"{name}: stored as {kind}, the plan asks for {wanted[name]}"
                for name, (_, kind) in sorted(rows.items()) if wanted[name] and wanted[name].upper() != kind.upper()]

    model = transformers_model(case.model_dir)
    original = {name: w.clone() for name, w in parameters(model).items()}
    quantised_names = [n for n in original if "experts" in n or ("self_attn" in n and n.endswith("proj.weight")
                                                                 and coarse.non_expert_bits != UNQUANTISED)]
    exact_names = [n for n in original if any(k in n for k in ("norm", "mlp.gate.weight"))]
    model.load_state_dict({k: w for k, w in weights.items() if k in original}, strict=False)
    llm = llama_model(Path(steps["quantize"][4]), windows.shape[1])
    cpp = llama_logits(llm, windows)
    token_problems, token_line = tokenizer_problems(llm, case.model_dir)
    kinds = sorted({kind for _, kind in rows.values()})
    return Served(weights, cpp, problems=problems + token_problems, structure=structure,
                  compare=[{"names": quantised_names, "original": original, "max_error_ratio": MAX_ERROR_RATIO},
                           {"names": exact_names}],
                  logit_checks=[("llama.cpp vs transformers running the GGUF's own weights", cpp,
                                 logits_of(model, windows), {"max_kl": MAX_KL})],
                  lines=[f"GGUF types: {', '.join(kinds)}", bytes_line, token_line,
                         "llama-perplexity (its own scoring: the second half of each window): "
                         + (ppl[1] if ppl else "?")])
