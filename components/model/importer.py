"""Base of the methods of the ``model`` stage kind: bring an existing checkpoint into a DAG."""
from __future__ import annotations

from pathlib import Path

from components.registry import Method


class ModelImporter(Method):
    """Names a checkpoint that exists outside paperdag; its content is what the digest hashes."""

    def checkpoint_dir(self) -> Path:
        """A local directory holding the checkpoint (downloading it first if it comes from a hub)."""
        raise NotImplementedError
