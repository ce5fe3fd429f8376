"""``deepmosaic workflow run|validate FILE.yaml``: the CLI of workflow files (hooked into ``cli.py``)."""
from __future__ import annotations

import os
import signal


def cmd_workflow_validate(a) -> int:
    from .nightly import plan_workflow
    from .spec import load_workflow
    wf = load_workflow(a.file)
    print(wf.describe())
    plans = plan_workflow(wf)
    print("  would do:" if plans else "  no inputs match")
    for p in plans:
        why = p.get("reason") or p.get("error") or ""
        print(f"    {p['action']:<11} {os.path.basename(p['input'])}{f'  ({why})' if why else ''}")
    print("valid")
    return 0


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def cmd_workflow_run(a) -> int:
    from .nightly import run_workflow
    from .spec import load_workflow
    wf = load_workflow(a.file)
    previous = signal.signal(signal.SIGTERM, _terminate)  # cron/batch time limits: stop like Ctrl-C
    try:
        result = run_workflow(wf)
    except KeyboardInterrupt:
        print(f"interrupted; the run index {wf.index_path} says where each input stopped. Run the same "
              f"command again to resume tile by tile.")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(result.summary())
    return 1 if result.failed else 0


def add_parser(sub):
    """Add ``workflow run`` and ``workflow validate`` to the CLI's subcommands."""
    w = sub.add_parser("workflow", help="run or check a workflow file (inputs, stages, cluster, output): "
                                        "nightly reprocessing, Slurm/SGE, GPU workers")
    wsub = w.add_subparsers(dest="workflow_command", required=True)
    r = wsub.add_parser("run", help="process every input that is not up to date; writes OUTPUT/index.json")
    r.add_argument("file", help="workflow YAML (see the shipped examples in deepmosaic/workflows/*.yaml)")
    r.set_defaults(fn=cmd_workflow_run)
    v = wsub.add_parser("validate", help="check a workflow file and say what a run would do (computes nothing)")
    v.add_argument("file")
    v.set_defaults(fn=cmd_workflow_validate)
    return w
