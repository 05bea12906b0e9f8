"""Checks shared by the two Hub uploads (``finetune.publish`` for a run, ``data_prep push`` for a
clip dataset) and the download of ``data.dataset``. Torch-free: data_prep imports it."""

from __future__ import annotations


def repo_id_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` is not a ``USER/NAME`` the Hub accepts, or None if it is."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        return "must be USER/NAME (or ORG/NAME)"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return str(e).split("\n")[0]
    return None


def token_missing() -> str | None:
    """A message if huggingface_hub finds no token (HF_TOKEN or a saved login), else None. The
    token itself is never read into a string here: huggingface_hub sends it as a header."""
    from huggingface_hub import get_token

    if get_token() is None:
        return "no Hugging Face token: run `hf auth login` or set HF_TOKEN (a write token), then retry"
    return None
