"""Convert a GGUF model (llama.cpp) into a Hugging Face checkpoint directory.

    python -m opd.model.convert --gguf smollm2-135m --out checkpoints/smollm2-135m-instruct
    python -m opd.model.convert --gguf /models/qwen2.5-0.5b-instruct-q8_0.gguf --out ckpt/qwen --dtype bfloat16

The directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with the chat template)
is what `opd.model.hf.load_pretrained` and `transformers` read. Bad input is one line on stderr and exit
status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from opd.model import gguf


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd.model.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", required=True,
                        help=f"path to a .gguf file, or a packaged model: {', '.join(sorted(gguf.PACKAGED))}")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="parameter dtype written (default float32: dequantized values are kept exactly)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = gguf.convert_gguf(args.gguf, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
