"""Taxonomies: the labels an annotator chooses between, loaded from YAML.

A taxonomy file names its labels, describes each one for the annotator model and says
when the service abstains. ``load_taxonomy`` and ``parse_taxonomy`` turn YAML into a
frozen ``Taxonomy``. Every problem in a file is reported at once, as one
``TaxonomyError`` whose problems carry the field's location and line:

    taxonomy/x.yaml:14: labels[3].name: duplicate label 'sports' (first defined at line 12)

Labels may name a ``parent``. Labels that are no one's parent (``leaves()``) are the
options the model scores; parents only group them.

Size: one module of about 440 lines on purpose. The models (taxonomy, label, abstention,
shortlist, demonstrations) and the YAML loader that maps every pydantic error back to its
line are one contract; split, a field's validation and its error location would drift apart.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import ErrorDetails

from service.errors import NotFound, TaxonomyError
from service.vocabulary import LongDocuments

__all__ = ["NONE_LABEL", "Abstention", "Label", "Taxonomy", "advice", "format_loc", "load_taxonomy", "parse_taxonomy"]

NONE_LABEL = "none_of_these"
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_CROSS_CHECKED = "taxonomy_cross_checked"  # context flag: parse_taxonomy runs the cross checks itself

MAX_PROBLEMS = 50  # a file's problems reported at once; more say how many (a hostile file can have one per line)
MAX_LISTED = 20  # names a message lists (unknown parents, a cycle, labels without examples)


class _Refused(Exception):
    """YAML the loader refuses to compose, at a line."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line, self.message = line, message


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 numbers (``1:20`` is 80 there, a string in YAML 1.2).

    Reading one costs time quadratic in its digits (320 kB took 7 s, measured), so ``x: 1:1:1:...`` in a
    request body could hold a worker for an hour. Not libyaml's CSafeLoader: its syntax errors point at less
    helpful lines and columns.
    """

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        """A node, refusing anchors and aliases (``&a``, ``*a``, ``<<: *a``): they can expand a small file a
        thousandfold."""
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _Refused(event.start_mark.line + 1, "YAML anchors and aliases (&name, *name) are not allowed in "
                                                      "taxonomies; write each value out")
        return super().compose_node(parent, index)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """An int, refusing an explicitly tagged base-60 one (``!!int 1:1:1``)."""
        return super().construct_yaml_int(_not_base_60(node))

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        """A float, refusing an explicitly tagged base-60 one."""
        return super().construct_yaml_float(_not_base_60(node))


def _not_base_60(node: yaml.ScalarNode) -> yaml.ScalarNode:
    """The node, unless it is a base-60 number (``1:20``), which is refused at its line."""
    if ":" in str(node.value):
        raise yaml.constructor.ConstructorError(None, None, "base-60 numbers (1:20) are not supported; quote the value",
                                                node.start_mark)
    return node


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if not tag.endswith((":int", ":float"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(
    r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)
Loc = tuple[str | int, ...]
Problem = tuple[str, int | None, str]
LineOf = Callable[[Loc], int | None]


def _not_blank(value: str) -> str:
    """Strip surrounding whitespace (so '>' and '>-' blocks are the same text); refuse blanks."""
    if not value.strip():
        raise ValueError("must not be empty")
    return value.strip()


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Label(_Model):
    """One option: its name, what it means, examples, and optionally a parent."""

    name: str = Field(description="the label as the model outputs it")
    description: str = Field(description="what belongs in this label, shown to the annotator model")
    examples: list[str] = Field(default=[], description="texts that belong in this label")
    counter_examples: list[str] = Field(default=[], description="similar texts that do not belong")
    parent: str | None = Field(default=None, description="name of the label that groups this one")

    @field_validator("examples", "counter_examples", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not 1 <= len(name) <= 64:
            raise ValueError(f"label names must be 1-64 characters long; this one has {len(name)}")
        if name != name.strip() or "\n" in name or "\r" in name:
            raise ValueError(f"label name {name!r} has surrounding whitespace or a line break; "
                             "remove it")
        if name == NONE_LABEL:
            raise ValueError(f"'{NONE_LABEL}' is reserved for the abstention option "
                             "(abstention.allow_none: true); rename this label")
        return name

    _check_description = field_validator("description")(_not_blank)


class Abstention(_Model):
    """When the service declines to pick a label."""

    threshold: float | None = Field(default=None, ge=0.0, le=1.0, strict=True)
    allow_none: bool = Field(default=False, strict=True)
    ambiguity_margin: float = Field(default=0.0, ge=0.0, lt=1.0, strict=True)


class Shortlist(_Model):
    """Score each document on its K most plausible leaves only (``service.labelling.shortlist``): large taxonomies."""

    strategy: Literal["retrieve", "top_down"] = Field(
        default="retrieve", description="retrieve: the K leaves most similar to the document (embeddings, labelled "
                                        "neighbours); top_down: the LLM picks among parents, then their children")
    k: int | Literal["auto"] = Field(default="auto", description="leaves per document, or 'auto': the smallest K "
                                                                  "whose recall on labelled texts reaches 'recall'")
    recall: float = Field(default=0.98, gt=0.0, le=1.0, description="the recall 'auto' calibrates K for")
    max_k: int = Field(default=10, ge=2, description="the largest K 'auto' may choose (the recall it reaches there "
                                                    "is recorded when the target needs more)")

    @field_validator("k")
    @classmethod
    def _at_least_two(cls, k: int | str) -> int | str:
        if isinstance(k, int) and k < 2:
            raise ValueError("a shortlist needs at least 2 labels (k >= 2)")
        return k


class Demonstrations(_Model):
    """Few-shot demonstrations chosen per document (``service.labelling.demonstrations``) for ``classify_fewshot``."""

    select: Literal["similar", "mmr", "label_diverse"] = Field(
        default="similar", description="similar: the most similar labelled texts; mmr: similar and unlike each "
                                       "other; label_diverse: the most similar text of each label")
    k: int = Field(default=4, ge=1, le=16, description="demonstrations per document")
    max_chars: int = Field(default=2000, ge=100, le=16000, description="characters all demonstrations of a document "
                                                                       "share (each is cut to its share)")


class Taxonomy(_Model):
    """A validated taxonomy; build it with ``parse_taxonomy`` or ``load_taxonomy``."""

    name: str = Field(description="the taxonomy's id: lowercase letters, digits, '_' or '-'")
    version: str = Field(default="1", description="a human version string")
    description: str = Field(description="one sentence on what is being labelled")
    instruction: str = Field(description="the instruction shown to the annotator model")
    multi_label: bool = Field(default=False, strict=True)
    candidate_mass: float = Field(default=0.9, gt=0.0, le=1.0, strict=True)
    abstention: Abstention = Abstention()
    model: str | None = Field(default=None, description="default model for jobs on this taxonomy, "
                                                        "a name from the models config")
    long_documents: LongDocuments = Field(
        default="truncate", description="documents longer than the model's input (ANNOTATE_MODEL_INPUT_CHARS): "
                                        "'truncate' labels their beginning and flags them; 'reject' refuses the job; "
                                        "'head_tail' labels their first two thirds and last third of that input; "
                                        "'chunk' labels overlapping windows of the whole text and combines them "
                                        "(service.labelling.long_documents)")
    shortlist: Shortlist | None = Field(default=None, description="score each document on a shortlist of its most "
                                                                  "plausible leaves (large taxonomies)")
    demonstrations: Demonstrations | None = Field(
        default=None, description="give each document its own few-shot demonstrations from the examples and the "
                                  "texts people labelled (classify_fewshot, the embedded engine)")
    labels: list[Label] = Field(description="the labels, each with at least name and description")

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise ValueError(f"invalid name {name!r}: use 1-64 characters from a-z, 0-9, '_' "
                             "and '-', starting with a letter or digit")
        return name

    _check_text = field_validator("version", "description", "instruction")(_not_blank)

    @field_validator("abstention", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _check_labels(self, info: ValidationInfo) -> Taxonomy:
        if info.context and info.context.get(_CROSS_CHECKED):
            return self
        entries = [(label.name, label.parent) for label in self.labels]
        problems = _cross_problems(entries, self.multi_label, lambda loc: None)
        if problems:
            raise ValueError("; ".join(f"{format_loc(loc)}: {msg}" for loc, msg in problems))
        return self

    @model_validator(mode="after")
    def _check_demonstrations(self) -> Taxonomy:
        if self.demonstrations is not None and self.multi_label:
            raise ValueError("demonstrations: per-document demonstrations cover single-label taxonomies")
        if self.demonstrations is not None and self.shortlist is not None:
            raise ValueError("demonstrations: per-document demonstrations cover taxonomies scored whole, "
                             "not shortlisted ones")
        return self

    def text_chars(self) -> int:
        """Characters of its free text (instruction, descriptions, examples): what a prompt would carry."""
        return len(self.description) + len(self.instruction) + sum(
            len(label.description) + sum(map(len, label.examples)) + sum(map(len, label.counter_examples))
            for label in self.labels)

    def leaves(self) -> list[Label]:
        """Labels that are no one's parent, in file order: the options the model scores."""
        parents = {label.parent for label in self.labels}
        return [label for label in self.labels if label.name not in parents]

    def label_names(self) -> list[str]:
        """Names of ``leaves()``."""
        return [label.name for label in self.leaves()]

    def ancestors(self, name: str) -> list[str]:
        """The parent chain of label ``name``, nearest first."""
        parent_of = {label.name: label.parent for label in self.labels}
        if name not in parent_of:
            raise NotFound(f"unknown label {name!r} in taxonomy '{self.name}'; "
                           f"labels: {', '.join(parent_of)}")
        chain: list[str] = []
        while (parent := parent_of[name]) is not None:
            chain.append(parent)
            name = parent
        return chain

    @property
    def selection_threshold(self) -> float:
        """abstention.threshold if set, else 0.5 for multi-label and 0.0 for single-label."""
        threshold = self.abstention.threshold
        return threshold if threshold is not None else (0.5 if self.multi_label else 0.0)

    def content_hash(self) -> str:
        """First 12 hex chars of sha256 over canonical JSON: changes only with meaning."""
        unset = {name for name in ("shortlist", "demonstrations") if getattr(self, name) is None}  # older hashes stay
        canonical = json.dumps(self.model_dump(exclude=unset), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


MIN_EXAMPLES = 2  # per label, below which ``advice`` speaks up


def advice(taxonomy: Taxonomy) -> list[str]:
    """What would make a valid taxonomy label better: labels with fewer than ``MIN_EXAMPLES`` examples. Measured on the
    development data, the default job read SMS / Rotten Tomatoes / TREC at 95.0 / 68.7 / 72.3% with 2-3 examples a label
    and at 77.3 / 39.3 / 49.3% with the same taxonomies less their examples (docs/taxonomy.md)."""
    few = [label.name for label in taxonomy.leaves() if len(label.examples) < MIN_EXAMPLES]
    if not few:
        return []
    return [f"{len(few):,} of {len(taxonomy.leaves()):,} labels have fewer than {MIN_EXAMPLES} examples ({_listed(few)}): the "
            "default job reads documents against each label's examples, and measured far less accurately without "
            "them (below the majority class on two of three datasets); add 2-4 short, realistic examples a label "
            "(docs/taxonomy.md, 'Write examples')"]


def load_taxonomy(path: str | Path) -> Taxonomy:
    """Read a UTF-8 YAML file and validate it; problems name the file as their source."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise TaxonomyError(source, [("", None, f"cannot read file: {exc.strerror}")]) from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        message = f"not valid UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        raise TaxonomyError(source, [("", line, message)]) from exc
    return parse_taxonomy(text, source=source)


def parse_taxonomy(text: str, *, source: str = "<taxonomy>") -> Taxonomy:
    """Validate YAML text as a taxonomy, reporting every problem at once."""
    if not isinstance(text, str):
        raise TypeError(f"parse_taxonomy takes str, got {type(text).__name__}; decode it first")
    root, data, problems = _read_yaml(text, source)
    line_of = partial(yaml_line, root)
    taxonomy = None
    try:
        taxonomy = Taxonomy.model_validate(data, context={_CROSS_CHECKED: True})
    except ValidationError as exc:
        problems += [_pydantic_problem(err, line_of) for err in exc.errors(include_url=False)]
    if isinstance(labels := data.get("labels"), list):  # cross checks run beside pydantic's
        entries = [(_text_at(item, "name"), _text_at(item, "parent")) for item in labels]
        cross = _cross_problems(entries, data.get("multi_label") is True, line_of)
        problems += [(format_loc(loc), line_of(loc), msg) for loc, msg in cross]
    if problems:
        problems = sorted(problems, key=lambda p: (p[1] is None, p[1] or 0))
        more: list[Problem] = [("", None, f"and {len(problems) - MAX_PROBLEMS:,} more problems; fix these first")
                               ] if len(problems) > MAX_PROBLEMS else []
        raise TaxonomyError(source, problems[:MAX_PROBLEMS] + more)
    assert taxonomy is not None  # it validated, or pydantic's problems were raised above
    return taxonomy


def _read_yaml(text: str, source: str) -> tuple[yaml.Node, dict, list[Problem]]:
    """Parse once into nodes (for lines) and data; syntax and shape errors raise at once."""
    try:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
            problems = _duplicate_keys(root, ()) if root is not None else []
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        where = f" (column {mark.column + 1})" if mark else ""
        problem = exc.problem or "invalid YAML"
        problem = f"{exc.context}, {problem}" if problem.startswith("but") else problem
        message = (f"YAML syntax error: {problem}{where}; check the indentation, and quote "
                   "text that contains ': ' or starts with a special character")
        raise TaxonomyError(source, [("", line, message)]) from exc
    except _Refused as exc:
        raise TaxonomyError(source, [("", exc.line, exc.message)]) from exc
    except RecursionError as exc:
        raise TaxonomyError(source, [("", None, "YAML nested too deeply; a taxonomy is a mapping of lists of "
                                      "mappings")]) from exc
    except ValueError as exc:  # an integer of more digits than Python reads (4,300)
        raise TaxonomyError(source, [("", None, f"a value cannot be read: {exc}; quote it if it is text")]) from exc
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        message = f"character #x{exc.character:04x} is not allowed in YAML; remove it"
        raise TaxonomyError(source, [("", line, message)]) from exc
    keys = ", ".join(n for n, f in Taxonomy.model_fields.items() if f.is_required())
    if root is None:
        raise TaxonomyError(source, [("", None, f"the file is empty; a taxonomy needs the keys {keys}")])
    if not isinstance(data, dict):
        message = f"the top level must be a mapping with the keys {keys}; found {_describe(data)}"
        raise TaxonomyError(source, [("", root.start_mark.line + 1, message)])
    return root, data, problems


def _duplicate_keys(node: yaml.Node, loc: Loc) -> list[Problem]:
    """YAML lets a later key silently replace an earlier one; report it instead."""
    problems: list[Problem] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key, value in node.value:
            name, line = str(key.value), key.start_mark.line + 1
            if name in first:
                problems.append((format_loc(loc + (name,)), line,
                                 f"duplicate key '{name}' (first at line {first[name]}); keep one"))
            first.setdefault(name, line)
            problems += _duplicate_keys(value, loc + (name,))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _duplicate_keys(item, loc + (i,))
    return problems


def yaml_line(root: yaml.Node, loc: Loc) -> int | None:
    """1-based line of the key or item at ``loc``, or of the nearest enclosing node."""
    node, line = root, root.start_mark.line
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if str(k.value) == str(part)]
            if not match:
                break
            key, node = match[-1]  # the last duplicate is the one that counts
            line = key.start_mark.line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line
        else:
            break
    return line + 1


def format_loc(loc: Loc) -> str:
    """('labels', 3, 'name') -> 'labels[3].name'."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).removeprefix(".")


def _describe(value: Any) -> str:
    """How a YAML value reads in a message: 'integer 5', "text 'abc'", 'a list'."""
    if value is None or isinstance(value, (list, dict)):
        kinds: dict[type, str] = {list: "a list", dict: "a mapping"}
        return kinds.get(type(value), "an empty value (null)")
    if isinstance(value, str):
        return f"text {value[:40]!r}"
    kind = {bool: "boolean", int: "integer", float: "number"}.get(type(value), "value")
    return f"{kind} {json.dumps(value, default=str)}"


def _model_at(loc: Loc) -> type[BaseModel]:
    """The model whose fields live at ``loc``: the top level, abstention or a label."""
    return Taxonomy if not loc else Abstention if loc[0] == "abstention" else Label


_EXPECTED = {"string_type": "text", "bool_type": "true or false", "float_type": "a number",
             "float_parsing": "a number", "list_type": "a list", "model_type": "a mapping",
             "model_attributes_type": "a mapping", "dict_type": "a mapping"}


def _pydantic_problem(err: ErrorDetails, line_of: LineOf) -> Problem:
    """Reword one pydantic error so that it names the key and says how to fix it."""
    loc, kind, value = tuple(err["loc"]), err["type"], err.get("input")
    if kind == "missing":
        field = _model_at(loc[:-1]).model_fields.get(str(loc[-1]))
        what = f" ({field.description})" if field and field.description else ""
        message = f"missing required key '{loc[-1]}'{what}"
    elif kind == "extra_forbidden":
        allowed = list(_model_at(loc[:-1]).model_fields)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        message = f"unknown key '{loc[-1]}'{hint}; allowed keys: {', '.join(allowed)}"
    elif kind in _EXPECTED:
        message = f"expected {_EXPECTED[kind]}, got {_describe(value)}"
        if _EXPECTED[kind] == "a mapping":
            message += f"; give the keys {', '.join(_model_at(loc).model_fields)}"
        elif kind == "string_type" and isinstance(value, (int, float, bool)):
            message += "; put it in quotes if it is meant as text"
    elif kind == "value_error":
        message = str(err["ctx"]["error"])
    else:
        message = err["msg"].replace("Input should be", "must be", 1) + f"; got {_describe(value)}"
    return format_loc(loc), line_of(loc), message


def _cycles(parent_of: dict[str, str | None]) -> list[list[str]]:
    """Each parent cycle once, from the first of its labels in file order; linear in the labels (each is walked
    once), where a walk per label had made a 20,000-label chain take hours."""
    cycles: list[list[str]] = []
    walked: set[str] = set()
    order = {name: k for k, name in enumerate(parent_of)}
    for name in parent_of:
        path: dict[str, int] = {}  # this walk's labels, in order
        current: str | None = name
        while current in parent_of and current not in walked and current not in path:
            path[current] = len(path)
            current = parent_of[current]
        walked.update(path)
        if current in path:  # the walk closed on itself: the labels from ``current`` on are a cycle
            cycle = list(path)[path[current]:]
            start = min(cycle, key=order.__getitem__)
            cycles.append(cycle[cycle.index(start):] + cycle[:cycle.index(start)])
    return cycles


def _listed(names: list[str]) -> str:
    """'a, b, c' with at most ``MAX_LISTED`` names, then how many more."""
    more = f" and {len(names) - MAX_LISTED:,} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def _listed_cycle(chain: list[str]) -> str:
    """A cycle as 'a -> b -> a', its first ``MAX_LISTED`` labels only when it is longer."""
    shown = chain if len(chain) <= MAX_LISTED else [*chain[:MAX_LISTED], f"... ({len(chain):,} labels in all)"]
    return " -> ".join([*shown, chain[0]])


def _text_at(item: Any, key: str) -> str | None:
    """item[key] of a raw label if it is text, else None."""
    value = item.get(key) if isinstance(item, dict) else None
    return value if isinstance(value, str) else None


def _cross_problems(entries: Sequence[tuple[str | None, str | None]], multi_label: bool,
                    line_of: LineOf) -> list[tuple[Loc, str]]:
    """Checks across labels: unique names, known parents, no cycles, enough options."""
    problems: list[tuple[Loc, str]] = []
    first: dict[str, int] = {}
    for i, (name, _) in enumerate(entries):
        if name is None:
            continue
        if name in first:
            line = line_of(("labels", first[name], "name"))
            where = f"line {line}" if line else format_loc(("labels", first[name]))
            problems.append((("labels", i, "name"), f"duplicate label '{name}' (first defined at "
                                                    f"{where}); label names must be unique"))
        first.setdefault(name, i)
    parent_of = {name: entries[i][1] for name, i in first.items()}
    unknown = [(i, name, parent) for i, (name, parent) in enumerate(entries) if parent is not None and parent not in first]
    for i, name, parent in unknown[:MAX_PROBLEMS]:  # each hint reads every name: bounded, not quadratic
        valid = [n for n in first if n != name]
        close = difflib.get_close_matches(parent, valid, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        problems.append((("labels", i, "parent"), f"unknown parent '{parent}'; {hint}valid parents: "
                                                    f"{_listed([repr(n) for n in valid])}"))
    problems += [(("labels", i, "parent"), f"unknown parent '{parent}'") for i, _, parent in unknown[MAX_PROBLEMS:]]
    problems += [(("labels", first[chain[0]], "parent"), f"parent cycle {_listed_cycle(chain)}; a label cannot be its "
                  "own ancestor, so remove one of these parents") for chain in _cycles(parent_of)]
    parents = {parent for _, parent in entries if parent is not None}
    leaves = [name for name, _ in entries if name not in parents]
    need = 1 if multi_label else 2
    if not problems and None not in leaves and len(leaves) < need:
        kind = "multi-label" if multi_label else "single-label"
        fix = "add a label" if multi_label else "add a label or set multi_label: true"
        grouped = " (a label that is a parent only groups others)" if parents else ""
        problems.append((("labels",), f"a {kind} taxonomy needs at least {need} label"
                                      f"{'s' if need > 1 else ''} to choose from, found "
                                      f"{len(leaves)}{grouped}; {fix}"))
    return problems
