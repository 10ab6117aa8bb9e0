"""Projectors side by side: the same recipe for each projector, scored and reported (`llava-kit compare-projectors`).

- `runner.py`   the comparison config, the runs, the measurements (see its docstring for the config keys)
- `results.py`  one row of the comparison
- `report.py`   the table (markdown + CSV) and the plot
"""

from llava_kit.compare.results import SHAPES_CHANCE, ProjectorResult
from llava_kit.compare.runner import (
    LISTED_PROJECTORS,
    CompareConfig,
    EvalSettings,
    compare_projectors,
    format_listing,
    list_projectors,
    load_compare_config,
    parse_grid,
    projector_run_configs,
    stage_configs,
)

__all__ = ["LISTED_PROJECTORS", "SHAPES_CHANCE", "CompareConfig", "EvalSettings", "ProjectorResult",
           "compare_projectors", "format_listing", "list_projectors", "load_compare_config", "parse_grid",
           "projector_run_configs", "stage_configs"]
