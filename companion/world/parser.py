"""The answer parser: a free-text answer to the objects, counts, words and boxes it
states, for the judge to compare with the scene."""

from __future__ import annotations

import re

from companion.world.scenes import COLORS, NUMBER_WORDS, SHAPES


_NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS)} | {"no": 0, "none": 0, "ten": 10,
                                                          "eleven": 11, "twelve": 12}
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small",
               "large": "large", "big": "large"}
_FOREIGN_COLORS = ("pink", "brown", "cyan", "magenta", "violet", "indigo", "turquoise",
                   "gold", "silver")
_FOREIGN_SHAPES = ("star", "hexagon", "pentagon", "rectangle", "oval", "heart", "ellipse",
                   "arrow", "cube", "sphere", "cross", "moon", "octagon", "ring", "cylinder")
_GENERIC_HEADS = ("object", "shape", "thing", "item")
_ARTICLES = ("a", "an", "the", "any", "another")
_NEGATIONS = ("not", "no", "nor", "never")
_CLAUSE_WORDS = ("and", "while", "but")
_REGION_WORDS = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom",
                 "left": "left", "right": "right", "center": "center", "centre": "center",
                 "middle": "center"}
_NUMBER = r"-?\d*\.?\d+"
_TOKEN = re.compile(
    r"(?P<box>\[\s*{n}\s*,\s*{n}\s*,\s*{n}\s*,\s*{n}\s*\])".format(n=_NUMBER)
    + r'|(?P<quote>["“”]\s*(?P<quoted>[^"“”\n]{0,40}?)\s*["“”])'
    + r"|(?P<number>\d+(?:\.\d+)?)|(?P<word>[A-Za-z]+)|(?P<punct>[.,;:!?])")


def _head(word: str) -> tuple[str, str] | None:
    """("shape"|"foreign"|"generic", singular) for a noun that names an object, else None."""
    singular = word[:-2] if word.endswith("es") and word[:-2] in _FOREIGN_SHAPES else \
        word[:-1] if word.endswith("s") else word
    for kind, names in (("shape", SHAPES), ("foreign", _FOREIGN_SHAPES),
                        ("generic", _GENERIC_HEADS)):
        if word in names or singular in names:
            return kind, (word if word in names else singular)
    return None


def _tokens(answer: str) -> list[dict]:
    """Tokens of an answer: words (lower-cased, raw kept), numbers, quoted words, boxes and
    punctuation."""
    text = re.sub(r"n['’]t\b", " not", answer)
    tokens = []
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup if match.lastgroup != "quoted" else "quote"
        if kind == "box":
            values = [float(v) for v in re.findall(_NUMBER, match.group("box"))]
            tokens.append({"kind": "box", "value": values})
        elif kind == "quote":
            tokens.append({"kind": "quote", "value": match.group("quoted").strip()})
        elif kind == "word":
            tokens.append({"kind": "word", "value": match.group().lower(), "raw": match.group()})
        elif kind == "number":
            tokens.append({"kind": "number", "value": match.group()})
        else:
            tokens.append({"kind": "punct", "value": match.group()})
    return tokens


def _number_value(token: dict) -> int | None:
    if token["kind"] == "number":
        value = float(token["value"])
        return int(value) if value.is_integer() else None
    if token["kind"] == "word":
        return _NUMBERS.get(token["value"])
    return None


def _word(tokens, i) -> str | None:
    return tokens[i]["value"] if 0 <= i < len(tokens) and tokens[i]["kind"] == "word" else None


def _parse_phrase(tokens, i) -> dict | None:
    """A noun phrase at ``i``: [number] [article] (size | colour)* head-noun."""
    j, number = i, None
    if j < len(tokens) and _number_value(tokens[j]) is not None:
        number, j = _number_value(tokens[j]), j + 1
    if number is None and _word(tokens, j) in _ARTICLES:
        j += 1
    phrase = {"number": number, "size": None, "color": None, "foreign_color": None}
    while True:
        word = _word(tokens, j)
        if word in _SIZE_WORDS:
            phrase["size"] = _SIZE_WORDS[word]
        elif word in COLORS:
            phrase["color"] = word
        elif word in _FOREIGN_COLORS:
            phrase["foreign_color"] = word
        else:
            break
        j += 1
    word = _word(tokens, j)
    head = _head(word) if word else None
    if head is None:
        return None
    kind, noun = head
    phrase.update(shape=noun if kind == "shape" else None,
                  foreign_shape=noun if kind == "foreign" else None,
                  plural=word != noun, start=i, end=j + 1)
    before = _word(tokens, i - 1)
    phrase["negated"] = number is None and before in _NEGATIONS
    if phrase["negated"]:
        phrase["number"] = 0
    return phrase


def parse_answer(answer) -> dict:
    """What a free-text answer states, JSON-able.

    ``phrases``: noun phrases ("two red circles", "a large square", "no triangles"), each
    with number (None if not stated), size, color, shape (None for object/shape), foreign
    colour/shape words (not of this world), negated; ``colors``/``sizes``/``shapes``: all
    such words; ``regions``; ``numbers``: bare numbers outside phrases; ``words``: quoted
    words (else all-caps words); ``boxes``; ``yes_no``; ``no_word`` ("there is no word");
    ``clauses``: token spans split at punctuation and "and", for attaching regions.
    """
    if not isinstance(answer, str):
        answer = "" if answer is None else str(answer)
    tokens = _tokens(answer[:4000])
    parsed = {"phrases": [], "colors": [], "sizes": [], "shapes": [], "regions": [],
              "numbers": [], "words": [], "boxes": [], "yes_no": None, "no_word": False,
              "standalone_colors": []}
    clause, i = 0, 0
    while i < len(tokens):
        token = tokens[i]
        word = token["value"] if token["kind"] == "word" else None
        if token["kind"] == "punct" or word in _CLAUSE_WORDS:
            clause += 1
            i += 1
            continue
        phrase = _parse_phrase(tokens, i)
        if phrase is not None:
            phrase["clause"] = clause
            parsed["phrases"].append(phrase)
            i = phrase["end"]
            continue
        if token["kind"] == "box":
            parsed["boxes"].append(token["value"])
        elif token["kind"] == "quote":
            if token["value"]:
                parsed["words"].append({"word": token["value"], "clause": clause, "quoted": True})
        elif word in _REGION_WORDS:
            region, second = _REGION_WORDS[word], _REGION_WORDS.get(_word(tokens, i + 1) or "")
            if region in ("top", "bottom") and second in ("left", "right"):
                region, i = f"{region} {second}", i + 1  # "top left": one region, two words
            parsed["regions"].append({"region": region, "clause": clause})
        elif word in COLORS or word in _FOREIGN_COLORS:
            parsed["colors"].append(word)
            parsed["standalone_colors"].append(word)  # "the square is blue"
        elif word in _SIZE_WORDS:
            parsed["sizes"].append(_SIZE_WORDS[word])
        elif word in ("yes", "no") and parsed["yes_no"] is None and (
                i == 0 or i + 1 == len(tokens) or tokens[i + 1]["kind"] == "punct"):
            parsed["yes_no"] = word
        elif _number_value(token) is not None:
            parsed["numbers"].append(_number_value(token))
        elif token["kind"] == "word" and len(token["raw"]) >= 2 and token["raw"].isupper():
            parsed["words"].append({"word": token["raw"], "clause": clause, "quoted": False})
        i += 1
    for phrase in parsed["phrases"]:
        if phrase["negated"] or phrase["number"] == 0:
            continue
        if phrase["color"] or phrase["foreign_color"]:
            parsed["colors"].append(phrase["color"] or phrase["foreign_color"])
        if phrase["size"]:
            parsed["sizes"].append(phrase["size"])
        if phrase["shape"] or phrase["foreign_shape"]:
            parsed["shapes"].append(phrase["shape"] or phrase["foreign_shape"])
    lowered = " " + re.sub(r"n['’]t\b", " not", answer[:4000].lower()) + " "
    parsed["no_word"] = bool(re.search(r"\b(no|not any|not a|without any|without a)\s+"
                                       r"(word|words|text|writing)\b", lowered)
                             or re.search(r"\bnothing (is )?written\b", lowered))
    return parsed
