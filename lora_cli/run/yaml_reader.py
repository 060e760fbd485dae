"""YAML read with limits: a config is small, so an alias bomb, deep nesting or a huge
file is refused at once (one message), never expanded; a key written twice in one
mapping is an error, not silently the last one."""

from __future__ import annotations

import yaml

# A config is a few hundred values: these limits are generous, and keep a hostile file
# (an alias bomb: 1 KB that expands to billions of values; nesting 50,000 deep) from
# taking minutes and gigabytes, or a RecursionError.
MAX_CONFIG_BYTES = 1 << 20


MAX_YAML_DEPTH = 64


MAX_YAML_VALUES = 100_000


class YAMLLimit(yaml.composer.ComposerError):
    """A YAML document beyond the size a config can have."""


class BoundedLoader(yaml.SafeLoader):
    """safe_load with limits: nesting at most MAX_YAML_DEPTH deep and at most
    MAX_YAML_VALUES values, both counted with aliases expanded."""

    def compose_node(self, parent, index):
        depth = getattr(self, "_depth", 0)
        if depth >= MAX_YAML_DEPTH:
            raise YAMLLimit(None, None, f"nesting deeper than {MAX_YAML_DEPTH} levels",
                             self.peek_event().start_mark)
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth

    def compose_document(self):
        node = super().compose_document()
        self._measure(node, {}, set())
        return node

    def _measure(self, node, sizes: dict, open_: set) -> tuple[int, int]:
        """(values, depth) of ``node`` with aliases expanded; each distinct node is measured once."""
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:     # an alias to a node that contains it: one value (validation refuses it)
            return 1, 1
        open_.add(key)
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        values, depth = 1, 1
        for child in children:
            v, d = self._measure(child, sizes, open_)
            values, depth = values + v, max(depth, d + 1)
        open_.discard(key)
        if values > MAX_YAML_VALUES or depth > MAX_YAML_DEPTH:
            what = f"more than {MAX_YAML_VALUES:,} values" if values > MAX_YAML_VALUES else \
                f"nesting deeper than {MAX_YAML_DEPTH} levels"
            raise YAMLLimit(None, None, f"aliases expand to {what}", node.start_mark)
        sizes[key] = (values, depth)
        return values, depth


def load_yaml(text: str, loader: type = BoundedLoader):
    """YAML text as Python data, read by ``loader`` (a BoundedLoader)."""
    return yaml.load(text, Loader=loader)


class UniqueKeyLoader(BoundedLoader):
    """safe_load that rejects a key written twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable key: let PyYAML report it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)
