"""Audio core: file I/O, resampling, STFT with the log-frequency warp, chunked overlap-add."""

from marsctl.audio.chunking import overlap_add
from marsctl.audio.io import AUDIO_SUFFIXES, is_audio_path, load_audio, save_audio
from marsctl.audio.resample import resample
from marsctl.audio.stft import LogFrequencyWarp, Spectrogram

__all__ = [
    "AUDIO_SUFFIXES",
    "LogFrequencyWarp",
    "Spectrogram",
    "is_audio_path",
    "load_audio",
    "overlap_add",
    "resample",
    "save_audio",
]
