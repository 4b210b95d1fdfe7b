"""The `jaxprompt` package's import graph has no cycles, function-level imports included."""
from __future__ import annotations

import ast
import os

import jaxprompt

ROOT = os.path.dirname(jaxprompt.__file__)


def _modules() -> dict[str, str]:
  """module name -> file, for every .py file under the package."""
  out = {}
  for d, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(d, f), os.path.dirname(ROOT))[:-3]
        name = rel.replace(os.sep, ".")
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = os.path.join(d, f)
  return out


def import_graph() -> dict[str, set[str]]:
  """module -> the jaxprompt modules it imports (at any level of the file)."""
  mods = _modules()
  graph = {}
  for name, path in mods.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        deps.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
        for a in node.names:
          sub = f"{base}.{a.name}"
          deps.add(sub if sub in mods else base)
    graph[name] = {d for d in deps if d in mods and d != name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
  """One cycle as [a, b, ..., a], or [] if the graph is acyclic."""
  state, stack = {}, []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if m not in state:
        found = visit(m)
        if found:
          return found
    stack.pop()
    state[n] = 2
    return []

  for n in sorted(graph):
    if n not in state:
      found = visit(n)
      if found:
        return found
  return []


def test_finder_sees_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_graph_reads_the_package():
  g = import_graph()
  # Converters import the towers, never the reverse.
  assert "jaxprompt.models.clip" in g["jaxprompt.convert.openai_clip"]
  assert "jaxprompt.models.vit" in g["jaxprompt.convert.timm_vit"]
  assert not any(d.startswith("jaxprompt.convert") for d in g["jaxprompt.models.clip"] | g["jaxprompt.models.vit"])
  # The LPT model does not depend on its losses.
  assert "jaxprompt.lpt.losses" not in g["jaxprompt.lpt.model"]


def test_no_import_cycles():
  cycle = find_cycle(import_graph())
  assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_families_do_not_import_each_other():
  g = import_graph()
  families = ("jaxprompt.clipreid", "jaxprompt.lpt", "jaxprompt.coop")
  for mod, deps in g.items():
    mine = [f for f in families if mod == f or mod.startswith(f + ".")]
    if not mine:
      continue
    others = [d for d in deps for f in families if f != mine[0] and (d == f or d.startswith(f + "."))]
    assert not others, f"{mod} imports another method family: {others}"
