"""LAION-CLAP adapter: real CLAP checkpoints as a :class:`QueryEncoder`, loaded without surprises.

What laion-clap 1.1.7 does on its own, and what this adapter does instead:

- ``import laion_clap`` runs ``laion_clap/training/data.py``, which downloads the
  bert-base-uncased, roberta-base and bart-base tokenizers *at import time*. We never
  import the ``laion_clap`` package: its inner ``clap_module`` package (the model code)
  is imported directly, the way laion-clap itself puts it on ``sys.path``.
- ``CLAP(...)`` calls ``RobertaModel.from_pretrained('roberta-base')`` (a download of
  weights that the CLAP checkpoint overwrites anyway). We build the text branch from the
  RoBERTa *config* of ``text_model`` (a local directory or a Hub id) with random weights,
  then load every weight from the CLAP checkpoint.
- Offline, ``RobertaTokenizer.from_pretrained('roberta-base')`` under transformers 5
  silently returns an empty 5-token tokenizer, and every sentence gets the same
  embedding. We load the tokenizer from ``text_model`` and refuse one that does not
  tokenize real words (:func:`check_tokenizer`), naming the files to provide.
- Checkpoints written with transformers < 4.31 carry ``text_branch.embeddings.position_ids``,
  a buffer newer transformers no longer stores: it is dropped before a *strict* load.
- Checkpoints are read with ``torch.load(weights_only=True)`` (or safetensors), never
  by unpickling arbitrary objects.
- laion-clap crops inputs longer than 10 s at random. Here audio is resampled to
  48 kHz and cut into consecutive 10 s windows (a last partial window is taken flush
  with the end; a clip shorter than 10 s is repeat-padded as CLAP was trained); the
  clip's embedding is the normalized mean of its windows' embeddings. Deterministic.
- laion-clap's inference runs without gradients and rounds audio through int16. Here the
  audio embedding is differentiable when asked (``embed_audio(..., differentiable=True)``,
  for pathwise RL rewards): the same windows and the same forward value, the int16 round
  trip made straight-through (backward = identity, clipping included), CLAP's frozen
  weights receiving no gradient. By default it runs under ``no_grad`` as before.

The image modality is a separate trunk (small CNN, or a CLIP vision tower) with a
projection trained by alignment stage 3. The CLAP text/audio outputs go through
identity-initialized linear heads, so an unaligned ``ClapEncoder`` is exactly CLAP.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import importlib.util
import pickle
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from marsctl.config import from_mapping, to_mapping
from marsctl.errors import MarsctlError
from marsctl.models.encoders.common import ProjectedEncoder, identity_or_default_linear
from marsctl.models.encoders.sources import hub_file, looks_like_path, pretrained_source
from marsctl.models.encoders.towers import ClipVisionTrunk, ImageTowerConfig, SmallImageCnn

#: named checkpoints of the LAION-CLAP Hub repo: file name and audio model
CLAP_HUB_REPO = "lukewys/laion_clap"
CLAP_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "630k-audioset": ("630k-audioset-best.pt", "HTSAT-tiny"),
    "630k": ("630k-best.pt", "HTSAT-tiny"),
    "music_speech_audioset": ("music_speech_audioset_epoch_15_esc_89.98.pt", "HTSAT-base"),
    "music_audioset": ("music_audioset_epoch_15_esc_90.14.pt", "HTSAT-base"),
    "music_speech": ("music_speech_epoch_15_esc_89.25.pt", "HTSAT-base"),
}
#: HTS-AT size from the width of its patch embedding
_HTSAT_BY_WIDTH = {96: "HTSAT-tiny", 128: "HTSAT-base", 256: "HTSAT-large"}
CLAP_SAMPLE_RATE = 48_000
CLAP_WINDOW_SAMPLES = 480_000
TOKENIZER_FILES = "vocab.json and merges.txt (plus tokenizer_config.json and config.json) of roberta-base"


@dataclasses.dataclass(frozen=True)
class ClapEncoderConfig:
    """Which LAION-CLAP checkpoint, which text model files, which image trunk."""

    #: a name of :data:`CLAP_CHECKPOINTS` (downloaded to the Hugging Face cache) or a local .pt/.safetensors path
    checkpoint: str = "630k-audioset"
    #: HTSAT-tiny / HTSAT-base / ...; empty = from the name table or detected from the weights
    amodel: str = ""
    #: RoBERTa tokenizer + config: a local directory, or a Hub id (cached download when online)
    text_model: str = "FacebookAI/roberta-base"
    image: ImageTowerConfig = ImageTowerConfig()
    #: quantize audio to int16 and back before embedding, as laion-clap's inference does
    quantize_int16: bool = True
    #: text tokens (CLAP uses 77)
    max_text_tokens: int = 77
    init_seed: int = 0


def import_clap_module() -> Any:
    """laion-clap's model code (``clap_module``) without running ``laion_clap/__init__`` (which downloads)."""
    if "clap_module" in sys.modules:
        return sys.modules["clap_module"]
    spec = importlib.util.find_spec("laion_clap")
    if spec is None or not spec.submodule_search_locations:
        raise MarsctlError("the laion-clap encoder needs the laion-clap package: pip install 'marsctl[clap]'")
    package_dir = list(spec.submodule_search_locations)[0]
    if package_dir not in sys.path:
        sys.path.append(package_dir)  # what laion_clap/__init__.py does, so both import paths agree
    return importlib.import_module("clap_module")


def resolve_checkpoint(checkpoint: str) -> tuple[Path, str]:
    """(local checkpoint path, audio model name or "") for a name or a path."""
    if checkpoint in CLAP_CHECKPOINTS:
        filename, amodel = CLAP_CHECKPOINTS[checkpoint]
        return hub_file(CLAP_HUB_REPO, filename), amodel
    if looks_like_path(checkpoint):
        return Path(pretrained_source(checkpoint)), ""
    raise MarsctlError(
        f"{checkpoint}: not a LAION-CLAP checkpoint name ({', '.join(CLAP_CHECKPOINTS)}) nor an existing path"
    )


def load_clap_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a CLAP checkpoint, without unpickling anything but tensors."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise MarsctlError(
                f"{path}: cannot be read as a weights-only checkpoint ({str(exc).splitlines()[0]}); "
                "convert it to safetensors or re-save its state_dict"
            ) from exc
        state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise MarsctlError(f"{path}: no state_dict in this checkpoint")
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}


def detect_amodel(state: dict[str, torch.Tensor], path: Path) -> str:
    weight = state.get("audio_branch.patch_embed.proj.weight")
    if weight is None or int(weight.shape[0]) not in _HTSAT_BY_WIDTH:
        raise MarsctlError(f"{path}: cannot tell the audio model from the weights; set amodel (e.g. HTSAT-base)")
    return _HTSAT_BY_WIDTH[int(weight.shape[0])]


def load_text_files(text_model: str) -> tuple[Any, Any]:
    """(RoBERTa tokenizer, RoBERTa config) from a local directory or a Hub id; the tokenizer is checked."""
    from transformers import AutoConfig, AutoTokenizer

    source = pretrained_source(text_model)
    local = Path(source).is_dir()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        config = AutoConfig.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise MarsctlError(
            f"{text_model}: cannot load the CLAP text tokenizer/config ({str(exc).splitlines()[0]}); "
            f"provide a directory with {TOKENIZER_FILES}"
        ) from exc
    check_tokenizer(tokenizer, text_model, int(config.vocab_size))
    return tokenizer, config


def check_tokenizer(tokenizer: Any, where: str, vocab_size: int | None = None) -> None:
    """Refuse a tokenizer that cannot tell sentences apart (the silent empty tokenizer of offline transformers 5)."""
    probes = ["a dog barking in the distance", "a violin playing a slow melody"]
    special = set(tokenizer.all_special_ids)
    content = []
    for probe in probes:
        ids = tokenizer(probe)["input_ids"]
        content.append([i for i in ids if i not in special])
    problem = ""
    if len(tokenizer) <= len(special) + 1 or any(not ids for ids in content):
        problem = f"it has {len(tokenizer)} tokens and turns real words into nothing"
    elif content[0] == content[1]:
        problem = "it gives different sentences the same tokens"
    elif vocab_size is not None and max(max(ids) for ids in content) >= vocab_size:
        problem = f"its token ids exceed the text model's vocabulary of {vocab_size}"
    if problem:
        raise MarsctlError(f"{where}: the CLAP text tokenizer is unusable ({problem}); provide a directory with {TOKENIZER_FILES}")


@contextlib.contextmanager
def _roberta_from_config(clap_model_module: Any, text_config: Any) -> Iterator[None]:
    """Make CLAP's hard-coded ``RobertaModel.from_pretrained('roberta-base')`` build from ``text_config``."""
    from transformers import RobertaModel

    class _FromConfig:
        @staticmethod
        def from_pretrained(*_args: Any, **_kwargs: Any) -> Any:
            return RobertaModel(text_config)

    original = clap_model_module.RobertaModel
    clap_model_module.RobertaModel = _FromConfig
    try:
        yield
    finally:
        clap_model_module.RobertaModel = original


def build_clap_model(amodel: str, text_config: Any) -> nn.Module:
    clap_module = import_clap_module()
    configs = clap_module.factory._MODEL_CONFIGS
    if amodel not in configs:
        raise MarsctlError(f"unknown CLAP audio model {amodel!r}; known: {', '.join(sorted(configs))}")
    model_cfg = copy.deepcopy(configs[amodel])
    model_cfg["text_cfg"]["model_type"] = "roberta"
    with _roberta_from_config(sys.modules["clap_module.model"], text_config):
        return clap_module.model.CLAP(**model_cfg, enable_fusion=False, fusion_type="None")


def load_clap_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = set(model.state_dict())
    # transformers >= 4.31 no longer stores position_ids: drop it (and any such buffer) when the model lacks it
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise MarsctlError(
            f"{path}: weights do not fit the CLAP model (missing: {', '.join(missing[:4]) or 'none'}; "
            f"unexpected: {', '.join(unexpected[:4]) or 'none'}); is amodel right, or is this a fusion checkpoint?"
        )
    model.load_state_dict(state, strict=True)


def clap_windows(wave: torch.Tensor, window: int = CLAP_WINDOW_SAMPLES) -> torch.Tensor:
    """Deterministic 10 s windows ``[W, window]`` covering a 48 kHz clip (see the module docstring)."""
    n = wave.shape[-1]
    if n <= window:
        repeats = max(1, window // n)
        return F.pad(wave.repeat(repeats), (0, window - n * repeats))[None]
    starts = list(range(0, n - window + 1, window))
    if starts[-1] + window < n:
        starts.append(n - window)
    return torch.stack([wave[s : s + window] for s in starts])


def int16_round_trip(waveforms: torch.Tensor) -> torch.Tensor:
    """laion-clap's ``int16_to_float32(float32_to_int16(x))``: clip to [-1, 1], truncate to int16 steps."""
    return (waveforms.clamp(-1, 1) * 32767.0).to(torch.int16).to(torch.float32) / 32767.0


def straight_through(waveforms: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Forward value exactly ``quantized``; backward the identity to ``waveforms`` (a straight-through estimator).

    Written ``q + (x - x.detach())`` rather than ``x + (q - x).detach()``: the added term is
    exactly zero, so the forward value is bit-identical to the quantized one.
    """
    return quantized.detach() + (waveforms - waveforms.detach())


class ClapEncoder(ProjectedEncoder):
    encoder_type = "laion-clap"
    external_modules = ("clap",)
    sample_rate = CLAP_SAMPLE_RATE
    audio_batch_size = 8

    def __init__(self, config: ClapEncoderConfig = ClapEncoderConfig()):
        checkpoint_path, named_amodel = resolve_checkpoint(config.checkpoint)
        state = load_clap_state_dict(checkpoint_path)
        amodel = config.amodel or named_amodel or detect_amodel(state, checkpoint_path)
        tokenizer, text_config = load_text_files(config.text_model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            clap = build_clap_model(amodel, text_config)
            load_clap_weights(clap, state, checkpoint_path)
            embed_dim = int(clap.joint_embed_shape)
            super().__init__(embed_dim)
            self.clap = clap
            self.tokenizer = tokenizer
            self.config = config
            self.amodel = amodel
            if config.image.kind == "clip-vision":
                self.image_trunk_pretrained = ClipVisionTrunk(config.image.model)
                self.external_modules = ("clap", "image_trunk_pretrained")
                image_dim = self.image_trunk_pretrained.output_dim
            else:
                self.image_trunk = SmallImageCnn(config.image)
                image_dim = self.image_trunk.output_dim
            self.text_head = identity_or_default_linear(embed_dim, embed_dim)
            self.audio_head = identity_or_default_linear(embed_dim, embed_dim)
            self.image_head = identity_or_default_linear(image_dim, embed_dim)
        self.freeze_external()

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.config.max_text_tokens, return_tensors="pt"
        )
        return self.clap.get_text_embedding({k: tokens[k] for k in ("input_ids", "attention_mask")})

    def audio_features(self, waveforms: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        if not differentiable:  # inference: the frozen CLAP trunk without autograd
            with torch.no_grad():
                if self.config.quantize_int16:
                    waveforms = int16_round_trip(waveforms)
                return self._clap_audio_embedding(waveforms)
        if self.config.quantize_int16:
            waveforms = straight_through(waveforms, int16_round_trip(waveforms))
        return self._clap_audio_embedding(waveforms)

    def _clap_audio_embedding(self, waveforms: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` at 48 kHz -> ``[B, D]``: CLAP's embedding of each clip's windows, averaged (see :func:`clap_windows`).
        The windows of all B clips go through HTSAT in one batch."""
        windows = [clap_windows(wave) for wave in waveforms]  # [W_b, window] each
        flat = torch.cat(windows)
        longer = torch.zeros(1, dtype=torch.bool)
        embeddings = self.clap.get_audio_embedding([{"waveform": w, "longer": longer} for w in flat])  # [sum W_b, D], unit vectors
        per_clip = embeddings.split([len(w) for w in windows])
        return torch.stack([F.normalize(clip.mean(0), dim=-1) for clip in per_clip])

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.config.image.kind == "clip-vision":
            with torch.no_grad():
                return self.image_trunk_pretrained(images)
        return self.image_trunk(images)

    def config_mapping(self) -> dict[str, Any]:
        mapping = to_mapping(self.config)
        mapping["amodel"] = self.amodel
        return mapping

    @classmethod
    def from_config_mapping(cls, mapping: dict[str, Any], where: str = "config") -> "ClapEncoder":
        return cls(from_mapping(ClapEncoderConfig, mapping, where))
