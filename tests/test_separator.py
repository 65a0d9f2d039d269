"""The U-Net separator: shapes, query conditioning, gradient flow, saving and loading."""

import json

import pytest
import torch

from marsctl.config import SignalConfig
from marsctl.errors import MarsctlError
from marsctl.models.separator import Separator, SeparatorConfig, load_separator, save_separator

SMALL = SeparatorConfig(query_dim=16, base_channels=8, max_channel_multiplier=4, signal=SignalConfig(segment_samples=8191))


def test_default_architecture_is_the_papers():
    config = SeparatorConfig()
    assert (config.num_levels, config.base_channels, config.mask_channels, config.kappa) == (7, 32, 32, 9.0)
    model = Separator(SeparatorConfig(query_dim=32))
    assert model.query_projection.in_features == 32 and model.query_projection.out_features == 32
    logits = model(torch.randn(1, 65535), torch.randn(1, 32))
    # 256 log-frequency bins x 256 frames for the 65,535-sample training window
    assert logits.shape == (1, 256, 256)


def test_shapes_odd_lengths_and_several_queries():
    torch.manual_seed(0)
    model = Separator(SMALL).eval()
    for length in (8191, 5000, 20000):
        mix = torch.randn(2, length)
        logits = model(mix, torch.randn(2, 16))
        assert logits.shape == (2, 256, length // 256 + 1)
        multi = model(mix, torch.randn(2, 3, 16))
        assert multi.shape == (2, 3, 256, length // 256 + 1)
        out = model.separate(mix, torch.randn(2, 3, 16))
        assert out.shape == (2, 3, length)


def test_query_changes_the_mask_and_features_are_shared():
    torch.manual_seed(0)
    model = Separator(SMALL).eval()
    mix = torch.randn(1, 8191)
    q1, q2 = torch.randn(1, 16), torch.randn(1, 16)
    assert not torch.allclose(model(mix, q1), model(mix, q2))
    both = model(mix, torch.stack([q1, q2], dim=1))
    torch.testing.assert_close(both[:, 0], model(mix, q1))
    torch.testing.assert_close(both[:, 1], model(mix, q2))


def test_all_pass_and_zero_masks():
    torch.manual_seed(0)
    model = Separator(SMALL)
    mix = torch.randn(2, 8191)
    stft, _, _ = model.analyze(mix)
    ones = torch.ones(2, 256, stft.shape[-1])
    torch.testing.assert_close(model.synthesize(ones, stft, 8191), mix, atol=1e-4, rtol=1e-4)
    assert model.synthesize(torch.zeros_like(ones), stft, 8191).abs().max() == 0


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    model = Separator(SMALL).train()
    logits = model(torch.randn(2, 8191), torch.randn(2, 2, 16))
    policy = model.policy(logits)
    loss = -policy.log_prob(policy.sample()).mean() - policy.entropy().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_wrong_query_size():
    with pytest.raises(ValueError, match="query embedding has size 8"):
        Separator(SMALL)(torch.randn(1, 8191), torch.randn(1, 8))


def test_save_load_roundtrip_and_errors(tmp_path):
    torch.manual_seed(0)
    model = Separator(SMALL).eval()
    save_separator(model, tmp_path / "m", encoder="builtin", card="# test\n")
    loaded = load_separator(tmp_path / "m")
    mix, q = torch.randn(1, 8191), torch.randn(1, 16)
    torch.testing.assert_close(loaded.model(mix, q), model(mix, q))
    assert loaded.encoder == "builtin"

    with pytest.raises(MarsctlError, match="no such"):
        load_separator(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MarsctlError, match="no config.json"):
        load_separator(tmp_path / "empty")
    # truncated weights
    bad = tmp_path / "bad"
    save_separator(model, bad, encoder="builtin")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MarsctlError, match="corrupt weights"):
        load_separator(bad)
    # architecture mismatch
    wrong = tmp_path / "wrong"
    save_separator(model, wrong, encoder="builtin")
    config = json.loads((wrong / "config.json").read_text())
    config["separator"]["base_channels"] = 16
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(MarsctlError, match="do not match the architecture"):
        load_separator(wrong)
    # some other artifact
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"kind": "marsctl-encoder"}))
    with pytest.raises(MarsctlError, match="not a separator checkpoint"):
        load_separator(other)
    (other / "config.json").write_text("{not json")
    with pytest.raises(MarsctlError, match="corrupt config"):
        load_separator(other)


def test_hub_id_not_cached_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MarsctlError, match="someorg/somemodel"):
        load_separator("someorg/somemodel@main")
