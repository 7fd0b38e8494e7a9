"""Harness tasks the paper's table needs that lm_eval 0.4.13 does not ship, written as task YAMLs into a
folder that `twotower eval --paper` adds to the task search path (before the user's --include-path
folders, so that a stand-in of the same name replaces them).

- `mbpp_sanitized`: the harness's `mbpp` task (prompt, 3 fixed shots, `[DONE]` stop, pass@1 by
  executing the tests) on the data set's `sanitized` configuration (427 hand-checked problems; 257
  in the test split). The sanitized rows name their problem text `prompt` (the full set's shots keep
  `text`), and some of their tests need the imports listed in `test_imports`, which are put before
  the asserts.
- `arc_challenge_chat_25shot`: the harness's `arc_challenge_chat` (the answer generated, "The best
  answer is X") with 25 shots as the paper's ARC row. The harness pins that task at 0 shots, and a
  task that pins 0 ignores the harness's `num_fewshot`, so the shot count needs a task of its own.

Each YAML includes the harness's own mbpp.yaml by absolute path, so it is written at run time.
"""

from __future__ import annotations

import json
from pathlib import Path

MBPP_SANITIZED = "mbpp_sanitized"
ARC_CHAT_25 = "arc_challenge_chat_25shot"

# Jinja templates; `prompt if prompt is defined else text` lets the full set's fixed shots render too.
_MBPP_TEXT = (
    "You are an expert Python programmer, and here is your task: {{prompt if prompt is defined else text}} "
    "Your code should pass these tests:\n\n{{test_list[0]}}\n{{test_list[1]}}\n{{test_list[2]}}\n[BEGIN]\n"
)
_MBPP_TARGET = (
    "{% if is_fewshot is defined %}{{code}}\n[DONE]"
    "{% else %}{% for line in test_imports %}{{line}}\n{% endfor %}{{test_list | join('\n')}}{% endif %}"
)


def harness_task_dir() -> Path:
    """The folder of the installed harness's own task YAMLs."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def _task_yaml(base: str, fields: dict) -> str:
    """A task YAML that includes the harness's `base` YAML by absolute path and overrides `fields`
    (written as JSON, which is YAML, so the template strings stay exactly as written)."""
    include = harness_task_dir() / base
    if not include.is_file():
        raise FileNotFoundError(f"the harness has no {include}: {fields['task']} is built on it")
    header = f"# Written by twotower.evaluation.extra_tasks: the harness's {base} with the paper's settings.\n"
    return header + json.dumps({"include": str(include), **fields}, indent=2) + "\n"


def mbpp_sanitized_yaml() -> str:
    fields = {
        "task": MBPP_SANITIZED,
        "dataset_name": "sanitized",
        "doc_to_text": _MBPP_TEXT,
        "doc_to_target": _MBPP_TARGET,
    }
    return _task_yaml("mbpp/mbpp.yaml", fields)


def arc_challenge_chat_25shot_yaml() -> str:
    return _task_yaml("arc/arc_challenge_chat.yaml", {"task": ARC_CHAT_25, "tag": [], "num_fewshot": 25})


EXTRA_TASKS = {MBPP_SANITIZED: mbpp_sanitized_yaml, ARC_CHAT_25: arc_challenge_chat_25shot_yaml}


def write_extra_tasks(folder: str | Path) -> Path:
    """Write every extra task's YAML into `folder` (created if needed); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, make in EXTRA_TASKS.items():
        (folder / f"{name}.yaml").write_text(make(), encoding="utf-8")
    return folder
