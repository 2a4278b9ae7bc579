"""Task suites: the generated built-in tasks (:mod:`.builtin`) and converters from raw benchmark formats
(:mod:`.convert`). Both produce :class:`dlp_lora.data.TaskData` written with :func:`dlp_lora.data.write_task`."""

from .builtin import (BUILTIN_TASKS, TASK_SPECS, generate_task, parse_task_names, task_info,
                      write_builtin_tasks)
from .convert import (CONVERTERS, FORMATS, convert, convert_shared_suite, default_task_name, load_raw,
                      shared_suite_jobs)

__all__ = [
    "BUILTIN_TASKS", "TASK_SPECS", "generate_task", "parse_task_names", "task_info", "write_builtin_tasks",
    "CONVERTERS", "FORMATS", "convert", "convert_shared_suite", "default_task_name", "load_raw",
    "shared_suite_jobs",
]
