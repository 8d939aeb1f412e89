"""The English the world speaks: number words, noun phrases, lists and boxes as text,
and the two questions every text asks of a scene (how many objects match, and the
shortest name that picks one out)."""

from __future__ import annotations

from collections.abc import Sequence

from companion.world.scenes import NUMBER_WORDS, Scene, SceneObject


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def noun_phrase(target: dict, plural: bool) -> str:
    """"large red circle(s)", "red object(s)", "object(s)" for a target of attributes."""
    words = [target[k] for k in ("size", "color") if target.get(k)]
    head = target.get("shape") or "object"
    return " ".join(words + [head + ("s" if plural else "")])


def with_article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def count_phrase(n: int, target: dict) -> str:
    """"no red objects", "one circle", "two large squares"."""
    return f"{'no' if n == 0 else number_word(n)} {noun_phrase(target, plural=n != 1)}"


def there_is(n: int, target: dict) -> str:
    return f"there {'is' if n == 1 else 'are'} {count_phrase(n, target)}"


def join_phrases(parts: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    if len(parts) <= 2:
        return " and ".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def box_text(bbox: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in bbox) + "]"


def object_matches(obj: SceneObject, target: dict) -> bool:
    return all(getattr(obj, key) == value for key, value in target.items() if value is not None)


def count_objects(scene: Scene, target: dict) -> int:
    """Number of objects whose attributes match ``target`` (e.g. ``{"color": "red"}``)."""
    return sum(object_matches(o, target) for o in scene.objects)


def reference(scene: Scene, obj: SceneObject) -> dict | None:
    """The shortest unambiguous name of ``obj``: {color, shape}, else {size, color, shape}."""
    for keys in (("color", "shape"), ("size", "color", "shape")):
        target = {k: getattr(obj, k) for k in keys}
        if count_objects(scene, target) == 1:
            return target
    return None
