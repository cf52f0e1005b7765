"""`python -m bnntrain.summary`: the former name of `python -m bnntrain.tools.summary`, which it runs
(with a note) until the next release."""
import runpy
import sys

if __name__ == "__main__":
    print("note: bnntrain.summary is now bnntrain.tools.summary; the old name goes in the next release", file=sys.stderr)
    runpy.run_module("bnntrain.tools.summary", run_name="__main__", alter_sys=True)
