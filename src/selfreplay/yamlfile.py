"""Reading the YAML files users give (configs, experiments) with bounds: one-line errors instead of hanging or
silently dropping a value.

- a file over :data:`MAX_BYTES` is refused before it is read (configs are a few kB);
- aliases are counted as expanded: a "billion laughs" file (nested aliases, tiny on disk, billions of values once
  copied into a config tree) is refused when its expansion passes :data:`MAX_VALUES`, as is an alias to itself;
- a key given twice in one mapping, which YAML loaders resolve silently (the last wins), is refused, named with
  its dotted path and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from selfreplay.errors import SelfReplayError

MAX_BYTES = 1 << 20  # 1 MiB
MAX_VALUES = 1_000_000  # scalars, lists and mappings after expanding aliases
MERGE_TAG = "tag:yaml.org,2002:merge"


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The data of the YAML file ``path`` (``what`` names it in errors), checked as the module docstring says."""
    where = f"{what} {path}"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise SelfReplayError(f"{where}: cannot read it ({e.strerror or e})") from None
    if len(data) > MAX_BYTES:
        raise SelfReplayError(f"{where}: larger than {MAX_BYTES // 2 ** 20} MiB; not a config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SelfReplayError(f"{where}: not valid YAML (not UTF-8 text: {e.reason} at byte {e.start})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_node(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as e:  # yaml errors carry multi-line context
        raise SelfReplayError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise SelfReplayError(f"{where}: nested too deeply") from None
    finally:
        loader.dispose()


def _check_node(root: Node, where: str) -> None:
    """Refuse duplicate keys and an expansion over MAX_VALUES (sizes memoised per node: aliases share nodes)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Node, path: str) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise SelfReplayError(f"{where}: {path or 'the document'} holds an alias to itself (line "
                                  f"{node.start_mark.line + 1})")
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, SequenceNode):
            total += sum(size(child, f"{path}[{i}]") for i, child in enumerate(node.value))
        elif isinstance(node, MappingNode):
            seen: set = set()
            for key, value in node.value:
                if isinstance(key, ScalarNode) and key.tag != MERGE_TAG:
                    name = f"{path}.{key.value}" if path else key.value
                    if (key.tag, key.value) in seen:
                        raise SelfReplayError(f"{where}: duplicate key '{name}' (line {key.start_mark.line + 1}); "
                                              f"give each key once")
                    seen.add((key.tag, key.value))
                else:
                    name = path
                total += size(key, path) + size(value, name)
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        if total > MAX_VALUES:
            raise SelfReplayError(f"{where}: expands to over {MAX_VALUES:,} values through its aliases (a YAML "
                                  f"alias bomb?); refusing to load it")
        return total

    size(root, "")
