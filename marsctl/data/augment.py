"""Augmentation of the training mixtures drawn by dynamic mixing (``augment:`` in the training recipes).

Each source window is changed, in this order, before the mixing gains of ``mix.mode`` are applied:

1. ``shift``: a random delay of 0..``max_s`` seconds (zeros in front, the window's end drops out);
2. ``eq``: a low shelf, a peaking band and a high shelf in cascade (RBJ Audio EQ Cookbook biquads, the
   formulas of torchaudio's ``bass_biquad``, ``equalizer_biquad`` and ``treble_biquad``, run by
   ``scipy.signal.sosfilt``; torchaudio's own filters clip their output to [-1, 1]), each band's gain drawn
   uniformly in ``db``, its frequency log-uniformly in :data:`EQ_BANDS`;
3. ``room``: convolution with a simulated room impulse response from a seeded bank (below). The RIR is
   cut so that its direct path lands on the dry source's samples (the source is not delayed), and the
   result is rescaled to the dry window's energy: **energy-preserving**, sum(wet²) = sum(dry²) (a silent
   window stays silent). The target is the reverberant source as it sits in the mix;
4. ``gain``: a random gain drawn uniformly in ``db``.

Each augmentation applies to each source with its own ``probability``. ``snr_db_range`` switches the
mixing itself to ``mix.mode: snr`` (the first source at ``signal.mix_source_gain``, the others at an SNR
drawn uniformly in the range; see :mod:`marsctl.data.mixing`). Every augmentation is off by default, and
a dataset with all of them off draws exactly the mixtures it drew before augmentation existed.

Randomness: the four augmentations draw from children of the item's seeded generator
(``numpy.random.Generator.spawn``), which leaves the item's own stream (labels, clips, windows, SNR)
untouched; one augmentation switched on or off does not change what the others draw. An item is a pure
function of (seed, epoch, index), so resumed runs and DataLoader workers see the same mixtures.

The room bank: ``bank_size`` shoebox rooms simulated by pyroomacoustics' image source model, each with
length, width and height drawn uniformly in their ranges, a target RT60 drawn uniformly in ``rt60_s``
turned into a wall energy absorption by ``pyroomacoustics.inverse_sabine`` (a room that no absorption
can make that dry is drawn again), and a source and a microphone placed uniformly at least
:data:`WALL_MARGIN_M` from every wall and :data:`MIN_SOURCE_MIC_M` apart. The image order is
inverse_sabine's, capped at ``max_order`` (the simulation time grows with its cube), and an RIR is kept
up to ``max_rir_s`` after its direct path. The bank is made once per (settings, seed, sample rate,
pyroomacoustics version) and cached as ``$XDG_CACHE_HOME/marsctl/rirs/<hash>.npz`` (written atomically),
so every later dataset, worker and run reads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from marsctl.config import ValidatedConfig, setting
from marsctl.errors import ConfigError, MarsctlError
from marsctl.files import atomic_path

#: sources and microphones stay this far from every wall (metres)
WALL_MARGIN_M = 0.5
#: and this far from each other
MIN_SOURCE_MIC_M = 0.5
#: EQ bands: (kind, lowest and highest centre frequency in Hz, Q); a centre above 0.45 x the sample rate
#: is lowered to it
EQ_BANDS = (("low_shelf", 60.0, 400.0, 0.707), ("peaking", 250.0, 4000.0, 1.0), ("high_shelf", 2000.0, 7000.0, 0.707))
#: the room bank file's layout (a change makes a new cache file)
BANK_FORMAT = 1


def _range(config: Any, name: str, low: float, high: float, what: str) -> None:
    """``config.name`` is a [lo, hi] pair of finite numbers with ``low <= lo <= hi <= high``."""
    value = getattr(config, name)
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if ok:
        value = (float(value[0]), float(value[1]))
        object.__setattr__(config, name, value)
        ok = low <= value[0] <= value[1] <= high
    if not ok:
        raise ConfigError(f"{name} must be a range [low, high] of {what} with {low:g} <= low <= high <= {high:g}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class RoomAugmentConfig(ValidatedConfig):
    """Simulated rooms (see the module docstring)."""

    #: chance that a source is convolved with a room impulse response
    probability: float = setting(0.0, ge=0, le=1)
    #: target RT60 range in seconds
    rt60_s: tuple[float, float] = (0.2, 0.7)
    #: room length, width and height ranges in metres
    length_m: tuple[float, float] = (3.0, 10.0)
    width_m: tuple[float, float] = (3.0, 8.0)
    height_m: tuple[float, float] = (2.4, 4.0)
    #: RIRs simulated once and drawn from
    bank_size: int = setting(64, ge=1, le=4096)
    #: highest image-source order (inverse_sabine's when lower)
    max_order: int = setting(25, ge=0, le=80)
    #: RIR length kept after the direct path, seconds
    max_rir_s: float = setting(1.0, gt=0, le=4)
    #: seed of the bank (the rooms), independent of the training seed
    seed: int = setting(0, ge=0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _range(self, "rt60_s", 0.05, 5.0, "seconds")
        least = 2 * WALL_MARGIN_M + MIN_SOURCE_MIC_M
        for name in ("length_m", "width_m", "height_m"):
            _range(self, name, least, 100.0, "metres")

    def bank_settings(self) -> dict[str, Any]:
        """What the bank depends on (not the probability)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "probability"}


@dataclasses.dataclass(frozen=True)
class GainAugmentConfig(ValidatedConfig):
    """A random gain per source."""

    probability: float = setting(0.0, ge=0, le=1)
    db: tuple[float, float] = (-6.0, 6.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _range(self, "db", -40.0, 40.0, "dB")


@dataclasses.dataclass(frozen=True)
class EqAugmentConfig(ValidatedConfig):
    """A random three-band EQ per source (:data:`EQ_BANDS`), each band's gain in ``db``."""

    probability: float = setting(0.0, ge=0, le=1)
    db: tuple[float, float] = (-6.0, 6.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _range(self, "db", -24.0, 24.0, "dB")


@dataclasses.dataclass(frozen=True)
class ShiftAugmentConfig(ValidatedConfig):
    """A random delay per source, 0..max_s seconds, zero-padded in front."""

    probability: float = setting(0.0, ge=0, le=1)
    max_s: float = setting(0.5, ge=0, le=60)


@dataclasses.dataclass(frozen=True)
class AugmentConfig(ValidatedConfig):
    """The ``augment:`` section of ``train sup`` and ``train rl`` recipes; everything off by default.

    Training mixtures only: the fixed validation and test mixtures are never augmented."""

    room: RoomAugmentConfig = dataclasses.field(default_factory=RoomAugmentConfig)
    gain: GainAugmentConfig = dataclasses.field(default_factory=GainAugmentConfig)
    eq: EqAugmentConfig = dataclasses.field(default_factory=EqAugmentConfig)
    shift: ShiftAugmentConfig = dataclasses.field(default_factory=ShiftAugmentConfig)
    #: mixtures at an SNR drawn uniformly in this range (``mix.mode: snr``); empty = the dataset's
    #: OmniSep /2 sums
    snr_db_range: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, kind in (("room", RoomAugmentConfig), ("gain", GainAugmentConfig), ("eq", EqAugmentConfig), ("shift", ShiftAugmentConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"{name} must be a mapping of {name} augmentation settings, got {getattr(self, name)!r}")
        if self.snr_db_range:
            _range(self, "snr_db_range", -40.0, 40.0, "dB")
        else:
            object.__setattr__(self, "snr_db_range", ())

    @property
    def per_source(self) -> bool:
        """Whether any per-source augmentation can apply."""
        return any(getattr(self, name).probability > 0 for name in ("room", "gain", "eq", "shift"))

    @property
    def enabled(self) -> bool:
        return self.per_source or bool(self.snr_db_range)


# ---------------------------------------------------------------- room impulse responses


@dataclasses.dataclass
class RirBank:
    """``rirs[i, :lengths[i]]`` is RIR ``i``; its direct path is at sample ``lead`` (the fractional-delay
    filter's half length: pyroomacoustics' sinc starts that many samples before it)."""

    rirs: np.ndarray  # [N, L] float32
    lengths: np.ndarray  # [N] int
    lead: int
    rt60_target: np.ndarray  # [N] seconds
    rt60_measured: np.ndarray  # [N] seconds (pyroomacoustics' measure_rt60 of each RIR; NaN when it fails)
    path: Path
    from_cache: bool


def rir_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "marsctl" / "rirs"


def _bank_key(config: RoomAugmentConfig, sample_rate: int) -> tuple[str, str]:
    from importlib.metadata import version  # the simulator's version, without importing it for a cached bank

    settings = {"format": BANK_FORMAT, "pyroomacoustics": version("pyroomacoustics"), "sample_rate": int(sample_rate), **config.bank_settings()}
    text = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20], text


def _simulate_room(rng: np.random.Generator, config: RoomAugmentConfig, sample_rate: int) -> tuple[np.ndarray, float, float]:
    """(the RIR from ``lead`` samples before its direct path, target RT60, measured RT60) of one random room."""
    import pyroomacoustics as pra

    fdl2 = int(pra.constants.get("frac_delay_length")) // 2
    c = float(pra.constants.get("c"))
    for _ in range(1000):
        dims = np.array([rng.uniform(*config.length_m), rng.uniform(*config.width_m), rng.uniform(*config.height_m)])
        rt60 = float(rng.uniform(*config.rt60_s))
        source = rng.uniform(WALL_MARGIN_M, dims - WALL_MARGIN_M)
        mic = rng.uniform(WALL_MARGIN_M, dims - WALL_MARGIN_M)
        if np.linalg.norm(source - mic) < MIN_SOURCE_MIC_M:
            continue
        try:
            absorption, order = pra.inverse_sabine(rt60, dims, c=c)
        except ValueError:  # no wall absorbs enough for this RT60 in this room: draw again
            continue
        break
    else:
        raise ConfigError(f"augment.room: no room of length {config.length_m}, width {config.width_m}, height {config.height_m} m "
                          f"can reach an RT60 in {config.rt60_s} s; allow smaller rooms or a longer RT60")
    room = pra.ShoeBox(dims, fs=sample_rate, materials=pra.Material(float(absorption)), max_order=min(int(order), config.max_order))
    room.add_source(source)
    room.add_microphone(mic)
    room.compute_rir()
    rir = np.asarray(room.rir[0][0], dtype=np.float64)
    direct = int(round(np.linalg.norm(source - mic) * sample_rate / c)) + fdl2
    keep = rir[direct - fdl2 : direct + int(round(config.max_rir_s * sample_rate)) + 1]
    try:
        measured = float(pra.experimental.measure_rt60(rir, fs=sample_rate))
    except Exception:  # too short a decay to measure
        measured = float("nan")
    return keep.astype(np.float32), rt60, measured


def load_rir_bank(config: RoomAugmentConfig, sample_rate: int, cache_dir: str | Path | None = None) -> RirBank:
    """The room bank of ``config`` at ``sample_rate``: read from the cache, else simulated and cached."""
    key, settings = _bank_key(config, sample_rate)
    path = Path(cache_dir) if cache_dir is not None else rir_cache_dir()
    path = path / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["settings"]) == settings:
                    return RirBank(data["rirs"], data["lengths"], int(data["lead"]), data["rt60_target"], data["rt60_measured"], path, True)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # unreadable or another layout: simulated again and rewritten below
    import pyroomacoustics as pra

    rng = np.random.default_rng([config.seed, BANK_FORMAT])
    made = [_simulate_room(rng, config, sample_rate) for _ in range(config.bank_size)]
    lengths = np.array([len(rir) for rir, _, _ in made], dtype=np.int64)
    rirs = np.zeros((len(made), int(lengths.max())), dtype=np.float32)
    for i, (rir, _, _) in enumerate(made):
        rirs[i, : len(rir)] = rir
    bank = RirBank(rirs, lengths, int(pra.constants.get("frac_delay_length")) // 2,
                   np.array([t for _, t, _ in made]), np.array([m for _, _, m in made]), path, False)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, rirs=bank.rirs, lengths=bank.lengths, lead=bank.lead, rt60_target=bank.rt60_target,
                     rt60_measured=bank.rt60_measured, settings=np.array(settings))
    except OSError as exc:
        raise MarsctlError(f"{path}: cannot write the room impulse response cache ({exc.strerror or exc})") from None
    return bank


def reverberate(wave: np.ndarray, rir: np.ndarray, lead: int) -> np.ndarray:
    """``wave`` convolved with ``rir`` (direct path at ``rir[lead]``), aligned with the dry samples and
    rescaled to the dry energy (energy-preserving; a silent window stays silent)."""
    from scipy.signal import fftconvolve

    dry = wave.astype(np.float64)
    wet = fftconvolve(dry, rir.astype(np.float64))[lead : lead + len(wave)]
    dry_energy, wet_energy = float(np.sum(dry * dry)), float(np.sum(wet * wet))
    if dry_energy <= 0 or wet_energy <= 0:
        return np.zeros_like(wave)
    return (wet * math.sqrt(dry_energy / wet_energy)).astype(wave.dtype)


# ---------------------------------------------------------------- EQ


def biquad_sos(kind: str, sample_rate: int, freq: float, gain_db: float, q: float) -> np.ndarray:
    """One second-order section ``[b0, b1, b2, 1, a1, a2]`` of the RBJ Audio EQ Cookbook (the formulas of
    torchaudio.functional.bass_biquad / equalizer_biquad / treble_biquad)."""
    w0 = 2 * math.pi * freq / sample_rate
    alpha = math.sin(w0) / (2 * q)
    cos = math.cos(w0)
    A = 10 ** (gain_db / 40)
    if kind == "peaking":
        b = [1 + alpha * A, -2 * cos, 1 - alpha * A]
        a = [1 + alpha / A, -2 * cos, 1 - alpha / A]
    elif kind in ("low_shelf", "high_shelf"):
        s = 1 if kind == "low_shelf" else -1
        t = 2 * math.sqrt(A) * alpha
        b = [A * ((A + 1) - s * (A - 1) * cos + t), s * 2 * A * ((A - 1) - s * (A + 1) * cos), A * ((A + 1) - s * (A - 1) * cos - t)]
        a = [(A + 1) + s * (A - 1) * cos + t, -s * 2 * ((A - 1) + s * (A + 1) * cos), (A + 1) + s * (A - 1) * cos - t]
    else:
        raise ValueError(f"unknown biquad kind {kind!r}")
    return np.array([*(x / a[0] for x in b), 1.0, a[1] / a[0], a[2] / a[0]])


def random_eq(rng: np.random.Generator, sample_rate: int, db: tuple[float, float]) -> np.ndarray:
    """The second-order sections of one random EQ (:data:`EQ_BANDS`), ``[3, 6]``."""
    sections = []
    for kind, low, high, q in EQ_BANDS:
        top = min(high, 0.45 * sample_rate)
        freq = float(math.exp(rng.uniform(math.log(min(low, top)), math.log(top))))
        sections.append(biquad_sos(kind, sample_rate, freq, float(rng.uniform(*db)), q))
    return np.stack(sections)


# ---------------------------------------------------------------- per-source application


class SourceAugmenter:
    """The per-source augmentations of an :class:`AugmentConfig` at one sample rate (the room bank loaded
    once, when it is made)."""

    def __init__(self, config: AugmentConfig, sample_rate: int, cache_dir: str | Path | None = None) -> None:
        self.config = config
        self.sample_rate = int(sample_rate)
        self.bank = load_rir_bank(config.room, sample_rate, cache_dir) if config.room.probability > 0 else None

    def __call__(self, rng: np.random.Generator, waves: list[np.ndarray]) -> list[np.ndarray]:
        """The augmented source windows; draws only from children of ``rng`` (see the module docstring)."""
        c = self.config
        # rng.spawn(4), with a Generator made only for the augmentations that are on (making one costs
        # about as much as gain and shift do)
        children = rng.bit_generator.seed_seq.spawn(4)
        shift_rng, eq_rng, room_rng, gain_rng = (
            np.random.Generator(type(rng.bit_generator)(seq)) if on else None
            for seq, on in zip(children, (c.shift.probability > 0, c.eq.probability > 0, self.bank is not None, c.gain.probability > 0)))
        out = []
        for wave in waves:
            wave = np.asarray(wave, dtype=np.float32)
            if c.shift.probability > 0 and shift_rng.random() < c.shift.probability:
                delay = min(len(wave), int(shift_rng.integers(0, int(round(c.shift.max_s * self.sample_rate)) + 1)))
                wave = np.concatenate([np.zeros(delay, np.float32), wave[: len(wave) - delay]])
            if c.eq.probability > 0 and eq_rng.random() < c.eq.probability:
                from scipy.signal import sosfilt

                wave = sosfilt(random_eq(eq_rng, self.sample_rate, c.eq.db), wave.astype(np.float64)).astype(np.float32)
            if self.bank is not None and room_rng.random() < c.room.probability:
                i = int(room_rng.integers(len(self.bank.lengths)))
                wave = reverberate(wave, self.bank.rirs[i, : self.bank.lengths[i]], self.bank.lead)
            if c.gain.probability > 0 and gain_rng.random() < c.gain.probability:
                wave = wave * np.float32(10 ** (gain_rng.uniform(*c.gain.db) / 20))
            out.append(wave)
        return out
