"""Second-moment statistics C0 = E[k kᵀ] of the edited layers' keys over a text corpus."""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..common.fileio import (
    RecordsError,
    read_located_records,
    sha256_file,
    tensor_sha256,
    write_tensors,
)
from ..model.arch import ModelLayout
from ..model.hooks import capture, run_until_stopped
from ..model.loading import LoadedModel, cache_dir
from ..model.placement import index_on, input_device
from . import stats_dist
from .sampling import sample_corpus
from .text import pad_id_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Corpus:
    texts: list[str]
    fingerprint: str
    description: str
    # Text sampled from the model (no corpus given): its size is the recipe's, said in the
    # description, so a smaller-than-asked warning would only repeat it.
    sampled: bool = False


class CorpusError(ValueError):
    pass


# A corpus giving less than 1/SMALL_CORPUS_SHARE of the tokens asked is warned about.
SMALL_CORPUS_SHARE = 2
# The whole-text cap for a model whose config names no context length.
FALLBACK_MAX_LEN = 2048
LEGACY_PIECE_TOKENS = 256


class StatsRecipeError(ValueError):
    pass


@dataclass(frozen=True)
class StatsRecipe:
    """How the corpus is cut and counted for C0. The default is the authors'
    (MEMIT/AlphaEdit ``layer_stats``): whole texts, each truncated to ``max_len`` tokens
    (``None``: the model's context length). ``piece_tokens`` cuts every text into pieces
    of that many tokens instead (256: sphere-edit's recipe before it followed the
    authors). ``samples`` takes the first that many texts of the corpus instead of a
    token budget."""

    piece_tokens: int | None = None
    samples: int | None = None
    max_len: int | None = None

    def __post_init__(self) -> None:
        if self.piece_tokens is not None and self.piece_tokens < 2:
            raise StatsRecipeError(
                f"stats_pieces: pieces of {self.piece_tokens} tokens are too short; give "
                "'whole' or a length of at least 2 (256 is the old recipe)"
            )
        if self.samples is not None and self.samples < 1:
            raise StatsRecipeError(f"stats_samples: must be at least 1, got {self.samples}")
        if self.max_len is not None and self.max_len < 1:
            raise StatsRecipeError(f"stats max_len: must be at least 1, got {self.max_len}")

    @classmethod
    def parse(
        cls, pieces: str | int | None = None, samples: int | None = None, tokens: int | None = None
    ) -> StatsRecipe:
        """``pieces`` as the CLI and presets give it: ``"whole"`` (or ``None``) or a piece
        length such as ``"256"``; ``samples`` and a token count ``tokens`` exclude each
        other (the statistics' size is one or the other)."""
        if tokens is not None and samples is not None:
            raise StatsRecipeError(
                "stats_samples: give either a token count (stats_tokens) or a sample count, "
                "not both"
            )
        if pieces is None or str(pieces).strip().lower() == "whole":
            return cls(samples=samples)
        try:
            length = int(str(pieces).strip())
        except ValueError:
            raise StatsRecipeError(
                f"stats_pieces: cannot read {pieces!r}; give 'whole' or a piece length such as 256"
            ) from None
        return cls(piece_tokens=length, samples=samples)

    @property
    def pieces(self) -> str:
        """``"whole"`` or the piece length, as the journal and the cache record it."""
        return "whole" if self.piece_tokens is None else str(self.piece_tokens)

    def size_tag(self, max_tokens: int | None) -> str:
        """The statistics' size in a cache file name: ``"<N>tok"`` or ``"<N>samples"``."""
        return f"{max_tokens}tok" if self.samples is None else f"{self.samples}samples"

    def cache_suffix(self) -> str:
        """The end of this recipe's cache file names: none for the default (whole texts up
        to the model's context), so an entry written before recipes were recorded (the
        256-token pieces) is found at the default's name and told apart by its metadata."""
        if self.piece_tokens is None:
            return "" if self.max_len is None else f"-whole{self.max_len}"
        return f"-pieces{self.piece_tokens}"

    def describe(self, max_len: int | None = None) -> dict[str, str]:
        """The recipe's fields in the cache metadata (``max_len``: the resolved cap)."""
        meta = {"pieces": self.pieces}
        if self.piece_tokens is None:
            meta["max_len"] = str(max_len)
        if self.samples is not None:
            meta["samples"] = str(self.samples)
        return meta


DEFAULT_RECIPE = StatsRecipe()


def context_length(model: nn.Module) -> int:
    """The model's context length (``max_position_embeddings``, or GPT-2's ``n_positions``),
    the authors' cap on a statistics text. A config naming neither gets
    :data:`FALLBACK_MAX_LEN`, with a warning."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    log.warning(
        "the model's config gives no context length (max_position_embeddings); statistics "
        "texts are truncated to %d tokens",
        FALLBACK_MAX_LEN,
    )
    return FALLBACK_MAX_LEN


def load_corpus(
    source: str | None,
    loaded: LoadedModel | None = None,
    *,
    sample_texts: int = 128,
    sample_tokens: int = 48,
    seed: int = 0,
) -> Corpus:
    """A local ``.jsonl`` (field ``text``) or ``.txt`` file, a Hugging Face dataset
    (``name``, ``name:config`` or ``name:config:split``), or, with ``source=None``, text
    sampled from the model itself."""
    if source is None:
        if loaded is None:
            raise CorpusError("no corpus given and no model to sample text from")
        texts = sample_corpus(
            loaded.model,
            loaded.tokenizer,
            n_texts=sample_texts,
            new_tokens=sample_tokens,
            seed=seed,
        )
        tag = f"model-samples:{loaded.fingerprint}:{sample_texts}:{sample_tokens}:{seed}"
        return Corpus(
            texts=texts,
            fingerprint=hashlib.sha256(tag.encode()).hexdigest(),
            description=(
                f"no corpus given: {sample_texts} texts of {sample_tokens} tokens sampled "
                f"from the model itself (seed {seed})"
            ),
            sampled=True,
        )
    if source.startswith(stats_dist.HF_PREFIX):
        return stats_dist.load_hf_stream(source)
    path = Path(source)
    if path.exists():
        return _load_corpus_file(path)
    if path.suffix in {".jsonl", ".json", ".txt"} or source.startswith((".", "/", "~")):
        raise CorpusError(
            f"corpus file {source} does not exist; give a .jsonl/.txt file or a hub dataset name"
        )
    return _load_hub_dataset(source)


def _load_corpus_file(path: Path) -> Corpus:
    if path.is_dir():
        raise CorpusError(f"corpus {path} is a directory; give a .jsonl or .txt file in it")
    if path.suffix == ".jsonl":
        try:
            records = read_located_records(path, what="corpus file")
        except RecordsError as error:
            raise CorpusError(str(error)) from None
        texts = []
        for lineno, record in records:
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CorpusError(f"{path} line {lineno}: expected an object with a 'text' string")
            texts.append(record["text"])
    else:
        try:
            raw = path.read_text(encoding="utf-8", errors="strict")
        except UnicodeDecodeError as error:
            bad = error.object[error.start]
            raise CorpusError(
                f"corpus file {path} is not UTF-8 text (byte {error.start} is {bad:#04x}); "
                "save it as UTF-8"
            ) from None
        texts = [block.strip() for block in raw.split("\n\n") if block.strip()]
    if not texts:
        raise CorpusError(f"corpus file {path} holds no text")
    return Corpus(texts=texts, fingerprint=sha256_file(path), description=f"corpus file {path}")


def _load_hub_dataset(spec: str) -> Corpus:
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            f"{spec!r} is not a local file, and loading a hub dataset needs the 'datasets' "
            "package (pip install datasets)"
        ) from None
    name, config, split = ([*spec.split(":"), None, None])[:3]
    try:
        data = datasets.load_dataset(name, config, split=split or "train")
    except Exception as error:  # noqa: BLE001 - the hub raises many kinds
        raise CorpusError(f"cannot load dataset {spec!r}: {error}") from None
    texts = [t for t in data["text"] if t and t.strip()]
    tag = f"hub:{spec}:{getattr(data, '_fingerprint', '')}"
    return Corpus(
        texts=texts,
        fingerprint=hashlib.sha256(tag.encode()).hexdigest(),
        description=f"hub dataset {spec}",
    )


@dataclass
class SecondMoment:
    """Sum of k kᵀ in float64 and the number of keys; ``moment`` is E[k kᵀ]."""

    total: torch.Tensor
    count: int

    @property
    def moment(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


def _token_pieces(
    tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], max_tokens: int, seq_len: int
) -> list[list[int]]:
    pieces: list[list[int]] = []
    budget = max_tokens
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        for begin in range(0, len(ids), seq_len):
            piece = ids[begin : begin + seq_len][:budget]
            if len(piece) >= 2:
                pieces.append(piece)
                budget -= len(piece)
            if budget <= 0:
                return pieces
    return pieces


def _whole_texts(
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    max_tokens: int | None,
    max_len: int,
) -> list[list[int]]:
    """Every text as one sequence, truncated to ``max_len`` tokens as the authors'
    tokenizer call truncates it; the last text is cut to the token budget when there is
    one. A one-token text adds its one key, as in the authors' statistics."""
    sequences: list[list[int]] = []
    budget = max_tokens
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_len)
        ids = list(ids["input_ids"])[: budget if budget is not None else None]
        if ids:
            sequences.append(ids)
        if budget is not None:
            budget -= len(ids)
            if budget <= 0:
                break
    return sequences


def recipe_sequences(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    corpus: Corpus,
    recipe: StatsRecipe,
    max_tokens: int | None,
) -> tuple[list[list[int]], str]:
    """The token sequences ``recipe`` makes of ``corpus``, sorted by length, and the plan
    string naming how they were cut (a resumed partial must have the same)."""
    texts: Iterable[str] = corpus.texts
    if recipe.samples is not None:
        texts = islice(corpus.texts, recipe.samples)
        max_tokens = None
    elif max_tokens is None:
        raise StatsRecipeError("stats_tokens: give a token count or a sample count (stats_samples)")
    if recipe.piece_tokens is None:
        max_len = recipe.max_len or context_length(model)
        sequences = _whole_texts(tokenizer, texts, max_tokens, max_len)
        cut = f"whole{max_len}"
    else:
        budget = max_tokens if max_tokens is not None else sys.maxsize
        sequences = _token_pieces(tokenizer, texts, budget, recipe.piece_tokens)
        cut = str(recipe.piece_tokens)
    if recipe.samples is not None:
        cut += f"/{recipe.samples}samples"
    return sorted(sequences, key=len), cut


@torch.no_grad()
def collect_second_moments(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[int],
    corpus: Corpus,
    *,
    max_tokens: int | None = None,
    recipe: StatsRecipe = DEFAULT_RECIPE,
    tokens_per_pass: int = 4096,
    progress: bool = True,
    bf16: bool = False,
    checkpoint: stats_dist.Checkpoint | None = None,
) -> dict[int, SecondMoment]:
    """E[k kᵀ] of the keys of ``layers`` over ``corpus`` cut by ``recipe`` (whole texts
    by default, :class:`StatsRecipe`), ``max_tokens`` of them or the recipe's sample
    count; each forward pass stops after the last layer. Sequences are sorted by length
    so padding is small; padded positions are masked out of the keys. ``bf16`` runs the
    forward under bfloat16 autocast (the accumulation stays float64). Under torchrun each
    rank runs its share of the passes and the sums are all-reduced; a ``checkpoint`` saves
    and resumes partial sums (:mod:`.stats_dist`)."""
    layout = ModelLayout.of(model)
    device = input_device(model)
    pieces, cut = recipe_sequences(model, tokenizer, corpus, recipe, max_tokens)
    if not pieces:
        shortest = 1 if recipe.piece_tokens is None else 2
        raise CorpusError(f"the corpus yields no token sequences of length {shortest} or more")
    available = sum(len(p) for p in pieces)
    if (
        max_tokens is not None
        and recipe.samples is None
        and not corpus.sampled
        and available * SMALL_CORPUS_SHARE < max_tokens
    ):
        log.warning(
            "%s gives %d tokens, far fewer than the %d statistics tokens asked; C0 rests on "
            "these few keys (give a larger corpus or fewer --stats-tokens)",
            corpus.description, available, max_tokens,
        )  # fmt: skip
    pad = pad_id_of(tokenizer)
    moments = {
        layer: SecondMoment(
            torch.zeros(layout.key_dim(layer), layout.key_dim(layer), dtype=torch.float64), 0
        )
        for layer in layers
    }
    stop_module = layout.layer(max(layers))
    bar = tqdm(
        total=sum(len(p) for p in pieces), unit="tok", desc="key statistics", disable=not progress
    )
    plan = f"{cut}:{tokens_per_pass}:{len(pieces)}"
    batches = packed_batches(pieces, tokens_per_pass, pad)
    for ids, mask in stats_dist.shard(batches, moments, checkpoint, plan):
        ids, mask = ids.to(device), mask.to(device)
        with ExitStack() as stack:
            seen = {layer: stack.enter_context(capture(layout.mlp_out(layer))) for layer in layers}
            stack.enter_context(capture(stop_module, stop=True))
            stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16))
            run_until_stopped(lambda ids=ids, mask=mask: model(input_ids=ids, attention_mask=mask))
        real = mask.bool()
        for layer in layers:
            keys = index_on(seen[layer].input, real).float()
            add_gram(moments[layer].total, keys)
            moments[layer].count += keys.shape[0]
        bar.update(int(real.sum()))
    bar.close()
    return moments


def add_gram(total: torch.Tensor, keys: torch.Tensor, block: int = 256) -> None:
    """``total += keysᵀ keys`` for a float64 ``total``, computing only the column blocks
    on and above the diagonal in float32 (the blocks below are their transposes). With
    ``d / block`` = b blocks that is (b + 1) / (2b) of the full product's FLOPs, so the
    statistics pass runs faster (docs/performance.md)."""
    width = keys.shape[1]
    for begin in range(0, width, block):
        end = min(begin + block, width)
        # Rows begin:end of the product, from the diagonal block rightwards.
        upper = (keys[:, begin:end].T @ keys[:, begin:]).double().to(total.device)
        total[begin:end, begin:] += upper
        total[end:, begin:end] += upper[:, end - begin :].T


def packed_batches(
    pieces: Sequence[Sequence[int]], tokens_per_pass: int, pad: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (ids, mask) batches of at most ``tokens_per_pass`` tokens (padding
    included) from ``pieces`` sorted by length, in order."""
    begin = 0
    while begin < len(pieces):
        rows = max(1, tokens_per_pass // len(pieces[min(begin + 1, len(pieces)) - 1]))
        group = pieces[begin : begin + rows]
        # Sorted ascending: the last piece is the longest of the group.
        while len(group) > 1 and len(group) * len(group[-1]) > tokens_per_pass:
            group = group[:-1]
        begin += len(group)
        width = len(group[-1])
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, piece in enumerate(group):
            ids[i, : len(piece)] = torch.tensor(piece)
            mask[i, : len(piece)] = 1
        yield ids, mask


def stats_cache_path(
    model_fp: str,
    corpus_fp: str,
    layer: int,
    tokens: int | None,
    dtype: str,
    recipe: StatsRecipe = DEFAULT_RECIPE,
) -> Path:
    """The cache entry of one layer's statistics; each recipe has its own file names."""
    name = f"layer{layer}-{recipe.size_tag(tokens)}-{dtype}{recipe.cache_suffix()}"
    return cache_dir() / "stats" / model_fp[:16] / corpus_fp[:16] / f"{name}.safetensors"


def weights_dtype(loaded: LoadedModel) -> str:
    """The dtype the statistics are computed in, as recorded in the cache key."""
    return str(next(loaded.model.parameters()).dtype).removeprefix("torch.")


def layer_second_moments(
    loaded: LoadedModel,
    layers: Sequence[int],
    corpus: Corpus,
    *,
    max_tokens: int | None = None,
    recipe: StatsRecipe = DEFAULT_RECIPE,
    progress: bool = True,
    bf16: bool = False,
) -> dict[int, SecondMoment]:
    """Cached :func:`collect_second_moments`: a cache entry is used only when the model,
    layer, corpus, token count, recipe and dtype recorded inside it all match and its
    checksum holds (an entry written before recipes were recorded is the 256-token
    pieces'). Two processes filling the same entries take turns (a lock file next to
    them): the second finds them filled."""
    dtype = weights_dtype(loaded) + ("-bf16-autocast" if bf16 else "")
    if recipe.samples is not None:
        max_tokens = None
    elif max_tokens is None:
        raise StatsRecipeError("stats_tokens: give a token count or a sample count (stats_samples)")
    whole = recipe.piece_tokens is None
    max_len = (recipe.max_len or context_length(loaded.model)) if whole else None
    expected = {
        "model": loaded.fingerprint,
        "corpus": corpus.fingerprint,
        "tokens": str(max_tokens),
        "dtype": dtype,
        **recipe.describe(max_len),
    }
    lock = stats_cache_path(loaded.fingerprint, corpus.fingerprint, 0, max_tokens, dtype, recipe)
    device = input_device(loaded.model)
    with stats_dist.cache_lock(
        lock.parent / f".{recipe.size_tag(max_tokens)}-{dtype}{recipe.cache_suffix()}.lock", device
    ):
        return _cached_second_moments(
            loaded, layers, corpus, expected, max_tokens, recipe, progress, bf16
        )


def _cached_second_moments(
    loaded: LoadedModel,
    layers: Sequence[int],
    corpus: Corpus,
    expected: dict[str, str],
    max_tokens: int | None,
    recipe: StatsRecipe,
    progress: bool,
    bf16: bool,
) -> dict[int, SecondMoment]:
    dtype = expected["dtype"]

    def entry(layer: int) -> Path:
        return stats_cache_path(
            loaded.fingerprint, corpus.fingerprint, layer, max_tokens, dtype, recipe
        )

    found: dict[int, SecondMoment] = {}
    missing = []
    for layer in layers:
        cached = _read_cached(entry(layer), {**expected, "layer": str(layer)})
        if cached is None:
            missing.append(layer)
        else:
            found[layer] = cached
    if missing:
        fresh = collect_second_moments(
            loaded.model,
            loaded.tokenizer,
            missing,
            corpus,
            max_tokens=max_tokens,
            recipe=recipe,
            progress=progress,
            bf16=bf16,
            checkpoint=stats_dist.checkpoint_for(entry(missing[0]), expected, missing),
        )
        for layer, moment in fresh.items():
            meta = {
                **expected,
                "layer": str(layer),
                "count": str(moment.count),
                "sha256": tensor_sha256(moment.total),
            }
            if stats_dist.is_writer():
                write_tensors(entry(layer), {"total": moment.total}, metadata=meta)
            found[layer] = moment
    return {layer: found[layer] for layer in layers}


def _read_cached(path: Path, expected: dict[str, str]) -> SecondMoment | None:
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            total = handle.get_tensor("total")
    except Exception as error:  # noqa: BLE001 - any unreadable cache is recomputed
        log.warning("statistics cache %s is unreadable (%s); recomputing", path, error)
        return None
    # Entries written before the recipe was recorded hold the 256-token pieces.
    meta = {"pieces": str(LEGACY_PIECE_TOKENS), **meta}
    mismatched = [k for k, v in expected.items() if meta.get(k) != v]
    if mismatched or total.dtype != torch.float64 or total.ndim != 2:
        log.warning("statistics cache %s does not match (%s); recomputing", path, mismatched)
        return None
    if meta.get("sha256") != tensor_sha256(total):
        log.warning("statistics cache %s is corrupted (checksum differs); recomputing", path)
        return None
    return SecondMoment(total=total, count=int(meta.get("count", "0")))
