"""
tools/rules.py: the house rules of reading, as budgets. CI runs it after the tests.

    python -m tools.rules        # prints each number beside its budget; exit 1 when one is over

The budgets leave room: a reader who adds a recipe, a format or a rounding (tens of lines) stays
green. Two rules are not budgets but rules: no line over 100 characters in the three main files
(wrap it), and no code but a recipe class compares recipe names (give the recipe a method). When
a feature needs more than the room left, shorten something in the same change, or raise the budget
there with the reason in the commit message: the numbers are here to be argued with, not gamed.
"""

import os
import re
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGETS = {  # name: (limit, why); each leaves 80 lines or more of room (2026-12-03)
    "line of def quantize": (159, "the idea comes first: a reader meets the quantizer early"),
    "core path lines (quantizers to sample)": (1040, "the core reads in one sitting"),
    "core path lines with code or docstring": (910, "the same, blank lines aside"),
    "qgpt.py lines": (1850, "one file a reader can hold; plumbing last"),
    "lines over 100 characters": (0, "a rule: wrap the line"),
    "recipe-name comparisons": (0, "a rule: each recipe class knows its own math"),
    "README.md bytes": (20_000, "a first reader's page; the rest has its own pages"),
}


def measure(root=HERE):
    """The numbers the budgets hold: {name: value}."""
    lines = {name: open(os.path.join(root, name)).read().splitlines()
             for name in ("qgpt.py", "kernels.py", "prepare_data.py")}
    q = lines["qgpt.py"]
    start = next(i for i, line in enumerate(q) if line.startswith("# Quantization primitives"))
    end = next(i for i, line in enumerate(q) if line.startswith("# Diagnostics"))
    core = q[start:end - 1]
    recipe_names = re.compile(r'(==|!=) *"(paper|int8)"|"(paper|int8)" *(==|!=)')
    return {
        "line of def quantize": next(i for i, line in enumerate(q, 1)
                                     if line.startswith("def quantize(")),
        "core path lines (quantizers to sample)": len(core),
        "core path lines with code or docstring": sum(bool(line.strip()) for line in core),
        "qgpt.py lines": len(q),
        "lines over 100 characters": sum(len(line) > 100 for ls in lines.values() for line in ls),
        "recipe-name comparisons": sum(bool(recipe_names.search(line)) for line in q),
        "README.md bytes": os.path.getsize(os.path.join(root, "README.md")),
    }


def main(argv=None):
    values = measure()
    over = []
    for name, value in values.items():
        limit, why = BUDGETS[name]
        print(f"  {name}: {value:,} (budget {limit:,}: {why})")
        if value > limit:
            over.append(f"{name} {value:,} > {limit:,}")
    print("house rules: " + ("OVER: " + "; ".join(over) if over else "all within budget"))
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
