"""Post-processing of generated captions: sentence-to-tags conversion and user edit rules.

``caption_to_tags`` is a deterministic, rule-based conversion (no model):

1. lower-case; drop known captioner artefacts (``arafed``, ``araffe``, "there is", ...) and a leading
   "a photo of" / "an image of" / "a picture of" (a medium such as "a painting of" stays a tag);
2. split into chunks at punctuation and at function words: articles, determiners, pronouns, prepositions,
   conjunctions and auxiliary verbs (see ``STOPWORDS``);
3. inside each chunk, verbs in -ing form (and a few common -ed participles) become their own tag, so
   "woman sitting" gives "woman", "sitting";
4. keep chunks of at most 3 words ("red car", "long black hair"); longer chunks are split into words;
5. drop duplicates, keeping the first occurrence.

Example: "a woman sitting on a bench with a dog in the park" -> "woman, sitting, bench, dog, park".

Edit rules (``apply_edits``), in this order: ``--replace OLD=NEW`` pairs (plain, case-sensitive text
replacement, applied in the order given), then ``--prefix`` (prepended verbatim unless the caption already
starts with it), then ``--append`` (added after ", " unless it starts with a comma or a space).
"""

from __future__ import annotations

import re

ARTEFACTS = ("arafed", "araffe", "arafe", "araffed", "arafly", "there is", "there are")
LEADING_FILLER = re.compile(
    r"^(?:(?:this|it)\s+is\s+)?(?:(?:an?|the)\s+)?(?:photo(?:graph)?|picture|image)\s+of\s+"
)
_STOPWORD_TEXT = """a an the this that these those there here it its it's their his her hers him them they he she we you i
    my your our some any each every both either neither no all
    of in on at by for with without from to into onto over under above below behind between among near next
    beside against through during before after around across along toward towards upon off out up down
    while as like than
    and or but nor so yet
    is are was were be been being am has have had having do does did can could will would shall should may
    might must very just also too not
    who whom whose which what where when why how"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
# "up"/"down" are stopwords but "close up" is a useful photography tag.
KEEP_PHRASES = ("close up", "close-up", "full body", "upper body")
_PARTICIPLES = frozenset(
    {"dressed", "tied", "parked", "covered", "filled", "painted", "stacked", "lit", "seated"}
)


def _chunks(text: str) -> list[list[str]]:
    chunks: list[list[str]] = [[]]
    for token in re.findall(r"[a-z0-9][a-z0-9'\-]*|[^\sa-z0-9]", text):
        if token in STOPWORDS or not re.match(r"[a-z0-9]", token):
            if chunks[-1]:
                chunks.append([])
            continue
        chunks[-1].append(token)
    return [c for c in chunks if c]


def _is_verbish(word: str) -> bool:
    return (len(word) > 4 and word.endswith("ing")) or word in _PARTICIPLES


def caption_to_tags(caption: str) -> str:
    """Convert a sentence caption into comma-separated tags (rules in the module docstring)."""
    text = caption.lower().strip()
    for artefact in ARTEFACTS:
        text = re.sub(rf"\b{re.escape(artefact)}\b", " ", text)
    text = LEADING_FILLER.sub("", text.strip())
    protected: dict[str, str] = {}
    for i, phrase in enumerate(KEEP_PHRASES):
        key = f"keepphrase{i}"
        if phrase in text:
            text = text.replace(phrase, key)
            protected[key] = phrase.replace("-", " ")
    tags: list[str] = []
    for chunk in _chunks(text):
        current: list[str] = []
        for word in chunk:
            if _is_verbish(word):
                if current:
                    tags.append(" ".join(current))
                    current = []
                tags.append(word)
            else:
                current.append(word)
        if current:
            if len(current) <= 3:
                tags.append(" ".join(current))
            else:
                tags.extend(current)
    out: list[str] = []
    for tag in tags:
        for key, phrase in protected.items():
            tag = tag.replace(key, phrase)
        if tag and tag not in out:
            out.append(tag)
    return ", ".join(out)


def parse_replacements(rules: list[str] | None) -> list[tuple[str, str]]:
    """``["old=new", ...]`` -> pairs. Raises ValueError naming a rule without ``=`` or with empty OLD."""
    pairs: list[tuple[str, str]] = []
    for rule in rules or []:
        old, sep, new = rule.partition("=")
        if not sep or not old:
            raise ValueError(f"--replace {rule!r}: expected OLD=NEW (e.g. --replace 'a man=mychar')")
        pairs.append((old, new))
    return pairs


def apply_edits(
    caption: str,
    *,
    prefix: str = "",
    replacements: list[tuple[str, str]] | None = None,
    append: str = "",
) -> str:
    """Apply replace rules, then the prefix, then the appended text (see module docstring)."""
    text = caption.strip()
    for old, new in replacements or []:
        text = text.replace(old, new)
    text = re.sub(r"\s{2,}", " ", text).strip()
    if prefix and not text.startswith(prefix.strip()):
        text = prefix + text
    if append:
        text = text + append if append[:1] in (",", " ") or not text else f"{text}, {append}"
    return text.strip()
