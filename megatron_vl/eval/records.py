"""What the evaluation reads, as records: an ``Item`` per question or image, the json files
they come from, and the one-line errors that name the file and the record when one is not
what its task reads. Files are named by what they are ("questions file X"), never by a flag:
the tool that took the path from a flag is the one that knows the flag."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import List, Optional

from ..errors import InputError, UsageError


class EvalFileError(InputError, ValueError):
    """An annotation or results file, or one of its records, that is not what the task reads
    (exit 1); a ValueError to Python callers."""


class FilesMismatch(UsageError, ValueError):
    """Files that each read fine but do not go together: results for other questions, questions
    without annotations (exit 2: the wrong files were named)."""


@dataclass
class Item:
    id: object                      # question_id / image_id / image name
    image: Optional[str]            # path of the image (None for t2i)
    question: str = ""              # VQA question; t2i: the caption to draw
    truth: List[str] = field(default_factory=list)   # human answers / reference captions
    answer: str = ""                # the answer a support example shows (most common human answer)


def load_json(path: str, what: str):
    """The json in `path`; `what` names the file in errors ("questions file")."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise EvalFileError(f"{what} {path}: no such file") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise EvalFileError(f"{what} {path}: not valid json ({exc})") from None
    except OSError as exc:
        raise EvalFileError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None


def short(value) -> str:
    """A record as json, cut to fit in an error line."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


_KIND_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def get(record, key: str, kinds, where: str, required: bool = True):
    """record[key], refused (naming the record) unless it is one of `kinds`: a null answer or an
    id of the wrong type would otherwise surface as an AttributeError deep in the scorer."""
    if not isinstance(record, dict):
        raise EvalFileError(f"{where}: expected a json object, found {short(record)}")
    if key not in record:
        if not required:
            return None
        raise EvalFileError(f"{where}: no {key!r} key in {short(record)}")
    value = record[key]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise EvalFileError(f"{where}: {key!r} is {short(value)}, expected "
                            f"{' or '.join(_KIND_NAMES.get(k, k.__name__) for k in kinds)}")
    return value


def human_answers(record, where: str) -> List[str]:
    """The 'answers' of a VQA-style annotation record, as strings."""
    answers = get(record, "answers", list, where)
    if not answers:
        raise EvalFileError(f"{where}: 'answers' is empty (a question needs its human answers)")
    return [get(x, "answer", str, f"{where}: answers[{k}]") for k, x in enumerate(answers)]


def list_of(data, key: Optional[str], path: str, what: str, layout: str) -> list:
    """data[key] (or data itself) as a list, refused naming the file and the layout expected."""
    rows = data.get(key) if key and isinstance(data, dict) else None if key else data
    if not isinstance(rows, list):
        found = type(data).__name__ if not isinstance(data, dict) else f"an object with keys {sorted(data)[:5]}"
        raise EvalFileError(f"{what} {path}: expected {layout}, found {found}")
    return rows


def unique(items: List[Item], path: str, what: str, noun: str) -> List[Item]:
    """`items`, refused if two share an id (a results file could not say which it answers)."""
    seen = set()
    for item in items:
        if item.id in seen:
            raise EvalFileError(f"{what} {path}: {noun} {item.id!r} appears twice")
        seen.add(item.id)
    return items


def few(ids) -> str:
    """Up to three ids for an error line, and how many more."""
    ids = list(ids)
    return ", ".join(repr(i) for i in ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
