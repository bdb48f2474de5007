"""What the MODEL and CLIP sockets carry for SD3 / SD3.5.

MODEL: the MMDiT with a rectified-flow schedule (shift 3.0 unless ModelSamplingSD3 sets another).
CLIP: CLIP-L, OpenCLIP-G and (optionally) T5-XXL. A prompt becomes, as ComfyUI's SD3 encoder makes it:
  context = [ CLIP-L ++ CLIP-G penultimate layers (77 tokens a chunk, zero-padded to the T5 width) ;
              T5 last layer (the whole prompt, EOS, then padding up to 77 tokens) ]  along the token axis,
  pooled  = CLIP-L ++ CLIP-G projected EOS vectors of the first chunk.
Without T5 the context is the CLIP tokens alone. The CLIP parts reuse ClipHandle's SDXL prompt handling
(penultimate layers, no final norm, weights, embeddings, 77-token chunks); T5 parses the same
(text:weight) emphasis, word by word, and is never cut. For prompts of up to 77 tokens this is also
what diffusers' StableDiffusion3Pipeline gives with max_sequence_length=77.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .diffusion_model import DiffusionModelHandle
from .memory import ResidentMixin, WeightsHolder, default_device, register_text_encoder
from .prompt_weights import parse_prompt
from .text_encoder import ClipHandle, TokenChunk, TokenizedPrompt

T5_TOKENS = 77          # T5's minimum length (ComfyUI's min_length); prompts are not cut at it
T5_EOS, T5_PAD = 1, 0


class SD3ModelHandle(DiffusionModelHandle):
    """An SD3Transformer2DModel; `apply` returns its velocity prediction."""

    def __init__(self, transformer: nn.Module, variant: str = "sd3", shift: float = 3.0,
                 device: str | None = None) -> None:  # noqa: D107  (no super().__init__: no UNet arch check)
        self._weights = WeightsHolder({"unet": transformer})
        self.arch = "sd3"
        self.variant = variant
        self.prediction_type = "flow"
        self.shift = float(shift)
        self.load_device = device or default_device()

    def clone(self) -> SD3ModelHandle:
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        return twin

    def sampling_schedule(self) -> Any:
        if self.model_sampling is not None:
            return self.model_sampling
        from ..sampling.model_sampling import FlowSchedule
        return FlowSchedule(shift=self.shift)

    @property
    def is_sdxl(self) -> bool:
        return False

    @torch.no_grad()
    def apply(self, x_in: torch.Tensor, timestep: torch.Tensor | float, cond: dict[str, Any]) -> torch.Tensor:
        """Velocity for `x_in` [B,16,h,w] at `timestep` (sigma * 1000); cond: "context" [B|1,T,D] and
        "pooled" [B|1,P] (required); "control" optional: an SD3 ControlNet application (models/controlnet_sd3.py)
        whose residuals are added after the joint blocks."""
        self.ensure_loaded()
        if "context" not in cond or cond.get("pooled") is None:
            raise ValueError("SD3 models need 'context' and 'pooled' in cond (encode the prompt with an SD3 CLIP)")
        tr = self.unet
        device, dtype = next(tr.parameters()).device, self.dtype
        batch = x_in.shape[0]

        def prep(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device=device, dtype=dtype)
            if t.shape[0] != batch:
                if t.shape[0] != 1:
                    raise ValueError(f"conditioning batch {t.shape[0]} does not match input batch {batch}")
                t = t.expand(batch, *t.shape[1:])
            return t

        context, pooled = prep(cond["context"]), prep(cond["pooled"])
        want = int(getattr(tr.config, "joint_attention_dim", 0))
        # Without T5 the embedding is CLIP padded with zeros to T5-XXL's 4096: only the padding may differ.
        if context.shape[-1] < want:
            context = torch.nn.functional.pad(context, (0, want - context.shape[-1]))
        elif context.shape[-1] > want and not bool(context[..., want:].any()):
            context = context[..., :want]
        if context.shape[-1] != want:
            raise ValueError(f"conditioning width {context.shape[-1]} does not fit this SD3 model ({want}): "
                             "encode the prompt with the matching SD3 text encoders")
        t = torch.as_tensor(timestep, device=device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(batch)
        x = x_in.to(device=device, dtype=dtype)
        kwargs: dict[str, Any] = {}
        control = cond.get("control")
        if control is not None:
            if not hasattr(control, "block_residuals"):
                raise ValueError("an SD1/SD2/SDXL ControlNet or T2I-Adapter was applied to the conditioning of an "
                                 "SD3 model; SD3 models take SD3 ControlNets (e.g. sd3.5_large_controlnet_canny)")
            residuals = control.block_residuals(self, x, t, context, pooled, cond)
            if residuals is not None:
                kwargs["block_controlnet_hidden_states"] = [r.to(device=device, dtype=dtype) for r in residuals]
        out = tr(hidden_states=x, timestep=t, encoder_hidden_states=context, pooled_projections=pooled,
                 return_dict=False, **kwargs)[0]
        slg = self.skip_layer_guidance
        if slg is not None:
            slg.observe(self, x, t, context, pooled, out, cond, kwargs.get("block_controlnet_hidden_states"))
        return out.to(device=x_in.device, dtype=torch.promote_types(x_in.dtype, torch.float32))

    # A SkipLayerGuidance set by SkipLayerGuidanceSD3 on a clone; None = off.
    skip_layer_guidance: Any = None


class SD3ClipHandle(ResidentMixin):
    """CLIP-L + CLIP-G (+ T5-XXL) with their tokenizers; the CLIP socket of SD3 models."""

    arch = "sd3"

    def __init__(self, text_encoders: Mapping[str, nn.Module], tokenizers: Mapping[str, Any],
                 embedding_dirs: Any = None, device: str | None = None, output_device: str = "cpu") -> None:
        present = tuple(k for k in ("l", "g") if text_encoders.get(k) is not None)
        if not present and text_encoders.get("t5") is None:
            raise ValueError("SD3 text encoding needs at least one of CLIP-L, CLIP-G and T5-XXL")
        if "t5" in text_encoders and "t5" not in tokenizers:
            raise ValueError("a T5 text encoder needs the T5 tokenizer")
        # Any subset runs, as in ComfyUI: a missing CLIP's tokens and pooled vector are zeros.
        self.clip_keys = present
        arch = {("l", "g"): "sdxl", ("l",): "sd3_clip_l", ("g",): "sd3_clip_g", (): "sd3_t5_only"}[present]
        self.clip = ClipHandle({k: text_encoders[k] for k in present}, tokenizers, arch,
                               embedding_dirs=embedding_dirs, device=device, output_device=output_device)
        # One holder for all three, shared with the inner CLIP handle: the cache accounts for (and moves)
        # them together.
        self._weights = register_text_encoder(WeightsHolder({k: text_encoders.get(k) for k in ("l", "g", "t5")}))
        self.clip._weights = self._weights
        self.t5_tokenizer = tokenizers.get("t5")
        self.clip_widths = self._clip_widths()
        self.load_device = device or default_device()
        self.output_device = output_device

    @property
    def text_encoders(self) -> dict[str, nn.Module]:
        return {k: v for k, v in self._weights.modules.items() if v is not None}

    @property
    def base_text_encoders(self) -> dict[str, nn.Module]:
        """The loaded encoders, whatever patches they hold now (for reading names and configs)."""
        return self.text_encoders

    def with_encoder_patch(self, key: str, patch: Any) -> SD3ClipHandle:
        """A clone with one more weight patch on encoder `key` ("l", "g" or "t5"), applied in place when
        it encodes. The inner CLIP handle records all three: it shares this handle's weights, and its
        `encoder(key)` patching serves T5 as well as the CLIPs."""
        if self._weights.modules.get(key) is None:
            raise ValueError(f"this SD3 CLIP has no {key!r} text encoder to patch")
        twin = self.clone()
        twin.clip = self.clip.with_encoder_patch(key, patch)
        return twin

    @property
    def has_t5(self) -> bool:
        return self._weights.modules.get("t5") is not None

    def clone(self) -> SD3ClipHandle:
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.clip = self.clip.clone()
        return twin

    def set_last_layer(self, n: int) -> None:
        self.clip.set_last_layer(n)

    def tokenize(self, text: str) -> TokenizedPrompt:
        tokens = self.clip.tokenize(text)
        if self.t5_tokenizer is not None:
            tokens.chunks["t5"] = [self._t5_chunk(text)]
        return tokens

    def _t5_chunk(self, text: str) -> TokenChunk:
        """T5's tokens as ComfyUI's SD3 tokenizer makes them: (text:weight) emphasis parsed, each word
        tokenized on its own, the end token, then padding (id 0) up to 77 tokens; a longer prompt is kept
        whole. Embedding names are skipped (there are no T5 textual inversions)."""
        tok = self.t5_tokenizer
        assert tok is not None  # only called with a T5 tokenizer
        ids: list[int] = []
        weights: list[float] = []
        for seg in parse_prompt(text):
            if seg.embedding is not None:
                continue
            for word in seg.text.replace("\n", " ").split(" "):
                if word:
                    word_ids = tok.encode(word, add_special_tokens=False)
                    ids += [int(i) for i in word_ids]
                    weights += [float(seg.weight)] * len(word_ids)
        ids.append(self.t5_eos())
        weights.append(1.0)
        pad = max(0, T5_TOKENS - len(ids))
        return TokenChunk(ids + [T5_PAD] * pad, weights + [1.0] * pad)

    def t5_eos(self) -> int:
        eos = getattr(self.t5_tokenizer, "eos_token_id", None)
        return int(eos) if eos is not None else T5_EOS

    def encode(self, tokens: TokenizedPrompt, t5_tokens: TokenizedPrompt | None = None, *,
               with_clip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled); `t5_tokens` gives T5 another prompt than the CLIPs (CLIPTextEncodeSD3).
        `with_clip=False` leaves the CLIP tokens out of the context and pools zeros (CLIPTextEncodeSD3's
        empty_padding "none", as ComfyUI's SD3 encoder); with no T5 encoder the context is the CLIP tokens
        alone, and with neither, 77 zero tokens."""
        clip_ctx = None
        widths = self.clip_widths
        if with_clip and self.clip_keys:
            clip_part = self._matched_clip_chunks(tokens)
            n_tokens = sum(len(c.ids) for c in next(iter(clip_part.values())))
            parts = []
            pooled_parts = []
            for key in ("l", "g"):
                if key in clip_part:
                    hidden, pooled = self._encode_single(key, TokenizedPrompt(tokens.text, {key: clip_part[key]}))
                else:   # not loaded (a partial set): zeros in its place, as ComfyUI's SD3 encoder
                    hidden = torch.zeros(1, n_tokens, widths[key], device=self.output_device)
                    pooled = torch.zeros(1, widths[key], device=self.output_device)
                parts.append(hidden)
                pooled_parts.append(pooled)
            clip_ctx = torch.cat(parts, dim=-1)
            pooled = torch.cat(pooled_parts, dim=-1)
        else:
            pooled = torch.zeros(1, widths["l"] + widths["g"], device=self.output_device)
        width = self._t5_width()
        t5_ctx = self._encode_t5(t5_tokens if t5_tokens is not None else tokens)   # None without T5
        if clip_ctx is not None:
            if clip_ctx.shape[-1] > width:
                raise ValueError(f"CLIP width {clip_ctx.shape[-1]} exceeds the T5 width {width}")
            clip_ctx = torch.nn.functional.pad(clip_ctx, (0, width - clip_ctx.shape[-1]))
        parts = [p for p in (clip_ctx, t5_ctx) if p is not None]
        if not parts:
            return torch.zeros(1, T5_TOKENS, width, device=self.output_device), pooled
        return torch.cat([p.to(parts[0]) for p in parts], dim=-2), pooled

    def encode_text(self, text: str) -> list[list[Any]]:
        cond, pooled = self.encode(self.tokenize(text))
        return [[cond, {"pooled_output": pooled}]]

    def _matched_clip_chunks(self, tokens: TokenizedPrompt) -> dict[str, list[TokenChunk]]:
        """CLIP-L's and CLIP-G's chunks, the shorter list padded with the empty prompt's chunk (separate
        clip_l / clip_g prompts of different lengths, as CLIPTextEncodeSD3 pads them in ComfyUI)."""
        chunks = {k: list(tokens.chunks[k]) for k in self.clip_keys}
        n = max(len(c) for c in chunks.values())
        if any(len(c) != n for c in chunks.values()):
            empty = self.clip.tokenize("").chunks
            for key, c in chunks.items():
                c += [empty[key][0]] * (n - len(c))
        return chunks

    def _encode_single(self, key: str, tokens: TokenizedPrompt) -> tuple[torch.Tensor, torch.Tensor]:
        handle = self.clip
        spec = next(s for s in handle.specs if s.key == key)
        with torch.no_grad(), self._weights.lock:
            self.ensure_loaded()
            hidden, pooled = handle._encode_one(spec, tokens.chunks[key])
        return hidden.to(self.output_device), pooled.to(self.output_device)

    def _clip_widths(self) -> dict[str, int]:
        """CLIP-L's and CLIP-G's widths (hidden = pooled for both): a loaded one's own, a missing one's from
        its partner (the released 768 / 1280, or the tiny test models' 32 / 64)."""
        from .tiny_sd3 import CLIP_WIDTH as TINY, T5_WIDTH as TINY_T5

        configs: dict[str, Any] = {k: self.text_encoders[k].config for k in self.clip_keys}
        widths = {k: int(c.hidden_size) for k, c in configs.items()}
        tiny = any(widths.get(k) == TINY[k] for k in ("l", "g")) or (not widths and self._t5_width() == TINY_T5)
        for key in ("l", "g"):
            widths.setdefault(key, TINY[key] if tiny else {"l": 768, "g": 1280}[key])
        return widths

    def _t5_width(self) -> int:
        t5 = self._weights.modules.get("t5")
        return int(getattr(t5.config, "d_model", 4096)) if t5 is not None else 4096

    def _encode_t5(self, tokens: TokenizedPrompt) -> torch.Tensor | None:
        """T5's last hidden states for the prompt's T5 chunk; weighted tokens move away from the empty
        prompt's encoding at the same position (z_empty + (z - z_empty) * w, as the CLIPs and ComfyUI do)."""
        chunks = tokens.chunks.get("t5")
        if not self.has_t5 or not chunks:
            return None
        chunk = chunks[0]
        weighted = any(w != 1.0 for w in chunk.weights)
        batch = [list(chunk.ids)]
        if weighted:
            batch.append([self.t5_eos()] + [T5_PAD] * (len(chunk.ids) - 1))
        with torch.no_grad(), self._weights.lock:
            self.ensure_loaded()
            t5 = self.clip.encoder("t5")    # its weights patched to this handle's patches (or restored)
            device = next(t5.parameters()).device
            out = t5(input_ids=torch.tensor(batch, device=device)).last_hidden_state.float()
        z = out[0:1]
        if weighted:
            w = torch.tensor(chunk.weights, dtype=z.dtype, device=z.device).view(1, -1, 1)
            z = torch.where(w != 1.0, out[1:2] + (z - out[1:2]) * w, z)
        return z.to(self.output_device)


class SkipLayerGuidance:
    """Skip-layer guidance (SD3.5): between two sigmas, the positive prediction is also computed with
    some joint blocks skipped, and the guided result moves away from it:
    ``cfg_result + (cond - cond_skipped) * scale`` (denoised estimates).

    `observe` runs inside the model call of the positive rows and keeps the difference for the same
    thread's CFG step (`cfg_function`); several positive entries contribute their mean difference."""

    def __init__(self, layers: list[int], scale: float, sigma_start: float, sigma_end: float) -> None:
        import threading

        self.layers, self.scale = list(layers), float(scale)
        self.sigma_start, self.sigma_end = float(sigma_start), float(sigma_end)
        self._local = threading.local()

    def active(self, sigma: float) -> bool:
        return bool(self.layers) and self.scale != 0 and self.sigma_end <= sigma <= self.sigma_start

    def observe(self, handle: SD3ModelHandle, x, t, context, pooled, out, cond: Mapping[str, Any],
                controls: list[torch.Tensor] | None = None) -> None:
        """`controls`: the ControlNet residuals of this call (the skipped pass gets them too, as in ComfyUI,
        where it is one more model call with the same conditioning)."""
        sig = cond.get("sigma")
        flags = list(cond.get("cond_or_uncond") or [])
        if sig is None or not flags or not self.active(float(torch.as_tensor(sig).max())):
            return
        per = x.shape[0] // len(flags)
        rows = [r for k, f in enumerate(flags) if f == 0 for r in range(k * per, (k + 1) * per)]
        if not rows:
            return
        idx = torch.tensor(rows, device=x.device)
        extra = {"block_controlnet_hidden_states": [c[idx] for c in controls]} if controls else {}
        skipped = handle.unet(hidden_states=x[idx], timestep=t[idx], encoder_hidden_states=context[idx],
                              pooled_projections=pooled[idx], skip_layers=self.layers, return_dict=False, **extra)[0]
        s = torch.as_tensor(sig, device=x.device, dtype=torch.float32)[idx].view(-1, 1, 1, 1)
        # denoised = x - v * sigma, so cond - cond_skipped = sigma * (v_skipped - v)
        diff = (s * (skipped.float() - out[idx].float())).reshape(-1, per, *x.shape[1:]).mean(0)
        self._local.diff = diff

    def cfg_function(self, cond: torch.Tensor, uncond: torch.Tensor, cfg: float, x: torch.Tensor,
                     sigma: torch.Tensor) -> torch.Tensor:
        result = uncond + (cond - uncond) * cfg
        diff = getattr(self._local, "diff", None)
        self._local.diff = None
        if diff is None or not self.active(float(torch.as_tensor(sigma).max())):
            return result
        return result + diff.to(result) * self.scale


def t5_chunk(ids: list[int]) -> TokenChunk:
    """A T5 token chunk (weights 1) of these ids."""
    return TokenChunk(list(ids), [1.0] * len(ids))


T5_TOKENIZER_DIR = Path(__file__).parent / "tokenizer" / "t5"


def t5_tokenizer_for(t5: nn.Module) -> Any:
    """The tokenizer of a T5 encoder: the shipped T5 (SentencePiece) vocabulary, or the tiny test
    vocabulary for the tiny random-weight encoders (told apart by their vocabulary size)."""
    from .tiny_sd3 import tiny_t5_tokenizer

    vocab = int(getattr(t5.config, "vocab_size", 0))
    tiny = tiny_t5_tokenizer()
    if vocab == len(tiny):
        return tiny
    from transformers import T5Tokenizer

    for name, kwargs in (("tokenizer.json", "tokenizer_file"), ("spiece.model", "vocab_file")):
        path = T5_TOKENIZER_DIR / name
        if path.is_file():
            return T5Tokenizer(**{kwargs: str(path)}, extra_ids=100, model_max_length=512)
    raise RuntimeError(f"the T5 tokenizer data is not installed (expected {T5_TOKENIZER_DIR}/spiece.model or "
                       "tokenizer.json); T5-XXL prompts cannot be tokenized")
