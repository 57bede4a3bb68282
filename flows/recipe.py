"""Recipes: strict YAML -> typed schema -> a DAG of content-addressed stages.

Everything a user can get wrong in a recipe is caught here, before any stage runs, with a
message that names the file, the key and what was expected.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from components.eval.claims import Claim, SeedPlan, claim_stages
from components.eval.rank_agreement import MetricCorrelationSpec, RankAgreementSpec
from components.eval.stability import StabilitySpec
from components.registry import UnknownMethodError
from components.train.samplers.registry import SAMPLERS
from components.model.growth import SIZE_KEYS, LlamaSizes, check_sizes
from components.model.presets import ENCODER_PRESETS, PRESETS
from components.train.fim import FillInTheMiddle
from components.train.mlm import objective_mismatch
from tasks.artifacts import compute_digest
from tasks.code_version import code_version, source_closure
from tasks.fingerprint import InputFileError, hash_inputs
from tasks.kinds import KINDS
from tasks.plan import RecipePlan, StagePlan
from flows.errors import RecipeError  # noqa: F401  (defined there so the CLI can catch it without importing this)
from flows.recipe_path import IDENTIFIER, RECIPE_SUFFIXES, resolve_recipe_path  # noqa: F401  (torch-free, for the CLI)

# Recipe and stage names become MLflow experiment names, directory names and DVC stage names:
# identifiers only, so none can carry a path separator, `..` or a shell metacharacter.


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PaperRef(Strict):
    title: str
    url: str
    arxiv: str | None = None


class SamplerSpec(Strict):
    method: str
    """A registered sampler key (uniform, fixed_subset, rs2, skill_it)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """The sampler's params; validated against the sampler's own typed schema."""


class StageResources(Strict):
    """What one run of a stage occupies. ``paperdag run --max-parallel N`` starts a stage beside
    others only while the sums stay within the machine; a stage asking for more than the machine
    has is refused before anything runs. Not in the digest (where a stage runs does not change
    what it builds), except ``ranks`` above 1: data-parallel ranks sum gradients in another
    order, so their weights differ from one rank's in the last bits."""
    threads: int | None = Field(None, ge=1)
    """torch intra-op threads. Default: the machine's cores shared out over --max-parallel."""
    memory_gb: float | None = Field(None, gt=0)
    """Peak host memory in GB, counted against the machine's physical memory."""
    gpus: int = Field(0, ge=0)
    """CUDA devices the stage needs: counted and checked; every stage still sees all devices."""
    ranks: int = Field(1, ge=1)
    """pretrain/finetune/distill only: data-parallel DeepSpeed ranks the stage launches (torchrun on
    this machine, or the DeepSpeed launcher over $PAPERDAG_HOSTFILE). Each rank trains on
    params.batch_size / ranks blocks of every step; the stage's threads are shared out over them."""


class StageSpec(Strict):
    kind: str
    """Stage kind: one of corpus, model (import a checkpoint), select, tokenize, pretrain, finetune, distill, prune,
    quantize, merge, evaluate."""
    method: str
    """A registered method key of that kind (never an import path)."""
    inputs: dict[str, str | list[str]] = Field(default_factory=dict)
    """Role -> upstream stage name(s), e.g. {tokens: tokenize, model: pretrain_dense}."""
    params: dict[str, Any] = Field(default_factory=dict)
    """The method's params; validated against the method's own typed schema."""
    model: str | None = None
    """pretrain/distill only: the model to build (a scale preset or an HF path). Default: the recipe's model."""
    train_domain: str | None = None
    """pretrain/finetune/distill only: train on this domain's token blocks only (e.g. prose, code)."""
    sampler: SamplerSpec | None = None
    """pretrain/finetune/distill only: how each step's blocks are drawn (default: uniform epochs)."""
    resources: StageResources = Field(default_factory=StageResources)
    """What the stage occupies when it runs beside others (threads, memory_gb, gpus)."""
    description: str = ""


class Recipe(Strict):
    name: str
    """The experiment's name (MLflow experiment, DVC stage prefix): snake_case."""
    paper: PaperRef
    reproduces: str
    """What this recipe reproduces from the paper, in one or two sentences."""
    model: str = "micro"
    """Scale preset (nano, micro, micro_student, small) or a Hugging Face model path."""
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    torch_compile: bool | Literal["auto"] = "auto"
    """Training stages: torch.compile the model ('auto': when the run repays compiling)."""
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    """Training stages: attention kernel ('auto': eager on CPU for short sequences, else the model's)."""
    seeds: list[int] | None = None
    """Run the seed-dependent stages once per seed (distinct digests); claims are then judged on
    paired per-seed values with a 95% interval. A stage depends on the seed when its method takes
    a ``seed`` the stage does not fix, or when it reads such a stage (evaluate stages excepted)."""
    include: list[str] = Field(default_factory=list)
    """Files merged under this one, in order (paths relative to this file): shared data blocks and
    stages are written once. This file's own keys win; mappings merge key by key."""
    data: dict[str, Any] = Field(default_factory=dict)
    """Params of the corpus stage (sources, noise, split)."""
    stages: dict[str, StageSpec]
    claims: list[Claim] = Field(default_factory=list)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int] | None) -> list[int] | None:
        if seeds is not None:
            if not seeds:
                raise ValueError("seeds is empty; give at least one seed or leave the key out")
            if len(set(seeds)) != len(seeds):
                raise ValueError(f"seeds has duplicates: {seeds}")
            if any(s < 0 for s in seeds):
                raise ValueError(f"seeds must be >= 0: {seeds}")
        return seeds

    @field_validator("claims")
    @classmethod
    def _claim_names(cls, claims: list[Claim]) -> list[Claim]:
        names = [c.name for c in claims]
        if len(set(names)) != len(names):
            raise ValueError(f"claim names repeat: {sorted({n for n in names if names.count(n) > 1})}")
        return claims

    @field_validator("name")
    @classmethod
    def _identifier(cls, name: str) -> str:
        if not IDENTIFIER.match(name):
            raise ValueError(f"recipe name {name!r} must be snake_case (a lower-case letter, then letters, digits, _)")
        return name

    @field_validator("stages")
    @classmethod
    def _names(cls, stages: dict[str, StageSpec]) -> dict[str, StageSpec]:
        for name in stages:
            if not IDENTIFIER.match(name):
                raise ValueError(f"stage name {name!r} must be snake_case (letters, digits, _)")
        if not stages:
            raise ValueError("a recipe needs at least one stage")
        return stages


# Recipe-level defaults copied into a method's params when the method has the field.
RECIPE_DEFAULTS = ("seed", "precision", "torch_compile", "attention")


def _format_validation(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        loc = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            lines.append(f"{loc}: {e['msg']}{got_s}")
    return "; ".join(lines)


def _known_keys(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)




def apply_override(raw: dict, assignment: str, path: Path) -> None:
    """Apply ``a.b.c=value`` to the raw recipe dict. The value is parsed as YAML (safe)."""
    if "=" not in assignment:
        raise RecipeError(f"{path}: override {assignment!r} must look like key.path=value")
    key, _, value_text = assignment.partition("=")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: override {assignment!r}: value is not valid YAML: {e}") from None
    node: Any = raw
    # `stages.S.resources.ranks=8`: how a stage runs, set for one run without editing the recipe
    resources = len(parts) == 4 and parts[0] == "stages" and parts[2] == "resources" \
        and parts[3] in StageResources.model_fields
    for i, part in enumerate(parts[:-1]):
        if resources and i == 2 and isinstance(node, dict) and node.get(part) is None:
            node[part] = {}
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[: i + 1])
            known = ", ".join(node) if isinstance(node, dict) else "(not a mapping)"
            raise RecipeError(f"{path}: override --set {key}: unknown key {where!r}; known keys there: {known}")
        node = node[part]
    if not isinstance(node, dict):
        raise RecipeError(f"{path}: override --set {key}: {'.'.join(parts[:-1])} is not a mapping")
    leaf = parts[-1]
    # A missing leaf is allowed only inside free-form mappings (method params, data); the schema
    # then rejects it if the method does not know it. Elsewhere the key must already exist.
    free_form = parts[0] == "data" or (len(parts) >= 2 and parts[-2] in ("params", "inputs")) or resources
    stage_field = len(parts) == 3 and parts[0] == "stages" and leaf in StageSpec.model_fields
    recipe_field = len(parts) == 1 and leaf in Recipe.model_fields  # e.g. precision, left to its default
    if leaf not in node and not free_form and not stage_field and not recipe_field:
        raise RecipeError(f"{path}: override --set {key}: unknown key {leaf!r}; known keys there: {', '.join(node)}")
    node[leaf] = value


def _read_yaml_mapping(path: Path, what: str) -> dict:
    if path.suffix not in RECIPE_SUFFIXES:
        raise RecipeError(f"{path}: a {what} is a {'/'.join(RECIPE_SUFFIXES)} file; not reading it")
    if not path.is_file():
        raise RecipeError(f"{what} {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: malformed YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a {what} must be a YAML mapping, got {type(raw).__name__}")
    return raw


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``: mappings merge key by key, anything else in ``top`` replaces."""
    out = dict(base)
    for key, value in top.items():
        out[key] = deep_merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


def _with_includes(path: Path, trail: tuple[Path, ...] = ()) -> tuple[dict, list[Path]]:
    """The file's mapping merged over its includes (recursively), and every file read."""
    path = path.resolve()
    if path in trail:
        cycle = " -> ".join(p.name for p in (*trail[trail.index(path):], path))
        raise RecipeError(f"{trail[0]}: include cycle: {cycle}")
    raw = _read_yaml_mapping(path, "recipe file" if not trail else "included file")
    includes = raw.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise RecipeError(f"{path}: include must be a list of file paths, got {includes!r}")
    merged, files = {}, [path]
    for index, name in enumerate(includes):
        target = (path.parent / name)
        if not target.is_file():
            raise RecipeError(f"{path}: include[{index}]: {name!r} does not exist (looked for {target})")
        part, part_files = _with_includes(target, (*trail, path))
        merged = deep_merge(merged, part)
        files += [f for f in part_files if f not in files]
    return deep_merge(merged, raw), files


def recipe_files(path: Path) -> list[Path]:
    """The recipe file and every file it includes: what its digests are computed from."""
    return _with_includes(Path(path))[1]


def load_recipe(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    if path.suffix not in RECIPE_SUFFIXES:
        raise RecipeError(f"{path}: a recipe is a {'/'.join(RECIPE_SUFFIXES)} file; not reading it")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    raw, _ = _with_includes(path)
    for assignment in overrides:
        apply_override(raw, assignment, path)
    if not {"name", "stages"} & set(raw):  # not a recipe: do not list what the file holds
        raise RecipeError(f"{path} is not a paperdag recipe: it has neither a `name` nor a `stages` key")
    unknown = set(raw) - set(Recipe.model_fields)
    if unknown:
        raise RecipeError(f"{path}: unknown top-level key(s) {sorted(unknown)}; known keys: {_known_keys(Recipe)}")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise RecipeError(f"{path}: {_format_validation(e)}") from None
    _check_graph(recipe, path)
    return recipe


def _check_graph(recipe: Recipe, path: Path) -> None:
    for name, spec in recipe.stages.items():
        where = f"{path}: stages.{name}"
        kind = KINDS.get(spec.kind)
        if kind is None:
            raise RecipeError(f"{where}.kind: unknown stage kind {spec.kind!r}; known kinds: {', '.join(KINDS)}")
        try:
            method_cls = kind.registry.get(spec.method)
        except UnknownMethodError as e:
            raise RecipeError(f"{where}.method: {e}") from None
        if not kind.trains and (spec.model or spec.train_domain):
            raise RecipeError(f"{where}: `model`/`train_domain` only apply to training stages, not {spec.kind}")
        if spec.sampler is not None:
            _check_sampler(spec, where, path, name)
        if spec.kind == "corpus" and spec.params:
            raise RecipeError(f"{where}.params: a corpus stage takes its params from the recipe's top-level `data`")
        for role, ref in spec.inputs.items():
            if role not in kind.roles:
                raise RecipeError(f"{where}.inputs.{role}: unknown input role for {spec.kind}; known roles: {', '.join(kind.roles) or '(none)'}")
            refs = ref if isinstance(ref, list) else [ref]
            if isinstance(ref, list) and not kind.roles[role].many:
                raise RecipeError(f"{where}.inputs.{role}: takes one stage, got a list")
            for r in refs:
                if r not in recipe.stages:
                    raise RecipeError(f"{where}.inputs.{role}: names stage {r!r}, which does not exist; stages: {', '.join(recipe.stages)}")
                if recipe.stages[r].kind not in kind.roles[role].accepts:
                    raise RecipeError(
                        f"{where}.inputs.{role}: stage {r!r} is a {recipe.stages[r].kind} stage; "
                        f"{role} accepts {', '.join(kind.roles[role].accepts)}")
        if getattr(method_cls, "needs_teacher", False) and "teacher" not in spec.inputs:
            raise RecipeError(f"{where}.inputs: method {spec.method} distills from a teacher; add `teacher: <stage>`")
        if getattr(method_cls, "needs_calibration", False) and "tokens" not in spec.inputs:
            raise RecipeError(f"{where}.inputs: method {spec.method} calibrates on token data; add `tokens: <tokenize stage>`")
        for role, spec_role in kind.roles.items():
            if spec_role.required and role not in spec.inputs:
                raise RecipeError(f"{where}.inputs: missing required input {role!r} for a {spec.kind} stage")
        params = _with_recipe_defaults(recipe, spec, method_cls)
        try:
            method_cls.Params.model_validate(params)
        except ValidationError as e:
            prefix = "data" if spec.kind == "corpus" else f"stages.{name}.params"
            raise RecipeError(f"{path}: {_format_validation(e, prefix)} (method {spec.method})") from None
        if spec.kind == "select":
            _check_selector_inputs(spec, where, method_cls(method_cls.Params.model_validate(params)))
    for name, spec in recipe.stages.items():  # checks that read an input stage, once every stage is valid
        method_cls = KINDS[spec.kind].registry.get(spec.method)
        _check_quantized_input(recipe, spec, method_cls, f"{path}: stages.{name}")
        _check_block_length(recipe, spec, method_cls, f"{path}: stages.{name}")
        _check_growth_target(recipe, spec, method_cls, f"{path}: stages.{name}")
        _check_rank_fits(recipe, spec, method_cls, f"{path}: stages.{name}")
    order = topological_order(recipe, path)
    evaluates = [n for n in order if recipe.stages[n].kind == "evaluate"]
    if recipe.claims and not evaluates:
        raise RecipeError(f"{path}: claims need an evaluate stage to check them")
    evaluated = {s for n in evaluates for ref in recipe.stages[n].inputs.get("models", []) for s in ([ref] if isinstance(ref, str) else ref)}
    evaluated |= {"eft" for n in evaluates if "eft_large_base" in recipe.stages[n].inputs}
    # claims may also read the stage metrics of anything upstream of an evaluate stage (e.g. a
    # select stage's target share), which the evaluate stage collects from their artifacts
    checkable = evaluated | {s for n in evaluates for s in _upstream(recipe, n)}
    # and the scaling laws an evaluate stage fits (``params.fits``), by the fit's name
    checkable |= {fit.get("name") for n in evaluates for fit in recipe.stages[n].params.get("fits", [])
                  if isinstance(fit, dict)}
    # and the rank agreements between early checkpoints and final models, the correlations
    # between two metrics across runs and the stability groups, by name
    for n in evaluates:
        checkable |= _check_compared_runs(recipe, n, path)
    for claim in recipe.claims:
        control = claim.effective_control()
        for stage in sorted(claim_stages(claim)):
            if stage not in checkable:
                baselines = {v.split(".", 1)[0] for v in control.replace.values()} if control else set()
                role = "its control's baseline" if stage in baselines else "it"
                raise RecipeError(
                    f"{path}: claims[{claim.name}]: {role} refers to stage {stage!r}, which is neither evaluated "
                    f"nor upstream of an evaluate stage; checkable stages: {', '.join(sorted(checkable))}")
    expand_seeds(recipe, path)  # a seed-dependent stage in a one-stage role is an error now, not at run time


def _check_compared_runs(recipe: Recipe, name: str, path) -> set[str]:
    """An evaluate stage's ``rank_agreements``, ``correlations`` and ``stability`` groups compare
    fixed runs among its evaluated models, and a rank agreement's runs keep a checkpoint at its fraction; checked
    before any stage trains. Returns their names."""
    spec = recipe.stages[name]
    models = spec.inputs.get("models", [])
    models = [models] if isinstance(models, str) else models
    _check_evaluated_checkpoints(recipe, name, models, path)
    entries = [(key, i, cls.model_validate(entry))  # the evaluator's params validated them already
               for key, cls in (("rank_agreements", RankAgreementSpec), ("correlations", MetricCorrelationSpec),
                                ("stability", StabilitySpec))
               for i, entry in enumerate(spec.params.get(key, []))]
    dependent = seed_dependent(recipe, path) if recipe.seeds and entries else set()
    for key, i, entry in entries:
        where = f"{path}: stages.{name}.params.{key}[{i}]"
        for run in entry.runs():
            if run not in models:
                raise RecipeError(f"{where}.models: {run!r} is not among this stage's inputs.models "
                                  f"({', '.join(models) or 'none'})")
            if run in dependent:
                raise RecipeError(f"{where}.models: {run!r} depends on the recipe's seeds, so it is one run per seed; "
                                  f"{key} compare fixed runs: pin stages.{run}.params.seed")
            if key != "rank_agreements":
                continue
            kept = recipe.stages[run].params.get("keep_checkpoints") or []
            if not any(round(100 * k) == round(100 * entry.at) for k in kept if isinstance(k, (int, float))):
                raise RecipeError(f"{where}: ranks {run!r} at {entry.at} of training, but stage {run} keeps checkpoints "
                                  f"at {kept or 'none'}; add {entry.at} to stages.{run}.params.keep_checkpoints")
    return {entry.name for _, _, entry in entries}


def _quantized_by(recipe: Recipe, name: str) -> str:
    """Why stage ``name``'s model is already on a low-bit grid ("" when it is not): a quantize stage,
    or a training stage whose method trains onto one (QAT, L4Q, BiPFT...). A fine-tune that does not
    quantize leaves the grid (its saved model is no longer marked quantized), so it is not one."""
    spec = recipe.stages[name]
    if spec.kind == "quantize":
        return f"stage {name!r} is a quantize stage"
    if KINDS[spec.kind].trains and getattr(KINDS[spec.kind].registry.get(spec.method), "quantizes_weights", False):
        return f"stage {name!r} trains its weights onto a low-bit grid (method {spec.method})"
    return ""


def _check_quantized_input(recipe: Recipe, spec: StageSpec, method_cls, where: str) -> None:
    """A prune stage, or a training method that quantizes, given an already quantized model: refused
    here, before its upstream stages train, rather than when the stage loads the model."""
    if spec.kind == "prune":
        roles = ("model",)
    elif KINDS[spec.kind].trains and getattr(method_cls, "quantizes_weights", False):
        roles = ("model", "student")
    else:
        return
    for role in roles:
        ref = spec.inputs.get(role)
        why = _quantized_by(recipe, ref) if isinstance(ref, str) else ""
        if not why:
            continue
        if spec.kind == "prune":
            raise RecipeError(f"{where}.inputs.{role}: {why}, so its model is already quantized; prune the "
                              "full-precision model, then quantize the pruned one")
        raise RecipeError(f"{where}.inputs.{role}: method {spec.method!r} trains the weights onto a low-bit grid, "
                          f"but {why}; give it the full-precision model, or fine-tune this one with a method "
                          "that does not quantize (e.g. lora)")


FIM_CONTROL_TOKENS = 3  # <PRE>, <SUF>, <MID>: components/train/fim.py shortens each block by three


def _check_block_length(recipe: Recipe, spec: StageSpec, method_cls, where: str) -> None:
    """FIM cuts each block into prefix, middle and suffix around its three control tokens, so a block
    must leave room for a middle and some context beside them; checked against the ``tokens``
    input's ``seq_len`` before anything trains."""
    if not (KINDS[spec.kind].trains and issubclass(method_cls, FillInTheMiddle)):
        return
    ref = spec.inputs.get("tokens")
    tokens = recipe.stages.get(ref) if isinstance(ref, str) else None
    if tokens is None or tokens.kind != "tokenize":
        return
    tokenizer_cls = KINDS["tokenize"].registry.get(tokens.method)
    seq_len = getattr(tokenizer_cls.Params.model_validate(_with_recipe_defaults(recipe, tokens, tokenizer_cls)),
                      "seq_len", None)
    shortest = FIM_CONTROL_TOKENS + 2  # at least one middle token and one of context
    if seq_len is not None and seq_len < shortest:
        raise RecipeError(f"{where}: method {spec.method!r} rearranges each block around {FIM_CONTROL_TOKENS} control "
                          f"tokens and needs blocks of at least {shortest} tokens, but its tokens input {ref!r} packs "
                          f"blocks of stages.{ref}.params.seq_len={seq_len}")


def _model_preset(recipe: Recipe, ref: str, seen: frozenset[str] = frozenset()) -> str | None:
    """The preset whose shape stage ``ref``'s model has, when the graph shows it: a pretrain or
    distill stage that starts from a preset, followed back through prune stages and training
    stages that keep their input's shape; None when unknown (an imported model, a merge, a method
    that may reshape the model inside its process, e.g. growth)."""
    spec = recipe.stages.get(ref)
    if spec is None or ref in seen:  # a cycle is refused later, by name
        return None
    if spec.kind == "prune":
        parent = spec.inputs.get("model")
        return _model_preset(recipe, parent, seen | {ref}) if isinstance(parent, str) else None
    if not KINDS[spec.kind].trains:
        return None
    method_cls = KINDS[spec.kind].registry.get(spec.method)
    if getattr(method_cls, "one_process_only", None) or "grow_to" in method_cls.Params.model_fields:
        return None
    return _starting_preset(recipe, spec, seen | {ref})


def _starting_preset(recipe: Recipe, spec: StageSpec, seen: frozenset[str] = frozenset()) -> str | None:
    """The preset whose shape a training stage starts from: its model (or student) input's, or its
    own when a pretrain or distill stage starts fresh; None when unknown."""
    parent = spec.inputs.get("model", spec.inputs.get("student"))
    if isinstance(parent, str):
        return _model_preset(recipe, parent, seen)
    preset = (spec.model or recipe.model) if parent is None and spec.kind in ("pretrain", "distill") else None
    return preset if preset in PRESETS else None


def _preset_sizes(preset: str) -> LlamaSizes:
    sizes = {key: PRESETS[preset][key] for key in SIZE_KEYS}
    return LlamaSizes(**sizes, head_dim=sizes["hidden_size"] // sizes["num_attention_heads"])


def _check_rank_fits(recipe: Recipe, spec: StageSpec, method_cls, where: str) -> None:
    """A low-rank method's ``params.rank`` above what the model's block Linears allow, checked
    against the preset before anything trains (the methods check it again on the real layers).
    In a Llama block every Linear has the residual width on one side and a width at least as
    large on the other, so each allows ``min(hidden, attention, mlp)``, over ``phm_dim`` for
    Compacter's Kronecker factors."""
    if not (KINDS[spec.kind].trains and "rank" in method_cls.Params.model_fields):
        return
    preset = _starting_preset(recipe, spec)
    if preset is None:
        return
    params = method_cls.Params.model_validate(_with_recipe_defaults(recipe, spec, method_cls))
    per = getattr(params, "phm_dim", 1)
    width = min(_preset_sizes(preset).widths.values()) // per
    if params.rank > width:
        bound = "min(in, out)" + (f" / phm_dim={per}" if per > 1 else "")
        raise RecipeError(f"{where}.params.rank: rank={params.rank} is larger than the block Linears of preset "
                          f"{preset!r} allow ({bound} = {width}); a rank above a layer's width adds parameters, "
                          "not rank")


def _check_growth_target(recipe: Recipe, spec: StageSpec, method_cls, where: str) -> None:
    """Growth (bert2BERT) into a ``grow_to`` preset the input cannot grow into (smaller in a size,
    another head size, a residual width that is not a multiple): refused here when the input model
    is pretrained from a preset in this recipe, before it trains, by the check the method runs
    again when the stage starts (its input may be any model)."""
    if not (KINDS[spec.kind].trains and "grow_to" in method_cls.Params.model_fields):
        return
    ref = spec.inputs.get("model")
    preset = _model_preset(recipe, ref) if isinstance(ref, str) else None
    if preset is None:
        return
    target = method_cls.Params.model_validate(_with_recipe_defaults(recipe, spec, method_cls)).grow_to
    try:
        check_sizes(_preset_sizes(preset), _preset_sizes(target), "random", "growth")
    except ValueError as error:
        raise RecipeError(f"{where}.params.grow_to={target!r}: {error} (stage {ref!r}'s model has the shape of "
                          f"preset {preset!r})") from None


def _check_evaluated_checkpoints(recipe: Recipe, name: str, models: list[str], path) -> None:
    """``checkpoints: true`` scores the checkpoints the evaluated models' training stages kept; with
    none kept it would silently score final models only."""
    if not recipe.stages[name].params.get("checkpoints"):
        return
    keeping = [m for m in models if m in recipe.stages and recipe.stages[m].params.get("keep_checkpoints")]
    if not keeping:
        raise RecipeError(f"{path}: stages.{name}.params.checkpoints: true scores the checkpoints that its models' "
                          f"training stages keep, but none of {', '.join(models) or 'its models'} sets "
                          "params.keep_checkpoints; add e.g. keep_checkpoints: [0.3] to a training stage it evaluates")


def _check_selector_inputs(spec: StageSpec, where: str, selector) -> None:
    """What a selector needs (target set, tokenizer, reference models), checked before any stage
    runs rather than after its upstream training stages have."""
    params = selector.params
    refs = spec.inputs.get("reference", [])
    n_refs = len(refs) if isinstance(refs, list) else 1
    has_target = getattr(params, "target_domain", None) is not None or "target" in spec.inputs
    if selector.needs_target and not has_target:
        raise RecipeError(f"{where}.params: method {spec.method} selects toward a target set; set target_domain "
                          f"or add a `target` input")
    if not selector.needs_target and has_target:
        raise RecipeError(f"{where}: method {spec.method} does not use a target set; remove target_domain / `target`")
    if n_refs < selector.min_references:
        raise RecipeError(f"{where}.inputs: method {spec.method} needs at least {selector.min_references} "
                          f"`reference` model(s), got {n_refs}")
    if (selector.needs_tokenizer or getattr(params, "budget_tokens", None)) and "tokenizer" not in spec.inputs:
        need = "budget_tokens" if getattr(params, "budget_tokens", None) else f"method {spec.method}"
        raise RecipeError(f"{where}.inputs: {need} needs a `tokenizer` input (a tokenize stage) to count tokens")


def _upstream(recipe: Recipe, name: str) -> set[str]:
    """Every stage that ``name`` depends on, directly or not."""
    out: set[str] = set()
    frontier = [name]
    while frontier:
        spec = recipe.stages[frontier.pop()]
        for ref in spec.inputs.values():
            for stage in [ref] if isinstance(ref, str) else ref:
                if stage not in out:
                    out.add(stage)
                    frontier.append(stage)
    return out


def _check_sampler(spec: StageSpec, where: str, path: Path, name: str) -> None:
    if not KINDS[spec.kind].trains:
        raise RecipeError(f"{where}.sampler: a sampler only applies to training stages, not {spec.kind}")
    try:
        sampler_cls = SAMPLERS.get(spec.sampler.method)
    except UnknownMethodError as e:
        raise RecipeError(f"{where}.sampler.method: {e}") from None
    try:
        sampler_cls.Params.model_validate(spec.sampler.params)
    except ValidationError as e:
        raise RecipeError(f"{path}: {_format_validation(e, f'stages.{name}.sampler.params')} "
                          f"(sampler {spec.sampler.method})") from None
    if sampler_cls.needs_skills and spec.train_domain:
        raise RecipeError(f"{where}.sampler: sampler {spec.sampler.method} mixes domains, so it cannot be combined "
                          f"with train_domain {spec.train_domain!r}")


def _with_recipe_defaults(recipe: Recipe, spec: StageSpec, method_cls) -> dict:
    params = dict(recipe.data if spec.kind == "corpus" else spec.params)
    for key in RECIPE_DEFAULTS:
        if key in method_cls.Params.model_fields and key not in params:
            params[key] = getattr(recipe, key)
    return params


def topological_order(recipe: Recipe, path: Path) -> list[str]:
    deps = {n: sorted({r for ref in s.inputs.values() for r in ([ref] if isinstance(ref, str) else ref)})
            for n, s in recipe.stages.items()}
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(n: str, trail: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cycle = trail[trail.index(n):] + [n]
            raise RecipeError(f"{path}: the stage graph has a cycle: {' -> '.join(cycle)}")
        state[n] = 1
        for d in deps[n]:
            visit(d, trail + [n])
        state[n] = 2
        order.append(n)

    for n in recipe.stages:  # recipe order breaks ties, so the order is stable
        visit(n, [])
    return order


def seed_dependent(recipe: Recipe, path: Path) -> set[str]:
    """Stages that change with the seed: a method taking a ``seed`` the stage does not fix (the
    corpus stays fixed: seeds vary selection, training and calibration, not the data), and
    every stage reading one, except evaluate stages, which gather all seeds."""
    dependent: set[str] = set()
    for name in topological_order(recipe, path):
        spec = recipe.stages[name]
        if spec.kind == "evaluate":
            continue
        fields = KINDS[spec.kind].registry.get(spec.method).Params.model_fields
        own = spec.kind != "corpus" and "seed" in fields and "seed" not in spec.params
        reads = {r for ref in spec.inputs.values() for r in ([ref] if isinstance(ref, str) else ref)}
        if own or reads & dependent:
            dependent.add(name)
    return dependent


def seed_copy(name: str, seed: int) -> str:
    return f"{name}_s{seed}"


def expand_seeds(recipe: Recipe, path: Path) -> tuple[Recipe, SeedPlan | None]:
    """With ``seeds``, every seed-dependent stage becomes one copy per seed (``<stage>_s<seed>``,
    its own seed set), reading its upstream's copy of the same seed; an evaluate stage's
    ``models`` list takes every copy. Without seeds the recipe is returned as it is."""
    if not recipe.seeds:
        return recipe, None
    dependent = seed_dependent(recipe, path)
    if not dependent:
        raise RecipeError(f"{path}: seeds: no stage depends on the seed (every method's seed is fixed or absent), so "
                          "every seed would give the same numbers; drop `seeds` or unpin a stage's seed")
    copies = {name: [seed_copy(name, s) for s in recipe.seeds] for name in dependent}
    clash = sorted({c for cs in copies.values() for c in cs} & set(recipe.stages))
    if clash:
        raise RecipeError(f"{path}: seeds: stage name(s) {clash} collide with the per-seed copies of other stages")
    stages: dict[str, StageSpec] = {}
    for name, spec in recipe.stages.items():
        if name not in dependent:
            if spec.kind == "evaluate":
                spec = spec.model_copy(update={"inputs": _evaluate_inputs(spec, copies, f"{path}: stages.{name}")})
            stages[name] = spec
            continue
        fields = KINDS[spec.kind].registry.get(spec.method).Params.model_fields
        for i, seed in enumerate(recipe.seeds):
            inputs = {role: ([copies[r][i] if r in copies else r for r in ref] if isinstance(ref, list)
                             else copies.get(ref, [ref] * len(recipe.seeds))[i]) for role, ref in spec.inputs.items()}
            params = {**spec.params, "seed": seed} if "seed" in fields and "seed" not in spec.params else spec.params
            stages[copies[name][i]] = spec.model_copy(update={"inputs": inputs, "params": params})
    return recipe.model_copy(update={"stages": stages}), SeedPlan(list(recipe.seeds), copies)


def _evaluate_inputs(spec: StageSpec, copies: dict[str, list[str]], where: str) -> dict:
    inputs = {}
    for role, ref in spec.inputs.items():
        if isinstance(ref, list):
            inputs[role] = [c for r in ref for c in copies.get(r, [r])]
        elif ref in copies:
            raise RecipeError(f"{where}.inputs.{role}: stage {ref!r} depends on the seed, but {role} takes one stage; "
                              f"fix its seed (params.seed) or the seed of what it reads")
        else:
            inputs[role] = ref
    return inputs


def compile_recipe(recipe: Recipe, path: Path) -> RecipePlan:
    """Resolve params and compute every stage's digest, in topological order (seeds expanded)."""
    recipe, seed_plan = expand_seeds(recipe, path)
    plans: dict[str, StagePlan] = {}
    for name in topological_order(recipe, path):
        spec = recipe.stages[name]
        kind = KINDS[spec.kind]
        method_cls = kind.registry.get(spec.method)
        params = method_cls.Params.model_validate(_with_recipe_defaults(recipe, spec, method_cls)).model_dump(mode="json")
        inputs = {role: ([ref] if isinstance(ref, str) else list(ref)) for role, ref in sorted(spec.inputs.items())}
        options: dict[str, Any] = {}
        if kind.trains:
            options["model"] = spec.model or (recipe.model if spec.kind in ("pretrain", "distill") else None)
            _check_objective(options["model"], spec.method, f"{path}: stages.{name}")
            options["train_domain"] = spec.train_domain
            if spec.sampler is not None:  # only when set, so stages without one keep their digests
                sampler_cls = SAMPLERS.get(spec.sampler.method)
                options["sampler"] = {"method": spec.sampler.method, "params": sampler_cls.Params.model_validate(
                    spec.sampler.params).model_dump(mode="json")}
        if spec.resources.ranks > 1:
            options["ranks"] = _checked_ranks(spec, method_cls, params, f"{path}: stages.{name}.resources.ranks")
        if spec.kind == "evaluate":  # the claims it checks are part of what it produces
            options["claims"] = [c.model_dump(mode="json") for c in recipe.claims]
            if seed_plan is not None:
                options["seeds"] = {"seeds": seed_plan.seeds, "expanded": seed_plan.expanded}
        files = source_closure((kind.task_module, method_cls.__module__))
        version = code_version(files)
        input_digests = {role: [plans[r].digest for r in refs] for role, refs in inputs.items()}
        local_files = _local_input_files(method_cls(method_cls.Params.model_validate(params)), options)
        try:
            file_digests = hash_inputs(local_files)
        except InputFileError as e:  # the message starts with the label: data.sources[0].path, model
            raise RecipeError(f"{path}: {'' if spec.kind == 'corpus' else f'stages.{name}.'}{e}") from None
        digest = compute_digest(spec.kind, spec.method, {"params": params, "options": options}, input_digests,
                                version, file_digests)
        plans[name] = StagePlan(name, spec.kind, spec.method, params, options, inputs, digest, files, version,
                                input_digests, local_files, file_digests, spec.resources.model_dump(exclude_none=True))
    return RecipePlan(recipe.name, Path(path), plans, [c.model_dump(mode="json") for c in recipe.claims],
                      recipe.paper.model_dump(), seed_plan.expanded if seed_plan else {})


def _checked_ranks(spec: StageSpec, method_cls, params: dict, where: str) -> int:
    ranks = spec.resources.ranks
    if not KINDS[spec.kind].trains:
        raise RecipeError(f"{where}: {ranks} ranks, but a {spec.kind} stage runs in one process; only "
                          "pretrain, finetune and distill stages train on several ranks")
    if params["batch_size"] % ranks:
        raise RecipeError(f"{where}: {ranks} ranks do not split params.batch_size={params['batch_size']}; "
                          "choose a batch_size divisible by the rank count")
    if not method_cls.shards_across_ranks:
        raise RecipeError(f"{where}: method {spec.method!r} keeps per-block state that each rank would update "
                          "for its own blocks only; train it on one rank")
    # an instance: whether a method needs one process may depend on its params (FIM with HLP's head)
    reason = getattr(method_cls(method_cls.Params.model_validate(params)), "one_process_only", "")
    if reason:
        raise RecipeError(f"{where}: method {spec.method!r} {reason}; train it on one rank")
    if 0 < spec.resources.gpus < ranks:
        raise RecipeError(f"{where}: {ranks} ranks need one GPU each, but resources.gpus is {spec.resources.gpus}")
    return ranks


def _check_objective(model: str | None, method: str, where: str) -> None:
    """A preset model and its method agree on the objective (``mlm.objective_mismatch``); a model
    loaded from a path or an input artifact is checked when the stage runs."""
    if model not in PRESETS and model not in ENCODER_PRESETS:
        return
    problem = objective_mismatch(model in ENCODER_PRESETS, method)
    if problem:
        raise RecipeError(f"{where}: model {model!r}: {problem}")


def _local_input_files(method, options: dict) -> dict[str, list[Path]]:
    """The local files a stage reads: its method's own (data files) and a training stage's
    starting model when that is a local checkpoint directory rather than a preset."""
    files = dict(method.input_files())
    model = options.get("model")
    if model and model not in PRESETS and model not in ENCODER_PRESETS and Path(model).is_dir():
        files["model"] = [Path(model)]
    return files


def load_plan(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Recipe, RecipePlan]:
    recipe = load_recipe(path, overrides)
    return recipe, compile_recipe(recipe, path)
