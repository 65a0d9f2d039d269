"""Augmentation of the dynamic training mixtures: simulated rooms (pyroomacoustics), gain, EQ, time shift
and the SNR range; determinism, energy preservation, the RIR cache, and all-off = no augmentation."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from data_fixtures import SR, write_tone
from marsctl.config import SignalConfig
from marsctl.data.augment import (
    AugmentConfig,
    EqAugmentConfig,
    GainAugmentConfig,
    RoomAugmentConfig,
    ShiftAugmentConfig,
    SourceAugmenter,
    biquad_sos,
    load_rir_bank,
    reverberate,
)
from marsctl.data.manifest import write_clips
from marsctl.data.mixing import DynamicMixDataset, _pool_by_label, draw_mixture
from marsctl.data.recipe import MixConfig
from marsctl.errors import ConfigError

SIGNAL = SignalConfig(segment_samples=8191)
#: a small, fast bank: small rooms, short RT60s, low image order
SMALL_ROOM = dict(rt60_s=(0.15, 0.3), length_m=(3.0, 4.0), width_m=(3.0, 4.0), height_m=(2.5, 3.0), bank_size=3, max_order=6,
                  max_rir_s=0.25, seed=5)


@pytest.fixture()
def dataset(tmp_path):
    rows = []
    for label, freq in {"bass": 110.0, "mid": 440.0, "treble": 1760.0}.items():
        for k in range(2):
            clip_id = f"{label}-{k}"
            rel = f"clips/{label}/{clip_id}.flac"
            write_tone(tmp_path / rel, freq * (1 + 0.01 * k), 1.0, amplitude=0.2 + 0.1 * k)
            rows.append({"clip_id": clip_id, "label": label, "split": "train", "audio_path": rel, "frame_paths": [],
                         "duration_s": 1.0, "sample_rate": SR, "source": "tone", "keep": True, "drop_reason": "",
                         "silence_ratio": 0.0, "clip_ratio": 0.0, "loudness_lufs": -20.0, "rms_db": -20.0, "peak_db": -10.0,
                         "semantic_margin": None})
    write_clips(tmp_path, rows)
    return tmp_path


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder / "marsctl" / "rirs"


def room(probability=1.0, **kw):
    return AugmentConfig(room=RoomAugmentConfig(probability=probability, **{**SMALL_ROOM, **kw}))


def everything():
    return AugmentConfig(room=RoomAugmentConfig(probability=1.0, **SMALL_ROOM), gain=GainAugmentConfig(probability=1.0),
                         eq=EqAugmentConfig(probability=1.0), shift=ShiftAugmentConfig(probability=1.0, max_s=0.1),
                         snr_db_range=(-10.0, 10.0))


def items(ds, n=4):
    return [ds[i] for i in range(n)]


def same(a, b):
    return all(torch.equal(x["mixture"], y["mixture"]) and torch.equal(x["sources"], y["sources"]) and x["clip_ids"] == y["clip_ids"]
               for x, y in zip(a, b))


def test_all_off_draws_exactly_the_mixtures_without_augmentation(dataset, cache):
    """Bit for bit, in both mixing modes, and through draw_mixture with an all-off augmenter."""
    for mode in ("omnisep", "snr"):
        plain = DynamicMixDataset(dataset, "train", SIGNAL, 2, seed=3, mode=mode)
        off = DynamicMixDataset(dataset, "train", SIGNAL, 2, seed=3, mode=mode, augment=AugmentConfig())
        assert off.augment is None and same(items(plain), items(off))
    pool = _pool_by_label([{"clip_id": f"{l}-{k}", "label": l, "audio_path": f"clips/{l}/{l}-{k}.flac", "frame_paths": []}
                           for l in ("bass", "mid", "treble") for k in range(2)])
    mix = MixConfig(num_sources=2)
    a = draw_mixture(np.random.default_rng([1, 2, 3]), pool, dataset, SIGNAL, mix, 2)
    b = draw_mixture(np.random.default_rng([1, 2, 3]), pool, dataset, SIGNAL, mix, 2, augment=SourceAugmenter(AugmentConfig(), SR))
    assert np.array_equal(a["mixture"], b["mixture"]) and np.array_equal(a["sources"], b["sources"]) and a["offsets"] == b["offsets"]
    assert not cache.exists()  # no room bank made when rooms are off


def test_room_augmentation_is_deterministic_per_seed_and_the_bank_is_cached(dataset, cache, tmp_path, monkeypatch):
    first = DynamicMixDataset(dataset, "train", SIGNAL, 2, seed=3, augment=room())
    assert first.augment.bank.from_cache is False
    files = list(cache.glob("*.npz"))
    assert files == [first.augment.bank.path]
    stamp = files[0].stat().st_mtime_ns
    a = items(first)
    assert same(a, items(first))  # the same item twice
    second = DynamicMixDataset(dataset, "train", SIGNAL, 2, seed=3, augment=room())
    assert second.augment.bank.from_cache is True and files[0].stat().st_mtime_ns == stamp  # read, not simulated again
    assert same(a, items(second))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh"))
    fresh = DynamicMixDataset(dataset, "train", SIGNAL, 2, seed=3, augment=room())
    assert fresh.augment.bank.from_cache is False and fresh.augment.bank.path != first.augment.bank.path
    assert np.array_equal(fresh.augment.bank.rirs, first.augment.bank.rirs)
    assert same(a, items(fresh))
    # the rooms changed the mixtures, another bank seed makes other rooms, another item seed other draws
    plain = items(DynamicMixDataset(dataset, "train", SIGNAL, 2, seed=3))
    assert [x["clip_ids"] for x in plain] == [x["clip_ids"] for x in a]
    assert not any(torch.equal(x["sources"], y["sources"]) for x, y in zip(plain, a))
    assert not same(a, items(DynamicMixDataset(dataset, "train", SIGNAL, 2, seed=3, augment=room(seed=6))))
    assert len(list(fresh.augment.bank.path.parent.glob("*.npz"))) == 2 and list(cache.glob("*.npz")) == files


def test_a_damaged_cache_file_is_simulated_again(dataset, cache):
    bank = load_rir_bank(RoomAugmentConfig(**SMALL_ROOM), SR)
    bank.path.write_bytes(b"not a zip file")
    again = load_rir_bank(RoomAugmentConfig(**SMALL_ROOM), SR)
    assert again.from_cache is False and np.array_equal(again.rirs, bank.rirs)
    assert load_rir_bank(RoomAugmentConfig(**SMALL_ROOM), SR).from_cache is True


def test_room_augmentation_is_energy_preserving_and_not_delayed(dataset, cache):
    bank = load_rir_bank(RoomAugmentConfig(**SMALL_ROOM), SR)
    assert bank.rirs.shape[0] == 3 and np.all(bank.rt60_target >= 0.15) and np.all(bank.rt60_target <= 0.3)
    rng = np.random.default_rng(0)
    wave = (rng.standard_normal(4000) * np.hanning(4000)).astype(np.float32)
    impulse = np.zeros(4000, np.float32)
    impulse[1000] = 1.0
    for i in range(3):
        rir = bank.rirs[i, : bank.lengths[i]]
        assert int(np.argmax(np.abs(rir))) == bank.lead  # the direct path is the strongest arrival here
        wet = reverberate(wave, rir, bank.lead)
        assert wet.shape == wave.shape and not np.allclose(wet, wave)
        assert np.sum(wet.astype(np.float64) ** 2) == pytest.approx(np.sum(wave.astype(np.float64) ** 2), rel=1e-5)
        assert int(np.argmax(np.abs(reverberate(impulse, rir, bank.lead)))) == 1000  # the source is not delayed
    assert not reverberate(np.zeros(100, np.float32), bank.rirs[0], bank.lead).any()
    # in the dataset: the same windows (the item's own draws are unchanged), each source at its dry energy
    dry = items(DynamicMixDataset(dataset, "train", SIGNAL, 2, seed=3))
    wet = items(DynamicMixDataset(dataset, "train", SIGNAL, 2, seed=3, augment=room()))
    for x, y in zip(dry, wet):
        assert x["clip_ids"] == y["clip_ids"]
        energy = lambda t: t.double().pow(2).sum(-1)  # noqa: E731
        torch.testing.assert_close(energy(y["sources"]), energy(x["sources"]), rtol=1e-5, atol=0)


def test_every_augmentation_on_keeps_mixture_the_sum_of_its_sources(dataset, cache):
    ds = DynamicMixDataset(dataset, "train", SIGNAL, 2, seed=1, augment=everything())
    assert ds.mix.mode == "snr" and list(ds.mix.snr_db_range) == [-10.0, 10.0]
    plain = items(DynamicMixDataset(dataset, "train", SIGNAL, 2, seed=1), 6)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for item in items(ds, 6):
            torch.testing.assert_close(item["mixture"], item["sources"].sum(0), rtol=0, atol=1e-6)
            assert torch.isfinite(item["sources"]).all() and float(item["mixture"].abs().max()) <= 0.99 + 1e-6
    ds.set_epoch(0)
    augmented = items(ds, 6)
    assert [x["clip_ids"] for x in augmented] == [x["clip_ids"] for x in plain]  # same clips, other signals
    assert not any(torch.equal(x["sources"], y["sources"]) for x, y in zip(plain, augmented))


def test_each_augmentation_draws_on_its_own(dataset, cache):
    """Switching one augmentation on does not change what another draws (each has its own child generator)."""
    gain = GainAugmentConfig(probability=1.0)
    only_gain = items(DynamicMixDataset(dataset, "train", SIGNAL, 2, seed=2, augment=AugmentConfig(gain=gain)))
    dry = items(DynamicMixDataset(dataset, "train", SIGNAL, 2, seed=2))
    for x, y in zip(dry, only_gain):  # omnisep: every source is 0.5 x its window, times its own random gain
        ratio = (y["sources"].double().pow(2).sum(-1) / x["sources"].double().pow(2).sum(-1)).sqrt()
        db = 20 * torch.log10(ratio)
        assert ((db >= -6 - 1e-4) & (db <= 6 + 1e-4)).all()
    shift_too = AugmentConfig(gain=gain, shift=ShiftAugmentConfig(probability=1.0, max_s=0.05))
    shifted = items(DynamicMixDataset(dataset, "train", SIGNAL, 2, seed=2, augment=shift_too))
    for x, y in zip(only_gain, shifted):  # a delay changes the window, not the gain drawn for it
        delays = [int(torch.nonzero(s.abs() > 0)[0]) for s in y["sources"]]
        assert all(0 <= d <= 0.05 * SR for d in delays)
        for s_gain, s_both, d in zip(x["sources"], y["sources"], delays):
            torch.testing.assert_close(s_both[d:], s_gain[: len(s_gain) - d], rtol=0, atol=0)


def test_eq_biquads_match_torchaudio(dataset):
    import torchaudio.functional as AF

    rng = np.random.default_rng(4)
    x = (0.05 * rng.standard_normal(2000)).astype(np.float64)  # small: torchaudio's filters clip at +-1
    from scipy.signal import sosfilt

    t = torch.from_numpy(x)
    cases = [("low_shelf", lambda: AF.bass_biquad(t, SR, 5.0, 200.0, 0.707), 200.0, 5.0, 0.707),
             ("peaking", lambda: AF.equalizer_biquad(t, SR, 1000.0, -4.0, 1.0), 1000.0, -4.0, 1.0),
             ("high_shelf", lambda: AF.treble_biquad(t, SR, 3.0, 3000.0, 0.707), 3000.0, 3.0, 0.707)]
    for kind, theirs, freq, gain, q in cases:
        ours = sosfilt(biquad_sos(kind, SR, freq, gain, q)[None], x)
        np.testing.assert_allclose(ours, theirs().numpy(), atol=1e-9)


def test_snr_range_and_augment_settings_from_a_recipe(tmp_path):
    from marsctl.rl.config import load_rl_config
    from marsctl.train.supervised import load_supervised_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("augment:\n  room: {probability: 0.5, rt60_s: [0.2, 0.6]}\n  gain: {probability: 1, db: [-3, 3]}\n"
                      "  snr_db_range: [-10, 10]\n")
    config = load_supervised_config(recipe)
    assert config.augment.room.rt60_s == (0.2, 0.6) and config.augment.gain.db == (-3.0, 3.0)
    assert config.augment.snr_db_range == (-10.0, 10.0) and config.augment.enabled
    assert load_rl_config(recipe).augment == config.augment
    assert load_supervised_config(None).augment == AugmentConfig() and not AugmentConfig().enabled
    bad = {
        "room: {rt60_s: [0.6, 0.2]}": "augment.room: rt60_s must be a range",
        "room: {rt60_s: [0.2, .nan]}": "rt60_s",
        "room: {probability: 1.5}": "augment.room: probability must be >= 0 and <= 1",
        "room: {length_m: [0.5, 4]}": "augment.room: length_m must be a range",
        "room: {bank_size: 0}": "augment.room: bank_size must be >= 1",
        "gain: {db: [-3]}": "augment.gain: db must be a list of 2 items",
        "eq: {db: [-30, 3]}": "augment.eq: db must be a range",
        "shift: {max_s: -1}": "augment.shift: max_s must be >= 0",
        "snr_db_range: [5]": "snr_db_range must be a range",
        "snr_db_range: [-10, .inf]": "snr_db_range",
        "rooms: {probability: 1}": "unknown key(s) rooms",
        "room: 3": "room must be a mapping",
    }
    for text, message in bad.items():
        recipe.write_text(f"augment:\n  {text}\n")
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
            load_supervised_config(recipe)
        assert "\n" not in str(info.value) and str(recipe) in str(info.value)
    recipe.write_text("queries: q.csv\naugment: {gain: {probability: 0.5}}\n")
    with pytest.raises(ConfigError, match="augment: applies to the mixtures drawn from a dataset"):
        load_rl_config(recipe)


def test_a_room_no_absorption_can_make_that_dry_is_one_line(cache):
    with pytest.raises(ConfigError, match="augment.room: no room of length"):
        load_rir_bank(RoomAugmentConfig(rt60_s=(0.05, 0.05), length_m=(50, 60), width_m=(50, 60), height_m=(20, 30), bank_size=1), SR)


def test_train_sup_gives_the_training_mixtures_its_augment_section(tmp_path, cache, monkeypatch):
    """The loop builds its training Dataset with the recipe's augment (the validation mixtures stay fixed)."""
    import marsctl.train.loop as loop
    from test_separator_fixtures import LabelTestEncoder, make_tone_dataset
    from test_train_sup_worker import small_config

    from marsctl.train.supervised import train_supervised

    class Built(Exception):
        pass

    data = make_tone_dataset(tmp_path / "data")
    seen = []
    real = loop.mixing_dataset

    def recording(*args, **kwargs):  # the real Dataset, recorded; the run stops once it is built
        seen.append((args[1], real(*args, **kwargs)))
        raise Built

    monkeypatch.setattr(loop, "mixing_dataset", recording)
    config = small_config(str(data), max_steps=2, val_every=100, checkpoint_every=100, augment=room())
    with pytest.raises(Built):
        train_supervised(config, tmp_path / "run", encoder=LabelTestEncoder(), device="cpu", progress=False)
    assert [split for split, _ in seen] == ["train"]
    dataset = seen[0][1]
    assert dataset.augment is not None and dataset.augment.config == room()
    plain = real(str(data), "train", config.signal, 2, seed=config.seed)
    assert plain.augment is None and not torch.equal(plain[0]["sources"], dataset[0]["sources"])


def test_dataloader_workers_draw_the_same_augmented_items(dataset, cache):
    """Worker processes (forked copies of the dataset, the bank inside) give the items the main process gives."""
    from marsctl.train.data import EpochIndexedDataset, StepBatchSampler, collate

    base = DynamicMixDataset(dataset, "train", SIGNAL, 2, seed=3, augment=everything())
    indexed = EpochIndexedDataset(base)
    sampler = StepBatchSampler(len(indexed), 2, seed=0, start_step=0, max_steps=4)
    loader = torch.utils.data.DataLoader(indexed, batch_sampler=sampler, collate_fn=collate, num_workers=1)
    for step, batch in zip(range(1, 5), loader):
        direct = collate([indexed[i] for i in sampler.step_indices(step)])
        assert torch.equal(batch["mixture"], direct["mixture"]) and torch.equal(batch["sources"], direct["sources"])
