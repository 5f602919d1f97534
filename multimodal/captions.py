"""Captions from class names: templates (config data) with "a"/"an" chosen for the next word, the
caption table every sequence draws from, and reading the class back out of a generated caption."""

from __future__ import annotations

import re

from shared.errors import ConfigError

DEFAULT_TEMPLATES = (
    "a photo of {a} {name}",
    "{a} {name}",
    "a picture of {a} {name}",
    "an image of {a} {name}",
    "a small {name}",
    "a blurry photo of {a} {name}",
    "a low-resolution photo of {a} {name}",
    "a close-up photo of {a} {name}",
)

# words whose spelling misleads the vowel rule: "an hour", "a unicorn", "a one-off"
_AN_ANYWAY = ("hour", "honest", "honour", "honor", "heir")
_A_ANYWAY = ("uni", "use", "usu", "one", "once", "eu", "ewe", "ur")


def article(word: str) -> str:
    w = word.lower()
    if w.startswith(_AN_ANYWAY):
        return "an"
    if w.startswith(_A_ANYWAY):
        return "a"
    return "an" if w[:1] in "aeiou" else "a"


def render(template: str, name: str) -> str:
    """Fill `{name}`, then each `{a}` with the article its next word takes."""
    if "{name}" not in template:
        raise ConfigError(f"caption template {template!r} has no {{name}} placeholder")
    text = template.replace("{name}", name)
    while "{a}" in text:
        i = text.index("{a}")
        nxt = text[i + 3:].split()
        if not nxt:
            raise ConfigError(f"caption template {template!r} ends with {{a}}: an article needs a word after it")
        text = text[:i] + article(nxt[0]) + text[i + 3:]
    if "{" in text or "}" in text:
        raise ConfigError(f"caption template {template!r}: only {{a}} and {{name}} are placeholders")
    return " ".join(text.split())


def display_names(classes: tuple[str, ...], names: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The words captions use for each class: `names` when given (one per class, in order), else
    the folder names with '-' and '_' as spaces."""
    if names:
        if len(names) != len(classes):
            raise ConfigError(f"data.class_names lists {len(names)} names but the data has {len(classes)} classes "
                              f"({', '.join(classes)})")
        out = tuple(" ".join(n.split()) for n in names)
    else:
        out = tuple(" ".join(c.replace("-", " ").replace("_", " ").split()) for c in classes)
    if any(not n for n in out) or len(set(n.lower() for n in out)) != len(out):
        raise ConfigError(f"class names must be non-empty and distinct, got {list(out)}")
    return out


class CaptionTable:
    """Every (class, template) caption as text and as text-token ids."""

    def __init__(self, names: tuple[str, ...], templates: tuple[str, ...], encode, max_tokens: int):
        if not templates:
            raise ConfigError("data.templates must list at least one caption template")
        self.names, self.templates = names, templates
        self.texts = [[render(t, n) for t in templates] for n in names]
        self.ids = [[encode(text) for text in row] for row in self.texts]
        longest = max(len(ids) for row in self.ids for ids in row)
        if longest > max_tokens:
            raise ConfigError(f"the longest caption takes {longest} text tokens but data.max_caption_tokens is "
                              f"{max_tokens}: raise it or shorten the templates")
        self.longest = longest


def class_in_caption(caption: str, names: tuple[str, ...]) -> int | None:
    """The class a caption names: the index of the one class name it contains as whole words, or
    None when it names none or several (a longer name containing a shorter one counts once)."""
    text = " " + " ".join(re.findall(r"[a-z0-9]+", caption.lower())) + " "
    found = set()
    for k in sorted(range(len(names)), key=lambda i: -len(names[i])):
        key = " " + " ".join(re.findall(r"[a-z0-9]+", names[k].lower())) + " "
        if key in text:
            found.add(k)
            text = text.replace(key, " ")
    return found.pop() if len(found) == 1 else None
