"""`python -m bnntrain.convert`: the former name of `python -m bnntrain.tools.convert`, which it runs
(with a note) until the next release."""
import runpy
import sys

if __name__ == "__main__":
    print("note: bnntrain.convert is now bnntrain.tools.convert; the old name goes in the next release", file=sys.stderr)
    runpy.run_module("bnntrain.tools.convert", run_name="__main__", alter_sys=True)
