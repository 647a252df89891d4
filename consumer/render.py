"""Manifest templates: Kubernetes YAML with ``{{ NAME }}`` variables, rendered per message.

Rendering happens on the YAML node tree, never on text. Pasting a message's values into YAML text and
parsing the result lets a value such as ``"x\\nkind: Secret"`` rewrite the manifest; here a value can
only ever become (part of) the one scalar its variable sits in.

How: at compile time every ``{{ NAME }}`` is swapped for a sentinel word (letters and digits, with a
per-compile random nonce), the text is composed into YAML nodes, and each document is turned into a
tree of small builders. Static scalars are constructed once; containers are rebuilt on every render so
callers may mutate what they get; scalars holding sentinels become "holes" that splice the values in.
The tree of a document is then turned into one generated Python function of nested dict and list
displays (`_generate`), which builds the same result with a fraction of the calls.
"""

from __future__ import annotations

import ast
import base64
import json
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = [
    "VARIABLE_PATTERN",
    "CompiledDocument",
    "MissingVariablesError",
    "RenderError",
    "TemplateError",
    "compile_manifest",
]

VARIABLE_PATTERN: re.Pattern[str] = re.compile(r"\{\{[ \t]*([A-Za-z_][A-Za-z0-9_.-]*)[ \t]*\}\}")

_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_TAG = "tag:yaml.org,2002:"
_STR, _MAP, _SEQ = _TAG + "str", _TAG + "map", _TAG + "seq"
_MERGE, _VALUE, _TIMESTAMP, _BINARY = _TAG + "merge", _TAG + "value", _TAG + "timestamp", _TAG + "binary"
_TYPED = frozenset({_TAG + "bool", _TAG + "int", _TAG + "float", _TAG + "null"})
# Tag our loader gives plain (unquoted, untagged) scalars that hold a variable: their type is only
# known once the value is in, so resolution is deferred to render time.
_PLAIN_HOLE = "tag:gitfaas:plain-hole"

_RESOLVER = yaml.resolver.Resolver()
_CONSTRUCTOR = yaml.constructor.SafeConstructor()

# Every text YAML 1.1 resolves to bool/int/float/null is made only of these characters (see the
# implicit resolvers in yaml.resolver), and within this set no text can be read as anything but one
# plain scalar (no space, so no ": " or " #"; no indicator characters). So: outside this set a value
# is kept as the exact string; inside it we ask YAML's own resolver. Anything it does not resolve to
# bool/int/float/null (str, timestamp...) is kept as the exact string too. fullmatch matters: the
# resolver's own regexes end in "$", which also matches before a trailing newline ("2\n" -> int).
_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")  # what YAML 1.1 counts as a new line
_MAYBE_TYPED = re.compile(r"[-+0-9A-Za-z_.:~]*")

# Limits on one manifest file, checked on YAML's event stream before any node is built. Without them
# a small file can take the consumer down: the C composer recurses once per nesting level (a few
# hundred thousand `[` overflow the C stack and kill the process), and aliases let a few hundred bytes
# stand for billions of nodes ("billion laughs") that every render would build afresh. Kubernetes
# manifests are nowhere near these numbers.
MAX_DEPTH = 100  # mappings and sequences open at once
MAX_NODES_PER_DOCUMENT = 50_000  # keys, values and items, an alias counted as the nodes it stands for
MAX_NODES_PER_FILE = 200_000  # the same, over all the documents of the file
MAX_ALIASES_PER_FILE = 1_000
MAX_DOCUMENTS_PER_FILE = 1_000


class TemplateError(ValueError):
    """A manifest file itself is unusable (bad YAML, not a mapping, unsupported tag...).

    Raised when a commit is loaded, long before any message arrives, so it can be reported against
    the file and line that need fixing.
    """

    def __init__(self, source: str, line: int | None, message: str) -> None:
        self.source = source
        self.line = line
        self.message = message
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {message}")


class MissingVariablesError(ValueError):
    """A message lacks values for variables a document uses; lists all of them so one fix suffices."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names: tuple[str, ...] = tuple(sorted(set(names)))
        super().__init__("missing variables: " + ", ".join(self.names))


class RenderError(ValueError):
    """A message's value cannot be placed (it would collide with another key, or is not a string)."""


Values = Mapping[str, str]
Builder = Callable[[Values], Any]


def _construct(node: yaml.ScalarNode) -> Any:
    """SafeConstructor's scalar logic, called directly: construct_object would cache every node forever."""
    return _CONSTRUCTOR.yaml_constructors[node.tag](_CONSTRUCTOR, node)


def _resolve_plain(text: str) -> Any:
    """Type a plain scalar's final text the way YAML would, without ever parsing it as YAML."""
    if not _MAYBE_TYPED.fullmatch(text):
        return text
    tag = _RESOLVER.resolve(yaml.ScalarNode, text, (True, False))
    if tag not in _TYPED:
        return text
    try:
        return _construct(yaml.ScalarNode(tag, text))
    except ValueError:  # e.g. "0x_" matches the int regex but has no digits; YAML itself would crash
        return text


class _Hole:
    """A scalar with variables: literal pieces (already YAML-decoded) around the variables' values."""

    __slots__ = ("literals", "names", "pairs", "plain", "single")

    def __init__(self, literals: tuple[str, ...], names: tuple[str, ...], plain: bool) -> None:
        self.literals = literals
        self.names = frozenset(names)
        self.pairs = tuple(zip(names, literals[1:], strict=True))
        self.plain = plain
        self.single = names[0] if literals == ("", "") else None

    def text(self, values: Values) -> str:
        if self.single is not None:
            return values[self.single]
        parts = [self.literals[0]]
        for name, literal in self.pairs:
            parts.append(values[name])
            parts.append(literal)
        return "".join(parts)

    def __call__(self, values: Values) -> Any:
        text = self.text(values)
        return _resolve_plain(text) if self.plain else text


class _Mapping:
    """Rebuilds a mapping: copy of the static part, then fill in dynamic values.

    Keys with variables take the slow path (`keyed`), which checks that no substituted key collides
    with a sibling: a value must never be able to remove a key.
    """

    __slots__ = ("dynamic", "keyed", "line", "names", "source", "template")

    def __init__(
        self,
        template: dict[Any, Any],
        dynamic: tuple[tuple[Any, Builder], ...],
        keyed: tuple[tuple[Any, _Hole | None, Any, bool], ...] | None,
        names: frozenset[str],
        source: str,
        line: int,
    ) -> None:
        self.template = template
        self.dynamic = dynamic
        self.keyed = keyed
        self.names = names
        self.source = source
        self.line = line

    def __call__(self, values: Values) -> dict[Any, Any]:
        if self.keyed is not None:
            return self._build_keyed(values)
        out = self.template.copy()
        for key, build in self.dynamic:
            out[key] = build(values)
        return out

    def _build_keyed(self, values: Values) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        from_variable: dict[str, bool] = {}  # key as JSON will spell it -> produced by a variable?
        for key, key_hole, value, dynamic in self.keyed or ():
            if key_hole is not None:
                key = spelled = key_hole.text(values)
            else:
                spelled = key if isinstance(key, str) else json.dumps(key)
            earlier = from_variable.get(spelled)
            # Static keys may override each other (YAML merge `<<`); anything involving a variable may not.
            if earlier is not None and (earlier or key_hole is not None):
                culprits = sorted(key_hole.names) if key_hole is not None else []
                raise RenderError(
                    f"{self.source}:{self.line}: key {spelled!r} "
                    + (f"(from variables {', '.join(culprits)}) " if culprits else "")
                    + "collides with another key of the same mapping after substitution"
                )
            from_variable[spelled] = key_hole is not None
            out[key] = value(values) if dynamic else value
        return out


class _Sequence:
    """Rebuilds a list: copy of the static items, then fill in dynamic ones."""

    __slots__ = ("dynamic", "names", "template")

    def __init__(self, template: list[Any], dynamic: tuple[tuple[int, Builder], ...], names: frozenset[str]):
        self.template = template
        self.dynamic = dynamic
        self.names = names

    def __call__(self, values: Values) -> list[Any]:
        out = self.template.copy()
        for index, build in self.dynamic:
            out[index] = build(values)
        return out


# A compiled node: (True, builder) when it must be built per render, (False, value) for an immutable
# static scalar that every render may share.
_Compiled = tuple[bool, Any]


class _Compiler:
    """Turns one file's composed nodes into builders, one document after the other.

    Nodes are remembered by identity, and every table keyed by `id(node)` also holds the node itself:
    an id is only unique among live objects, so once a node is freed a node of a later document may
    get its id. (A memo of bare ids, kept for the whole file, once handed later documents results
    compiled for freed nodes: another document's name, subtree or variable.) The memo lasts one
    document: YAML anchors do not cross `---`, so no node can be shared between documents.
    """

    def __init__(self, source: str, sentinel: re.Pattern[str], names: list[str]) -> None:
        self.source = source
        self.sentinel = sentinel
        self.names = names
        self.seen: set[int] = set()  # sentinel indexes found in scalars (not object ids)
        self._memo: dict[int, tuple[yaml.Node, _Compiled]] = {}  # aliases: one compiled builder per node
        self._active: dict[int, yaml.Node] = {}  # nodes being compiled / flattened: guards against recursion
        self._merging: dict[int, yaml.Node] = {}

    def start_document(self) -> None:
        """Forget the previous document's nodes (and let them be freed)."""
        self._memo.clear()

    def restore(self, text: str) -> str:
        """Give messages the template's spelling back instead of sentinel words."""
        return self.sentinel.sub(lambda m: "{{" + self.names[int(m[1])] + "}}", text)

    def error(self, where: yaml.Node | yaml.Event, message: str) -> TemplateError:
        mark = where.start_mark
        line = mark.line + 1 if mark is not None else None
        return TemplateError(self.source, line, self.restore(message).replace(_TAG, "!!"))

    def node(self, node: yaml.Node) -> _Compiled:
        key = id(node)
        known = self._memo.get(key)
        if known is not None and known[0] is node:  # always the node itself while it is in the memo
            return known[1]
        if self._active.get(key) is node:
            raise self.error(node, "recursive alias: a node cannot contain itself")
        if self.sentinel.search(node.tag):
            raise self.error(node, "variables are not allowed in tags")
        self._active[key] = node
        try:
            if isinstance(node, yaml.MappingNode):
                compiled: _Compiled = (True, self.mapping(node))
            elif isinstance(node, yaml.SequenceNode):
                compiled = (True, self.sequence(node))
            else:
                hole = self.hole(node)
                compiled = (True, hole) if hole is not None else (False, self.static_scalar(node, key=False))
        finally:
            del self._active[key]
        self._memo[key] = (node, compiled)
        return compiled

    def hole(self, node: yaml.ScalarNode) -> _Hole | None:
        parts = self.sentinel.split(node.value)
        if len(parts) == 1:
            return None
        if node.tag not in (_PLAIN_HOLE, _STR):
            raise self.error(node, f"tag {node.tag} is not supported on a scalar with variables")
        indexes = [int(i) for i in parts[1::2]]
        self.seen.update(indexes)
        return _Hole(tuple(parts[0::2]), tuple(self.names[i] for i in indexes), node.tag == _PLAIN_HOLE)

    def static_scalar(self, node: yaml.ScalarNode, key: bool) -> Any:
        tag = node.tag
        # Timestamps stay the text written (as kubectl does): a datetime would not survive json.dumps.
        # `=` and `<<` outside a merge position are just text.
        if tag in (_STR, _TIMESTAMP, _VALUE) or (tag == _MERGE and not key):
            return node.value
        try:
            if tag in _TYPED:
                return _construct(node)
            if tag == _BINARY:  # bytes are not JSON; base64 text is what Kubernetes expects for them
                return base64.b64encode(_construct(node)).decode("ascii")
        except (ValueError, yaml.YAMLError) as exc:
            raise self.error(node, f"invalid {tag} scalar: {exc}") from None
        raise self.error(node, f"unsupported tag {tag}")

    def flatten(self, node: yaml.MappingNode) -> list[tuple[yaml.Node, yaml.Node, bool]]:
        """Pairs of a mapping with YAML merge keys (`<<`) expanded, in override order (later wins).

        The flag marks pairs written in this mapping, as opposed to merged in: only those must be
        unique. Unlike SafeConstructor.flatten_mapping this leaves the (possibly shared) nodes alone.
        """
        key = id(node)
        if self._merging.get(key) is node:
            raise self.error(node, "recursive merge: a mapping cannot merge itself")
        self._merging[key] = node
        try:
            merged: list[tuple[yaml.Node, yaml.Node, bool]] = []
            written: list[tuple[yaml.Node, yaml.Node, bool]] = []
            for key_node, value_node in node.value:
                if key_node.tag != _MERGE:
                    written.append((key_node, value_node, True))
                    continue
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for merged_node in reversed(sources):  # earlier sources take precedence
                    if not isinstance(merged_node, yaml.MappingNode) or merged_node.tag != _MAP:
                        raise self.error(value_node, "`<<` expects a mapping or a list of mappings")
                    merged.extend((k, v, False) for k, v, _ in self.flatten(merged_node))
            return merged + written
        finally:
            del self._merging[key]

    def mapping(self, node: yaml.MappingNode) -> _Mapping:
        if node.tag != _MAP:
            raise self.error(node, f"unsupported tag {node.tag}")
        entries: list[tuple[Any, _Hole | None, _Compiled]] = []
        written: dict[str, yaml.Node] = {}
        for key_node, value_node, is_written in self.flatten(node):
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error(key_node, "mapping keys must be scalars")
            if self.sentinel.search(key_node.tag):
                raise self.error(key_node, "variables are not allowed in tags")
            key_hole = self.hole(key_node)
            key = None if key_hole is not None else self.static_scalar(key_node, key=True)
            if key_hole is None and is_written:
                spelled = key if isinstance(key, str) else json.dumps(key)
                if spelled in written:
                    raise self.error(key_node, f"duplicate key {spelled!r}")
                written[spelled] = key_node
            entries.append((key, key_hole, self.node(value_node)))

        line = node.start_mark.line + 1
        if any(key_hole is not None for _, key_hole, _ in entries):
            keyed = tuple((key, key_hole, value, dynamic) for key, key_hole, (dynamic, value) in entries)
            names = frozenset().union(
                *(key_hole.names for _, key_hole, _ in entries if key_hole is not None),
                *(value.names for _, _, (dynamic, value) in entries if dynamic),
            )
            return _Mapping({}, (), keyed, names, self.source, line)

        template: dict[Any, Any] = {}
        for key, _, (dynamic, value) in entries:  # later pairs override earlier ones, as in YAML
            template[key] = (dynamic, value)
        dynamic_items = tuple((key, value) for key, (dynamic, value) in template.items() if dynamic)
        names = frozenset().union(*(build.names for _, build in dynamic_items))
        static = {key: None if dynamic else value for key, (dynamic, value) in template.items()}
        return _Mapping(static, dynamic_items, None, names, self.source, line)

    def sequence(self, node: yaml.SequenceNode) -> _Sequence:
        if node.tag != _SEQ:
            raise self.error(node, f"unsupported tag {node.tag}")
        items = [self.node(item) for item in node.value]
        template = [None if dynamic else value for dynamic, value in items]
        dynamic_items = tuple((index, value) for index, (dynamic, value) in enumerate(items) if dynamic)
        names = frozenset().union(*(build.names for _, build in dynamic_items))
        return _Sequence(template, dynamic_items, names)


MAX_GENERATED_NODES = 5_000  # larger documents keep the builder tree (compiling the code would take long)
# Per file: generating code tripled the load time of a file at the size limits (1 MiB: 0.45 -> 1.5 s),
# so past this many generated nodes (~0.15 s) the file's other documents keep the tree (typical manifests are far
# below: the 60-line Job of B5 is ~150).
MAX_GENERATED_NODES_PER_FILE = 5_000


class _TooLarge(Exception):
    pass


def _generate(build: _Mapping, budget: list[int] | None = None) -> Builder | None:
    """The builder tree as one Python function of nested dict and list displays (or None).

    Same result as calling `build`, in the same order, with far fewer calls: containers are displays,
    static scalars constants (shared, as the tree shares them), single-variable strings a lookup
    in `values`. What the tree does in more than a line (typed plain scalars, keys with variables
    and their collision check) is left to the tree's own objects, called from the code. Nothing of
    the manifest becomes source text: the code is built as an AST whose constants are the values
    themselves.
    """
    helpers: dict[str, Any] = {"_resolve_plain": _resolve_plain}
    count = 0

    def values_get(name: str) -> ast.expr:
        return ast.Subscript(ast.Name("values", ast.Load()), ast.Constant(name), ast.Load())

    def call(builder: Builder) -> ast.expr:
        helper = f"_b{len(helpers)}"
        helpers[helper] = builder
        return ast.Call(ast.Name(helper, ast.Load()), [ast.Name("values", ast.Load())], [])

    def text(hole: _Hole) -> ast.expr:
        if hole.single is not None:
            return values_get(hole.single)
        parts: list[ast.expr] = [ast.Constant(hole.literals[0])]
        for name, literal in hole.pairs:
            parts += [values_get(name), ast.Constant(literal)]
        return ast.Call(ast.Attribute(ast.Constant(""), "join", ast.Load()),
                        [ast.Tuple(parts, ast.Load())], [])

    def expression(builder: Builder) -> ast.expr:
        nonlocal count
        count += 1 + len(getattr(builder, "template", ()))  # static items too
        if count > MAX_GENERATED_NODES or (budget is not None and count > budget[0]):
            raise _TooLarge
        if type(builder) is _Hole:
            if builder.plain:
                return ast.Call(ast.Name("_resolve_plain", ast.Load()), [text(builder)], [])
            return text(builder)
        if type(builder) is _Sequence:
            dynamic = dict(builder.dynamic)
            return ast.List([expression(dynamic[index]) if index in dynamic else ast.Constant(item)
                             for index, item in enumerate(builder.template)], ast.Load())
        if type(builder) is _Mapping and builder.keyed is None:
            dynamic = dict(builder.dynamic)
            keys: list[ast.expr | None] = []
            items: list[ast.expr] = []
            for key, value in builder.template.items():
                keys.append(ast.Constant(key))
                items.append(expression(dynamic[key]) if key in dynamic else ast.Constant(value))
            return ast.Dict(keys, items)
        return call(builder)

    try:
        body = expression(build)
        function = ast.FunctionDef(
            name="build", args=ast.arguments(posonlyargs=[], args=[ast.arg("values")], kwonlyargs=[],
                                             kw_defaults=[], defaults=[]),
            body=[ast.Return(body)], decorator_list=[], returns=None)
        module = ast.fix_missing_locations(ast.Module([function], type_ignores=[]))
        namespace = dict(helpers)
        exec(compile(module, "<gitfaas manifest>", "exec"), namespace)  # an AST of constants: no manifest text
    except (_TooLarge, RecursionError, MemoryError, SyntaxError, ValueError, TypeError):
        return None
    generated: Builder = namespace["build"]
    if budget is not None:
        budget[0] -= count
    return generated


@dataclass(frozen=True, slots=True)
class CompiledDocument:
    """One manifest document, ready to be rendered for many messages.

    `line` is the 1-based line where the document's content (its first key) starts. Instead of a
    `static` dict with sentinel words in it, `sample()` renders the document with each variable
    shown as `{{NAME}}`; use it to validate apiVersion/kind/metadata.name at load time.
    """

    source: str
    index: int
    line: int
    variables: frozenset[str]
    _build: _Mapping = field(repr=False, compare=False)
    _fast: Builder | None = field(default=None, repr=False, compare=False)  # `_generate(_build)`

    def render(self, values: Values) -> dict[str, Any]:
        """A fresh dict (nothing shared with other renders) for one message's values."""
        problems = [name for name in self.variables if not isinstance(values.get(name), str)]
        if problems:
            missing = [name for name in problems if name not in values]
            if missing:
                raise MissingVariablesError(missing)
            raise RenderError(f"{self.source}: values must be strings: {', '.join(sorted(problems))}")
        return self._build(values) if self._fast is None else self._fast(values)

    def sample(self) -> dict[str, Any]:
        """The document with every variable left visible as `{{NAME}}` (typed as a string)."""
        return self._build({name: "{{" + name + "}}" for name in self.variables})


def _loader_class(prefix: str) -> type:
    class Loader(_BaseLoader):  # type: ignore[misc, valid-type]
        def resolve(self, kind: type, value: str, implicit: tuple[bool, bool]) -> str:
            if kind is yaml.ScalarNode and implicit[0] and prefix in value:
                return _PLAIN_HOLE
            return super().resolve(kind, value, implicit)

    return Loader


def _compose_all(text: str, loader_class: type) -> Iterator[yaml.Node]:
    loader = loader_class(text)
    try:
        while loader.check_node():
            yield loader.get_node()
    finally:
        loader.dispose()


def _is_empty(node: yaml.Node) -> bool:
    """`---` followed by nothing (or a bare null): kubectl skips these too."""
    return isinstance(node, yaml.ScalarNode) and node.tag == _TAG + "null"


def compile_manifest(text: str, source: str) -> list[CompiledDocument]:
    """Compile every non-empty document of one manifest file.

    Empty documents (`---` with nothing, or only comments) are skipped and not counted in `index`.
    A document that is not a mapping raises TemplateError. Variables only count where they sit in a
    scalar (key or value); in comments they are ignored, in anchors or tags they are an error.
    """
    nonce = secrets.token_hex(8)
    while f"gfv{nonce}" in text:  # astronomically unlikely, but then user text could forge a variable
        nonce = secrets.token_hex(8)
    prefix = f"gfv{nonce}n"
    names: list[str] = []

    def to_sentinel(match: re.Match[str]) -> str:
        names.append(match[1])
        return f"{prefix}{len(names) - 1}z"

    # Same line count as the original (sentinels hold no newline), so YAML's line numbers stay right.
    substituted = VARIABLE_PATTERN.sub(to_sentinel, text)
    compiler = _Compiler(source, re.compile(prefix + r"(\d+)z"), names)
    loader_class = _loader_class(prefix)
    documents: list[CompiledDocument] = []
    budget = [MAX_GENERATED_NODES_PER_FILE]  # what is left of it, shared by the file's documents
    try:
        _check_limits(substituted, loader_class, compiler)
        for root in _compose_all(substituted, loader_class):
            compiler.start_document()
            if _is_empty(root):
                continue
            if not isinstance(root, yaml.MappingNode):
                raise compiler.error(root, f"document {len(documents)} is not a mapping")
            build = compiler.mapping(root)
            documents.append(
                CompiledDocument(source, len(documents), root.start_mark.line + 1, build.names, build,
                                 _generate(build, budget))
            )
        if len(compiler.seen) < len(names):
            _reject_hidden_variables(substituted, loader_class, compiler)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark is not None else None
        message = compiler.restore(" ".join(part for part in (exc.context, exc.problem) if part) or str(exc))
        lines = _LINE_BREAK.split(text)
        if line is not None and line <= len(lines):  # libyaml's messages do not quote the text
            message += f": {lines[line - 1].strip()[:120]!r}"
        raise TemplateError(source, line, message) from None
    except yaml.YAMLError as exc:
        raise TemplateError(source, None, compiler.restore(str(exc))) from None
    except RecursionError:
        raise TemplateError(source, None, "manifest is nested too deeply") from None
    return documents


def _check_limits(text: str, loader_class: type, compiler: _Compiler) -> None:
    """Refuse a file over the size limits, reading only its event stream (no recursion, no nodes built).

    Each alias counts as the number of nodes its anchor stands for, so a "billion laughs" is stopped
    after a few hundred events instead of being expanded.
    """
    loader = loader_class(text)
    try:
        documents = aliases = earlier_nodes = nodes = 0
        sizes: dict[str, int] = {}  # anchor -> nodes it stands for (anchors are per document)
        open_collections: list[tuple[str | None, int]] = []  # (anchor, nodes before it)
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > MAX_DOCUMENTS_PER_FILE:
                    raise compiler.error(event, f"more than {MAX_DOCUMENTS_PER_FILE} YAML documents in one file")
                earlier_nodes += nodes
                nodes = 0
                sizes.clear()
                continue
            if isinstance(event, yaml.AliasEvent):
                aliases += 1
                if aliases > MAX_ALIASES_PER_FILE:
                    raise compiler.error(event, f"more than {MAX_ALIASES_PER_FILE} aliases (*name) in one file")
                nodes += sizes.get(event.anchor, 1)
            elif isinstance(event, yaml.ScalarEvent):
                nodes += 1
                if event.anchor is not None:
                    sizes[event.anchor] = 1
            elif isinstance(event, yaml.CollectionStartEvent):
                open_collections.append((event.anchor, nodes))
                nodes += 1
                if len(open_collections) > MAX_DEPTH:
                    raise compiler.error(event, f"nested more than {MAX_DEPTH} levels deep")
            elif isinstance(event, yaml.CollectionEndEvent):
                anchor, before = open_collections.pop()
                if anchor is not None:
                    sizes[anchor] = nodes - before
                continue
            else:
                continue
            if nodes > MAX_NODES_PER_DOCUMENT:
                raise compiler.error(event, f"document has more than {MAX_NODES_PER_DOCUMENT} nodes, counting "
                                            "each alias as the nodes it stands for (an alias bomb?)")
            if earlier_nodes + nodes > MAX_NODES_PER_FILE:
                raise compiler.error(event, f"file has more than {MAX_NODES_PER_FILE} nodes, counting each "
                                            "alias as the nodes it stands for")
    finally:
        loader.dispose()


def _reject_hidden_variables(text: str, loader_class: type, compiler: _Compiler) -> None:
    """A variable that is in no scalar is in a comment (fine) or an anchor name (silently unused: reject)."""
    for event in yaml.parse(text, Loader=loader_class):
        anchor = getattr(event, "anchor", None)
        if anchor and compiler.sentinel.search(anchor):
            raise compiler.error(event, "variables are not allowed in anchor names")
