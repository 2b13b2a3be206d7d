"""Config files as ops edit them: YAML checked by a pydantic model, refused with each
problem's line, its field path and what is wrong, in words.

The YAML parser and pydantic speak their own jargon ("expected <block end>",
`routes.0.on_legacy_falure`); ops read `routes.yaml:9` and want the route by
its name, the offending line, and the key they probably meant. `parse_model`
and `load_model` are the one way every config file of the bus is read
(routes, cases, customers, loyalty, returns, orders, file drops); the rest are
plain functions from a parser's or a validator's error to one line of text.
"""
from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)
Check = Callable[[dict, yaml.Node, str], list[str]]  # (data, node, source) -> problems, each `source:LINE: ...`

# The YAML parser's problems, in words (matched by prefix, first match wins).
_YAML_PROBLEMS = (
    ("expected <block end>", "the indentation does not line up: this line is indented differently "
                             "from the keys around it"),
    ("mapping values are not allowed", "a ':' where none may be: indent the key under its parent, "
                                       "or quote a value that contains ': '"),
    ("found character '\\t'", "a tab: indent with spaces only"),
    ("could not find expected ':'", "a key without ':' after it"),
    ("expected ',' or ']'", "a [list] that is not closed with ']'"),
    ("expected ',' or '}'", "a {mapping} that is not closed with '}'"),
    ("found unexpected end of stream", "a quote that is never closed"),
    ("found unexpected ':'", "a ':' inside a value: quote the value"),
    ("expected <block mapping start>", "a list item or value where a 'key: value' was expected"),
    ("expected the node content, but found '<stream end>'", "the file ends where a value was expected"),
    ("expected the node content", "a value is missing here"),
    ("found undefined alias", "an '*alias' with no '&anchor' before it"),
)


def parse_model(text: str, model: type[M], source: str, error: type[Exception], checks: tuple[Check, ...] = (),
                section: str | None = None, loader: type = yaml.SafeLoader) -> M:
    """The file's text as `model` (an empty file: the model's defaults), or `error` naming every
    problem on a line of its own. `checks` add problems of their own (a route named twice);
    `section`: only that top-level key is the model's (others belong to other readers)."""
    try:
        node = yaml.compose(text, Loader=loader)
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        raise error(yaml_problem(exc, text, source)) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise error(f"{source}:1: expected a mapping with {', '.join(model.model_fields)}")
    problems = duplicate_keys(node, source)
    for check in checks:
        problems += check(data, node, source)
    if problems:
        raise error("\n".join(problems))
    path: tuple = () if section is None else (section,)
    try:
        return model.model_validate(data if section is None else data.get(section) or {})
    except ValidationError as exc:
        raise error("\n".join(problem(e, data, node, source, model, path) for e in exc.errors())) from None


def load_model(path: Path | str, model: type[M], error: type[Exception], checks: tuple[Check, ...] = (),
               section: str | None = None, missing_ok: bool = False, loader: type = yaml.SafeLoader) -> M:
    """`parse_model` of a file; `missing_ok`: a file that does not exist means the defaults."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        if missing_ok and isinstance(exc, FileNotFoundError):
            return model()
        raise error(f"{path}: cannot read: {exc.strerror}") from None
    return parse_model(text, model, str(path), error, checks, section, loader)


def problem(err: dict, data: Any, node: yaml.Node | None, source: str, root: type[BaseModel],
            prefix: tuple = ()) -> str:
    """One validation error as `source:LINE: field.path: what is wrong`; a model-wide rule's
    message (`a.b: ...; c: ...`) as one line per statement, at the key it names. `prefix`: where
    in the file (`data`, `node`) the model (`root`) starts."""
    loc = tuple(err["loc"])
    line = line_of(node, prefix + loc)
    where = readable_path(data, prefix + loc)
    if err["type"] == "extra_forbidden":
        return f"{source}:{line}: " + unknown_key(root, loc, readable_path(data, prefix + loc[:-1]))
    if err["type"] == "missing":
        return f"{source}:{line}: {where}: required, missing"
    if err["type"] == "value_error" and not loc:
        return "\n".join(f"{source}:{line_of(node, prefix + _path_in_words(said)) or line}: {said}"
                         for said in err["msg"].removeprefix("Value error, ").split("; "))
    return f"{source}:{line}: {where}: {err['msg']}"


def _path_in_words(said: str) -> tuple[str, ...]:
    """The key path a rule's message starts with (`groups.consent.owner: ...`)."""
    head = said.split(":", 1)[0] if ":" in said else ""
    return tuple(p for p in head.replace("[", ".").replace("]", "").split(".") if p and " " not in p)


def yaml_problem(exc: yaml.YAMLError, text: str, source: str) -> str:
    """`source:LINE: what is wrong in words (the line as written)`."""
    said = str(getattr(exc, "problem", None) or exc)
    words = next((words for start, words in _YAML_PROBLEMS if said.startswith(start)), None)
    # A key left without ':' is noticed on the next line; the scanner's context is the key itself.
    at_key = said.startswith("could not find expected ':'")
    mark = (getattr(exc, "context_mark", None) if at_key else None) or getattr(exc, "problem_mark", None)
    if words is None:
        words = f"not valid YAML ({said})"
    if mark is None:
        return f"{source}: {words}"
    lines = text.splitlines()
    shown = f' ("{lines[mark.line].strip()}")' if mark.line < len(lines) and lines[mark.line].strip() else ""
    return f"{source}:{mark.line + 1}: {words}{shown}"


def line_of(node: yaml.Node | None, path: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at a pydantic error path (or its nearest parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in path:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def duplicate_keys(node: yaml.Node | None, source: str, path: str = "") -> list[str]:
    """YAML keeps the last of two equal keys without a word: a route with two `mode:`
    lines would run the second. Each repeated key, with both lines."""
    found: list[str] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value)
            if name in first:
                found.append(f"{source}:{key.start_mark.line + 1}: {path or '<top>'}: key '{name}' "
                             f"is given twice (first on line {first[name]}); remove one")
            else:
                first[name] = key.start_mark.line + 1
            found += duplicate_keys(value, source, f"{path}.{name}" if path else name)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += duplicate_keys(item, source, f"{path}[{_item_name(item) or i}]")
    return found


def _item_name(node: yaml.Node) -> str | None:
    if isinstance(node, yaml.MappingNode):
        return next((str(v.value) for k, v in node.value if k.value == "name" and isinstance(v, yaml.ScalarNode)),
                    None)
    return None


def readable_path(data: Any, loc: tuple) -> str:
    """`routes.0.rollout.percent` -> `routes[sales].rollout.percent` (the route's name when it has one)."""
    out, node = "", data
    for key in loc:
        if isinstance(key, int):
            name = node[key].get("name") if isinstance(node, list) and key < len(node) and \
                isinstance(node[key], dict) else None
            out += f"[{name}]" if isinstance(name, str) and name else f"[{key}]"
        else:
            out += f".{key}" if out else str(key)
        if isinstance(node, dict):
            node = node.get(key)
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            node = None
    return out or "<top>"


def model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the last key of `loc` (to list what it does accept); a
    list's index and a mapping's own key (`types.<name>`) lead to the model of its items."""
    model: Any = root
    keys = iter(loc[:-1])
    for key in keys:
        if isinstance(key, int):
            continue
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return None
        if _is_mapping(field.annotation):
            next(keys, None)  # the mapping's own key: its value is the model
        model = _model_in(field.annotation)
        if model is None:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _is_mapping(annotation: Any) -> bool:
    return typing.get_origin(annotation) is dict or any(typing.get_origin(a) is dict
                                                        for a in typing.get_args(annotation))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def unknown_key(root: type[BaseModel], loc: tuple, where: str) -> str:
    """`routes[sales]: unknown key 'on_legacy_falure' (did you mean 'on_legacy_failure'?)`."""
    key = str(loc[-1])
    model = model_at(root, loc)
    known = list(model.model_fields) if model is not None else []
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}" if known else ""
    return f"{where}: unknown key '{key}'" + (f" ({hint})" if hint else "")
