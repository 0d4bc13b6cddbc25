"""Convert a Hugging Face checkpoint to GGUF with llama.cpp's own converter, also when llama.cpp does
not recognise the tokenizer's pre-tokenizer.

    python gguf_convert.py --llama-cpp LLAMA_CPP_DIR [--tokenizer-pre gpt-2] MODEL_DIR \
        --outtype f32 --outfile model.gguf

Run it by path with the Python that has llama.cpp's converter requirements (torch, transformers,
numpy, sentencepiece): it imports nothing from moescope. llama.cpp's converter names a BPE
tokenizer's pre-tokenizer by hashing the ids it gives a fixed text (`get_vocab_base_pre`) and stops
with "BPE pre-tokenizer was not recognized" on a hash it does not list; it has no option to name
one, and its own remedy (convert_hf_to_gguf_update.py) downloads reference tokenizers. This wrapper
keeps every answer the converter knows and gives an unknown hash `--tokenizer-pre` instead, with a
warning. The default, gpt-2, is a byte-level BPE split with GPT-2's regex, which is what a tokenizer
trained with the `tokenizers` library's ByteLevel pre-tokenizer (use_regex on) uses; other values
llama.cpp accepts for `tokenizer.ggml.pre` include llama-bpe, qwen2 and deepseek-llm. The other
arguments go to convert_hf_to_gguf.py unchanged.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path


def patch_pre_tokenizer(text_model: type, fallback: str) -> None:
    """Make `text_model.get_vocab_base_pre` answer `fallback` where it would refuse an unknown hash."""
    known = text_model.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            logging.getLogger("gguf_convert").warning(
                "llama.cpp does not know this tokenizer's pre-tokenizer: writing tokenizer.ggml.pre = %r", fallback)
            return fallback

    text_model.get_vocab_base_pre = get_vocab_base_pre


def run_converter(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    parser.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp source directory")
    parser.add_argument("--tokenizer-pre", default="gpt-2", help="pre-tokenizer for an unknown hash (gpt-2)")
    args, rest = parser.parse_known_args(argv)
    sources = args.llama_cpp.resolve()
    if not (sources / "convert_hf_to_gguf.py").is_file():
        parser.error(f"{sources} has no convert_hf_to_gguf.py: give the llama.cpp source directory")
    sys.path[:0] = [str(sources), str(sources / "gguf-py")]
    converter = importlib.import_module("convert_hf_to_gguf")
    try:  # the model classes live in conversion/ since 2026, in the converter itself before
        text_model = importlib.import_module("conversion.base").TextModel
    except ImportError:
        text_model = converter.TextModel
    patch_pre_tokenizer(text_model, args.tokenizer_pre)
    sys.argv = [str(sources / "convert_hf_to_gguf.py"), *rest]
    converter.main()


if __name__ == "__main__":
    run_converter()
