"""The old import path of `distcls tune`, now distcls/train/tune.py: kept because a search started before the
move names it in Ray Tune's pickled state (tuner.pkl, experiment_state-*.json: the trainable `run_trial` and
the callbacks, by reference), and `--resume --trust-tune-state` must still load that state. New code imports
distcls.train.tune."""

from distcls.train.tune import (
    METRIC,
    SEARCHED,
    TRIAL_DRIVER_CPUS,
    base_train_config,
    best_checkpoint,
    check_search_dir,
    local_cpus,
    manifest_csv,
    plot_trials,
    release_callback,
    results_markdown,
    run_trial,
    run_tune,
    search_space,
    soup_top_trials,
    split_manifests,
    summary_lines,
    trial_rows,
    warn_trusted_state,
    with_absolute_paths,
    write_results,
)

__all__ = [
    "METRIC",
    "SEARCHED",
    "TRIAL_DRIVER_CPUS",
    "base_train_config",
    "best_checkpoint",
    "check_search_dir",
    "local_cpus",
    "manifest_csv",
    "plot_trials",
    "release_callback",
    "results_markdown",
    "run_trial",
    "run_tune",
    "search_space",
    "soup_top_trials",
    "split_manifests",
    "summary_lines",
    "trial_rows",
    "warn_trusted_state",
    "with_absolute_paths",
    "write_results",
]
