"""marsctl's ImageBind (``marsctl/models/encoders/imagebind.py``) against the reference code, on random weights.

Needs a checkout of facebookresearch/ImageBind (``--reference``: the folder holding its ``imagebind``
package, whose ``bpe/bpe_simple_vocab_16e6.txt.gz`` is the real CLIP vocabulary) and the reference's
own dependencies importable (timm, einops, iopath, ftfy, pytorchvideo); nothing of it is copied here.
It builds the reference ``ImageBindModel`` at a small size with random weights, loads that state dict
into marsctl's towers (the key layout round trip: strict, every key and shape), and compares, for the
same files:

* text: the reference ``SimpleTokenizer`` ids and marsctl's ``ClipBpeTokenizer`` ids (the real BPE
  file), and the two text embeddings;
* audio: ``load_and_transform_audio_data`` (torchaudio.load replaced by soundfile: torchaudio 2.9 has
  no file I/O) and marsctl's ``audio_input`` of the same waveform, then the two audio embeddings,
  at 16 kHz and 44.1 kHz (resampled), 0.5 s to 10 s;
* vision: ``load_and_transform_vision_data`` (PIL resize) and marsctl's ``embed_image`` of the same
  picture as a float tensor (torch's antialiased bicubic resize), 224 x 224 and 300 x 400.

    PYTHONPATH=/path/with/timm-einops-iopath-pytorchvideo python bench/imagebind_reference_check.py \\
        --reference /path/to/ImageBind --json imagebind_check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from marsctl.models.encoders.imagebind import (  # noqa: E402
    ClipBpeTokenizer,
    ImageBindArch,
    ImageBindEncoder,
    ImageBindEncoderConfig,
    audio_input,
    mel_banks,
    skipped_key,
)

TEXTS = [
    "a dog barking", "A Violin, playing slowly...", "rain on a tin roof at 3am", "the sound of an engine idling",
    "people   speaking\tin a café", "bird chirping &amp; wind", "don't stop the music!", "échelle: Ünïcödé façade",
    "a very long description " * 12, "", "1234 5678", "<|endoftext|> inside text",
]
SMALL = dict(
    out_embed_dim=48, vision_embed_dim=64, vision_num_blocks=2, vision_num_heads=4, text_embed_dim=64, text_num_blocks=2,
    text_num_heads=4, audio_embed_dim=64, audio_num_blocks=2, audio_num_heads=4, depth_embed_dim=32, depth_num_blocks=1,
    depth_num_heads=2, thermal_embed_dim=32, thermal_num_blocks=1, thermal_num_heads=2, imu_embed_dim=32, imu_num_blocks=1,
    imu_num_heads=2,
)


def import_reference(folder: Path) -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    if "torchvision.transforms.functional_tensor" not in sys.modules:  # pytorchvideo 0.1.5 imports a module torchvision 0.17 renamed
        import torchvision.transforms.functional as functional

        sys.modules["torchvision.transforms.functional_tensor"] = functional
    sys.path.insert(0, str(folder))
    from imagebind import data
    from imagebind.models import imagebind_model, multimodal_preprocessors

    return data, imagebind_model, multimodal_preprocessors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="folder holding ImageBind's imagebind package")
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    args = parser.parse_args()
    data, imagebind_model, preprocessors = import_reference(args.reference)
    bpe = args.reference / "imagebind" / "bpe" / "bpe_simple_vocab_16e6.txt.gz"

    torch.manual_seed(0)
    reference = imagebind_model.ImageBindModel(**SMALL).eval()
    arch = ImageBindArch(**{k: v for k, v in SMALL.items() if k.split("_")[0] in ("out", "vision", "text", "audio")})
    results: dict = {"reference": str(args.reference), "arch": SMALL}

    ref_tokenizer = preprocessors.SimpleTokenizer(bpe_path=str(bpe))
    ours_tokenizer = ClipBpeTokenizer(bpe)
    ref_ids = torch.stack([ref_tokenizer(t) for t in TEXTS])
    our_ids = ours_tokenizer(TEXTS)
    results["text_ids_equal"] = bool(torch.equal(ref_ids, our_ids))
    results["text_ids_rows_differing"] = [TEXTS[i] for i in range(len(TEXTS)) if not torch.equal(ref_ids[i], our_ids[i])]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = tmp / "small.pth"
        torch.save(reference.state_dict(), checkpoint)  # the reference's own layout, all six towers
        results["skipped_keys"] = sum(skipped_key(k) for k in reference.state_dict())
        ours = ImageBindEncoder(ImageBindEncoderConfig(checkpoint=str(checkpoint), arch=arch, bpe=str(bpe), cache_dir=str(tmp)))

        with torch.no_grad():
            ref_text = torch.nn.functional.normalize(reference({"text": ref_ids})["text"], dim=-1)
            our_text = ours.embed_text(TEXTS)
        results["text_embedding_max_abs_diff"] = float((ref_text - our_text).abs().max())

        rng = np.random.default_rng(0)
        audio = []
        for rate, seconds in ((16_000, 0.5), (16_000, 2.0), (16_000, 3.3), (16_000, 10.0), (44_100, 5.0)):
            t = np.arange(int(rate * seconds)) / rate
            wave = (0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) + 0.05 * rng.standard_normal(t.size) + 0.01).astype(np.float32)
            path = tmp / f"a{rate}_{seconds}.wav"
            sf.write(path, wave, rate, subtype="FLOAT")
            audio.append((path, wave, rate))

        import torchaudio

        def load(path, *a, **k):
            samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
            return torch.from_numpy(samples.T.copy()), rate

        torchaudio.load = load
        banks = mel_banks()
        for path, wave, rate in audio:
            ref_input = data.load_and_transform_audio_data([str(path)], "cpu")  # [1, 3, 1, 128, 204]
            with torch.no_grad():
                ref_audio = torch.nn.functional.normalize(reference({"audio": ref_input})["audio"], dim=-1)
                our_audio = ours.embed_audio([torch.from_numpy(wave)], rate)
            entry = {"embedding_max_abs_diff": float((ref_audio - our_audio).abs().max())}
            if rate == 16_000:
                entry["fbank_input_max_abs_diff"] = float((ref_input - audio_input(torch.from_numpy(wave)[None], banks)).abs().max())
            results[f"audio_{rate}Hz_{path.stem.split('_')[1]}s"] = entry

        from PIL import Image

        for h, w in ((224, 224), (300, 400)):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pixels[: h // 2] //= 2  # some structure, so that resizing matters
            path = tmp / f"im{h}x{w}.png"
            Image.fromarray(pixels).save(path)
            ref_input = data.load_and_transform_vision_data([str(path)], "cpu")
            with torch.no_grad():
                ref_image = torch.nn.functional.normalize(reference({"vision": ref_input})["vision"], dim=-1)
                our_image = ours.embed_image(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255)
            results[f"vision_{h}x{w}_embedding_max_abs_diff"] = float((ref_image - our_image).abs().max())

    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
