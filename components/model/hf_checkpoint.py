"""A Hugging Face causal-LM checkpoint as a model artifact: a local directory or a pinned hub commit.

Checked when the recipe compiles, before anything runs: the directory has ``config.json`` and
safetensors weights (a pickle-only checkpoint is refused, never unpickled), and its
``model_type`` is a causal LM that transformers implements itself (no remote code). A local
directory's files are hashed into the stage's digest, so editing the checkpoint reruns what
reads it. A hub model must name a full commit hash: a branch name moves, a digest must not.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pydantic import model_validator

from components.model.importer import ModelImporter
from components.registry import MethodParams, Paper

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
# what an import needs of a hub repository: weights, configs, tokenizer files
HUB_FILES = ["*.safetensors", "*.json", "tokenizer.model", "*.txt"]


def check_checkpoint_dir(path: Path) -> None:
    """Raise ValueError naming what is wrong with ``path`` as a causal-LM checkpoint."""
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory (a Hugging Face checkpoint is a directory with config.json)")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json, so it is not a Hugging Face checkpoint")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(f"{path} holds only pickle weights ({', '.join(pickles)}); paperdag loads safetensors "
                             "only, since unpickling runs code. Convert it once with "
                             "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`")
        raise ValueError(f"{path} has no *.safetensors weights")
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    if config.get("auto_map"):
        raise ValueError(f"{path / 'config.json'} maps to custom code (auto_map); paperdag runs no remote code")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{path / 'config.json'}: model_type {model_type!r} is not a causal language model that "
                         "transformers implements (paperdag's stages train, quantize, merge and evaluate causal LMs)")


class HfCheckpoint(ModelImporter):
    key = "hf_checkpoint"
    paper = Paper("Transformers: State-of-the-Art Natural Language Processing", "https://arxiv.org/abs/1910.03771",
                  "1910.03771")

    class Params(MethodParams):
        path: str | None = None
        """A local checkpoint directory (relative to where paperdag runs)."""
        hub: str | None = None
        """A hub repository, ``org/name``; needs ``revision``."""
        revision: str | None = None
        """The hub commit (40 hex characters): what the digest stands for."""

        @model_validator(mode="after")
        def _one_source(self):
            if (self.path is None) == (self.hub is None):
                raise ValueError("give exactly one of path (a local checkpoint directory) or hub (org/name)")
            if self.path is not None:
                if self.revision is not None:
                    raise ValueError("revision applies to hub models only")
                check_checkpoint_dir(Path(self.path))
            elif self.revision is None or not COMMIT.match(self.revision):
                raise ValueError(f"hub model {self.hub}: revision must be a full 40-character commit hash (got "
                                 f"{self.revision!r}); a branch or tag can move, and the stage's digest must not")
            return self

    def input_files(self) -> dict[str, list[Path]]:
        return {"params.path": [Path(self.params.path)]} if self.params.path is not None else {}

    def checkpoint_dir(self) -> Path:
        if self.params.path is not None:
            return Path(self.params.path)
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        try:
            local = snapshot_download(self.params.hub, revision=self.params.revision, allow_patterns=HUB_FILES,
                                      local_files_only=offline)
        except LocalEntryNotFoundError:
            raise FileNotFoundError(f"hub model {self.params.hub}@{self.params.revision[:12]} is not in the local "
                                    "Hugging Face cache and HF_HUB_OFFLINE is set; download it once with network "
                                    "access, or give a local path") from None
        return Path(local)  # checked by the model stage, like a local directory
