"""Typed, strict schemas for every JSON file moetrt reads (config.json, the shard index, manifests).

One machinery, used by each file's reader: pydantic v2 in strict mode (no coercion: `"false"` is not a
bool, `true` is not an int or a float, `"1"` is not an int, NaN and infinities are not numbers), bounded
ints, and a one-line `MoetrtError` naming the file, the field and what was expected. JSON is read with the
standard parser under guards for what it cannot represent: nesting deeper than the interpreter's recursion
limit and integers longer than Python's int-string limit (4300 digits) become one-line errors too.

Each schema lives beside its reader (`moetrt.model.config`, `moetrt.model.checkpoint`, `moetrt.artifacts`);
this module sits on the ground floor with `names` and `errors` so that model/ may use it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from moetrt.errors import MoetrtError

STRICT = ConfigDict(strict=True, allow_inf_nan=False, frozen=True)

# Bounds: no real model comes near them, and every product the runtime forms from them fits in 64 bits.
MAX_DIM = 2**20  # hidden/intermediate/head sizes, heads, experts
MAX_LAYERS = 1024
MAX_VOCAB = 2**24
MAX_POSITIONS = 2**24
MAX_TOKEN_ID = 2**31 - 1
MAX_BATCH = 2**16  # KV-cache rows an engine is built for
MAX_THREADS = 4096  # intra-op threads (ORT, torch)

Dim = Annotated[int, Field(ge=1, le=MAX_DIM)]
Layers = Annotated[int, Field(ge=1, le=MAX_LAYERS)]
Vocab = Annotated[int, Field(ge=1, le=MAX_VOCAB)]
Positions = Annotated[int, Field(ge=1, le=MAX_POSITIONS)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
PositiveFloat = Annotated[float, Field(gt=0)]

T = TypeVar("T")


class Strict(BaseModel):
    """Base of the schemas: strict types, no NaN/inf, frozen; unknown keys are kept (`extra="allow"`) since
    Hugging Face configs and later moetrt stages add fields of their own."""

    model_config = ConfigDict(**STRICT, extra="allow")


def load_json(path: Path, what: str, problem: str = "malformed JSON") -> Any:
    """The JSON value in `path`, or a one-line MoetrtError (`what` says what the file should be, `problem`
    how a file that does not parse is described)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except IsADirectoryError:
        raise MoetrtError(f"{path}: is a directory; expected {what}") from None
    except UnicodeDecodeError as err:
        raise MoetrtError(f"{path}: {problem} (not UTF-8: byte {err.start}); expected {what}") from None
    except OSError as err:
        raise MoetrtError(f"{path}: cannot read {what} ({err.strerror})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise MoetrtError(f"{path}: {problem} (nested too deeply); expected {what}") from None
    except ValueError as err:  # JSONDecodeError, and the int-string conversion limit
        raise MoetrtError(f"{path}: {problem} ({first_line(str(err))}); expected {what}") from None


def parse(schema: type[T], data: Any, source: str) -> T:
    """`data` validated against `schema` (a pydantic model, dataclass or type), or a one-line MoetrtError
    naming `source`, the first offending field, the expectation and the value found."""
    try:
        return TypeAdapter(schema).validate_python(data, strict=True)
    except ValidationError as err:
        raise schema_error(source, err) from None


def schema_error(source: str, err: ValidationError, within: str = "") -> MoetrtError:
    """One line from pydantic's first error: `source: field 'a.b': <expectation>, found <value>`; `within`
    is the field path of the validated value inside its file (for nested validation)."""
    first = err.errors(include_url=False)[0]
    # pydantic labels union branches and validator wrappers in `loc` ("constrained-int", "list[...]"): not fields
    parts = [within] if within else []
    parts += [str(part) for part in first["loc"] if not (isinstance(part, str) and ("[" in part or "-" in part))]
    loc = ".".join(parts)
    message = re.sub(r" or instance of \w+", "", first["msg"])
    if first["type"] == "missing":
        return MoetrtError(f"{source}: missing field '{loc}'")
    if first["type"] == "unexpected_keyword_argument":
        return MoetrtError(f"{source}: unknown field '{loc}'")
    message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    message = first_line(message)[:300]
    if first["type"] in ("value_error", "assertion_error") and not first["loc"]:  # a whole-object check
        return MoetrtError(f"{source}: field '{loc}': {message}" if loc else f"{source}: {message}")
    return MoetrtError(f"{source}: field '{loc}': {message}, found {_short(first.get('input'))}")


def first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else text


def _short(value: Any) -> str:
    """repr of a found value, bounded (a 4000-digit int or a 10 MB string is not echoed whole)."""
    try:
        text = repr(value)
    except ValueError:  # an int past the int-string limit
        return f"an integer of about {value.bit_length() * 30103 // 100000} digits"
    return text if len(text) <= 80 else text[:77] + "..."
