"""Helpers shared by the benchmark scripts, in one place (no script imports another).

Scripts live in ``benchmarks/<perf|accuracy|paper|studies>/`` and put ``benchmarks/`` on
``sys.path`` to import this package; ``benchmarks/README.md`` indexes them.

* :mod:`.results`: ``RESULTS`` (``benchmarks/results`` or ``$HYDRATTR_BENCH_RESULTS``),
  ``bench_parser`` (the options the perf and accuracy scripts share), ``save_results``,
  ``publish``, ``run_record``, ``load_result``, ``atomic_write``, ``tagged``, and the
  run loop of the cleaning benchmarks: ``start_run``, ``run_settings``, ``default_tag``,
  ``markdown_head``;
* :mod:`.data`: ``resolve_data_dir`` (``--data-dir`` or ``$HYDRATTR_DATA``, a clear stop
  when missing), ``load_split``, ``peers_data``, ``add_data_arg``, ``add_run_args``,
  ``parse_settings``;
* :mod:`.nets`: ``paper_lenet``, ``step_schedule``, ``mnist_lenet``, ``cleaning_net`` (Tables 3/4),
  ``fit_net``, ``accuracy``, ``peer_net`` / ``PEER_MODELS``, ``test_losses``;
* :mod:`.noise`: ``noisy_setting``, ``retrain_seeds``, ``precision_recall``,
  ``hybrid_scores``;
* :mod:`.baselines`: the cleanlab baseline, ``oof_probs``, ``cleanlab_select``,
  ``cleanlab_removed``;
* :mod:`.memory`: ``peak_rss_gib``, ``PeakMemory``, ``release_memory``;
* :mod:`.presets`: ``PRESETS``, ``add_setting_args``, ``apply_preset``;
* :mod:`.detection`: Table 4's row evaluation, markdown and ensemble member files.
"""
from .baselines import cleanlab_removed, cleanlab_select, oof_probs
from .data import (WORK, add_data_arg, add_run_args, load_split, parse_settings, peers_data,
                   resolve_data_dir)
from .detection import (TABLE4_PAPER, ensemble_part_path, evaluate, evaluate_splits,
                        member_seed, table4_markdown)
from .memory import PeakMemory, peak_rss_gib, release_memory
from .nets import (PEER_MODELS, accuracy, cleaning_net, fit_net, mnist_lenet, paper_lenet,
                   peer_net, step_schedule, test_losses)
from .noise import hybrid_scores, noisy_setting, precision_recall, retrain_seeds
from .presets import PRESETS, add_setting_args, apply_preset
from .results import (BENCH, RESULTS, atomic_write, bench_parser, default_tag, load_result,
                      markdown_head, publish, run_record, run_settings, save_results,
                      start_run, tagged)

__all__ = [name for name in dir() if not name.startswith("_")]
