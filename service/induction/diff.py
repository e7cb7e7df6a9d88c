"""What changed between two versions of a taxonomy: the review of an evolved or re-induced taxonomy."""

from __future__ import annotations

from service.taxonomy import Label, Taxonomy


def diff(old: Taxonomy, new: Taxonomy) -> list[str]:
    """What changed between two taxonomies, one line per change ('+' added, '-' removed, '~' changed)."""
    lines = []
    for key in ("description", "instruction", "multi_label", "candidate_mass", "abstention", "model"):
        if getattr(old, key) != getattr(new, key):
            lines.append(f"~ {key}: {getattr(old, key)!r} -> {getattr(new, key)!r}")
    before = {label.name: label for label in old.labels}
    after = {label.name: label for label in new.labels}
    lines += [f"+ {name}: {after[name].description}" for name in after if name not in before]
    lines += [f"- {name}: {before[name].description}" for name in before if name not in after]
    for name in before.keys() & after.keys():
        changed = [k for k in Label.model_fields if getattr(before[name], k) != getattr(after[name], k)]
        lines += [f"~ {name}.{k}: {getattr(before[name], k)!r} -> {getattr(after[name], k)!r}" for k in changed]
    return lines
