"""``checkpoint.push_to_hub``: upload a finished run's model to the Hugging Face hub (huggingface_hub's own calls).

A Hugging Face model goes up as its ``model/`` directory (what ``from_pretrained`` loads); a built-in GPT as its
weights, config and run record. The repository is created if needed (private unless told otherwise), as HF
Trainer's ``push_to_hub`` does; ``HF_ENDPOINT`` / ``HF_TOKEN`` / ``huggingface-cli login`` apply as usual.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from selfreplay.errors import SelfReplayError

GPT_FILES = ["model.safetensors", "config.yaml", "run.json", "summary.json"]


def check_hub(repo_id: Optional[str]) -> None:
    """Before training: huggingface_hub is installed and the repository id is well formed."""
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        raise SelfReplayError("checkpoint.push_to_hub needs huggingface_hub: pip install 'selfreplay[hf]'") from None
    if repo_id is not None:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            raise SelfReplayError(f"checkpoint.hub_model_id={repo_id!r}: {str(e).splitlines()[0]}") from None


def push_run(run_dir, kind: str, repo_id: Optional[str], private: bool) -> str:
    """Create the repository (if needed) and upload the run's model in one commit; returns the commit's URL."""
    from huggingface_hub import HfApi

    run_dir = Path(run_dir)
    repo_id = repo_id or run_dir.resolve().name
    api = HfApi()
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        folder, patterns = (run_dir / "model", None) if kind == "hf" else (run_dir, GPT_FILES)
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), allow_patterns=patterns,
                                   commit_message=f"selfreplay: {run_dir.name}")
    except Exception as e:  # HTTP, auth and network errors: the trained model is saved either way
        raise SelfReplayError(f"checkpoint.push_to_hub: uploading to {repo_id} failed ({str(e).splitlines()[0]}); "
                              f"the model is saved in {run_dir}") from None
    return commit.commit_url
