"""Where a key or a variable sits in a manifest file, so `gitfaas validate` names the line to fix.

The consumer's compiled documents keep no positions (they are rendered for every message and
should stay small); an author's check can afford to read the file once more. Variables are swapped
for plain words first, exactly as the compiler does, so the file composes as YAML whatever the
variables' positions, and line numbers stay those of the original text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

from consumer.render import VARIABLE_PATTERN

_Loader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_NULL = "tag:yaml.org,2002:null"
_WORD = re.compile(r"gitfaasvariable(\d+)x")
# The file was accepted by the compiler, whose limits bound nesting and alias expansion; this bound
# only keeps the walk finite whatever happens.
_MAX_DEPTH = 100


@dataclass
class DocumentLines:
    start: int
    keys: dict[tuple[str | int, ...], int] = field(default_factory=dict)
    variables: dict[str, int] = field(default_factory=dict)


class ManifestLines:
    """Lines of one file's keys (by path) and variables (first use), per non-empty document."""

    def __init__(self, text: str) -> None:
        names: list[str] = []

        def to_word(match: re.Match[str]) -> str:
            names.append(match[1])
            return f"gitfaasvariable{len(names) - 1}x"

        self._names = names
        self.documents: list[DocumentLines] = []
        try:
            for root in yaml.compose_all(VARIABLE_PATTERN.sub(to_word, text), Loader=_Loader):
                if root is None or (isinstance(root, yaml.ScalarNode) and root.tag == _NULL):
                    continue  # empty documents are not counted, as in compile_manifest
                document = DocumentLines(root.start_mark.line + 1)
                self._walk(root, (), document, set())
                self.documents.append(document)
        except (yaml.YAMLError, RecursionError):
            self.documents = []  # no lines then: each problem falls back to its document's start

    def _walk(self, node: yaml.Node, path: tuple[str | int, ...], document: DocumentLines,
              active: set[int]) -> None:
        if len(path) > _MAX_DEPTH or id(node) in active:  # `active` holds the nodes on this path only
            return
        active.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            self._variables(node, document)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                document.keys.setdefault((*path, index), item.start_mark.line + 1)
                self._walk(item, (*path, index), document, active)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    self._variables(key, document)
                    child = (*path, self._restore(key.value))
                    document.keys.setdefault(child, key.start_mark.line + 1)
                    self._walk(value, child, document, active)
        active.discard(id(node))

    def _variables(self, node: yaml.ScalarNode, document: DocumentLines) -> None:
        for index in _indexes(node.value):
            if index < len(self._names):  # the text itself may hold such a word: not one of ours
                document.variables.setdefault(self._names[index], node.start_mark.line + 1)

    def _restore(self, text: str) -> str:
        for index in _indexes(text):
            if index < len(self._names):
                text = text.replace(f"gitfaasvariable{index}x", "{{" + self._names[index] + "}}")
        return text

    def key_line(self, document: int, path: tuple[str | int, ...] | None, default: int) -> int:
        """The line of `path` in the document (or of its nearest written parent), else `default`."""
        if document >= len(self.documents):
            return default
        found = self.documents[document]
        while path:
            if path in found.keys:
                return found.keys[path]
            path = path[:-1]
        return found.start if found.start else default

    def variable_line(self, document: int, name: str, default: int) -> int:
        if document >= len(self.documents):
            return default
        return self.documents[document].variables.get(name, default)


def _indexes(text: str) -> list[int]:
    return [int(match[1]) for match in _WORD.finditer(text)]
