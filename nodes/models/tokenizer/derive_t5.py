"""Derive the shipped T5 tokenizer (t5/tokenizer.json) from stable-diffusion.cpp's embedded copy.

Not used at runtime: the derived file is committed in t5/. Re-run only to regenerate it:

    pip download --no-deps --no-binary :all: -d /tmp/sdcpp stable-diffusion-cpp-python==0.4.7
    tar xzf /tmp/sdcpp/stable_diffusion_cpp_python-0.4.7.tar.gz -C /tmp/sdcpp
    python nodes/models/tokenizer/derive_t5.py \
        /tmp/sdcpp/stable_diffusion_cpp_python-0.4.7/vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp

That sdist vendors stable-diffusion.cpp (MIT), which embeds the standard T5 v1.1 / T5-XXL tokenizer
(Google's 32000-piece SentencePiece unigram vocabulary, Apache-2.0, plus 100 <extra_id_*> tokens) as
the tokenizers-library JSON, written out as a C byte array named `t5_tokenizer_json_str`. The bytes
are copied unchanged (the array's trailing NULs dropped).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ARRAY = "t5_tokenizer_json_str[]"


def extract(header: str) -> bytes:
    start = header.index("{", header.index(ARRAY))
    end = header.index("};", start)
    return bytes(int(x, 16) for x in re.findall(r"0x[0-9a-fA-F]{1,2}", header[start:end])).rstrip(b"\0")


def main(argv: list[str]) -> None:
    data = extract(Path(argv[1]).read_text(encoding="utf-8"))
    out = Path(__file__).parent / "t5" / "tokenizer.json"
    out.parent.mkdir(exist_ok=True)
    out.write_bytes(data)
    print(f"wrote {out} ({len(data)} bytes)")


if __name__ == "__main__":
    main(sys.argv)
