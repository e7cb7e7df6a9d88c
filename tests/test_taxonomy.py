"""Taxonomy loading: the shipped examples, every error path with its line, and the model."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.errors import NotFound, TaxonomyError
from service.taxonomy import NONE_LABEL, Taxonomy, load_taxonomy, parse_taxonomy

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

# Lines 1-4; labels start on line 5.
HEAD = """\
name: demo
description: Demo taxonomy.
instruction: Pick one.
labels:
"""
TWO_LABELS = HEAD + """\
  - name: a
    description: A things.
  - name: b
    description: B things.
"""


def problems_of(text: str) -> list[tuple[str, int | None, str]]:
    with pytest.raises(TaxonomyError) as info:
        parse_taxonomy(text, source="t.yaml")
    return info.value.problems


# --- the shipped examples ---------------------------------------------------------

SHIPPED = sorted((ROOT / "taxonomy").glob("*.yaml"))


def test_the_four_examples_are_shipped():
    names = {path.name for path in SHIPPED}
    assert {"news-topics.yaml", "trec-questions.yaml", "sms-spam.yaml", "trec-coarse.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_taxonomy_loads_and_is_named_after_its_file(path):
    taxonomy = load_taxonomy(path)
    assert taxonomy.name == path.stem
    assert len(taxonomy.label_names()) >= 2
    assert path.read_text(encoding="utf-8").startswith("#")  # the comment header


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "taxonomies" / "terse").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_terse_benchmark_taxonomies_match_the_shipped_labels(path):
    """The benchmark's terse taxonomies (one line a label, no examples) label what the shipped ones do."""
    terse, shipped = load_taxonomy(path), load_taxonomy(ROOT / "taxonomy" / path.name)
    assert terse.label_names() == shipped.label_names()
    assert not any(label.examples for label in terse.labels)


def test_advice_names_the_labels_without_enough_examples():
    """A valid taxonomy whose labels have fewer than two examples gets advice naming them (the default job reads
    documents against the examples); one with enough gets none."""
    from service.taxonomy import advice

    [line] = advice(parse_taxonomy(TWO_LABELS))
    assert line.startswith("2 of 2 labels have fewer than 2 examples (a, b): ")
    assert advice(load_taxonomy(ROOT / "taxonomy" / "sms-spam.yaml")) == []


def test_shipped_label_sets():
    assert load_taxonomy(ROOT / "taxonomy/sms-spam.yaml").label_names() == ["ham", "spam"]
    coarse = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert load_taxonomy(ROOT / "taxonomy/trec-coarse.yaml").label_names() == coarse
    trec = load_taxonomy(ROOT / "taxonomy/trec-questions.yaml")
    assert len(trec.label_names()) == 50
    assert {trec.ancestors(name)[0] for name in trec.label_names()} == set(coarse)
    assert all(name.split(":")[0] == trec.ancestors(name)[0] for name in trec.label_names())
    news = load_taxonomy(ROOT / "taxonomy/news-topics.yaml")
    assert news.abstention.allow_none is True
    assert news.selection_threshold == 0.3


@pytest.mark.skipif(not (SHARED_DATA / "trec_questions.csv").exists(),
                    reason="shared/data (the real TREC and SMS data) is not next to the repo")
def test_shipped_labels_cover_the_gold_labels():
    with open(SHARED_DATA / "trec_questions.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    trec = load_taxonomy(ROOT / "taxonomy/trec-questions.yaml")
    assert {row["fine"] for row in rows} == set(trec.label_names())
    coarse = load_taxonomy(ROOT / "taxonomy/trec-coarse.yaml")
    assert {row["coarse"] for row in rows} == set(coarse.label_names())
    with open(SHARED_DATA / "sms_spam.csv", encoding="utf-8") as f:
        sms_labels = {row["label"] for row in csv.DictReader(f)}
    assert sms_labels == set(load_taxonomy(ROOT / "taxonomy/sms-spam.yaml").label_names())


# --- reading the file --------------------------------------------------------------

HINT = "; check the indentation, and quote text that contains ': ' or starts with a special character"


@pytest.mark.parametrize("text, line, problem", [
    (HEAD + "  - name: a\n    description: A things.\n   bad: indent\n", 7,
     "expected <block end>, but found '<block mapping start>' (column 4)"),
    (TWO_LABELS.replace("B things.", "Note: B things."), 8,
     "mapping values are not allowed here (column 22)"),
    (HEAD + "  - name: [a\n", 6, "expected ',' or ']', but got '<stream end>' (column 1)"),
])
def test_yaml_syntax_error_reports_its_line(text, line, problem):
    assert problems_of(text) == [("", line, f"YAML syntax error: {problem}{HINT}")]


def test_non_utf8_file_reports_the_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(TWO_LABELS.replace("A things.", "Caf\xe9 things.").encode("latin-1"))
    with pytest.raises(TaxonomyError) as info:
        load_taxonomy(path)
    assert info.value.problems == [("", 6, "not valid UTF-8 (byte 0xe9); save the file as UTF-8")]
    assert str(info.value) == f"{path}:6: not valid UTF-8 (byte 0xe9); save the file as UTF-8"


def test_character_yaml_does_not_allow():
    assert problems_of("name: demo\ndescription: x\x00\n") == [
        ("", 2, "character #x0000 is not allowed in YAML; remove it")]


def test_more_than_one_document():
    assert problems_of(TWO_LABELS + "---\nname: other\n") == [
        ("", 9, "YAML syntax error: expected a single document in the stream, but found another "
                f"document (column 1){HINT}")]


def test_missing_file_is_a_taxonomy_error(tmp_path):
    with pytest.raises(TaxonomyError) as info:
        load_taxonomy(tmp_path / "absent.yaml")
    assert info.value.problems == [("", None, "cannot read file: No such file or directory")]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(text):
    assert problems_of(text) == [
        ("", None, "the file is empty; a taxonomy needs the keys name, description, instruction, labels")]


def test_top_level_must_be_a_mapping():
    assert problems_of("# header\n- a\n- b\n") == [
        ("", 2, "the top level must be a mapping with the keys name, description, instruction, "
                "labels; found a list")]


def test_load_taxonomy_accepts_str_and_path(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text(TWO_LABELS, encoding="utf-8")
    assert load_taxonomy(str(path)) == load_taxonomy(path) == parse_taxonomy(TWO_LABELS)


# --- keys and values ---------------------------------------------------------------

def test_unknown_top_level_key_lists_allowed_keys():
    assert problems_of("colour: red\n" + TWO_LABELS) == [
        ("colour", 1, "unknown key 'colour'; allowed keys: name, version, description, "
                      "instruction, multi_label, candidate_mass, abstention, model, long_documents, shortlist, "
                      "demonstrations, labels")]


def test_unknown_key_in_a_label_names_field_line_and_allowed_keys():
    text = TWO_LABELS + "    colour: blue\n    example: [b1]\n"
    assert problems_of(text) == [
        ("labels[1].colour", 9, "unknown key 'colour'; allowed keys: name, description, "
                                "examples, counter_examples, parent"),
        ("labels[1].example", 10, "unknown key 'example' (did you mean 'examples'?); allowed keys: "
                                  "name, description, examples, counter_examples, parent"),
    ]


def test_unknown_key_in_abstention():
    text = TWO_LABELS + "abstention:\n  margin: 0.1\n"
    assert problems_of(text) == [
        ("abstention.margin", 10, "unknown key 'margin'; allowed keys: threshold, allow_none, "
                                  "ambiguity_margin")]


def test_missing_required_fields_point_at_the_enclosing_mapping():
    text = "name: demo\ndescription: Demo.\nlabels:\n  - name: a\n  - name: b\n    description: B.\n"
    assert problems_of(text) == [
        ("instruction", 1, "missing required key 'instruction' (the instruction shown to the "
                           "annotator model)"),
        ("labels[0].description", 4, "missing required key 'description' (what belongs in this "
                                     "label, shown to the annotator model)"),
    ]


@pytest.mark.parametrize("block, problem", [
    ("abstention:\n  threshold: 1.5\n",
     ("abstention.threshold", 10, "must be less than or equal to 1; got number 1.5")),
    ("abstention:\n  threshold: -0.1\n",
     ("abstention.threshold", 10, "must be greater than or equal to 0; got number -0.1")),
    ("abstention:\n  ambiguity_margin: 1\n",
     ("abstention.ambiguity_margin", 10, "must be less than 1; got integer 1")),
    ("candidate_mass: 0\n", ("candidate_mass", 9, "must be greater than 0; got integer 0")),
    ("multi_label: 1\n", ("multi_label", 9, "expected true or false, got integer 1")),
    ("version: 2\n", ("version", 9, "expected text, got integer 2; put it in quotes if it is "
                                    "meant as text")),
])
def test_bad_values(block, problem):
    assert problems_of(TWO_LABELS + block) == [problem]


def test_bad_taxonomy_name():
    assert problems_of(TWO_LABELS.replace("name: demo", "name: My Topics")) == [
        ("name", 1, "invalid name 'My Topics': use 1-64 characters from a-z, 0-9, '_' and '-', "
                    "starting with a letter or digit")]


def test_labels_must_be_mappings_and_examples_text():
    text = HEAD + "  - just a name\n  - name: b\n    description: B.\n    examples: [1, ok]\n"
    assert problems_of(text) == [
        ("labels[0]", 5, "expected a mapping, got text 'just a name'; give the keys name, "
                         "description, examples, counter_examples, parent"),
        ("labels[1].examples[0]", 8, "expected text, got integer 1; put it in quotes if it is "
                                     "meant as text"),
    ]


def test_blank_description_and_bad_label_name():
    text = HEAD + '  - name: " a"\n    description: ""\n  - name: b\n    description: B.\n'
    assert problems_of(text) == [
        ("labels[0].name", 5, "label name ' a' has surrounding whitespace or a line break; remove it"),
        ("labels[0].description", 6, "must not be empty"),
    ]


def test_duplicate_yaml_key_is_reported():
    text = TWO_LABELS.replace("    description: B things.\n",
                              "    description: B things.\n    description: Bee things.\n")
    assert problems_of(text) == [
        ("labels[1].description", 9, "duplicate key 'description' (first at line 8); keep one")]


# --- checks across labels ----------------------------------------------------------

def test_duplicate_label_reports_both_lines():
    text = TWO_LABELS + "  - name: c\n    description: C.\n  - name: a\n    description: A again.\n"
    with pytest.raises(TaxonomyError) as info:
        parse_taxonomy(text, source="taxonomy/x.yaml")
    assert info.value.problems == [
        ("labels[3].name", 11, "duplicate label 'a' (first defined at line 5); label names must be unique")]
    assert str(info.value) == ("taxonomy/x.yaml:11: labels[3].name: duplicate label 'a' "
                               "(first defined at line 5); label names must be unique")


def test_unknown_parent_lists_valid_names():
    text = HEAD + ("  - name: sports\n    description: S.\n"
                   "  - name: football\n    description: F.\n    parent: sprots\n"
                   "  - name: tennis\n    description: T.\n    parent: sports\n")
    assert problems_of(text) == [
        ("labels[1].parent", 9, "unknown parent 'sprots'; did you mean 'sports'? valid parents: "
                                "'sports', 'tennis'")]


def test_parent_cycle():
    text = HEAD + ("  - name: a\n    description: A.\n    parent: c\n"
                   "  - name: b\n    description: B.\n    parent: a\n"
                   "  - name: c\n    description: C.\n    parent: b\n"
                   "  - name: d\n    description: D.\n    parent: d\n"
                   "  - name: e\n    description: E.\n")
    assert problems_of(text) == [
        ("labels[0].parent", 7, "parent cycle a -> c -> b -> a; a label cannot be its own ancestor, "
                                "so remove one of these parents"),
        ("labels[3].parent", 16, "parent cycle d -> d; a label cannot be its own ancestor, "
                                 "so remove one of these parents"),
    ]


def test_hostile_label_graphs_give_bounded_reports():
    """A request body may hold thousands of labels in one long cycle or with unknown parents: the report keeps its
    first ``MAX_PROBLEMS`` problems and says how many more, a cycle's message lists ``MAX_LISTED`` labels, and an
    unknown parent's message lists ``MAX_LISTED`` valid names (the checks are linear: a walk per label, and a list of
    every name per problem, had made such files take hours)."""
    from service.taxonomy import MAX_LISTED, MAX_PROBLEMS

    n = 3000
    cycle = HEAD + "".join(f"  - name: l{i}\n    description: L.\n    parent: l{(i + 1) % n}\n" for i in range(n))
    [(location, line, message)] = problems_of(cycle)
    assert (location, line) == ("labels[0].parent", 7)
    assert message.startswith("parent cycle l0 -> l1 -> ") and f"... ({n:,} labels in all) -> l0;" in message
    assert message.count(" -> ") == MAX_LISTED + 1
    orphans = HEAD + "".join(f"  - name: l{i}\n    description: L.\n    parent: x{i}\n" for i in range(n))
    problems = problems_of(orphans)
    assert len(problems) == MAX_PROBLEMS + 1
    assert problems[0] == ("labels[0].parent", 7, "unknown parent 'x0'; valid parents: "
                           + ", ".join(f"'l{i}'" for i in range(1, MAX_LISTED + 1)) + f" and {n - 1 - MAX_LISTED:,} more")
    assert problems[-1] == ("", None, f"and {n - MAX_PROBLEMS:,} more problems; fix these first")


def test_base_60_numbers_are_text_and_huge_numbers_an_error():
    """YAML 1.1 reads ``1:20`` as 80, in time quadratic in its digits: here it is text, as in YAML 1.2, and a tagged
    one (``!!int``) is refused at its line; an integer too long for Python to read is a problem, not a crash."""
    assert parse_taxonomy(TWO_LABELS + "version: 1:20\n").version == "1:20"
    assert parse_taxonomy(TWO_LABELS + "version: " + ":".join(["1"] * 10_000) + "\n").version.count(":") == 9_999
    [(_, line, message)] = problems_of(TWO_LABELS + "version: !!int 1:20\n")
    assert line == 9 and "base-60 numbers (1:20) are not supported; quote the value" in message
    [(_, _, message)] = problems_of(TWO_LABELS + "version: " + "9" * 5000 + "\n")
    assert message.startswith("a value cannot be read") and message.endswith("quote it if it is text")


def test_reserved_name():
    text = TWO_LABELS.replace("name: b", f"name: {NONE_LABEL}")
    assert problems_of(text) == [
        ("labels[1].name", 7, "'none_of_these' is reserved for the abstention option "
                              "(abstention.allow_none: true); rename this label")]


def test_too_few_labels():
    one = HEAD + "  - name: a\n    description: A.\n"
    assert problems_of(one) == [
        ("labels", 4, "a single-label taxonomy needs at least 2 labels to choose from, found 1; "
                      "add a label or set multi_label: true")]
    assert parse_taxonomy(one + "multi_label: true\n").label_names() == ["a"]
    grouped = one + "  - name: b\n    description: B.\n    parent: a\n"
    assert problems_of(grouped) == [
        ("labels", 4, "a single-label taxonomy needs at least 2 labels to choose from, found 1 "
                      "(a label that is a parent only groups others); add a label or set "
                      "multi_label: true")]
    assert problems_of(HEAD.replace("labels:", "labels: []"))[0][2].endswith("found 0; add a "
                                                                             "label or set multi_label: true")


def test_all_problems_are_reported_at_once_in_line_order():
    text = ("name: Demo\ndescription: Demo.\ninstruction: Pick.\ncolour: red\nlabels:\n"
            "  - name: a\n  - name: a\n    description: A.\n    parent: z\n")
    assert [(loc, line) for loc, line, _ in problems_of(text)] == [
        ("name", 1), ("colour", 4), ("labels[0].description", 6), ("labels[1].name", 7),
        ("labels[1].parent", 9)]


def test_building_in_python_runs_the_same_checks():
    with pytest.raises(ValidationError, match=r"labels\[1\].name: duplicate label 'a' "
                                              r"\(first defined at labels\[0\]\)"):
        Taxonomy(name="demo", description="d", instruction="i",
                 labels=[{"name": "a", "description": "A."}, {"name": "a", "description": "A."}])


# --- the model ---------------------------------------------------------------------

def test_content_hash_ignores_formatting_and_follows_meaning():
    base = parse_taxonomy(TWO_LABELS)
    reformatted = parse_taxonomy("""\
# a comment that changes nothing
instruction: "Pick one."     # keys in another order
labels:
- {description: A things., name: a}
- description: B things.
  name: b

description: >
  Demo taxonomy.
name: demo
version: "1"
""")
    assert reformatted.content_hash() == base.content_hash()
    assert re.fullmatch(r"[0-9a-f]{12}", base.content_hash())
    changed = parse_taxonomy(TWO_LABELS.replace("B things.", "B things, and more."))
    assert changed.content_hash() != base.content_hash()
    assert parse_taxonomy(TWO_LABELS + "version: \"2\"\n").content_hash() != base.content_hash()


TREE = HEAD + """\
  - name: sport
    description: Sport.
  - name: ball
    description: Ball games.
    parent: sport
  - name: football
    description: Football.
    parent: ball
  - name: tennis
    description: Tennis.
    parent: ball
  - name: running
    description: Running.
    parent: sport
  - name: politics
    description: Politics.
"""


def test_leaves_and_ancestors():
    tree = parse_taxonomy(TREE)
    assert tree.label_names() == ["football", "tennis", "running", "politics"]
    assert [label.description for label in tree.leaves()] == ["Football.", "Tennis.", "Running.",
                                                              "Politics."]
    assert tree.ancestors("football") == ["ball", "sport"]
    assert tree.ancestors("running") == ["sport"]
    assert tree.ancestors("sport") == []
    with pytest.raises(NotFound, match="unknown label 'golf' in taxonomy 'demo'"):
        tree.ancestors("golf")


@pytest.mark.parametrize("extra, expected", [
    ("", 0.0),
    ("multi_label: true\n", 0.5),
    ("abstention:\n  threshold: 0.7\n", 0.7),
    ("multi_label: true\nabstention:\n  threshold: 0.2\n", 0.2),
])
def test_selection_threshold_defaults(extra, expected):
    assert parse_taxonomy(TWO_LABELS + extra).selection_threshold == expected


def test_defaults():
    taxonomy = parse_taxonomy(TWO_LABELS + "abstention:\n")
    assert (taxonomy.version, taxonomy.multi_label, taxonomy.candidate_mass) == ("1", False, 0.9)
    assert taxonomy.abstention.model_dump() == {"threshold": None, "allow_none": False,
                                                "ambiguity_margin": 0.0}
    assert taxonomy.labels[0].model_dump() == {"name": "a", "description": "A things.",
                                               "examples": [], "counter_examples": [], "parent": None}
