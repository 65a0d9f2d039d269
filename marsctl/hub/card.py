"""The generated repo card (README.md) of a pushed artifact.

The card is a Hugging Face repo card: YAML metadata (parsed and written with
``huggingface_hub.RepoCard``) and a Markdown body. The metadata carries a ``marsctl``
block with the artifact kind, the stage that made it, the stage hash that ``--reuse``
matches, and the content fingerprint of the files. The body shows the config, the recipe,
the metrics, how the artifact was made, and how to use it. A README that the stage itself
wrote (for instance the encoder's model card) is kept, between markers, so that pushing
twice does not lose it. Nothing that looks like a token is ever written into a card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import yaml
from huggingface_hub import RepoCard

from marsctl.hub.artifacts import CARD_FILE, ArtifactInfo
from marsctl.hub.secrets import redact_secrets

NOTES_START = "<!-- marsctl:notes:start -->"
NOTES_END = "<!-- marsctl:notes:end -->"
_METRIC_FILES = ("model_summary.json", "metrics.json", "summary.json", "report.json", "results.json")
_REPORT_FILES = ("model_summary.md", "report.md", "summary.md", "results.md")
_ROW_LABEL_KEYS = ("system", "query_modality", "label", "name", "split")
_KIND_TITLES = {
    "dataset": "marsctl dataset build",
    "reward-encoder": "MARS-Sep reward encoder",
    "separator": "MARS-Sep query-conditioned separator (supervised)",
    "rl-policy": "MARS-Sep separator policy (RL fine-tuned)",
    "eval-report": "marsctl evaluation report",
}
_KIND_TAGS = {
    "dataset": ["audio", "audio-source-separation"],
    "reward-encoder": ["audio", "contrastive-learning", "reward-model"],
    "separator": ["audio", "audio-source-separation"],
    "rl-policy": ["audio", "audio-source-separation", "reinforcement-learning"],
    "eval-report": ["audio", "evaluation"],
}


def read_card_metadata(path: Path) -> dict[str, Any]:
    """The YAML metadata of a card file (empty if the card has none or cannot be parsed)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        if not text.startswith("---"):
            return {}
        card = RepoCard(text, ignore_metadata_errors=True)
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return card.data.to_dict() if card.data is not None else {}


def card_stage_hash(path: Path) -> str | None:
    """The stage hash a marsctl card records, or None."""
    block = read_card_metadata(path).get("marsctl")
    return block.get("stage_hash") if isinstance(block, Mapping) else None


def _existing_notes(root: Path) -> tuple[str, dict[str, Any]]:
    """Body and metadata of a README the producing stage wrote (or kept by an earlier push)."""
    path = root / CARD_FILE
    if not path.is_file():
        return "", {}
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return text.strip(), {}
    card = RepoCard(text, ignore_metadata_errors=True)
    metadata = card.data.to_dict() if card.data is not None else {}
    if NOTES_START in text and NOTES_END in text:
        notes = text.split(NOTES_START, 1)[1].split(NOTES_END, 1)[0].strip()
    elif "marsctl" in metadata:
        notes = ""  # a card we generated without notes
    else:
        notes = card.text.strip()
    # the stage's own metadata (license, tags, ...) is kept; our block is regenerated
    own = {k: v for k, v in metadata.items() if k != "marsctl"}
    return notes, own


def _metrics(root: Path, info: ArtifactInfo) -> dict[str, Any]:
    for name in _METRIC_FILES:
        path = root / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(data, dict):
                return {"source": name, "values": data}
    if info.kind == "dataset" and isinstance(info.config.get("counts"), Mapping):
        return {"source": "dataset.json counts", "values": dict(info.config["counts"])}
    for holder in (info.config, info.provenance or {}):
        value = holder.get("metrics") if isinstance(holder, Mapping) else None
        if isinstance(value, Mapping) and value:
            return {"source": "config" if holder is info.config else "provenance.json", "values": dict(value)}
    return {}


def _flatten_numbers(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``[("sdr.mean", 7.1), ...]`` for every number in a nested mapping."""
    rows: list[tuple[str, Any]] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            if key in _ROW_LABEL_KEYS and isinstance(value, str):
                continue  # already part of the row's name
            rows += _flatten_numbers(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(data, list):
        for index, item in enumerate(data):
            label = str(index)
            if isinstance(item, Mapping):
                parts = [str(item[k]) for k in _ROW_LABEL_KEYS if isinstance(item.get(k), str) and item[k] not in ("", "-")]
                label = "/".join(parts) or label
            rows += _flatten_numbers(item, f"{prefix}[{label}]")
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        rows.append((prefix, data))
    return rows


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _dataset_configs(files: list[str]) -> list[dict[str, Any]]:
    """``configs:`` entries so that ``datasets.load_dataset(repo, "clips")`` reads the manifests."""
    configs = []
    for name in ("clips", "mixtures"):
        if f"manifests/{name}.parquet" in files:
            # one table per manifest (datasets names it "train"); its `split` column holds train/val/test
            configs.append({"config_name": name, "data_files": f"manifests/{name}.parquet"})
    if configs:
        configs[0]["default"] = True
    return configs


def _json_block(data: Any, token: str | None, limit: int = 12_000) -> str:
    text = json.dumps(data, indent=2, sort_keys=True, default=str)
    if len(text) > limit:
        text = text[:limit] + "\n... (truncated; see the file in this repo)"
    return "```json\n" + redact_secrets(text, token) + "\n```"


def render_card(
    info: ArtifactInfo,
    *,
    repo_id: str,
    files: list[str],
    content_fingerprint: str,
    token: str | None = None,
) -> str:
    """The README.md text for the artifact ``info`` pushed as ``repo_id`` with these ``files``."""
    from marsctl import __version__

    root = info.path
    provenance = info.provenance or {}
    notes, own_metadata = _existing_notes(root)
    metrics = _metrics(root, info)
    title = _KIND_TITLES[info.kind]
    # the card itself is left out of the counts, so that regenerating it gives the same text
    content_files = [f for f in files if f != CARD_FILE]
    total_bytes = sum((root / f).stat().st_size for f in content_files)

    marsctl_block: dict[str, Any] = {
        "kind": info.kind,
        "content_sha256": content_fingerprint,
        "marsctl_version": provenance.get("marsctl_version", __version__),
    }
    for key in ("stage", "stage_hash", "created_utc"):
        if provenance.get(key):
            marsctl_block[key] = provenance[key]
    metadata: dict[str, Any] = dict(own_metadata)
    metadata["tags"] = sorted(set(metadata.get("tags") or []) | {"marsctl", "mars-sep", info.kind, *_KIND_TAGS[info.kind]})
    if info.repo_type == "model":
        metadata.setdefault("library_name", "marsctl")
        metadata.setdefault("pipeline_tag", "audio-to-audio")
    else:
        metadata.setdefault("pretty_name", repo_id.split("/")[-1])
        configs = _dataset_configs(files)
        if configs:
            metadata["configs"] = configs
    metadata["marsctl"] = marsctl_block

    lines = [f"# {repo_id.split('/')[-1]}", "", f"{title}, made with marsctl, the toolkit of MARS-Sep "
             "([arXiv 2510.10509](https://arxiv.org/abs/2510.10509)): query-conditioned sound separation, "
             "fine-tuned by reinforcement learning against an aligned audio-text-vision reward.", ""]

    lines += ["## Use it", "", "```bash"]
    option = {"dataset": "--data", "eval-report": "", "reward-encoder": "--encoder"}.get(info.kind, "--model")
    lines.append(f"marsctl hub pull {'datasets/' if info.repo_type == 'dataset' else ''}{repo_id}")
    if option:
        lines.append(f"# or give it directly to any stage, optionally at a revision:  {option} {repo_id}@<revision>")
    lines += ["```", ""]
    if info.kind == "dataset" and _dataset_configs(files):
        lines += ["The manifests load with `datasets`: `load_dataset(\"" + repo_id + "\", \"clips\", split=\"train\")` "
                  "(and `\"mixtures\"`); each is one table, whose `split` column says train/val/test.", ""]

    lines += ["## How it was made", ""]
    if provenance:
        lines.append(f"- stage: `{provenance.get('stage', '?')}`")
        if provenance.get("command"):
            lines.append("- command: `" + redact_secrets(" ".join(map(str, provenance["command"])), token) + "`")
        for name, value in (provenance.get("inputs") or {}).items():
            if isinstance(value, Mapping) and value.get("spec") is not None:
                lines.append(f"- input `{name}`: `{redact_secrets(str(value.get('spec', '')), token)}` "
                             f"(fingerprint `{value.get('fingerprint', '?')}`)")
        lines.append(f"- marsctl {provenance.get('marsctl_version', '?')}, {provenance.get('created_utc', '')}")
    else:
        lines.append("- no provenance.json was recorded by the producing stage; the config below is all we know.")
    recipe = info.config.get("recipe") if isinstance(info.config, Mapping) else None
    if recipe is None:
        recipe = provenance.get("recipe")
    lines.append("")

    if recipe is not None:
        lines += ["## Recipe", ""]
        if isinstance(recipe, (Mapping, list)):
            lines += ["```yaml", redact_secrets(yaml.safe_dump(recipe, sort_keys=False).rstrip(), token), "```", ""]
        else:
            lines += [f"`{redact_secrets(str(recipe), token)}`", ""]

    lines += ["## Config", ""]
    if info.config:
        lines += [f"From `{info.config_file}`:", "", _json_block(info.config, token), ""]
    if provenance.get("config") is not None:
        lines += ["Stage config (`provenance.json`):", "", _json_block(provenance["config"], token), ""]
    if not info.config and provenance.get("config") is None:
        lines += ["(none recorded)", ""]

    report_name = next((n for n in _REPORT_FILES if n in files), None) if info.kind == "eval-report" else None
    if report_name is None:
        lines += ["## Metrics", ""]
    rows = _flatten_numbers(metrics.get("values", {})) if report_name is None else []
    if rows:
        lines += [f"From `{metrics['source']}`:", "", "| metric | value |", "|---|---|"]
        for key, value in rows[:60]:
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
        if len(rows) > 60:
            lines.append(f"| ... | {len(rows) - 60} more in `{metrics['source']}` |")
    elif report_name is None:
        lines.append("(none recorded)")
    if report_name is None:
        lines.append("")

    if report_name is not None:  # an evaluation report: its own Markdown summary is the metrics section
        report = (root / report_name).read_text(encoding="utf-8", errors="replace").strip()
        if len(report) > 20_000:
            report = report[:20_000] + f"\n\n... (truncated; see `{report_name}`)"
        lines += [f"## Report (`{report_name}`)", "", redact_secrets(report, token), ""]

    lines += ["## Content", "", f"- {len(content_files)} files besides this card, {_human_bytes(total_bytes)}",
              f"- content hash: `{content_fingerprint}` (sha256 over every file's path, size and sha256, card excluded)"]
    if provenance.get("stage_hash"):
        lines.append(f"- stage hash: `{provenance['stage_hash']}` (config + inputs; `--reuse` matches it)")
    lines.append("")

    if notes:
        lines += ["## Notes from the producing stage", "", NOTES_START, redact_secrets(notes, token), NOTES_END, ""]

    body = "\n".join(lines)
    header = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)
    text = f"---\n{header}---\n\n{body}"
    RepoCard(text)  # the library must be able to parse what we publish
    return text
