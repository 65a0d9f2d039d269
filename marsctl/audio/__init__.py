"""Audio core: file I/O (whole files and block streams), resampling, STFT with the log-frequency warp, chunked overlap-add."""

from marsctl.audio.chunking import StreamingOverlapAdd, overlap_add
from marsctl.audio.io import AUDIO_SUFFIXES, is_audio_path, load_audio, save_audio
from marsctl.audio.resample import resample
from marsctl.audio.stft import LogFrequencyWarp, Spectrogram
from marsctl.audio.stream import AudioStream, StreamingResampler, open_audio_stream

__all__ = [
    "AUDIO_SUFFIXES",
    "AudioStream",
    "LogFrequencyWarp",
    "Spectrogram",
    "StreamingOverlapAdd",
    "StreamingResampler",
    "is_audio_path",
    "load_audio",
    "open_audio_stream",
    "overlap_add",
    "resample",
    "save_audio",
]
