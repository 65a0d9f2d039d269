"""Where pretrained weights come from: a local path, or a Hugging Face Hub id (cached download)."""

from __future__ import annotations

from pathlib import Path

from marsctl.errors import MarsctlError


def looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or Path(spec).exists()


def pretrained_source(spec: str) -> str:
    """A local directory/file as an absolute path, or a Hub id unchanged (transformers caches it).

    A spec that looks like a path but does not exist is an error here, not a confusing
    Hub lookup later.
    """
    if looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise MarsctlError(f"{spec}: no such file or directory")
        return str(path.resolve())
    return spec


def hub_file(repo_id: str, filename: str) -> Path:
    """Download one file of a Hub model repo into the Hugging Face cache (or find it there)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except Exception as exc:  # offline, missing file, auth: one line for the user
        raise MarsctlError(
            f"{repo_id}/{filename}: cannot download it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "give a local path instead when offline"
        ) from exc
