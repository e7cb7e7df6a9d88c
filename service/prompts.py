"""Prompt templates: one file per task under ``prompts/``, versioned by content hash.

A template file is split into sections by ``### name`` lines; each section is a Jinja2
template. Classification templates have ``system`` (instruction and taxonomy, shared by
every document), ``user`` (the document), ``assistant`` (the start of the reply, not
scored) and the continuations scored after it: ``choice`` for single-label taxonomies,
``yes``/``no`` for multi-label ones.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

from .errors import InvalidInput

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
_SECTION = re.compile(r"^### (\w+)[ \t]*$", re.MULTILINE)
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)


@dataclass(frozen=True)
class PromptTemplate:
    """A parsed template file; ``hash`` changes whenever a byte of the file does."""

    name: str
    hash: str
    sections: dict[str, jinja2.Template]

    def render(self, section: str, **context) -> str:
        """Render one section, stripped of the newline that ends it in the file."""
        if section not in self.sections:
            raise InvalidInput(f"prompt {self.name!r} has no section {section!r}; it has {sorted(self.sections)}")
        return self.sections[section].render(**context).rstrip("\n")


def load_template(name: str, directory: Path = PROMPTS_DIR) -> PromptTemplate:
    """Read ``prompts/NAME.md`` and split it into sections."""
    path = directory / f"{name}.md"
    if not path.exists():
        known = sorted(p.stem for p in directory.glob("*.md"))
        raise InvalidInput(f"unknown prompt template {name!r}; known: {', '.join(known)}")
    text = path.read_text(encoding="utf-8")
    parts = _SECTION.split(text)
    sections = {parts[i]: _ENV.from_string(parts[i + 1].lstrip("\n")) for i in range(1, len(parts), 2)}
    return PromptTemplate(name=name, hash=hashlib.sha256(text.encode()).hexdigest()[:12], sections=sections)
