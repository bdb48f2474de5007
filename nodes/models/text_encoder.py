"""What the CLIP socket carries: the text encoder(s) of a checkpoint with ComfyUI's prompt handling.

Per text encoder, a prompt becomes chunks of 77 tokens: BOS, up to 75 prompt tokens, EOS, then
padding (EOS for CLIP-L, 0 for OpenCLIP H/G). Every token carries the weight of its prompt segment;
`embedding:NAME` segments become one slot per textual-inversion vector. Segments are tokenized
word by word (split on spaces and newlines); a word that does not fit in the current chunk starts
the next one, unless it is MAX_WORD_LENGTH tokens or longer, then it is split (ComfyUI's rule).

Encoding follows ComfyUI: all chunks go through the encoder as one batch; if any weight differs
from 1.0 an "empty prompt" chunk (BOS, EOS, padding) is encoded alongside and each weighted
position becomes `z_empty + (z - z_empty) * w`. Chunks are concatenated along the token axis; the
pooled vector is the first chunk's.

Which hidden layer feeds the UNet:
- SD1 (CLIP-L): the last layer, after the final layer norm;
- SD2 (OpenCLIP-H): the penultimate layer, with the final layer norm applied;
- SDXL: the penultimate layer of CLIP-L and of OpenCLIP-G, without the final norm, concatenated
  (768 + 1280 = 2048 dims); pooled = G's projected EOS vector;
- SDXL refiner: OpenCLIP-G alone, penultimate layer without the final norm (1280 dims), pooled as SDXL.
`set_last_layer(n)` (CLIPSetLastLayer) picks layer n (-1 last, -2 penultimate, ...) in every encoder;
an |n| larger than the encoder is the normed last layer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.memory import notify_moved

from .embeddings import EmbeddingStore
from .lora import copy_with_weights
from .memory import ResidentMixin, WeightsHolder, default_device, register_text_encoder
from .prompt_weights import parse_prompt
from .weight_patch import chain

log = logging.getLogger(__name__)

MAX_LENGTH = 77           # tokens per chunk, BOS and EOS included
MAX_WORD_LENGTH = 8       # a group this long may be split across chunks; shorter ones move whole
BOS_ID, EOS_ID = 49406, 49407
EMBEDDING_SLOT_ID = 0     # placeholder id at positions whose input vector is injected (never EOS)

# Injection hooks sit on token-embedding modules that clones (and handles built with
# with_text_encoders) may share, so hook-and-run is serialised process-wide.
_INJECT_LOCK = threading.RLock()


@dataclass(frozen=True)
class EncoderSpec:
    key: str                     # "l", "h" or "g"
    default_layer: int | None    # None = last layer, normed
    layer_norm_hidden: bool      # apply the final layer norm to an intermediate layer's output
    pad_with_end: bool           # pad with EOS (CLIP-L) or with token 0 (OpenCLIP)
    embedding_key: str           # key inside SDXL-style embedding files


ARCH_ENCODERS: dict[str, tuple[EncoderSpec, ...]] = {
    "sd1": (EncoderSpec("l", None, True, True, "clip_l"),),
    "sd2": (EncoderSpec("h", -2, True, False, "clip_h"),),
    "sdxl": (EncoderSpec("l", -2, False, True, "clip_l"), EncoderSpec("g", -2, False, False, "clip_g")),
    "sdxl_refiner": (EncoderSpec("g", -2, False, False, "clip_g"),),
    # SD3 encoder sets without both CLIPs (DualCLIPLoader / CLIPLoader type sd3): SDXL's settings per CLIP
    "sd3_clip_l": (EncoderSpec("l", -2, False, True, "clip_l"),),
    "sd3_clip_g": (EncoderSpec("g", -2, False, False, "clip_g"),),
    "sd3_t5_only": (),
}


@dataclass
class TokenChunk:
    """One 77-token encoder input: ids, per-token weights, and vectors injected at positions."""

    ids: list[int]
    weights: list[float]
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class TokenizedPrompt:
    """`chunks[key]` for each text encoder key ("l", "h", "g")."""

    text: str
    chunks: dict[str, list[TokenChunk]]

    def num_chunks(self, key: str | None = None) -> int:
        key = key or next(iter(self.chunks))
        return len(self.chunks[key])

    def has_weights(self) -> bool:
        return any(w != 1.0 for cs in self.chunks.values() for c in cs for w in c.weights)

    def digest(self) -> str:
        """Content hash (ids, weights, injected vectors): the encode cache's key."""
        h = hashlib.sha256()
        for key in sorted(self.chunks):
            h.update(key.encode())
            for chunk in self.chunks[key]:
                h.update(torch.tensor(chunk.ids, dtype=torch.int64).numpy().tobytes())
                h.update(torch.tensor(chunk.weights, dtype=torch.float64).numpy().tobytes())
                for pos in sorted(chunk.vectors):
                    h.update(str(pos).encode())
                    h.update(chunk.vectors[pos].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()


Group = list[tuple[int | torch.Tensor, float]]


def chunk_groups(groups: Iterable[Group], pad_id: int, bos: int = BOS_ID, eos: int = EOS_ID) -> list[TokenChunk]:
    """Pack token groups into 77-token chunks the way ComfyUI does: a group that does not fit in
    the current chunk moves to the next one whole, unless it is at least MAX_WORD_LENGTH long, in
    which case it is split at the chunk boundary."""
    chunks: list[list[tuple[int | torch.Tensor, float]]] = []
    batch: list[tuple[int | torch.Tensor, float]] = [(bos, 1.0)]
    chunks.append(batch)
    room = MAX_LENGTH - 1  # keep one slot for EOS
    for group in groups:
        group = list(group)
        is_large = len(group) >= MAX_WORD_LENGTH
        while group:
            if len(group) + len(batch) > room:
                remaining = room - len(batch)
                if is_large:
                    batch.extend(group[:remaining])
                    batch.append((eos, 1.0))
                    group = group[remaining:]
                else:
                    batch.append((eos, 1.0))
                    batch.extend([(pad_id, 1.0)] * remaining)
                batch = [(bos, 1.0)]
                chunks.append(batch)
            else:
                batch.extend(group)
                group = []
    batch.append((eos, 1.0))
    batch.extend([(pad_id, 1.0)] * (MAX_LENGTH - len(batch)))

    out: list[TokenChunk] = []
    for entries in chunks:
        chunk = TokenChunk([], [])
        for pos, (token, weight) in enumerate(entries):
            if isinstance(token, torch.Tensor):
                chunk.ids.append(EMBEDDING_SLOT_ID)
                chunk.vectors[pos] = token
            else:
                chunk.ids.append(int(token))
            chunk.weights.append(float(weight))
        out.append(chunk)
    return out


def empty_chunk(pad_id: int, bos: int = BOS_ID, eos: int = EOS_ID) -> TokenChunk:
    ids = [bos, eos] + [pad_id] * (MAX_LENGTH - 2)
    return TokenChunk(ids, [1.0] * MAX_LENGTH)


def _text_model(model: nn.Module) -> Any:
    """The module holding embeddings/encoder/final_layer_norm (WithProjection wraps one); duck-typed."""
    return getattr(model, "text_model", model)


class ClipHandle(ResidentMixin):
    """Text encoders + tokenizers + settings. Clones share weights and copy settings."""

    def __init__(self, text_encoders: Mapping[str, nn.Module], tokenizers: Mapping[str, Any], arch: str,
                 embedding_dirs: Iterable[str | Path] | Callable[[], Iterable[str | Path]] | None = None,
                 device: str | None = None,
                 cache_size: int = 16, output_device: str = "cpu",
                 layer_defaults: Mapping[str, Any] | None = None) -> None:
        if arch not in ARCH_ENCODERS:
            raise ValueError(f"unknown architecture {arch!r}")
        specs = ARCH_ENCODERS[arch]
        if layer_defaults:
            # A loader may state the layer per encoder (objects with .index and .final_norm).
            specs = tuple(
                dataclasses.replace(s, default_layer=int(layer_defaults[s.key].index),
                                    layer_norm_hidden=bool(layer_defaults[s.key].final_norm))
                if s.key in layer_defaults else s
                for s in specs
            )
        missing = [s.key for s in specs if s.key not in text_encoders or s.key not in tokenizers]
        if missing:
            raise ValueError(f"{arch} needs text encoder and tokenizer {missing}")
        self.arch = arch
        self.specs = specs
        self._weights = register_text_encoder(WeightsHolder({s.key: text_encoders[s.key] for s in specs}))
        self.tokenizers = {s.key: tokenizers[s.key] for s in specs}
        self.embeddings = EmbeddingStore(embedding_dirs) if embedding_dirs is not None else None
        self.load_device = device or default_device()
        self.output_device = output_device
        self.layer_idx: int | None = None  # None = the architecture's default layer
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._cache_lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, checkpoint: Any,
                        embedding_dirs: Iterable[str | Path] | Callable[[], Iterable[str | Path]] | None = None,
                        device: str | None = None) -> ClipHandle:
        """From a `nodes.models.checkpoint.LoadedCheckpoint` (duck-typed)."""
        return cls(checkpoint.text_encoders, checkpoint.tokenizers, checkpoint.arch,
                   embedding_dirs=embedding_dirs, device=device,
                   layer_defaults=getattr(checkpoint, "clip_layers", None))

    # ------------------------------------------------------------------ settings and clones
    # Weight patches recorded on this handle (lora.LoraPatch per encoder key), applied in place to the shared
    # encoders when this handle encodes, as the UNet's are (diffusion_model.DiffusionModelHandle.unet).
    encoder_patches: tuple = ()

    @property
    def base_text_encoders(self) -> dict[str, nn.Module]:
        """The loaded encoders, whatever patches they currently hold (for reading names and configs)."""
        return dict(self._weights.modules)  # type: ignore[arg-type]

    @property
    def text_encoders(self) -> dict[str, nn.Module]:
        """The encoders holding this handle's weights (valid until another handle on them encodes)."""
        return {key: self.encoder(key) for key in self._weights.modules}

    def encoder(self, key: str) -> nn.Module:
        """Encoder `key`, its shared weights patched in place to this handle's patches for it (or restored
        to the originals for a handle without any)."""
        module = self._weights.modules[key]
        assert module is not None  # a handle holds every encoder its arch has
        patches = [patch for target, patch in self.encoder_patches if target == key]
        if not patches and key not in self._weights.patchers:
            return module
        pkey = tuple(patch.key for patch in patches)
        fn = chain(*(patch.apply for patch in patches)) if patches else None
        patcher = self._weights.patcher(key)
        before = patcher.key
        module = patcher.sync(pkey, fn)
        if patcher.key != before:
            notify_moved(self._weights)    # the kept originals changed: the cache re-measures
            module = patcher.sync(pkey, fn)
        return module

    def with_encoder_patch(self, key: str, patch: Any) -> ClipHandle:
        """A clone with one more weight patch on encoder `key` (applied when it encodes)."""
        twin = self.clone()
        twin.encoder_patches = tuple(self.encoder_patches) + ((key, patch),)
        return twin

    def clone(self) -> ClipHandle:
        twin = object.__new__(ClipHandle)
        twin.__dict__.update(self.__dict__)
        twin.tokenizers = dict(self.tokenizers)
        # The cache key covers the settings, but a clone may be patched (LoRA) after cloning.
        twin._cache = OrderedDict()
        twin._cache_lock = threading.Lock()
        return twin

    def with_text_encoders(self, text_encoders: Mapping[str, nn.Module]) -> ClipHandle:
        """A clone whose encoders are replaced (e.g. merged copies); settings carried over. The encoders it
        keeps are this handle's as they stand: patched ones become copies holding the patched weights
        (the new holder must not share modules whose weights other handles re-patch)."""
        twin = self.clone()
        modules = dict(self._weights.modules)
        for key in {target for target, _ in self.encoder_patches} - set(text_encoders):
            patches = [patch.apply for target, patch in self.encoder_patches if target == key]
            base = self._weights.patcher(key).base_weights()
            module = self._weights.modules[key]
            assert module is not None  # a patch is only recorded on an encoder the handle holds
            modules[key] = copy_with_weights(module, dict(chain(*patches)(base)))
        modules.update(text_encoders)
        twin._weights = register_text_encoder(WeightsHolder(modules))
        twin.encoder_patches = ()
        return twin

    def set_last_layer(self, n: int) -> None:
        """CLIPSetLastLayer: -1 = last layer, -2 = penultimate, ..."""
        if not isinstance(n, int) or n == 0:
            raise ValueError(f"layer index must be a non-zero int, got {n!r}")
        self.layer_idx = n

    clip_layer = set_last_layer  # ComfyUI's name

    def reset_clip_layer(self) -> None:
        self.layer_idx = None

    @property
    def last_layer(self) -> int:
        """The effective layer of the first encoder (-1 last, -2 penultimate, ...)."""
        if self.layer_idx is not None:
            return self.layer_idx
        default = self.specs[0].default_layer
        return -1 if default is None else default

    @property
    def clip_skip(self) -> int:
        """A1111's convention: 1 = last layer, 2 = penultimate."""
        return -self.last_layer

    @clip_skip.setter
    def clip_skip(self, value: int) -> None:
        self.set_last_layer(-int(value))

    # ------------------------------------------------------------------ tokenizing
    def tokenize(self, text: str) -> TokenizedPrompt:
        segments = parse_prompt(text)
        chunks: dict[str, list[TokenChunk]] = {}
        for spec in self.specs:
            tokenizer = self.tokenizers[spec.key]
            bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else BOS_ID
            eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else EOS_ID
            dim = self._hidden_size(spec.key)
            groups: list[Group] = []
            for seg in segments:
                if seg.embedding is not None and self.embeddings is not None:
                    vectors = self.embeddings.load(seg.embedding, dim, spec.embedding_key)
                    if vectors is None:
                        log.warning("warning, embedding:%s does not exist, ignoring", seg.embedding)
                        continue
                    groups.append([(vectors[i], seg.weight) for i in range(vectors.shape[0])])
                    continue
                # Word by word, as ComfyUI does: each word is one group, so chunk_groups moves a
                # word that does not fit whole to the next chunk instead of cutting it in two.
                for word in seg.text.replace("\n", " ").split(" "):
                    if not word:
                        continue
                    ids = tokenizer.encode(word, add_special_tokens=False, verbose=False)
                    if ids:
                        groups.append([(int(i), seg.weight) for i in ids])
            chunks[spec.key] = chunk_groups(groups, eos if spec.pad_with_end else 0, bos, eos)
        return TokenizedPrompt(text, chunks)

    def _hidden_size(self, key: str) -> int:
        model = self._weights.modules[key]   # the config only: no need to patch
        assert model is not None  # a handle holds every encoder its arch has
        return int(_text_model(model).config.hidden_size)

    # ------------------------------------------------------------------ encoding
    def encode(self, tokens: TokenizedPrompt) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (cond [1, 77*k, D], pooled [1, P] or None), float32 on `output_device`. Cached."""
        key = (self.layer_idx, tokens.digest())
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit[0].clone(), None if hit[1] is None else hit[1].clone()
        cond, pooled = self._encode_uncached(tokens)
        if self.cache_size > 0:
            with self._cache_lock:
                self._cache[key] = (cond, pooled)
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return cond.clone(), None if pooled is None else pooled.clone()

    def encode_from_tokens(self, tokens: TokenizedPrompt, return_pooled: bool = False):
        cond, pooled = self.encode(tokens)
        return (cond, pooled) if return_pooled else cond

    def encode_text(self, text: str) -> list[list[Any]]:
        """CLIPTextEncode: text -> CONDITIONING `[[cond, {"pooled_output": pooled}]]`."""
        cond, pooled = self.encode(self.tokenize(text))
        return [[cond, {"pooled_output": pooled}]]

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    @torch.no_grad()
    def _encode_uncached(self, tokens: TokenizedPrompt) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self._weights.lock:
            self.ensure_loaded()
            outs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for spec in self.specs:
                outs[spec.key] = self._encode_one(spec, tokens.chunks[spec.key])
        if self.arch == "sdxl":
            zl, _ = outs["l"]
            zg, pooled = outs["g"]
            cut = min(zl.shape[1], zg.shape[1])
            cond = torch.cat([zl[:, :cut], zg[:, :cut]], dim=-1)
        else:
            cond, pooled = outs[self.specs[0].key]
        dev = self.output_device
        return cond.float().to(dev), pooled.float().to(dev)

    def _encode_one(self, spec: EncoderSpec, chunks: list[TokenChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.encoder(spec.key)
        tokenizer = self.tokenizers[spec.key]
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else BOS_ID
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else EOS_ID
        weighted = any(w != 1.0 for c in chunks for w in c.weights)
        batch = list(chunks)
        if weighted:
            batch.append(empty_chunk(eos if spec.pad_with_end else 0, bos, eos))
        hidden, pooled = self._run_encoder(model, spec, batch)
        # Weighting (and everything after) in float32, whatever dtype the encoder runs in.
        hidden, pooled = hidden.float(), pooled[0:1].float()
        pieces = []
        for k, chunk in enumerate(chunks):
            z = hidden[k : k + 1]
            if weighted:
                w = torch.tensor(chunk.weights, dtype=z.dtype, device=z.device).view(1, -1, 1)
                z_empty = hidden[-1:]
                z = torch.where(w != 1.0, z_empty + (z - z_empty) * w, z)
            pieces.append(z)
        return torch.cat(pieces, dim=1), pooled

    def _run_encoder(self, model: nn.Module, spec: EncoderSpec,
                     batch: list[TokenChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        inner = _text_model(model)
        device = self.compute_device or next(model.parameters()).device   # a split encoder: its load device
        ids = torch.tensor([c.ids for c in batch], dtype=torch.long, device=device)
        injections = [(b, pos, vec) for b, c in enumerate(batch) for pos, vec in c.vectors.items()]

        def inject(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            for b, pos, vec in injections:
                output[b, pos] = vec.to(device=output.device, dtype=output.dtype)
            return output

        with _INJECT_LOCK:
            hook = inner.embeddings.token_embedding.register_forward_hook(inject) if injections else None
            try:
                out = model(input_ids=ids, output_hidden_states=True)
            finally:
                if hook is not None:
                    hook.remove()
        pooled = out.text_embeds if hasattr(out, "text_embeds") and out.text_embeds is not None else out.pooler_output
        layer = self.layer_idx if self.layer_idx is not None else spec.default_layer
        n_layers = len(out.hidden_states) - 1
        if layer is None or abs(layer) > n_layers or (layer > 0 and layer >= n_layers):
            hidden = out.last_hidden_state
        else:
            hidden = out.hidden_states[layer] if layer < 0 else out.hidden_states[layer + 1]
            if spec.layer_norm_hidden:
                hidden = inner.final_layer_norm(hidden)
        return hidden, pooled

