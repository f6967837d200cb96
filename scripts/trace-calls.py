"""How far a command's data travels through kphi's files: run one command in-process under a profiler and count
the kphi files it enters and the distinct caller -> callee edges that cross from one file to another (each edge
once, however often a loop takes it).

    python scripts/trace-calls.py [SRC] [--edges] -- compare --suite smoke --quiet --out /tmp/walk

SRC (default: src) is the directory that holds the kphi package to trace, so two checkouts can be compared.
"""
import collections
import os
import sys
import tempfile


def trace(src: str, argv: list[str]) -> tuple[int, set[str], set[tuple[str, str, str, str]]]:
    sys.path.insert(0, os.path.abspath(src))
    root = os.path.join(os.path.abspath(src), "kphi")
    files, edges = set(), set()

    def profile(frame, event, arg):
        callee = frame.f_code.co_filename
        if event != "call" or not callee.startswith(root):
            return
        files.add(os.path.relpath(callee, root))
        caller = frame.f_back
        while caller is not None and not caller.f_code.co_filename.startswith(root):
            caller = caller.f_back  # through the libraries between two kphi frames (Trainer, transformers)
        if caller is not None and caller.f_code.co_filename != callee:
            edges.add((os.path.relpath(caller.f_code.co_filename, root), caller.f_code.co_name,
                       os.path.relpath(callee, root), frame.f_code.co_name))

    import kphi.cli

    sys.setprofile(profile)
    try:
        status = kphi.cli.main(argv)
    finally:
        sys.setprofile(None)
    return status, files, edges


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--" not in args:
        sys.exit(__doc__)
    ours, command = args[: args.index("--")], args[args.index("--") + 1 :]
    show_edges = "--edges" in ours
    ours = [a for a in ours if a != "--edges"]
    status, files, edges = trace(ours[0] if ours else "src", command or ["compare", "--suite", "smoke", "--quiet",
                                                                       "--out", tempfile.mkdtemp()])
    entered = collections.Counter(callee for _, _, callee, _ in edges)
    print(f"exit status {status}: {len(files)} kphi files entered, {len(edges)} distinct cross-file call edges")
    print("most entered:", ", ".join(f"{f} {n}" for f, n in entered.most_common(5)))
    if show_edges:
        print("\n".join(" ".join(edge) for edge in sorted(edges)))
