"""The run machinery: the command line (cli.py), each stage's config (config.py) and its
checks (checks.py), the pipeline of stages (pipeline.py), run folders and their locks
(folders.py), and what a run folder says, read as data (untrusted.py)."""
