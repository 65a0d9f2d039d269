"""A tiny randomly initialized LAION-CLAP, built offline from laion-clap's own model code and saved
with the released checkpoints' key layout (``module.`` prefix from DDP, ``position_ids`` of
transformers < 4.31), plus a byte-level RoBERTa tokenizer: shared by the CLAP adapter tests.

Import the fixtures into a test module (``from clap_fixtures import no_network, tiny_clap``) after
checking that laion-clap is installed (``import laion_clap`` itself downloads tokenizers: never
import it, look for it with ``importlib.util.find_spec``)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from marsctl.models.encoders.clap import build_clap_model
from marsctl.models.encoders.imagebind import bytes_to_unicode  # the byte-level BPE alphabet (GPT-2, RoBERTa, CLIP)


def write_roberta_files(path: Path, with_bytes: bool = True) -> Path:
    """A byte-level BPE RoBERTa tokenizer (no merges: one token per byte) and a 1-layer RoBERTa config."""
    from transformers import RobertaConfig, RobertaTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    if with_bytes:
        for char in bytes_to_unicode().values():
            vocab[char] = len(vocab)
    vocab["<mask>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    RobertaTokenizer(str(path / "vocab.json"), str(path / "merges.txt")).save_pretrained(str(path))
    RobertaConfig(
        vocab_size=len(vocab), hidden_size=768, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=80, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
    ).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def no_network():
    """Every connection attempt except to 127.0.0.1 is refused *and recorded*."""
    attempts: list[str] = []
    connect, create = socket.socket.connect, socket.create_connection

    def local_only(address) -> bool:
        return isinstance(address, tuple) and address[0] in ("127.0.0.1", "localhost")

    def guarded_connect(self, address, *args, **kwargs):
        if local_only(address):
            return connect(self, address, *args, **kwargs)
        attempts.append(repr(address)[:200])
        raise OSError("network access is not allowed in this test")

    def guarded_create(address, *args, **kwargs):
        if local_only(address):
            return create(address, *args, **kwargs)
        attempts.append(repr(address)[:200])
        raise OSError("network access is not allowed in this test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", guarded_connect)
        mp.setattr(socket, "create_connection", guarded_create)
        yield attempts


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory, no_network):
    """(checkpoint path, text model dir, the state dict written) of a tiny random CLAP."""
    from transformers import RobertaConfig

    root = tmp_path_factory.mktemp("tiny-clap")
    text_dir = write_roberta_files(root / "roberta")
    torch.manual_seed(0)
    model = build_clap_model("HTSAT-tiny", RobertaConfig.from_pretrained(str(text_dir)))
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # saved from DDP, like the releases
    state["module.text_branch.embeddings.position_ids"] = torch.arange(80)[None]  # transformers < 4.31 stored it
    checkpoint = root / "tiny-clap.pt"
    torch.save({"epoch": 3, "name": "tiny", "state_dict": state}, checkpoint)
    return checkpoint, text_dir, state
