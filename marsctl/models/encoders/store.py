"""Encoders as directories (config.json + model.safetensors + README.md) and ``load_encoder``.

``load_encoder(spec)`` accepts:

- a saved encoder directory (what ``marsctl align`` writes);
- ``builtin``: the offline encoder with its untrained audio/image trunks;
- ``aisfx``: the built-in encoder with aiSFX's pretrained sound-effects CNN as its frozen audio trunk
  (``pip install --no-deps aisfx``; the weights ship in that package), untrained projection;
- ``default``: the aligned encoder shipped with the default separator (its query and reward encoder);
- ``laion-clap:NAME`` (``630k-audioset``, ``630k``, ``music_speech_audioset``,
  ``music_audioset``, ``music_speech``) or ``laion-clap:/path/to/checkpoint.pt``;
- ``imagebind:huge`` (ImageBind's text, audio and vision towers; the official checkpoint, downloaded
  once into ``~/.cache/marsctl/imagebind``), ``imagebind:/path/to/imagebind_huge.pth`` or ``imagebind:URL``;
- a Hub id ``org/name[@rev]`` of a saved encoder, through ``marsctl.hub.resolve_artifact``
  when the hub module is installed.

Weights are read with safetensors only; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from marsctl import __version__
from marsctl.errors import MarsctlError
from marsctl.models.encoders.anchor import AnchorFusion
from marsctl.models.encoders.common import ProjectedEncoder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1


def _encoder_classes() -> dict[str, Any]:
    from marsctl.models.encoders.builtin import BuiltinEncoder
    from marsctl.models.encoders.clap import ClapEncoder
    from marsctl.models.encoders.imagebind import ImageBindEncoder

    return {
        BuiltinEncoder.encoder_type: BuiltinEncoder,
        ClapEncoder.encoder_type: ClapEncoder,
        ImageBindEncoder.encoder_type: ImageBindEncoder,
    }


def build_encoder(encoder_type: str, config: dict[str, Any], where: str = "config") -> ProjectedEncoder:
    classes = _encoder_classes()
    if encoder_type not in classes:
        raise MarsctlError(f"{where}: unknown encoder_type {encoder_type!r}; known: {', '.join(classes)}")
    return classes[encoder_type].from_config_mapping(config, where)


def load_encoder(
    spec: str | os.PathLike, device: str | torch.device = "cpu", image_model: str | None = None
) -> ProjectedEncoder:
    """Build the encoder named by ``spec`` (see the module docstring), in eval mode on ``device``,
    with every parameter frozen (``requires_grad=False``): ready for inference, and embedding
    calls build no autograd graph. Training code calls ``encoder.unfreeze_trainable()``.

    ``image_model`` (built-in names only) swaps the small image CNN for a pretrained
    CLIP-family vision tower (a local directory or a Hub id); a saved directory already
    records its image trunk.
    """
    from marsctl.models.encoders.towers import ImageTowerConfig

    spec_str = str(spec)
    path = Path(spec_str).expanduser()
    image = ImageTowerConfig(kind="clip-vision", model=image_model) if image_model else ImageTowerConfig()
    if path.is_dir():
        if image_model:
            raise MarsctlError(f"{path}: a saved encoder already has its image trunk; image_model applies to built-in names only")
        encoder = _load_directory(path)
    elif spec_str == "default":
        from marsctl.pretrained import DEFAULT_SEPARATOR_DIR

        encoder = _load_directory(DEFAULT_SEPARATOR_DIR / "encoder")
    elif spec_str in ("builtin", "aisfx"):
        from marsctl.models.encoders.builtin import BuiltinEncoder, BuiltinEncoderConfig
        from marsctl.models.encoders.towers import AudioCnnConfig

        audio = AudioCnnConfig(kind="aisfx") if spec_str == "aisfx" else AudioCnnConfig()
        encoder = BuiltinEncoder(BuiltinEncoderConfig(audio=audio, image=image))
    elif spec_str.startswith("laion-clap:"):
        from marsctl.models.encoders.clap import ClapEncoder, ClapEncoderConfig

        encoder = ClapEncoder(ClapEncoderConfig(checkpoint=spec_str.split(":", 1)[1], image=image))
    elif spec_str.startswith("imagebind:"):
        from marsctl.models.encoders.imagebind import ImageBindEncoder, ImageBindEncoderConfig

        if image_model:
            raise MarsctlError(f"{spec_str}: ImageBind has its own vision tower; image_model applies to built-in names only")
        encoder = ImageBindEncoder(ImageBindEncoderConfig(checkpoint=spec_str.split(":", 1)[1]))
    elif "/" in spec_str and not spec_str.startswith((".", "/", "~")):
        try:
            from marsctl.hub import resolve_artifact  # type: ignore[attr-defined]
        except ImportError as exc:
            raise MarsctlError(f"{spec_str}: no such encoder directory (Hub ids need marsctl.hub)") from exc
        encoder = _load_directory(Path(resolve_artifact(spec_str, "model")))
    else:
        raise MarsctlError(
            f"{spec_str}: not an encoder directory, 'builtin', 'aisfx', 'default', 'laion-clap:NAME', 'laion-clap:PATH', "
            "'imagebind:huge' or 'imagebind:PATH'"
        )
    encoder.requires_grad_(False)
    return encoder.to(device).eval()


def _load_directory(path: Path) -> ProjectedEncoder:
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_path.is_file():
        raise MarsctlError(f"{path}: not a saved encoder (no {CONFIG_NAME})")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MarsctlError(f"{config_path}: not valid JSON ({exc})") from exc
    if "encoder_type" not in meta or "config" not in meta:
        raise MarsctlError(f"{config_path}: missing 'encoder_type' or 'config'; is this an encoder directory?")
    encoder = build_encoder(meta["encoder_type"], meta["config"], str(config_path))
    anchor = meta.get("anchor_fusion")
    if anchor:
        encoder.anchor_fusion = AnchorFusion(
            int(anchor["embedding_dim"]), int(anchor["rank"]), tuple(anchor.get("modalities", ("audio", "text")))
        )
    if not weights_path.is_file():
        raise MarsctlError(f"{path}: {WEIGHTS_NAME} is missing")
    try:
        state = load_file(str(weights_path))
    except Exception as exc:
        raise MarsctlError(f"{weights_path}: cannot read safetensors ({exc})") from exc
    encoder.load_persistent_state_dict(state, str(weights_path))
    return encoder


def encoder_metadata(encoder: ProjectedEncoder) -> dict[str, Any]:
    anchor = encoder.anchor_fusion
    return {
        "format_version": FORMAT_VERSION,
        "marsctl_version": __version__,
        "encoder_type": encoder.encoder_type,
        "embedding_dim": encoder.embedding_dim,
        "config": encoder.config_mapping(),
        "anchor_fusion": anchor.config_mapping() if anchor is not None else None,
    }


def save_encoder(encoder: ProjectedEncoder, directory: str | os.PathLike, card_extra: str = "") -> Path:
    """Write ``directory`` atomically: built beside it under a temporary name, then renamed into place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        meta = encoder_metadata(encoder)
        state = encoder.persistent_state_dict()
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (tmp / CARD_NAME).write_text(model_card(encoder, meta, state, card_extra), encoding="utf-8")
        os.chmod(tmp, 0o755)
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def model_card(encoder: ProjectedEncoder, meta: dict[str, Any], state: dict[str, torch.Tensor], extra: str) -> str:
    n_saved = sum(t.numel() for t in state.values())
    n_total = sum(p.numel() for p in encoder.parameters())
    lines = [
        "---",
        "library_name: marsctl",
        "tags: [audio, text, image, contrastive, reward-model, mars-sep]",
        "---",
        f"# marsctl query/reward encoder ({meta['encoder_type']})",
        "",
        "Text, audio and image towers projected into one shared, L2-normalized space of "
        f"{meta['embedding_dim']} dimensions, used by MARS-Sep as the query encoder and as the reward "
        "encoder (reward = cos(phi_a(separated), z*)).",
        "",
        "Load it with:",
        "",
        "```python",
        "from marsctl.models.encoders import load_encoder",
        "encoder = load_encoder('path/to/this/directory')",
        "```",
        "",
        f"- encoder type: `{meta['encoder_type']}`",
        f"- parameters: {n_total:,} in all, {n_saved:,} stored here (pretrained frozen trunks are referenced by the config, not copied)",
        f"- anchor fusion (z*): {'rank ' + str(meta['anchor_fusion']['rank']) if meta['anchor_fusion'] else 'not trained'}",
        f"- written by marsctl {meta['marsctl_version']}",
        "",
        "## Configuration",
        "",
        "```json",
        json.dumps(meta["config"], indent=2),
        "```",
    ]
    if extra:
        lines += ["", extra.rstrip()]
    return "\n".join(lines) + "\n"
