#!/usr/bin/env python3
"""Lists the Rust functions longer than a limit (default 150 lines) outside tests, longest first.

DESIGN.md asks for functions that read as their phases, ~100 lines being a sign to split; issue 23 sets ~150
as the ceiling for non-test code. Usage: scripts/long_functions.py [LIMIT] [FOLDER...] (default: the
workspace's library and binary sources). Test code is left out: files under a tests/ or benches/ folder, and
items after a #[cfg(test)] line. Exit status 1 when any function is over the limit, so CI could use it.

Reads the files as text: a function's length is from its `fn` line to the line of its closing brace, found
by counting braces outside strings, chars and comments (good enough for this code base; a raw string with
unbalanced braces would confuse it).
"""
import os
import re
import sys

FN_START = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+\"[^\"]*\"\s+)?fn\s+(\w+)")


def code_only(line, in_block_comment):
    """The line with strings, chars and comments blanked; whether a /* */ comment is still open after it."""
    out = []
    i = 0
    in_string = False
    while i < len(line):
        two = line[i : i + 2]
        if in_block_comment:
            if two == "*/":
                in_block_comment = False
                i += 2
                continue
            i += 1
            continue
        if in_string:
            if line[i] == "\\":
                i += 2
                continue
            if line[i] == '"':
                in_string = False
            i += 1
            continue
        if two == "//":
            break
        if two == "/*":
            in_block_comment = True
            i += 2
            continue
        if line[i] == '"':
            in_string = True
            i += 1
            continue
        # A char literal such as '{' (not a lifetime such as 'a).
        m = re.match(r"'(\\.|[^\\'])'", line[i:])
        if m:
            i += m.end()
            continue
        out.append(line[i])
        i += 1
    return "".join(out), in_block_comment


def long_functions(path, limit):
    lines = open(path, encoding="utf-8", errors="replace").read().split("\n")
    found = []
    stack = []  # (name, start line, depth at which its body opened)
    depth = 0
    in_block_comment = False
    test_depth = None  # brace depth of a #[cfg(test)] item being skipped
    pending_test = False
    pending_fn = None
    for number, raw in enumerate(lines, 1):
        if raw.strip().startswith("#[cfg(test)]"):
            pending_test = True
        code, in_block_comment = code_only(raw, in_block_comment)
        m = FN_START.match(code)
        if m and test_depth is None:
            pending_fn = (m.group(7), number)
        for ch in code:
            if ch == "{":
                if pending_test and test_depth is None:
                    test_depth = depth
                pending_test = False
                if pending_fn is not None:
                    stack.append((pending_fn[0], pending_fn[1], depth))
                    pending_fn = None
                depth += 1
            elif ch == "}":
                depth -= 1
                if test_depth is not None and depth == test_depth:
                    test_depth = None
                if stack and stack[-1][2] == depth:
                    name, start, _ = stack.pop()
                    length = number - start + 1
                    if length > limit:
                        found.append((length, path, start, name))
            elif ch == ";":
                # A declaration without a body (trait method) or a one-line #[cfg(test)] item.
                if pending_fn is not None and depth >= 0:
                    pending_fn = None
                if pending_test and test_depth is None:
                    pending_test = False
    return found


def main():
    args = sys.argv[1:]
    limit = 150
    if args and args[0].isdigit():
        limit = int(args.pop(0))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folders = args or [os.path.join(root, d) for d in ("core", "comm", "alloc", "kernels-ptx", "bin")]
    found = []
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d not in ("tests", "benches", "target", "fuzz")]
            for name in filenames:
                if name.endswith(".rs"):
                    found += long_functions(os.path.join(dirpath, name), limit)
    for length, path, start, name in sorted(found, reverse=True):
        print(f"{length:5} lines  {os.path.relpath(path, root)}:{start}  {name}")
    print(f"{len(found)} functions over {limit} lines outside tests")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
