"""Shared UI for every page, one concept per module:

- `fields`: the sidebar's fields, their defaults and the values each takes;
- `state`: the session's settings and model as one `Current`, and settings back to sidebar values;
- `links`: the shareable link (query parameters) in and out;
- `sidebar`: the model picker and the settings widgets;
- `page`: what a page file calls first (`page_state`);
- `uploads`: every uploader's rule, checked on the server;
- `training`: the training forms' model, dataset and name choices, checked alike on every page;
- `live`: the live views' metric cursor (only the points written since the last poll);
- `experiment_charts`: the Experiments page's figures (imported from there: they need plotly);
- `display` and `charts`: the headline count and the plot markers.

Pages import from here. Nothing in this package imports torch: everything computed comes from
`lora_core`.
"""

from __future__ import annotations

from lora_core.embedded import EMBEDDED_CONFIG, config_name
from pages.common.charts import add_markers, hline, vband, vline
from pages.common.display import human, role_breakdown, show_count
from pages.common.fields import CUSTOM, DEFAULT_MODEL, DROPOUT_MAX, R_MAX, SIDEBAR_DEFAULTS, field_problem
from pages.common.links import LINK_KEYS, load_link, write_link
from pages.common.live import follow_metrics
from pages.common.page import page_state
from pages.common.resources import rank_sweep_device, run_manager, simulation_device
from pages.common.sidebar import render_sidebar
from pages.common.state import (
    Current,
    apply_settings,
    current,
    init_state,
    request_apply,
    settings_from_state,
    sidebar_changes,
    sidebar_strategy,
    strategy_of,
    targets_text,
)
from pages.common.training import (
    DATA_SOURCES,
    HUB,
    MODEL_SOURCES,
    UPLOAD,
    chosen_dataset,
    dataset_fields,
    run_name,
    store_upload,
    training_model,
    training_settings,
)
from pages.common.uploads import (
    IMPORT_MAX_BYTES,
    UPLOADS,
    Upload,
    UploadError,
    UploadRule,
    check_upload,
    display_name,
    file_upload,
    read_upload,
)

__all__ = [
    "CUSTOM",
    "DATA_SOURCES",
    "DEFAULT_MODEL",
    "DROPOUT_MAX",
    "EMBEDDED_CONFIG",
    "HUB",
    "IMPORT_MAX_BYTES",
    "LINK_KEYS",
    "MODEL_SOURCES",
    "R_MAX",
    "SIDEBAR_DEFAULTS",
    "UPLOAD",
    "UPLOADS",
    "Current",
    "Upload",
    "UploadError",
    "UploadRule",
    "add_markers",
    "apply_settings",
    "check_upload",
    "chosen_dataset",
    "config_name",
    "current",
    "dataset_fields",
    "display_name",
    "field_problem",
    "file_upload",
    "follow_metrics",
    "hline",
    "human",
    "init_state",
    "load_link",
    "page_state",
    "rank_sweep_device",
    "read_upload",
    "render_sidebar",
    "request_apply",
    "role_breakdown",
    "run_manager",
    "run_name",
    "settings_from_state",
    "show_count",
    "sidebar_changes",
    "sidebar_strategy",
    "simulation_device",
    "store_upload",
    "strategy_of",
    "targets_text",
    "training_model",
    "training_settings",
    "vband",
    "vline",
    "write_link",
]
