"""`python -m bnntrain.export`: the former name of `python -m bnntrain.tools.export`, which it runs
(with a note) until the next release."""
import runpy
import sys

if __name__ == "__main__":
    print("note: bnntrain.export is now bnntrain.tools.export; the old name goes in the next release", file=sys.stderr)
    runpy.run_module("bnntrain.tools.export", run_name="__main__", alter_sys=True)
