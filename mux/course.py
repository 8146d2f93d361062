"""``python -m mux.course``: the old command name of ``python -m mux.runner.course`` (issue 20 and older notes use it).

Only run as a script does it load the run machinery, so the teaching library still imports nothing of it.
"""
if __name__ == "__main__":
    import runpy

    runpy.run_module("mux.runner.course", run_name="__main__", alter_sys=True)
