"""Prompt templates: one file per task under ``prompts/``, versioned by content hash.

A template file is split into sections by ``### name`` lines; each section is a Jinja2
template. Classification templates have ``system`` (instruction and taxonomy, shared by
every document), ``user`` (the document), ``assistant`` (the start of the reply, not
scored) and the continuations scored after it: ``choice`` for single-label taxonomies,
``yes``/``no`` for multi-label ones. An optional ``format`` section says ``completion`` for a
plain-text prompt (system text, a blank line, the user text; no chat markup), whose
answers end at the end of their line (``service.labelling.labeller`` appends the newline to each
continuation); without it the prompt is a chat, whose answers end with the end of the turn.

A prompt is chosen by *name* from the registry, the ``*.md`` files directly under
``prompts/``; a name is never joined onto a path, so a caller cannot point the service at
another file. Templates are code, so every one renders in Jinja's
``ImmutableSandboxedEnvironment``: attribute walks such as ``cycler.__init__.__globals__``
raise ``SecurityError`` instead of reaching Python.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from service.errors import InvalidInput

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"
_SECTION = re.compile(r"^### (\w+)[ \t]*$", re.MULTILINE)
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what a template's file name (without .md) may be
_ENV = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)


@dataclass(frozen=True)
class PromptTemplate:
    """A parsed template file; ``hash`` changes whenever a byte of the file does."""

    name: str
    hash: str
    sections: dict[str, jinja2.Template]
    chat: bool = True  # a chat (the default) or a plain-text completion (``### format``, read once at load)

    def render(self, section: str, **context) -> str:
        """Render one section, stripped of the newline that ends it in the file."""
        if section not in self.sections:
            raise InvalidInput(f"prompt {self.name!r} has no section {section!r}; it has {sorted(self.sections)}")
        return self.sections[section].render(**context).rstrip("\n")


def template_names(directory: Path = PROMPTS_DIR) -> dict[str, Path]:
    """The registry: template name -> file, for the ``*.md`` files directly in ``directory``."""
    return {path.stem: path for path in directory.glob("*.md") if path.is_file() and NAME.match(path.stem)}


def load_template(name: str, directory: Path = PROMPTS_DIR) -> PromptTemplate:
    """Read the registry's template ``name`` and split it into sections; an unknown name lists the known ones."""
    known = template_names(directory)
    if name not in known:  # the same answer whatever file may exist elsewhere
        raise InvalidInput(f"unknown prompt template {name[:64]!r}; known: {', '.join(sorted(known))}")
    text = known[name].read_text(encoding="utf-8")
    parts = _SECTION.split(text)
    sections = {parts[i]: _ENV.from_string(parts[i + 1].lstrip("\n")) for i in range(1, len(parts), 2)}
    fmt = sections["format"].render().strip() if "format" in sections else "chat"
    if fmt not in ("chat", "completion"):
        raise InvalidInput(f"prompt {name!r}: section 'format' must be 'chat' or 'completion', not {fmt[:64]!r}")
    return PromptTemplate(name=name, hash=hashlib.sha256(text.encode()).hexdigest()[:12], sections=sections,
                          chat=fmt == "chat")
