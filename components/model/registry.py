"""Model importers a recipe can name (``kind: model``)."""
from components.model.hf_checkpoint import HfCheckpoint
from components.model.importer import ModelImporter
from components.registry import Registry

MODEL_IMPORTERS = Registry("model", ModelImporter, [HfCheckpoint])
