"""Reference-free RL data: a plain folder of audio mixtures and a per-file queries file.

``marsctl train rl --data FOLDER --queries FILE`` fine-tunes on mixtures nobody separated:
FOLDER holds audio files (searched recursively, as ``marsctl separate`` searches a folder) and
FILE says what to extract from each, in the format of ``marsctl separate --queries``
(:func:`marsctl.separate.inputs.read_query_mapping`: CSV/TSV with ``path`` and ``query``
columns, or JSON; relative paths are relative to FILE). A file may have several rows, one query
each; a cell ``a|b`` is one composed query. Each training item is a random
``signal.segment_samples`` crop of one file with that file's queries; the step draws one of
them per item.

* Reward terms: only those that need no reference can score an unseparated mixture. A term
  reading the target (``si_sdr``) or the anchor z* made from the target's audio
  (``semantic_anchor``) is refused before training (:func:`check_reference_free`); reward terms
  whose inputs are the estimates, the mixtures, the queries and the estimates' embeddings
  (``query_similarity``, ``energy_guard``) are allowed.
* Files: every file is decoded once, at the model's sample rate, and held in memory (about
  230 MB per hour of audio at 16 kHz). A file that cannot be decoded is skipped with one line
  naming it; a folder with no usable file is an error. Files weigh by their length (a file of
  ten segments is drawn ten times as often as a one-segment file); a file shorter than a
  segment is zero-padded.
* Validation: :data:`HELD_OUT_FRACTION` of the files (at least one when there are two or
  more), chosen by a seeded hash of each file's path, are never trained on. Their fixed crops
  (evenly spaced, up to ``val_mixtures`` in all), each with every query of its file, give the
  logged metric: the mean reward and each reward term over ``group_size`` seeded samples. There
  is no SI-SDRi: no references.
* Exact resume: a crop is a pure function of (seed, epoch, index), the query choice of the
  step's seed (as every RL draw).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from marsctl.audio import load_audio
from marsctl.errors import AudioError, ConfigError, MarsctlError
from marsctl.models.encoder_base import QueryEncoder
from marsctl.models.separator import Separator
from marsctl.rl.config import ESTIMATOR_SUMMARY, RLConfig
from marsctl.rl.rewards import REWARD_TERMS, RewardConfig, RewardFunction, reward_functions
from marsctl.rl.rollout import RewardModel, mean_policy_reward
from marsctl.rl.trainer import RLTask
from marsctl.train.distributed import DistributedContext
from marsctl.train.loop import Scores
from marsctl.separate.inputs import find_inputs, read_query_mapping
from marsctl.separate.queries import Query, embed_query, out_of_vocabulary

#: RewardBatch inputs that only a reference (a separated target) provides, and why
REFERENCE_INPUTS = {
    "targets": "the target's reference audio",
    "anchors": "the anchor z* (made from the target's reference audio)",
}
#: fraction of the files held out for validation (at least one of two or more files)
HELD_OUT_FRACTION = 0.1
#: seed offset of the held-out choice (never the crops' seed)
HELD_OUT_SEED = 7_919
#: how many unused files a summary line names
NAMED_IN_SUMMARY = 3


def reference_inputs(name: str) -> list[str]:
    """What of :data:`REFERENCE_INPUTS` the registered reward term ``name`` reads."""
    return [need for need in REWARD_TERMS[name].needs if need in REFERENCE_INPUTS]


def check_reference_free(rewards: RewardConfig) -> None:
    """One-line :class:`ConfigError` for the first weighted term that needs a reference."""
    for name, weight in rewards.weights.items():
        needs = reference_inputs(name)
        if weight != 0 and needs:
            free = ", ".join(n for n in REWARD_TERMS if not reference_inputs(n))
            raise ConfigError(
                f"reward term '{name}' needs {REFERENCE_INPUTS[needs[0]]}, which a plain folder of mixtures "
                f"does not have; give it weight 0 (reference-free terms: {free}; recipe rl-folder does this)"
            )


def check_folder_config(config: "RLConfig") -> None:
    """Refuse, in one line and before anything loads, what a plain folder cannot give (reward terms
    that need a reference; the judge, which scores labelled validation mixtures) and a missing
    queries file."""
    check_reference_free(config.rewards)
    if not Path(config.queries).is_file():
        raise ConfigError(f"{config.queries}: no such query mapping file")
    if getattr(config, "judge", ""):
        raise ConfigError("judge: the judge scores labelled validation mixtures, which a plain folder of mixtures "
                          "(--queries) does not have; leave judge empty")


def reference_free(functions: Sequence[RewardFunction]) -> list[RewardFunction]:
    """The terms of ``functions`` that need no reference (validation logs these only)."""
    return [f for f in functions if not any(need in REFERENCE_INPUTS for need in f.needs)]


@dataclasses.dataclass(frozen=True)
class FolderFile:
    path: Path
    wave: np.ndarray  # [N] mono float32 at the model's sample rate
    #: indices into FolderData.queries
    queries: tuple[int, ...]


@dataclasses.dataclass
class FolderData:
    """The usable files of a folder, split by file, and the distinct queries they use."""

    folder: Path
    train: list[FolderFile]
    val: list[FolderFile]
    queries: list[Query]

    def describe(self) -> str:
        return (f"{len(self.train)} training and {len(self.val)} held-out file(s) of {self.folder} "
                f"({len(self.queries)} distinct queries)")


def load_folder_data(folder: str | Path, queries_file: str | Path, sample_rate: int, seed: int,
                     say: Callable[[str], None]) -> FolderData:
    """Decode the files of ``folder`` that ``queries_file`` gives queries for (module docstring).
    Skips, each said in one line: a row whose file is not an audio file of the folder, a file that
    does not decode; one summary line for the folder's audio files without a query."""
    folder, queries_file = Path(folder), Path(queries_file)
    if not folder.is_dir():
        raise MarsctlError(f"{folder}: no such folder of mixtures")
    if (folder / "dataset.json").is_file():
        raise ConfigError(f"{folder} is a 'marsctl data build' dataset; --queries is for a plain folder of mixtures "
                          "(leave it out to train on the dataset)")
    search = find_inputs([folder])
    for problem in search.problems:
        say(f"skipping {problem}")
    audio = {f.path.resolve(): f.path for f in search.files}
    queries: dict[Query, int] = {}
    by_file: dict[Path, list[int]] = {}
    outside: set[Path] = set()
    for row, query in read_query_mapping(queries_file):
        key = row.path.resolve()
        if key not in audio:
            if key not in outside:
                outside.add(key)
                say(f"skipping {row.path}: not an audio file in {folder} ({queries_file})")
            continue
        index = queries.setdefault(query, len(queries))
        if index not in by_file.setdefault(key, []):
            by_file[key].append(index)
    unused = [audio[k] for k in sorted(audio) if k not in by_file]
    if unused:
        named = ", ".join(str(p) for p in unused[:NAMED_IN_SUMMARY]) + (", ..." if len(unused) > NAMED_IN_SUMMARY else "")
        say(f"{len(unused)} audio file(s) in {folder} have no query in {queries_file}, not used: {named}")
    files = []
    for key in sorted(by_file):
        try:
            wave = load_audio(audio[key], sample_rate)
        except AudioError as exc:
            say(f"skipping {exc}")
            continue
        files.append(FolderFile(audio[key], wave, tuple(by_file[key])))
    if not files:
        raise MarsctlError(f"{folder}: no usable audio file with a query in {queries_file}")
    train, val = split_by_file(files, folder, seed)
    used = sorted({i for f in files for i in f.queries})
    # keep only the queries of usable files, renumbered
    renumber = {old: new for new, old in enumerate(used)}
    train, val = ([dataclasses.replace(f, queries=tuple(renumber[i] for i in f.queries)) for f in part] for part in (train, val))
    ordered = list(queries)  # in first-seen order: index i is ordered[i]
    return FolderData(folder, train, val, [ordered[i] for i in used])


def split_by_file(files: Sequence[FolderFile], folder: Path, seed: int) -> tuple[list[FolderFile], list[FolderFile]]:
    """(training, held-out) files: the held-out ones have the smallest seeded hashes of their path
    relative to ``folder`` (a file keeps its side when others are added)."""
    count = len(files)
    held_out = 0 if count < 2 else min(count - 1, max(1, round(HELD_OUT_FRACTION * count)))

    def rank(file: FolderFile) -> str:
        try:
            name = file.path.resolve().relative_to(folder.resolve()).as_posix()
        except ValueError:
            name = file.path.as_posix()
        return hashlib.sha256(f"{seed + HELD_OUT_SEED}:{name}".encode()).hexdigest()

    chosen = {id(f) for f in sorted(files, key=rank)[:held_out]}
    return [f for f in files if id(f) not in chosen], [f for f in files if id(f) in chosen]


def _crop(wave: np.ndarray, offset: int, length: int) -> np.ndarray:
    piece = wave[offset:offset + length]
    return np.pad(piece, (0, length - len(piece))) if len(piece) < length else piece


class FolderCropDataset(Dataset):
    """Random ``segment`` crops of the training files: item ``i`` of epoch ``e`` is a crop of the
    file owning slot ``i`` (a file has one slot per segment of its length, at least one) at an
    offset drawn from (seed, e, i). Items: ``{"mixture": [T], "queries": (query indices)}``."""

    def __init__(self, files: Sequence[FolderFile], segment: int, seed: int):
        if not files:
            raise MarsctlError("no training files (every usable file is held out for validation)")
        self.files, self.segment, self.seed, self.epoch = list(files), segment, seed, 0
        slots = [max(1, math.ceil(len(f.wave) / segment)) for f in self.files]
        self.owner = np.repeat(np.arange(len(self.files)), slots)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.owner)

    def __getitem__(self, index: int) -> dict[str, Any]:
        file = self.files[int(self.owner[index])]
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        offset = int(rng.integers(0, max(1, len(file.wave) - self.segment + 1)))
        return {"mixture": torch.from_numpy(_crop(file.wave, offset, self.segment).copy()), "queries": file.queries}


def collate_crops(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"mixture": torch.stack([i["mixture"] for i in items]), "queries": [tuple(i["queries"]) for i in items]}


@dataclasses.dataclass(frozen=True)
class HeldOutCrop:
    path: Path
    offset: int
    mixture: np.ndarray  # [T]
    queries: tuple[int, ...]


def held_out_crops(files: Sequence[FolderFile], segment: int, limit: int) -> list[HeldOutCrop]:
    """Up to ``limit`` fixed crops of the held-out files: evenly spaced over each file, as many from
    each as ``limit`` allows (at least one), never more than the file has segments."""
    if not files or limit < 1:
        return []
    per_file = max(1, limit // len(files))
    crops = []
    for file in files:
        last = max(0, len(file.wave) - segment)
        count = min(per_file, math.ceil(len(file.wave) / segment))
        offsets = sorted({int(round(x)) for x in np.linspace(0, last, count)}) if last else [0]
        crops += [HeldOutCrop(file.path, o, _crop(file.wave, o, segment), file.queries) for o in offsets]
    return crops[:limit]


def query_keys(queries: Sequence[Query]) -> list[str]:
    """A readable label per query, distinct for distinct queries (the reward model's key)."""
    return [f"{q.slug()}#{q.exact_hash()}" for q in queries]


@torch.no_grad()
def embed_queries(encoder: QueryEncoder, queries: Sequence[Query], sample_rate: int) -> torch.Tensor:
    """``[Q, D]`` fused unit-norm embeddings (as ``marsctl separate`` embeds them), on the CPU."""
    return torch.stack([embed_query(encoder, q, sample_rate).float().cpu() for q in queries])


class QueryRewardModel(RewardModel):
    """A reward model whose query texts are the folder's queries, embedded by the reward encoder
    like ``marsctl separate`` embeds them (composed texts, audio and image queries); used when
    the reward encoder is not the query encoder (labels are :func:`query_keys`)."""

    def __init__(self, *args: Any, query_vectors: Mapping[str, torch.Tensor], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.query_vectors = dict(query_vectors)

    def text(self, labels: Sequence[str]) -> torch.Tensor:
        missing = [label for label in labels if label not in self.query_vectors]
        if missing:
            return super().text(labels)
        return torch.stack([self.query_vectors[label] for label in labels])


def folder_validation_reward(model: Separator, crops: Sequence[HeldOutCrop], query_vectors: torch.Tensor, labels: Sequence[str],
                             reward_model: RewardModel, group_size: int, device: torch.device, seed: int,
                             kappa: float) -> dict[str, float]:
    """Mean reward and reward terms (and each term's std) of the current policy on the fixed
    held-out crops, every query of a crop's file scored with ``group_size`` seeded samples."""
    items = ((crop.mixture, query_vectors[list(crop.queries)], [labels[i] for i in crop.queries], None) for crop in crops)
    return mean_policy_reward(model, items, reward_model, group_size, device, seed, kappa)


class FolderRLTask(RLTask):
    """``train rl`` on a plain folder (the module docstring): the RL step is :class:`RLTask`'s
    (:func:`marsctl.rl.update.rl_update`, untouched), with crops of the folder's files, one of
    each file's queries per item and no target."""

    def __init__(self, config: RLConfig, model: Separator, reference: Separator, encoder: QueryEncoder, encoder_spec: str,
                 reward_model: RewardModel, data: FolderData, query_vectors: torch.Tensor, labels: Sequence[str],
                 ctx: DistributedContext, known_labels: Sequence[str] = ()):
        super().__init__(config, model, reference, encoder, encoder_spec, reward_model, data.folder, ctx, known_labels=known_labels)
        self.data, self.query_vectors, self.labels = data, query_vectors, list(labels)
        self.val_crops = held_out_crops(data.val, self.signal.segment_samples, config.val_mixtures)
        self.last_val_reward: float | None = None

    def training_data(self, is_main: bool) -> tuple[Dataset, list[HeldOutCrop], Callable]:
        dataset = FolderCropDataset(self.data.train, self.signal.segment_samples, self.config.seed)
        return dataset, (self.val_crops if is_main else []), collate_crops

    def step_inputs(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, None, list[str]]:
        device = self.ctx.device
        chosen = [options[int(torch.randint(len(options), (1,), generator=generator))] for options in batch["queries"]]
        query = self.query_vectors[chosen].to(device)  # q_b [B, D]: one of each file's queries
        return batch["mixture"].to(device), query, None, [self.labels[i] for i in chosen]  # no target: no reference

    def validate(self, val_set: list) -> dict[str, float]:
        rewards = folder_validation_reward(self.model, val_set, self.query_vectors, self.labels, self.reward_model,
                                           self.config.group_size, self.ctx.device, self.config.seed, kappa=self.kappa)
        self.last_val_reward = rewards.get("reward")
        return {f"val_{k}": v for k, v in rewards.items()}

    def card(self, step: int, scores: Scores, config: RLConfig | None = None) -> str:
        config, data = config or self.config, self.data
        weights = ", ".join(f"{k} {v:g}" for k, v in config.rewards.weights.items() if v != 0)
        if not self.val_crops:
            validation = "none (a single usable file: nothing held out)"
        else:
            last = f"{self.last_val_reward:.4f}" if self.last_val_reward is not None else "see `metrics.jsonl` (`val_reward`)"
            validation = (f"mean reward {last} on {len(self.val_crops)} fixed crops of {len(data.val)} held-out file(s); "
                          "no SI-SDRi: a plain folder has no references")
        return (
            "# marsctl separator (MARS-Sep RL fine-tuned, reference-free)\n\n"
            "Query-conditioned mask separator fine-tuned by `marsctl train rl` as a Beta mask policy "
            f"({ESTIMATOR_SUMMARY[config.estimator]}, entropy bonus, KL to the starting policy) on a plain folder of "
            "mixtures with per-file queries, using reference-free reward terms only.\n\n"
            f"- starting model (reference policy): `{config.init_model}`\n"
            f"- training data: `{config.data}` with the queries of `{config.queries}` ({len(data.train)} training file(s), "
            f"{len(data.queries)} distinct queries)\n"
            f"- reward encoder: `{config.reward_encoder or 'the query encoder'}`; reward weights: {weights}\n"
            f"- steps: {step} (batch {config.batch_size} x group {config.group_size} per process, {config.ppo_epochs} PPO epoch(s)), "
            f"AdamW lr {config.learning_rate}\n"
            f"- validation: {validation}\n\n"
            "Full settings are in `config.json` (`training`).\n"
        )


def folder_task(config: RLConfig, model: Separator, reference: Separator, encoder: QueryEncoder, encoder_spec: str,
                reward_encoder: QueryEncoder, ctx: DistributedContext, say: Callable[[str], None],
                known_labels: Sequence[str] = ()) -> FolderRLTask:
    """The RL task of ``config.data`` (a plain folder) with ``config.queries``: files decoded,
    queries embedded by the query encoder (and by the reward encoder when it is another one).
    ``known_labels`` (the classes the start was trained on, when its config records them): a text
    query far from all of them gets one warning line each (:func:`new_class_warnings`)."""
    signal = model.config.signal
    data = load_folder_data(config.data, config.queries, signal.sample_rate, config.seed, say)
    say(f"train rl on {data.describe()}; validation logs the mean reward terms on the held-out files "
        "(no references: no SI-SDRi)" if data.val else f"train rl on {data.describe()}; one usable file: nothing held out, "
        "no validation")
    for warning in new_class_warnings(encoder, known_labels, data.queries):
        say(warning)
    labels = query_keys(data.queries)
    query_vectors = embed_queries(encoder, data.queries, signal.sample_rate)
    same = reward_encoder is encoder
    reward_vectors = query_vectors if same else embed_queries(reward_encoder, data.queries, signal.sample_rate)
    reward_model = QueryRewardModel(reward_encoder, reference_free(reward_functions(config.rewards)), signal, same_space_as_queries=same,
                                    segments=config.rewards.segments, config=config.rewards,
                                    query_vectors=dict(zip(labels, reward_vectors)))
    return FolderRLTask(config, model, reference, encoder, encoder_spec, reward_model, data, query_vectors, labels, ctx, known_labels)


def new_class_warnings(encoder: QueryEncoder, known_labels: Sequence[str], queries: Sequence[Query]) -> list[str]:
    """One line per text query far, in the query encoder's space, from every class the start was trained on
    (``marsctl separate``'s out-of-vocabulary rule): reference-free RL does not teach a separator new classes
    (docs/results.md, "What reference-free adaptation does, and when it hurts")."""
    texts = [text for query in queries for text in query.texts]
    return [f"query {note.query!r} is far from every class the starting separator was trained on (nearest: {note.nearest_text}); "
            "reference-free RL does not teach new classes and may degrade the others: train it with references first "
            "('marsctl train sup'; docs/results.md#what-reference-free-adaptation-does-and-when-it-hurts)"
            for note in out_of_vocabulary(encoder, list(known_labels), texts)]
