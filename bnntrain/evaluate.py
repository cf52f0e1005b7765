"""`python -m bnntrain.evaluate`: the former name of `python -m bnntrain.tools.evaluate`, which it runs
(with a note) until the next release."""
import runpy
import sys

if __name__ == "__main__":
    print("note: bnntrain.evaluate is now bnntrain.tools.evaluate; the old name goes in the next release", file=sys.stderr)
    runpy.run_module("bnntrain.tools.evaluate", run_name="__main__", alter_sys=True)
