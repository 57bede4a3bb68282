"""Model artifacts: an HF model directory plus ``paperdag.json`` (the method's own facts)."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from safetensors.torch import load_file
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from components.model.presets import is_encoder, load_model
from components.model.side_tensors import ACTIVATION_FILE, AUXILIARY_FILE
from tasks.artifacts import Artifact, ArtifactError

FACTS = "paperdag.json"
LOSS_CURVE = "loss_curve.json"  # a training stage's loss by step ({"steps": [...], "loss": [...]})
hf_logging.disable_progress_bar()  # "Loading weights" bars per tiny model are noise in a stage log


def read_model_facts(art: Artifact) -> dict:
    """A model artifact's facts (``paperdag.json``) without loading its weights."""
    return json.loads((art.path / FACTS).read_text()) if (art.path / FACTS).exists() else {}


SIDE_MODULES = ("linear_attention", "binary_network")  # facts of models with modules beside their weights


def _installer(module: str, function: str):
    """``module.function``, imported by name and so left out of the code closure of every stage that
    loads models (``tasks/code_version.py``). That is sound: a model only carries these modules when
    the stage that made it ran this code (Hedgehog's, BiPFT's or the quantize stage's closure holds
    it), so an edit to it changes that model's digest, and every stage loading it reruns through its
    input digest. Imported directly, an edit to BiPFT's layers would rerun data selection."""
    return getattr(importlib.import_module(module), function)


def load_model_artifact(art: Artifact, activation_hooks: bool = False, keeps: tuple[str, ...] = (),
                        encoder_ok: bool = False):
    """(model, tokenizer, facts) from a model artifact, verified against its manifest.

    ``activation_hooks``: for a WxAy model, also quantize activations as it deploys (the
    evaluate stage). Training and merging start from its weights alone.

    A model with modules beside its weights (``SIDE_MODULES``: Hedgehog's linear attention, BiPFT's
    binary network) is loaded with them installed, and only by callers that keep them (``keeps``
    names the kinds): a stage that saves a new model from its weights alone (quantize, merge, prune,
    distil into it) would silently drop them. A masked-LM encoder loads only where ``encoder_ok``."""
    art.verify()  # a corrupt or truncated model.safetensors fails here, naming the file
    try:
        model = load_model(art.path)
        tokenizer = AutoTokenizer.from_pretrained(str(art.path), trust_remote_code=False)
    except Exception as e:  # safetensors/transformers raise many types for a bad file
        raise ArtifactError(f"cannot load model artifact {art.path}: {type(e).__name__}: {e}") from None
    if not encoder_ok and is_encoder(model):
        raise ArtifactError(f"model artifact {art.path} is a masked-LM encoder; only method mlm trains one and only "
                            "evaluate method masked_lm scores one (this stage works on causal decoders)")
    facts = read_model_facts(art)
    linear, binary = facts.get("linear_attention"), facts.get("binary_network")
    for kind, what in (("linear_attention", linear and f"{linear['feature_map']} linear attention"),
                       ("binary_network", binary and "a binary network (BiPFT)")):
        if what and kind not in keeps:
            raise ArtifactError(f"model artifact {art.path} has {what} (modules beside its weights, in "
                                f"{AUXILIARY_FILE}); this stage would save a model without them. Evaluate it"
                                + (", or fine-tune it with method hedgehog" if kind == "linear_attention" else ""))
    try:
        if linear:
            install = _installer("components.model.linear_attention", "install_linear_attention")
            install(model, linear["feature_map"],
                    load_file(str(art.path / AUXILIARY_FILE)) if linear["feature_map"] != "elu" else {})
        if binary:
            install = _installer("components.model.binary_network", "install_binary_network")
            install(model, binary["estimators"], load_file(str(art.path / AUXILIARY_FILE)))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot load the {'linear attention' if linear else 'binary network'} of model "
                            f"artifact {art.path}: {e}") from None
    activations = facts.get("quantization", {}).get("activations")
    if activations and activation_hooks:
        side_state = load_file(str(art.path / ACTIVATION_FILE))
        spec = _installer("components.quant.activation", "ActivationSpec").from_meta(activations)
        _installer("components.quant.activation", "install_activation_quant")(model, spec, side_state)
    return model, tokenizer, facts


def save_model_artifact(model, tokenizer, out_dir: Path, facts: dict) -> None:
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / FACTS).write_text(json.dumps(facts, indent=2, sort_keys=True, default=str))


def load_tokenizer_artifact(art: Artifact):
    return AutoTokenizer.from_pretrained(str(art.path / "tokenizer"), trust_remote_code=False)


class TokenizerMismatchError(ValueError):
    """A model meets token ids of a tokenizer other than the one it was trained with."""


def check_model_tokenizer(model_dir: Path, tokenizer, what: str) -> None:
    """A model artifact's tokenizer (saved beside its weights) has the vocabulary of ``tokenizer``.

    Token ids of another vocabulary, even one of the same size, would be scored without any error
    and mean nothing (``what`` names the model and the tokens for the message)."""
    own = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False).get_vocab()
    vocab = tokenizer.get_vocab()
    if own != vocab:
        moved = sum(own.get(token) != index for token, index in vocab.items())
        raise TokenizerMismatchError(
            f"{what}: the model was trained with another tokenizer ({len(own)} entries against {len(vocab)}; "
            f"{moved} tokens have another id or are missing). Score a model on tokens of its own tokenizer: a "
            f"tokenize stage shares one through `inputs.tokenizer`")
