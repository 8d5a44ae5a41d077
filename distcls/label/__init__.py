"""`distcls label` at bucket scale: what a job lists (manifest.py), the paths it may read (confine.py), the plan
(plan.py), the output's parts (parts.py), the job (job.py)."""

from distcls.label.job import label_status, run_labeling
from distcls.label.parts import done_paths, existing_parts, output_schema, read_labels

__all__ = ["done_paths", "existing_parts", "label_status", "output_schema", "read_labels", "run_labeling"]
