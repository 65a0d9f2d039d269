"""The query-conditioned mask separator (Sound-of-Pixels / CLIPSep / OmniSep U-Net).

Data flow for a mixture ``x`` and a query embedding ``e`` (``[D]``, unit norm):

    X = STFT(x)                                   [513, frames]   (Hann, n_fft 1024, hop 256)
    L = log(warp(|X|) + eps)                      [256, frames]   log-frequency grid
    H = UNet7(BN(L))                              [32, 256, frames]  query-independent features
    c = sigmoid(Linear_{D->32}(e))                [32]
    logits = sum_k s_k c_k H_k + b                [256, frames]   inner product (learned scale s, bias b)
    P = sigmoid(logits)                           mask probability; the policy's mode
    y = iSTFT(warp^-1(M) * X)                     mixture phase, M = P (or a Beta sample)

The U-Net features do not depend on the query, so several queries (the sources of a
mixture in supervised training, or a group of RL samples) share one U-Net pass:
:meth:`Separator.features` then :meth:`Separator.logits`.

A trained separator is a directory: ``config.json`` (this module's
:class:`SeparatorConfig`, the encoder spec, training notes), ``model.safetensors`` and a
``README.md`` model card. :func:`load_separator` reads it back and reports a missing,
corrupt or mismatched checkpoint as one clear :class:`~marsctl.errors.MarsctlError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from marsctl.audio import LogFrequencyWarp, Spectrogram
from marsctl.config import SignalConfig, ValidatedConfig, from_mapping, setting, to_mapping
from marsctl.errors import ConfigError, MarsctlError
from marsctl.files import atomic_path, write_json_atomic
from marsctl.models.policy import DEFAULT_KAPPA, BetaMaskPolicy

#: magnitude floor before the log (CLIPSep uses 1e-10 as well)
LOG_EPS = 1e-10
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
ARTIFACT_KIND = "marsctl-separator"
SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SeparatorConfig(ValidatedConfig):
    """Architecture of the separator (everything needed to rebuild it before loading weights)."""

    #: size of the query embedding (the encoder's ``embedding_dim``)
    query_dim: int = setting(512, ge=1)
    #: U-Net depth: the log-spectrogram is halved this many times on both axes
    #: (at most log2(signal.n_log_bins): see :func:`check_num_levels`)
    num_levels: int = setting(7, ge=1)
    #: channels of the first U-Net level; level i has base * min(2**i, max_channel_multiplier)
    base_channels: int = setting(32, ge=1, le=4096)
    max_channel_multiplier: int = setting(8, ge=1, le=1024)
    #: U-Net output channels, combined with the 32-d conditioned query by an inner product
    mask_channels: int = setting(32, ge=1, le=4096)
    #: Beta policy concentration: alpha = 1 + kappa P, beta = 1 + kappa (1 - P)
    kappa: float = setting(DEFAULT_KAPPA, gt=0)
    signal: SignalConfig = dataclasses.field(default_factory=SignalConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_num_levels(self.num_levels, self.signal)


def max_num_levels(signal: SignalConfig) -> int:
    """The deepest U-Net the log-frequency grid allows: each level halves the frequency axis, and
    the input is padded to a multiple of 2**num_levels, so 2**num_levels <= n_log_bins (a deeper
    net would only add padding, doubling the input per extra level)."""
    return max(1, int(signal.n_log_bins).bit_length() - 1)


def check_num_levels(num_levels: int, signal: SignalConfig) -> None:
    """One line when ``num_levels`` is outside 1..:func:`max_num_levels` for ``signal``."""
    top = max_num_levels(signal)
    if not 1 <= num_levels <= top:
        raise ConfigError(
            f"num_levels must be in 1..{top} for n_log_bins {signal.n_log_bins} "
            f"(each level halves the frequency grid: 2**num_levels <= n_log_bins), got {num_levels}"
        )


class _Down(nn.Module):
    """Conv 4x4 stride 2 -> (BatchNorm) -> LeakyReLU(0.2): halves both axes."""

    def __init__(self, cin: int, cout: int, norm: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=not norm)
        self.norm = nn.BatchNorm2d(cout) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.conv(x)), 0.2)


class _Up(nn.Module):
    """Bilinear x2 upsampling -> Conv 3x3 -> BatchNorm -> ReLU (Sound-of-Pixels' up-block)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return F.relu(self.norm(self.conv(x)))


class UNet(nn.Module):
    """``num_levels``-level U-Net with skip connections: ``[B, 1, F, T] -> [B, out, F, T]``.

    ``F`` and ``T`` must be multiples of ``2 ** num_levels`` (the separator pads).
    """

    def __init__(self, num_levels: int, base: int, max_multiplier: int, out_channels: int):
        super().__init__()
        widths = [base * min(2**i, max_multiplier) for i in range(num_levels)]
        self.input_norm = nn.BatchNorm2d(1)
        self.down = nn.ModuleList(
            _Down(1 if i == 0 else widths[i - 1], widths[i], norm=0 < i < num_levels - 1) for i in range(num_levels)
        )
        # up[i] undoes down[i]; its input is the deeper level's output concatenated with the skip
        ups = []
        for i in range(num_levels - 1, 0, -1):
            cin = widths[i] if i == num_levels - 1 else 2 * widths[i]
            ups.append(_Up(cin, widths[i - 1]))
        self.up = nn.ModuleList(ups)
        self.head = nn.Conv2d(2 * widths[0] if num_levels > 1 else widths[0], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(x)
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
        skips.pop()  # the innermost output is x itself
        for up in self.up:
            x = torch.cat([up(x), skips.pop()], dim=1)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.head(x)


class Separator(nn.Module):
    """Query-conditioned mask separator with a Beta mask policy (see the module docstring)."""

    def __init__(self, config: SeparatorConfig):
        super().__init__()
        self.config = config
        self.spectrogram = Spectrogram(config.signal)
        self.warp = LogFrequencyWarp.from_config(config.signal)
        self.unet = UNet(config.num_levels, config.base_channels, config.max_channel_multiplier, config.mask_channels)
        self.query_projection = nn.Linear(config.query_dim, config.mask_channels)
        self.inner_scale = nn.Parameter(torch.ones(config.mask_channels))
        self.inner_bias = nn.Parameter(torch.zeros(1))

    # --- analysis ------------------------------------------------------------------------
    def analyze(self, mixture: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[..., T]`` -> (complex STFT ``[..., 513, frames]``, warped magnitude and its log ``[..., 256, frames]``).

        Always computed in float32 (outside autocast)."""
        with torch.autocast(device_type=mixture.device.type, enabled=False):
            stft = self.spectrogram.stft(mixture.float())
            warped = self.warp(stft.abs())
            return stft, warped, torch.log(warped.clamp_min(0) + LOG_EPS)

    def features(self, log_magnitude: torch.Tensor) -> torch.Tensor:
        """Query-independent U-Net features: ``[B, F_log, frames] -> [B, mask_channels, F_log, frames]``."""
        batch, n_freq, n_frames = log_magnitude.shape
        multiple = 2**self.config.num_levels
        pad_f = (-n_freq) % multiple
        pad_t = (-n_frames) % multiple
        x = log_magnitude.unsqueeze(1)
        if pad_f or pad_t:
            # padded bins read as silence
            x = F.pad(x, (0, pad_t, 0, pad_f), value=math.log(LOG_EPS))
        return self.unet(x)[..., :n_freq, :n_frames]

    def query_vector(self, query: torch.Tensor) -> torch.Tensor:
        """c = sigmoid(Linear(e)): ``[..., D] -> [..., mask_channels]``."""
        if query.shape[-1] != self.config.query_dim:
            raise ValueError(f"query embedding has size {query.shape[-1]}, the separator expects {self.config.query_dim}")
        return torch.sigmoid(self.query_projection(query))

    def logits(self, features: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Inner product of features ``[B, C, F, T]`` and queries ``[B, D]`` or ``[B, S, D]``.

        Returns ``[B, F, T]`` or ``[B, S, F, T]`` logits: sum_k s_k c_k H_k + b.
        """
        c = self.query_vector(query) * self.inner_scale
        if c.ndim == 2:
            return torch.einsum("bc,bcft->bft", c, features) + self.inner_bias
        return torch.einsum("bsc,bcft->bsft", c, features) + self.inner_bias

    def forward(self, mixture: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Mixtures ``[B, T]`` and queries ``[B, D]`` (or ``[B, S, D]``) -> mask logits on the log grid."""
        _, _, log_mag = self.analyze(mixture)
        return self.logits(self.features(log_mag), query)

    def policy(self, logits: torch.Tensor) -> BetaMaskPolicy:
        return BetaMaskPolicy.from_logits(logits, self.config.kappa)

    # --- synthesis -----------------------------------------------------------------------
    def synthesize(self, mask: torch.Tensor, mixture_stft: torch.Tensor, length: int) -> torch.Tensor:
        """Warp a log-grid mask ``[..., F_log, frames]`` back to linear bins, apply it to the
        mixture STFT (broadcast over leading axes) and invert with the mixture phase."""
        with torch.autocast(device_type=mask.device.type, enabled=False):
            linear_mask = self.warp.inverse(mask.float()).clamp(0.0, 1.0)
            return self.spectrogram.istft(linear_mask * mixture_stft, length)

    @torch.no_grad()
    def separate(self, mixture: torch.Tensor, query: torch.Tensor, decode: str = "mode") -> torch.Tensor:
        """Mixtures ``[B, T]`` and queries ``[B, D]`` (or ``[B, S, D]``) -> separated waveforms of the same leading shape."""
        stft, _, log_mag = self.analyze(mixture)
        logits = self.logits(self.features(log_mag), query)
        mask = self.policy(logits).decode(decode)
        if mask.ndim == 4:
            stft = stft.unsqueeze(1)
        return self.synthesize(mask, stft, mixture.shape[-1])


# --- artifact I/O ----------------------------------------------------------------------------
def save_separator(
    model: Separator,
    directory: str | Path,
    encoder: str,
    extra: dict[str, Any] | None = None,
    card: str | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``README.md`` card) into ``directory``.

    ``encoder`` is the spec of the query encoder the separator was trained with (a
    built-in name, a Hub id, or a path; a relative path is read relative to ``directory``).
    Each file is written atomically.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / MODEL_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "kind": ARTIFACT_KIND})
    write_json_atomic(
        directory / CONFIG_FILE,
        {
            "kind": ARTIFACT_KIND,
            "schema_version": SCHEMA_VERSION,
            "separator": to_mapping(model.config),
            "encoder": encoder,
            **(extra or {}),
        },
    )
    if card is not None:
        with atomic_path(directory / CARD_FILE) as tmp:
            tmp.write_text(card, encoding="utf-8")
    return directory


@dataclasses.dataclass
class LoadedSeparator:
    model: Separator
    directory: Path
    #: encoder spec, already resolved against the model directory when it is a relative path
    encoder: str
    config: dict[str, Any]


def read_separator_config(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise MarsctlError(f"{directory}: not a separator checkpoint (no {CONFIG_FILE})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MarsctlError(f"{config_path}: corrupt config ({exc})") from exc
    if not isinstance(config, dict) or config.get("kind") != ARTIFACT_KIND or "separator" not in config:
        kind = config.get("kind") if isinstance(config, dict) else None
        raise MarsctlError(f"{directory}: not a separator checkpoint (config kind is {kind!r}, expected {ARTIFACT_KIND!r})")
    return config


def resolve_model_dir(spec: str | Path) -> Path:
    """A local directory for ``spec``: a path, or a Hub id (``org/name[@rev]``) through ``marsctl.hub``."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    try:
        from marsctl.hub import resolve_artifact  # provided by the hub layer
    except ImportError:
        raise MarsctlError(f"{spec}: no such model directory") from None
    return Path(resolve_artifact(str(spec), "model"))


def load_separator(spec: str | Path, device: str | torch.device = "cpu") -> LoadedSeparator:
    """Load a separator directory (or Hub id); errors name the directory and what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = resolve_model_dir(spec)
    if directory.is_file():
        raise MarsctlError(f"{directory}: expected a model directory (with {CONFIG_FILE} and {MODEL_FILE}), got a file")
    config = read_separator_config(directory)
    sep_config = from_mapping(SeparatorConfig, config["separator"], where=f"{directory / CONFIG_FILE}: separator")
    weights_path = directory / MODEL_FILE
    if not weights_path.is_file():
        raise MarsctlError(f"{directory}: missing {MODEL_FILE}")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise MarsctlError(f"{weights_path}: corrupt weights ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    model = Separator(sep_config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise MarsctlError(f"{weights_path}: weights do not match the architecture in {CONFIG_FILE} ({detail})") from exc
    model.eval().to(device)
    encoder = str(config.get("encoder", "builtin"))
    local = directory / encoder
    if not Path(encoder).is_absolute() and local.exists():
        encoder = str(local)
    return LoadedSeparator(model=model, directory=directory, encoder=encoder, config=config)
