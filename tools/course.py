"""
tools/course.py: qgpt for a course. Blank the seams a student implements; check what each seam's tests cover.

    python -m tools.course blank quantizer adam_state --out course/   # a copy with those bodies blanked
    cd course && python -m pytest test_qgpt.py -k "quantizer or adam_state"   # grades them
    python -m tools.course check-seams                                # blank each seam in turn, run the suite

A seam is a function under a `# SEAM: <name>` comment (qgpt.py, kernels.py). Blanking replaces its
body, not its docstring (the contract), with `raise NotImplementedError`. Every test that grades a
seam has the seam's name in its own name, so `pytest -k <name>` selects exactly those (and test_course_blanking_raises[<name>]).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

SEAM_FILES = ["qgpt.py", "kernels.py"]
COURSE_FILES = SEAM_FILES + ["prepare_data.py", "test_qgpt.py", "requirements.txt", "README.md", "tools/__init__.py",
                             "tools/bench.py", "tools/study.py", "tools/course.py", "tools/COURSE.md",
                             "tools/gate.py", "tools/plot.py", "tools/rules.py"]


def copy_project(out):
    """The course's files into out/, keeping the folder layout."""
    for name in COURSE_FILES:
        os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
        shutil.copy(os.path.join(HERE, name), os.path.join(out, name))


def seam_names():
    found = set()
    for name in SEAM_FILES:
        with open(os.path.join(HERE, name)) as f:
            found.update(re.findall(r"^\s*# SEAM: (\w+)$", f.read(), flags=re.M))
    return sorted(found)


def blank_seam(source, name):
    """Replace the body (not the docstring) of each function tagged `# SEAM: name` by a raise."""
    lines, out, i, count = source.splitlines(keepends=True), [], 0, 0
    while i < len(lines):
        out.append(lines[i])
        i += 1
        if lines[i - 1].strip() != f"# SEAM: {name}":
            continue
        while not lines[i].lstrip().startswith("def "):  # decorators between the tag and the def
            out.append(lines[i])
            i += 1
        indent = len(lines[i]) - len(lines[i].lstrip())
        while not re.sub(r"#.*", "", lines[i]).rstrip().endswith(":"):  # a signature over several lines
            out.append(lines[i])
            i += 1
        out.append(lines[i])
        i += 1
        if lines[i].strip().startswith('"""'):  # keep the docstring: it states the contract
            closed = lines[i].count('"""') >= 2
            out.append(lines[i])
            i += 1
            while not closed:
                out.append(lines[i])
                closed = '"""' in lines[i]
                i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            i += 1
        out.append(" " * (indent + 4) + f'raise NotImplementedError("course exercise: implement seam {name!r}")\n\n\n')
        count += 1
    return "".join(out), count


def check_seams():
    """Blank each seam in a copy of the project and report which tests fail."""
    all_ok = True
    for seam in seam_names():
        with tempfile.TemporaryDirectory() as tmp:
            copy_project(tmp)
            for name in SEAM_FILES:
                path = os.path.join(tmp, name)
                with open(path) as f:
                    blanked, _ = blank_seam(f.read(), seam)
                with open(path, "w") as f:
                    f.write(blanked)
            run = subprocess.run([sys.executable, "-m", "pytest", "test_qgpt.py", "-q", "-p", "no:cacheprovider",
                                  "-rfE"], cwd=tmp, capture_output=True, text=True)
        # a test that relies on a broken seam stops in its setup (blame_a_broken_seam): an ERROR
        failed = sorted({line.split("::")[1].split("[")[0].split(" ")[0] for line in run.stdout.splitlines()
                         if line.startswith(("FAILED", "ERROR"))})
        graded = [t for t in failed if seam in t]
        others = [t for t in failed if seam not in t]
        print(f"{seam:24s} {len(graded):3d} of its own tests fail; {len(others)} others fail: {', '.join(others)}")
        all_ok &= bool(graded)
    return 0 if all_ok else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description="Course tooling for qgpt's seams.")
    sub = parser.add_subparsers(dest="command", required=True)
    blank = sub.add_parser("blank", help="copy the project with the named seams blanked")
    blank.add_argument("seams", nargs="+", choices=seam_names())
    blank.add_argument("--out", required=True, help="folder for the copy (created)")
    sub.add_parser("check-seams", help="blank each seam in turn and report which tests fail")
    args = parser.parse_args(argv)
    if args.command == "check-seams":
        return check_seams()
    copy_project(args.out)
    for name in SEAM_FILES:
        path = os.path.join(args.out, name)
        with open(path) as f:
            source = f.read()
        for seam in args.seams:
            source, _ = blank_seam(source, seam)
        with open(path, "w") as f:
            f.write(source)
    print(f"wrote {args.out} with {', '.join(args.seams)} blanked; grade with: cd {args.out} && "
          f"python -m pytest test_qgpt.py -k '{' or '.join(args.seams)}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
