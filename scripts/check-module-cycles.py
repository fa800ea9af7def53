#!/usr/bin/env python3
"""Fails when two modules of src/ import each other (directly or through others), or when a
file in src/ has more than 600 lines of code before its tests.

A module is a file: src/proxy/admission.rs is `proxy::admission`, src/proxy/mod.rs is
`proxy`. Every `crate::a::b::c` path in a file (in `use` lines or written inline) is an
edge to the deepest module file it names; `super::x` is resolved the same way. Tests
(`#[cfg(test)]` and below) are not counted: a test may reach across modules.
Written by hand because cargo-modules would need a nightly toolchain and a download at test
time; this reads the files as text, which is all the check needs.
"""
import pathlib
import re
import sys

SRC = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parent.parent / "src"
MAX_LINES = 600
# The test module, not any #[cfg(test)] item (a shared test fixture may be declared early).
TESTS = re.compile(r"#\[cfg\(test\)\]\s*(?:pub(?:\(crate\))?\s+)?mod tests\b")


def module_of(path: pathlib.Path) -> tuple:
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return parts


def code_before_tests(path: pathlib.Path) -> str:
    text = path.read_text()
    tests = TESTS.search(text)
    return text if tests is None else text[: tests.start()]


def without_comments(code: str) -> str:
    """Doc links such as [`crate::x`] are not imports."""
    return re.sub(r"//[^\n]*", "", code)


def main() -> int:
    files = sorted(p for p in SRC.rglob("*.rs") if "bin" not in p.relative_to(SRC).parts[:1])
    modules = {module_of(p): p for p in files}
    problems = []
    edges = {m: set() for m in modules}
    for module, path in modules.items():
        code = code_before_tests(path)
        lines = code.count("\n")
        if lines > MAX_LINES:
            problems.append(f"{path.relative_to(SRC.parent)}: {lines} lines before its tests (most {MAX_LINES})")
        # The module a `super::` path starts from: a mod.rs is its own folder's parent.
        own = module if path.name != "mod.rs" else module + ("",)
        for match in re.finditer(r"\b(crate|super)((?:::\w+)+)", without_comments(code)):
            root, rest = match.group(1), match.group(2).split("::")[1:]
            if root == "crate":
                names = list(rest)
            else:
                names = list(own[:-1]) + rest
                names = [n for n in names if n]
            target = None
            for end in range(len(names), 0, -1):
                if tuple(names[:end]) in modules:
                    target = tuple(names[:end])
                    break
            if target is not None and target != module:
                # Naming a module's own parent folder (mod.rs) is a declaration, not a use.
                if target == module[: len(target)] and not names[len(target):]:
                    continue
                edges[module].add(target)
    # Cycles: depth-first search over the import graph.
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    for cycle in cycles:
        problems.append("import cycle: " + " -> ".join("::".join(m) or "crate" for m in cycle))
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"module check: {len(modules)} modules, {sum(len(e) for e in edges.values())} imports, no cycle, none over {MAX_LINES} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
